"""Files the product writes: checked before the work, written whole, sets all or nothing.

* `check_outputs` runs before any compiling or simulating, so a bad --json, --plot, --out,
  -o or --tensors ends in one line (exit 2) at once, not after the run. A file's folder
  must exist or be creatable, and be writable: that is tested by creating a file there
  (`_probe`), because permission bits do not tell (root passes every access() test, yet
  cannot create files in /sys). The file must not be a folder or a special file (FIFO,
  device, socket); an existing file must be writable as open() would judge it. No two
  outputs may be the same file, and no output may be one of the command's inputs. A
  symbolic link is followed: its target is written and the link stays a link.
* `write_files` writes each file to a temporary name beside it, then renames them all
  into place with SIGINT, SIGTERM and SIGHUP held back until the last rename; if a rename
  fails anyway, the set's files already replaced are put back. A reader sees the old file
  or the new one, never half of one, and a set (the five plots) is never a mix of two
  runs. (Within a set, a file is absent for the instant between moving the old one aside
  and renaming the new one in.) A new file gets the mode open() gives it (0666 less the
  umask), a replaced file keeps its mode.
* `strict_json`: JSON without NaN or Infinity. A quantity that cannot be computed is
  written as null by its producer, with the reason beside it; a non-finite float reaching
  here is a bug of ours and raises.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from wse_sim.errors import UserError

# A file's content: its bytes, or a function that writes them into an open binary file.
Content = bytes | Callable[[BinaryIO], object]
_HELD = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
_names = itertools.count()  # temporary names: unique within the process, pid across
_TMPFILE = getattr(os, "O_TMPFILE", None)  # Linux only
# Every file put in place by write_files, in order (the CLI clears it per command and
# names them when a Ctrl-C ends the command).
written: list[Path] = []


def strict_json(data: Any, indent: int | None = None) -> str:
    """`data` as JSON; ValueError if it holds a NaN or an infinity."""
    return json.dumps(data, indent=indent, allow_nan=False)


def check_outputs(*, files: Mapping[str, str | None] | None = None,
                  folders: Mapping[str, tuple[str | None, Sequence[str]]] | None = None,
                  inputs: Sequence[str] = ()) -> None:
    """UserError naming the option and path of the first output that cannot be written.
    `files`: option -> path (None: not asked for); `folders`: option -> (folder, the names
    of the files to be written in it); `inputs`: the files the command reads."""
    seen = {_target(path): f"the input {path}" for path in inputs}
    targets: list[tuple[str, str, Path]] = []  # (option, where in a message, file)
    for option, path in (files or {}).items():
        if path is not None:
            where = f"{option} {path}"
            target = _target(path)
            _check_folder(target.parent, where)
            _check_file(target, where)
            targets.append((option, where, target))
    for option, (path, names) in (folders or {}).items():
        if path is not None:
            where = f"{option} {path}"
            folder = _target(path)
            if folder.exists() and not folder.is_dir():
                raise UserError(f"{where}: is not a folder")
            _check_folder(folder, where)
            for name in names:
                _check_file(folder / name, f"{where}: {name}")
                targets.append((option, where, folder / name))
    for option, where, target in targets:
        if target in seen:
            raise UserError(f"{where}: the same file as {seen[target]}")
        seen[target] = option


def write_file(path: str | os.PathLike[str], content: Content) -> Path:
    """Write one file atomically (see the module docstring); returns the path written
    (a symbolic link's target)."""
    return write_files({path: content})[0]


def write_files(files: Mapping[str | os.PathLike[str], Content]) -> list[Path]:
    """Write every file of `files` (path -> its content), all or nothing."""
    staged: list[tuple[Path, Path]] = []  # (temporary, target)
    try:
        for path, content in files.items():
            target = _target(path)
            staged.append((_stage(target, content), target))
        _commit(staged)
    finally:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)  # left only if the commit did not happen
    return [target for _, target in staged]


def _target(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(path))


def _check_folder(folder: Path, where: str) -> None:
    """`folder` is a writable folder, or the nearest existing folder above it is (so it
    can be created)."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{where}: {existing} is not a folder")
    try:
        _probe(existing)
    except OSError as err:
        raise UserError(f"{where}: cannot create files in {existing}: {err.strerror}") from None


def _probe(folder: Path) -> None:
    """Create a file in `folder` and remove it; OSError if that cannot be done. A nameless
    O_TMPFILE leaves no trace, not even the folder's mtime; where the file system has no
    O_TMPFILE (sysfs, procfs, other systems), a named file is created and removed."""
    if _TMPFILE is not None:
        try:
            os.close(os.open(folder, _TMPFILE | os.O_WRONLY, 0o600))
            return
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EISDIR):  # EISDIR: an old kernel
                raise
    handle, probe = tempfile.mkstemp(prefix=".wse-sim-probe-", dir=folder)
    os.close(handle)
    os.unlink(probe)


def _check_file(target: Path, where: str) -> None:
    """`target` does not exist, or is a regular file open() could write."""
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as err:  # a loop of symbolic links, a path through a file
        raise UserError(f"{where}: {err.strerror}") from None
    if stat.S_ISDIR(mode):
        raise UserError(f"{where}: is a folder, not a file")
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device")
        raise UserError(f"{where}: is {kind}, not a regular file")
    if not os.access(target, os.W_OK):
        raise UserError(f"{where}: is not writable")


def _stage(target: Path, content: Content) -> Path:
    """`content` in a new temporary file beside `target`, flushed to disk."""
    temporary = target.with_name(f".{target.name}.{os.getpid()}.{next(_names)}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # 0o666 less the umask, as open() would create it
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                         0o666)
    except OSError as err:
        raise UserError(f"{target}: cannot write: {err.strerror}") from None
    try:
        with os.fdopen(handle, "wb") as fh:
            if target.exists():
                os.fchmod(fh.fileno(), stat.S_IMODE(target.stat().st_mode))
            if isinstance(content, bytes):
                fh.write(content)
            else:
                content(fh)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:  # a full disk, a quota
        temporary.unlink(missing_ok=True)
        raise UserError(f"{target}: cannot write: {err.strerror}") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def _commit(staged: list[tuple[Path, Path]]) -> None:
    """Rename each temporary over its target; if one fails, put the set's old files back."""
    done: list[tuple[Path, Path | None]] = []  # (target, where its old file was moved)
    with _signals_held():
        for temporary, target in staged:
            backup = None
            try:
                if len(staged) > 1 and target.exists():  # a set: keep the old file
                    aside = target.with_name(f".{target.name}.{os.getpid()}.old")
                    os.replace(target, aside)
                    backup = aside
                os.replace(temporary, target)
            except OSError as err:
                for new, old in [(target, backup), *reversed(done)]:
                    if old is not None:
                        os.replace(old, new)
                    elif new != target:  # written by this set, with nothing before it
                        new.unlink()
                raise UserError(f"{target}: cannot write: {err.strerror}") from None
            done.append((target, backup))
        for _, backup in done:
            if backup is not None:
                backup.unlink()
        written.extend(target for target, _ in done)  # before a held Ctrl-C is raised


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back: their handlers run when the block ends.
    (Python-level handlers, not the thread's signal mask: numpy's BLAS threads would take
    a masked signal and the main thread would raise KeyboardInterrupt all the same.)"""
    handlers = {signum: signal.getsignal(signum) for signum in _HELD}
    if (threading.current_thread() is not threading.main_thread()
            or None in handlers.values()):  # no Python handler to hold, or not ours to swap
        yield
        return
    caught: list[int] = []
    for signum in handlers:
        signal.signal(signum, lambda number, frame: caught.append(number))
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)
