"""Errors a user can cause. The CLI prints their message as one line and exits 2."""


class UserError(Exception):
    """Bad input from a user: a config, a model that does not fit, an impossible placement,
    a program that deadlocks. The message is one line naming the field, op, PE or color."""


class ProgramError(UserError):
    """A Program that cannot run: out-of-bounds operand, bad route, unknown color..."""


class DeadlockError(UserError):
    """The fabric stopped making progress while work remained."""


class SimulationStopped(UserError):
    """A run stopped at a cycle boundary before its end: `reason` is "max_cycles" (the
    cycle limit) or "interrupted" (Ctrl-C); `cycle` the cycles run; `result` what ran (a
    partial `wse_sim.engine.SimResult`: counters of those cycles); `report`, once a
    pipeline built it, the partial report. The message is `stopped at cycle N: why`."""

    def __init__(self, message: str, *, cycle: int, reason: str, result: object) -> None:
        super().__init__(message)
        self.cycle = cycle
        self.reason = reason
        self.result = result
        self.report: dict | None = None



class SwitchOrderError(UserError):
    """A switch position changed while wavelets waited at an input port that neither the new
    position nor any later one accepts: they could never move (`wse_sim.router`)."""
