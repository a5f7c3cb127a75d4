"""Output files (wse_sim.outputs): written whole with the mode open() would give, through
symbolic links, and as sets all or nothing, even when interrupted. (The bad paths the
commands refuse are in tests/test_bad_input.py.)"""

from __future__ import annotations

import math
import os
import signal
import stat
from pathlib import Path

import pytest
from test_plots import synthetic_run

from wse_sim import outputs, plots
from wse_sim.errors import UserError
from wse_sim.outputs import check_outputs, strict_json, write_file, write_files
from wse_sim.plots import PLOT_FILES, write_plots


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_new_file_gets_the_umask_mode_and_a_replaced_file_keeps_its_own(tmp_path):
    old = os.umask(0o027)
    try:
        write_file(tmp_path / "new.json", b"{}")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "new.json") == 0o640  # 0666 less the umask, as open() gives
    kept = tmp_path / "kept.json"
    kept.write_bytes(b"old")
    kept.chmod(0o604)
    write_file(kept, b"new")
    assert (kept.read_bytes(), _mode(kept)) == (b"new", 0o604)


def test_a_symbolic_link_is_written_through(tmp_path):
    target = tmp_path / "real.json"
    target.write_bytes(b"old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    assert write_file(link, b"new") == target
    assert link.is_symlink() and target.read_bytes() == b"new"


def test_missing_folders_are_created_at_write_time_not_by_the_check(tmp_path):
    path = tmp_path / "a" / "b" / "out.json"
    check_outputs(files={"--json": str(path)})
    assert list(tmp_path.iterdir()) == []
    write_file(path, b"{}")
    assert path.read_bytes() == b"{}"


def test_the_content_may_be_written_by_a_function(tmp_path):
    write_file(tmp_path / "x.bin", lambda fh: fh.write(b"abc"))
    assert (tmp_path / "x.bin").read_bytes() == b"abc"


def test_an_interrupted_drawing_leaves_the_old_plots(tmp_path, monkeypatch):
    run = synthetic_run(8, 8, [(0, 0, 4, 4)])
    write_plots(run, tmp_path)
    before = _listing(tmp_path)

    def interrupted(fig, data):
        raise KeyboardInterrupt

    monkeypatch.setitem(plots._DRAW, "sram", interrupted)  # the fourth of five pictures
    with pytest.raises(KeyboardInterrupt):
        write_plots(synthetic_run(8, 8, [(2, 2, 6, 6)]), tmp_path)
    assert _listing(tmp_path) == before


def test_a_failed_rename_puts_the_set_back(tmp_path, monkeypatch):
    old = {tmp_path / name: b"old " + name.encode() for name in PLOT_FILES[:3]}
    for path, data in old.items():
        path.write_bytes(data)
    new = {**{path: b"new" for path in old}, **{tmp_path / name: b"new" for name in PLOT_FILES[3:]}}
    real_replace, renamed = os.replace, []

    def failing_replace(src, dst):
        if str(src).endswith(".tmp"):
            renamed.append(dst)
            if len(renamed) == 4:  # the fourth new file: three are in place already
                raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", failing_replace)
    with pytest.raises(UserError, match="cannot write: No space left on device"):
        write_files(new)
    assert _listing(tmp_path) == {path.name: data for path, data in old.items()}


def test_a_ctrl_c_during_the_renames_lands_after_the_last(tmp_path, monkeypatch):
    real_replace = os.replace

    def interrupt_then_replace(src, dst):
        os.kill(os.getpid(), signal.SIGINT)  # held back until the set is in place
        real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", interrupt_then_replace)
    files = {tmp_path / name: name.encode() for name in PLOT_FILES}
    with pytest.raises(KeyboardInterrupt):
        write_files(files)
    assert _listing(tmp_path) == {path.name: data for path, data in files.items()}


def test_strict_json_refuses_what_json_cannot_hold():
    assert strict_json({"a": None, "b": 1.5}) == '{"a": null, "b": 1.5}'
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError):
            strict_json({"x": value})
