"""What a user writes, read strictly: one place for the rules every config and input file
follows, so a bad file ends in one line naming it (`wse_sim.errors.UserError`).

* Files are UTF-8, strictly: a bad byte is an error naming the file and its offset, never
  a UnicodeDecodeError and never silently replaced (`read_user_file`).
* An input is a regular file: a FIFO or a device (/dev/zero) is refused in one line before
  anything waits on it or reads it (`open_user_file`, `check_user_file`).
* YAML numbers follow YAML 1.2 for floats: PyYAML implements YAML 1.1, where `1e-8` (no
  dot) and `1.0e8` (unsigned exponent) are strings, so a config field would see a string
  where the user wrote a number (`load_yaml`). A quoted "1e-8" stays a string.
* Numbers in user-written pydantic models are strict (`ConfigDict(strict=True)`: no float,
  bool or string becomes an int, no bool becomes a float) and floats are finite
  (`FiniteFloat`: `.inf` and `.nan` are refused where they would otherwise pass a bound
  like `gt=0`); a float the simulated PEs compute with is a normal float32 (`Fp32`), so
  an `lr: 1e-50` does not become 0 on the wafer nor an `init_std: 1e200` infinity.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import yaml
from pydantic import AfterValidator, AllowInfNan

from wse_sim.errors import UserError

# A float field: finite; under a strict model an int is accepted (exact), a bool is not.
FiniteFloat = Annotated[float, AllowInfNan(False)]
_FP32_TINY, _FP32_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)


def _in_fp32(value: float) -> float:
    if value != 0 and not _FP32_TINY <= abs(value) <= _FP32_MAX:
        raise ValueError(f"{value:g} is not a normal float32 (the wafer computes in float32: "
                         f"magnitudes {_FP32_TINY:.3g} to {_FP32_MAX:.3g})")
    return value


# A float the simulated PEs compute with: it must survive the conversion to float32.
Fp32 = Annotated[FiniteFloat, AfterValidator(_in_fp32)]

_FLOAT_TAG = "tag:yaml.org,2002:float"
# The YAML 1.2 floats with an exponent that YAML 1.1's pattern misses (PyYAML's own
# pattern still resolves the rest: 0.5, .inf, 1.0e-8).
_EXPONENT_FLOAT = re.compile(r"^[-+]?([0-9][0-9_]*(\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2's exponent floats. The resolver table is copied: PyYAML's
    add_implicit_resolver would otherwise append to lists shared with SafeLoader."""

    yaml_implicit_resolvers = {first: list(resolvers) for first, resolvers
                               in yaml.SafeLoader.yaml_implicit_resolvers.items()}


_Loader.add_implicit_resolver(_FLOAT_TAG, _EXPONENT_FLOAT, list("-+0123456789."))


def open_user_file(path: str | Path, what: str) -> int:
    """A file descriptor of the regular file `path`, open for reading; a UserError naming
    it if it cannot be opened or is a folder, FIFO or device. Nothing blocks or reads
    first: opening a FIFO would wait for a writer, and reading /dev/zero never ends."""
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:  # missing, no permission, a socket (ENXIO)
        raise UserError(f"{path}: cannot read {what}: {err.strerror or err}") from None
    mode = os.fstat(handle).st_mode
    if not stat.S_ISREG(mode):
        os.close(handle)
        kind = ("Is a directory" if stat.S_ISDIR(mode) else "is a FIFO, not a regular file"
                if stat.S_ISFIFO(mode) else "is a device, not a regular file")
        raise UserError(f"{path}: cannot read {what}: {kind}")
    return handle


def check_user_file(path: str | Path, what: str) -> None:
    """`open_user_file` for a file that another library will read (a program's .npz)."""
    os.close(open_user_file(path, what))


def read_user_file(path: str | Path, what: str) -> str:
    """The text of a file the user named, decoded as UTF-8; a UserError naming the file
    if it cannot be read (`open_user_file`), or naming the first bad byte and its offset
    if it is not UTF-8."""
    try:
        with os.fdopen(open_user_file(path, what), "rb") as fh:
            raw = fh.read()
    except OSError as err:  # an I/O error while reading
        raise UserError(f"{path}: cannot read {what}: {err.strerror or err}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text: byte 0x{raw[err.start]:02x} at offset "
                        f"{err.start} ({err.reason})") from None


def read_user_yaml(path: str | Path, what: str) -> Any:
    """A YAML file the user named, read and parsed (`read_user_file`, `load_yaml`)."""
    return load_yaml(read_user_file(path, what), str(path))


def load_yaml(text: str, source: str) -> Any:
    """`text` parsed as YAML (safe types, YAML 1.2 floats); a one-line UserError naming
    `source` and the line and column of a syntax error."""
    try:
        return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "malformed YAML"
        raise UserError(f"{source}: invalid YAML{where}: {problem}") from None
    except RecursionError:
        raise UserError(f"{source}: invalid YAML: nested too deeply") from None
