"""A progress line for long compiles and simulations on a terminal."""

from __future__ import annotations

import logging
import sys
import time

CLEAR_TO_END = "\x1b[K"  # a shorter line drawn over a longer one leaves nothing behind
LOGGERS = ("compiler", "wse_sim.engine")  # whose INFO records the line shows


class Progress:
    """One self-overwriting stderr line: while the compiler works, its latest progress
    record (the `compiler` logger at INFO: routing's negotiation rounds; then
    `wse_sim.engine`'s while numba prepares the engine), then the cycles simulated and the
    simulation rate (the total is not known in advance, so there is no bar). At the end, a
    record's line is cleared and a simulation's kept."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.started = time.perf_counter()
        self.drawn = False  # the line is on the terminal, not yet ended
        self.transient = False  # ... and is a log record's
        self._handler = _Records(self)
        self._loggers = [logging.getLogger(name) for name in LOGGERS]
        self._levels = [logger.level for logger in self._loggers]

    def __call__(self, cycle: int) -> None:
        if self.enabled:
            elapsed = time.perf_counter() - self.started
            rate = cycle / max(elapsed, 1e-9)
            self.draw(f"simulating: {cycle:>12,} cycles  {elapsed:6.1f} s  "
                       f"{rate / 1e3:8.1f} k cycles/s", transient=False)

    def draw(self, text: str, transient: bool) -> None:
        print(f"\r{text}{CLEAR_TO_END}", end="", file=sys.stderr, flush=True)
        self.drawn, self.transient = True, transient

    def __enter__(self) -> Progress:
        if self.enabled:
            for logger in self._loggers:
                logger.addHandler(self._handler)
                logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: object) -> None:
        """End the line, so what is printed next (the report, an error, a Ctrl-C's line)
        starts a line of its own, however the work ended."""
        if self.enabled:
            for logger, level in zip(self._loggers, self._levels, strict=True):
                logger.removeHandler(self._handler)
                logger.setLevel(level)
        if self.drawn:
            ending = f"\r{CLEAR_TO_END}" if self.transient else "\n"
            print(ending, end="", file=sys.stderr, flush=True)
            self.drawn = False


class _Records(logging.Handler):
    """Draws the records of LOGGERS on its Progress line, with the time since it began, at
    most `PER_SECOND` a second (negotiation rounds may come every few milliseconds)."""

    PER_SECOND = 10

    def __init__(self, progress: Progress) -> None:
        super().__init__(logging.INFO)
        self.progress = progress
        self.drawn_at: dict[str, float] = {}  # logger name -> when its last record was drawn

    def emit(self, record: logging.LogRecord) -> None:
        now = time.perf_counter()
        # (per logger: the engine's one record is drawn however soon after routing's last)
        if now - self.drawn_at.get(record.name, float("-inf")) >= 1 / self.PER_SECOND:
            self.drawn_at[record.name] = now
            self.progress.draw(f"{record.getMessage()}  {now - self.progress.started:6.1f} s",
                               transient=True)
