"""Errors a user can cause. The CLI prints their message as one line and exits 2."""


class UserError(Exception):
    """Bad input from a user: a config, a model that does not fit, an impossible placement,
    a program that deadlocks. The message is one line naming the field, op, PE or color."""


class ProgramError(UserError):
    """A Program that cannot run: out-of-bounds operand, bad route, unknown color..."""


class DeadlockError(UserError):
    """The fabric stopped making progress while work remained."""

