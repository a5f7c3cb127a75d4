"""Limits and interrupts through the command line: a deadlocked program and the max-cycles
stop end `simulate` and `run` in exit code 2 and one line naming what stopped them; Ctrl-C
(a real SIGINT) ends them in exit code 130 and one line. Whatever the ending, each output
given (--json, --plot, --tensors), already holding an older run's files here, is either
untouched or complete, never half-written, and no temporary file is left beside it. A
reader of stdout that goes away (`... | head -1`) is no error: the command writes its
files and returns its exit code, with nothing on stderr.

A simulation stopped by the limit or a Ctrl-C prints "stopped at cycle N: ..." and writes
its partial report to --json ("partial": true); plots and tensors need a finished run.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from programs import deadlock_pair, send_east

from wse_sim import outputs, plots
from wse_sim.cli import main
from wse_sim.hardware import WaferConfig
from wse_sim.plots import PLOT_FILES
from wse_sim.program import Program, TensorLayout, TensorSlot, save_program
from wse_sim.progress import CLEAR_TO_END

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "models" / "gpt_tiny.yaml"
OLD_JSON = b'{"old": "a run before this one"}\n'
OLD_TENSORS = b"old tensors"
PNG_END = b"IEND\xaeB`\x82"  # the last chunk of every PNG file
WAIT = 300  # seconds for a phase to begin or a process to end (a loaded 2-core machine)


# -- outputs ----------------------------------------------------------------------------------


def _old_outputs(folder: Path) -> dict[str, Path]:
    """An older run's --json, --plot and --tensors in `folder` (only their bytes matter)."""
    paths = {"json": folder / "out.json", "plot": folder / "plots",
             "tensors": folder / "tensors.npz"}
    paths["json"].write_bytes(OLD_JSON)
    paths["plot"].mkdir()
    for name in PLOT_FILES:
        (paths["plot"] / name).write_bytes(b"old " + name.encode())
    paths["tensors"].write_bytes(OLD_TENSORS)
    return paths


def _contents(paths: dict[str, Path]) -> dict[str, bytes]:
    files = {"json": paths["json"], "tensors": paths["tensors"],
             **{name: paths["plot"] / name for name in PLOT_FILES}}
    return {key: path.read_bytes() for key, path in files.items()}


def _outputs_after(paths: dict[str, Path], before: dict[str, bytes]) -> dict[str, str]:
    """Each output "untouched" or "complete" (asserted: nothing else); the five plots are
    one set, all untouched or all complete."""
    after = _contents(paths)
    state = {}
    for key, data in after.items():
        if data == before[key]:
            state[key] = "untouched"
        elif key == "json":
            report = json.loads(data, parse_constant=pytest.fail)  # whole, strict JSON
            assert isinstance(report, dict) and "cycles" in report
            state[key] = "complete"
        elif key == "tensors":
            with np.load(paths["tensors"]) as z:
                assert z.files
            state[key] = "complete"
        else:
            assert data.startswith(b"\x89PNG") and data.endswith(PNG_END), key
            state[key] = "complete"
    assert len({state[name] for name in PLOT_FILES}) == 1, f"a mix of plots: {state}"
    state["plot"] = state[PLOT_FILES[0]]
    leftovers = [p.name for p in paths["json"].parent.rglob(".*")]  # .NAME.pid.k.tmp/.old
    assert not leftovers, leftovers
    return {key: state[key] for key in ("json", "plot", "tensors")}


def _line(stderr: str) -> str:
    """The one line on stderr (the progress line a terminal shows, each of its drawings
    ending in CLEAR_TO_END, is not counted)."""
    assert "Traceback" not in stderr, stderr
    lines = [seg for line in stderr.replace("\r\n", "\n").split("\n")
             for seg in line.split("\r") if seg.strip() and not seg.endswith(CLEAR_TO_END)]
    assert len(lines) == 1, stderr
    return lines[0]


