"""A progress line for long simulations on a terminal."""

from __future__ import annotations

import sys
import time


class Progress:
    """One self-overwriting stderr line: cycles simulated and the simulation rate (the total
    is not known in advance, so there is no bar)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.started = time.perf_counter()
        self.drawn = False  # the line is on the terminal, not yet ended

    def __call__(self, cycle: int) -> None:
        if self.enabled:
            elapsed = time.perf_counter() - self.started
            rate = cycle / max(elapsed, 1e-9)
            print(f"\rsimulating: {cycle:>12,} cycles  {elapsed:6.1f} s  "
                  f"{rate / 1e3:8.1f} k cycles/s", end="", file=sys.stderr, flush=True)
            self.drawn = True

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        """End the line, so what is printed next (the report, an error, a Ctrl-C's line)
        starts a line of its own, however the simulation ended."""
        if self.drawn:
            print(file=sys.stderr)
            self.drawn = False
