"""Errors a user can cause. The CLI prints their message as one line and exits 2."""

from pathlib import Path


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