def _program(folder: Path, program: Program, wafer: WaferConfig) -> str:
    """`program` saved with one named tensor (so --tensors may be given)."""
    program.tensors["x"] = TensorLayout((1, 1), [TensorSlot(0, 0, 0, (0, 1), (0, 1), 1)])
    path = folder / "program.npz"
    save_program(program, path, wafer)
    return str(path)


def _cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wse_sim", *argv], capture_output=True,
                          text=True, cwd=cwd, timeout=WAIT)


# -- deadlock and the cycle limit -------------------------------------------------------------


def test_a_deadlock_is_one_line_naming_pe_and_color(tmp_path):
    program = _program(tmp_path, deadlock_pair(), WaferConfig(width=16, height=16))
    paths = _old_outputs(tmp_path)
    before = _contents(paths)
    run = _cli("simulate", program, "--json", str(paths["json"]), "--plot",
               str(paths["plot"]), "--tensors", str(paths["tensors"]), cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    line = _line(run.stderr)
    assert line.startswith("error: deadlock at cycle 1 (the fabric is stuck) | waiting: ")
    assert "PE (0, 0) task 0 pc 0 MOV waits: FABIN color 3 empty" in line
    assert "PE (1, 0) task 0 pc 0 MOV waits: FABIN color 4 empty" in line
    assert _outputs_after(paths, before) == dict.fromkeys(("json", "plot", "tensors"),
                                                          "untouched")
    assert run.stdout == ""


@pytest.mark.parametrize("command", ["simulate", "run"])
def test_the_cycle_limit_is_one_line_and_exit_2(command, tmp_path):
    if command == "simulate":
        argv = [_program(tmp_path, send_east(100, 3), WaferConfig(width=16, height=16))]
        limit = 10
    else:
        argv, limit = [str(TINY)], 2000
    paths = _old_outputs(tmp_path)
    before = _contents(paths)
    extra = ["--tensors", str(paths["tensors"])] if command == "simulate" else []
    run = _cli(command, *argv, "--max-cycles", str(limit), "--json", str(paths["json"]),
               "--plot", str(paths["plot"]), *extra, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    line = _line(run.stderr)
    assert line.startswith("stopped at cycle ") and f"reached max_cycles={limit};" in line, line
    assert "PEs still running a task" in line, line
    state = _outputs_after(paths, before)
    assert state["plot"] == "untouched"  # a stopped run has no plots
    assert state["json"] == "complete"
    assert json.loads(paths["json"].read_text())["partial"] is True
    assert state["tensors"] == "untouched"


# -- Ctrl-C in a real process -----------------------------------------------------------------


class _Run:
    """`python -m wse_sim ARGV` with stderr on a terminal (so the simulation draws its
    progress line) and stdout in a file."""

    def __init__(self, argv: list[str], folder: Path) -> None:
        primary, secondary = pty.openpty()
        self.stdout = open(folder / "stdout.txt", "wb")  # noqa: SIM115 (closed in wait)
        self.proc = subprocess.Popen([sys.executable, "-m", "wse_sim", *argv],
                                     stdout=self.stdout, stderr=secondary, cwd=folder)
        os.close(secondary)
        self.stderr = b""
        self._primary = primary
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._primary, 4096)
            except OSError:  # the process closed its terminal
                return
            if not chunk:
                return
            self.stderr += chunk

    def wait_for(self, what: str, ready) -> None:
        deadline = time.monotonic() + WAIT
        while not ready():
            assert self.proc.poll() is None, f"ended before {what}: {self.stderr!r}"
            assert time.monotonic() < deadline, f"no {what} in {WAIT} s"
            time.sleep(0.01)

    def interrupt(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=WAIT)
        self._reader.join(timeout=10)
        os.close(self._primary)
        self.stdout.close()
        return code, self.stderr.decode()

    def mapped(self, library: str) -> bool:
        return _maps(self.proc.pid, library)


@pytest.mark.parametrize("phase", ["compile", "simulation", "plotting"])
def test_ctrl_c_during_run_leaves_outputs_untouched_or_complete(phase, tmp_path):
    paths = _old_outputs(tmp_path)
    before = _contents(paths)
    json_inode = paths["json"].stat().st_ino
    run = _Run(["run", str(TINY), "--json", str(paths["json"]), "--plot", str(paths["plot"])],
               tmp_path)
    if phase == "compile":
        # numba (llvmlite) is loaded with the simulator, just before the compiler runs
        # (gpt_tiny: about 0.35 s); stopped before the simulation drew its progress line
        # (checked below)
        run.wait_for("llvmlite", lambda: run.mapped("llvmlite"))
        time.sleep(0.1)
    elif phase == "simulation":
        run.wait_for("the progress line", lambda: b"simulating:" in run.stderr)
    else:  # the JSON is written (renamed into place) before the plots are drawn
        run.wait_for("the new JSON", lambda: paths["json"].stat().st_ino != json_inode)
    code, stderr = run.interrupt()
    if phase == "plotting" and code == 0:
        # the plots take ~2.5 s after the JSON; on a loaded machine the signal can come
        # after the run ended: then every output is whole, and the path was not exercised
        assert _outputs_after(paths, before) == dict.fromkeys(("json", "plot"), "complete") | {
            "tensors": "untouched"}, stderr
        pytest.skip("the run ended before Ctrl-C reached its plotting")
    assert code == 130, stderr
    line = _line(stderr)
    state = _outputs_after(paths, before)
    if phase == "compile":
        assert "simulating:" not in stderr
    if phase == "plotting":
        assert state["json"] == "complete"
        assert line.startswith(f"interrupted: wrote only {paths['json']}"), line
    elif phase == "simulation":  # the partial report of the cycles that ran
        assert line.startswith("stopped at cycle ") and "interrupted (Ctrl-C)" in line, line
        assert state == {"json": "complete", "plot": "untouched", "tensors": "untouched"}
        assert json.loads(paths["json"].read_text())["partial"] is True
    else:
        assert line == "interrupted: no file written"
        assert state == {"json": "untouched", "plot": "untouched", "tensors": "untouched"}


def _group(group: int) -> list[int]:
    """The processes of a process group."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == group:
                    members.append(int(entry.name))
            except ProcessLookupError:
                pass
    return members


def _ignores_sigint(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # it has ended (the caller asserts it has not)
        return True
    ignored = int(status.split("SigIgn:")[1].split()[0], 16)  # bit n - 1: signal n
    return bool(ignored >> (signal.SIGINT - 1) & 1)


def _maps(pid: int, library: str) -> bool:
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:  # it has ended
        return False


def test_ctrl_c_during_a_sweep_stops_it_and_its_workers_quietly(tmp_path):
    """A terminal's Ctrl-C goes to the sweep and to every worker process it started: one
    line and exit 130, no worker's traceback or log, no result file."""
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"configs: [{TINY}]\nplacements: [linear, snake]\n")
    proc = subprocess.Popen([sys.executable, "-m", "wse_sim", "sweep", str(grid), "--out",
                             str(tmp_path / "out"), "--workers", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own group, as a terminal's job
    deadline = time.monotonic() + WAIT
    # The cluster is up: a worker has loaded numba (llvmlite), and the sweep no longer
    # ignores SIGINT as it does while the workers start.
    while not (any(_maps(pid, "llvmlite") for pid in _group(proc.pid) if pid != proc.pid)
               and not _ignores_sigint(proc.pid)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=WAIT)
    assert proc.returncode == 130, stderr
    assert _line(stderr) == "interrupted: no file written"
    assert not (tmp_path / "out").exists()


# -- Ctrl-C at exact points, in this process ---------------------------------------------------


def _sigint_then(function):
    """`function` preceded by a real SIGINT to this process (raised as KeyboardInterrupt at
    Python's next check, or held back by wse_sim.outputs while it renames)."""
    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return function(*args, **kwargs)
    return interrupted


def _first_plot_rename(real):
    def replace(src, dst):
        if str(dst).endswith(PLOT_FILES[0]) and str(src).endswith(".tmp"):
            os.kill(os.getpid(), signal.SIGINT)
        return real(src, dst)
    return replace


POINTS = {
    # point: (patch(monkeypatch), expected json, plot, tensors)
    "simulating": (lambda mp: mp.setattr("wse_sim.progress.Progress.__call__",
                                         _sigint_then(lambda self, cycle: None)),
                   "complete", "untouched", "untouched"),  # the partial report
    "writing the tensors": (lambda mp: mp.setattr(outputs.os, "fsync",
                                                  _sigint_then(os.fsync)),
                            "untouched", "untouched", "untouched"),
    "drawing the plots": (lambda mp: mp.setitem(plots._DRAW, "sram",
                                                _sigint_then(plots._DRAW["sram"])),
                          "complete", "untouched", "complete"),
    "renaming the plots": (lambda mp: mp.setattr(outputs.os, "replace",
                                                 _first_plot_rename(os.replace)),
                           "complete", "complete", "complete"),
}


@pytest.mark.parametrize("point", POINTS)
def test_ctrl_c_at_each_point_of_simulate(point, tmp_path, monkeypatch, capsys):
    program = _program(tmp_path, send_east(3000, 3), WaferConfig(width=16, height=16))
    paths = _old_outputs(tmp_path)
    before = _contents(paths)
    patch, *expected = POINTS[point]
    patch(monkeypatch)
    code = main(["simulate", program, "--json", str(paths["json"]), "--plot",
                 str(paths["plot"]), "--tensors", str(paths["tensors"])])
    monkeypatch.undo()
    assert code == 130
    line = _line(capsys.readouterr().err)
    state = _outputs_after(paths, before)
    assert [state[key] for key in ("json", "plot", "tensors")] == expected
    if point == "simulating":  # stopped at a cycle boundary: its own line
        assert line.startswith("stopped at cycle ") and "interrupted (Ctrl-C)" in line, line
        assert json.loads(paths["json"].read_text())["partial"] is True
        return
    written = [str(paths[key]) for key in ("tensors", "json") if state[key] == "complete"]
    written += [str(paths["plot"] / name) for name in PLOT_FILES if state["plot"] == "complete"]
    assert line == (f"interrupted: wrote only {', '.join(written)}" if written
                    else "interrupted: no file written")


# -- a reader that goes away ------------------------------------------------------------------


def _with_stdout_closed(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m wse_sim ARGV` writing to a pipe whose reader has already gone (as after
    `| head -1`): every write to stdout fails with EPIPE."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        return subprocess.run([sys.executable, "-m", "wse_sim", *argv], stdout=writer,
                              stderr=subprocess.PIPE, text=True, cwd=cwd, timeout=WAIT)
    finally:
        os.close(writer)


@pytest.mark.parametrize("argv", [["schema"], ["graph", str(TINY)],
                                  ["traffic", "--mesh", "4x4", "--rate", "0.1", "--cycles",
                                   "200"]], ids=["schema", "graph", "traffic"])
def test_a_closed_stdout_is_no_error(argv, tmp_path):
    run = _with_stdout_closed(*argv, cwd=tmp_path)
    assert (run.returncode, run.stderr) == (0, "")


def test_a_closed_stdout_does_not_stop_the_outputs(tmp_path):
    program = _program(tmp_path, send_east(100, 3), WaferConfig(width=16, height=16))
    paths = _old_outputs(tmp_path)
    before = _contents(paths)
    run = _with_stdout_closed("simulate", program, "--json", str(paths["json"]), "--tensors",
                              str(paths["tensors"]), cwd=tmp_path)
    assert (run.returncode, run.stderr) == (0, "")
    state = _outputs_after(paths, before)
    assert state == {"json": "complete", "plot": "untouched", "tensors": "complete"}
