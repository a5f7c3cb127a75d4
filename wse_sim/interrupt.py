"""Ctrl-C as a request to stop at the next cycle boundary, not an exception anywhere.

While `sigint_flag()` is active, SIGINT only sets a flag that the caller polls between
chunks of simulated cycles (`wse_sim.engine.simulate(..., interruptible=True)`), so the
run ends at a cycle boundary with its state intact and the counters so far can be
reported. Signal handlers belong to the main thread: elsewhere (a sweep's worker) the
flag never rises and Ctrl-C keeps its usual effect.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def sigint_flag() -> Iterator[Callable[[], bool]]:
    """Yield a function that says whether Ctrl-C was pressed since the block began; the
    previous SIGINT handler is back when the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    pressed = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.set())
    try:
        yield pressed.is_set
    finally:
        signal.signal(signal.SIGINT, previous)
