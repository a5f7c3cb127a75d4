"""Errors a user can cause. The CLI prints their message as one line and exits 2."""

from pathlib import Path
from typing import Any

import yaml


class UserError(Exception):
    """Bad input from a user: a config, a model that does not fit, an impossible placement,
    a program that deadlocks. The message is one line naming the field, op, PE or color."""


class ProgramError(UserError):
    """A Program that cannot run: out-of-bounds operand, bad route, unknown color..."""


class DeadlockError(UserError):
    """The fabric stopped making progress while work remained."""


def read_user_file(path: str | Path, what: str) -> str:
    """The text of a file the user named; a UserError naming it if it cannot be read."""
    try:
        return Path(path).read_text()
    except OSError as err:
        raise UserError(f"{path}: cannot read {what}: {err.strerror or err}") from None


def read_user_yaml(path: str | Path, what: str) -> Any:
    """The parsed YAML of a file the user named; a UserError naming it (and the line) if it
    cannot be read or parsed."""
    text = read_user_file(path, what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "malformed YAML"
        raise UserError(f"{path}: invalid YAML{where}: {problem}") from None
