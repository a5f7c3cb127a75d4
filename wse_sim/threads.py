"""The host threads of a run: how many cores the process has, how a run's cycles are cut
into chunks, and how many worker threads run each (`ChunkPlan`), and starting them.

A run with several workers starts one host thread per stripe of fabric rows
(`wse_sim.state`); its numba functions release the GIL and meet at `wse_sim.jit.barrier`
twice per simulated cycle. Pure Python: an edit here recompiles no engine code.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# A cycle's routers and PEs are shared among more threads only when each thread gets this
# many to run (a router or PE visit costs 50 to 200 ns; the two barriers of a cycle about a
# microsecond). gpt_small's step, about 230 visits a cycle, simulated in 13 s on two
# threads with 32 and in 20 s with 256, which kept it on one (measured when this was set).
VISITS_PER_WORKER = 32


def workers_for(wk: Any, visits_per_cycle: float) -> int:
    """The worker threads worth starting for the next chunk of cycles of `wk`'s stripes."""
    return max(1, min(len(wk.stripe), int(visits_per_cycle // VISITS_PER_WORKER)))


CHUNK_SECONDS = 0.2  # a run's chunks of cycles last about this long (progress, Ctrl-C)
TIMING_SECONDS = 0.005  # a chunk timed on the other thread count would last this long ...
TIMING_GAP_MAX = 64  # ... and comes at least this many chunks after the one before
THREADS_WIN = 0.9  # several threads are chosen if a visit takes at most this share of one's


class ChunkPlan:
    """How a run over `wk`'s stripes cuts its cycles into chunks, and how many worker
    threads run each: chunks of about CHUNK_SECONDS (from `first` cycles, within
    [least, most]) on one thread, or on as many as the work per cycle pays for
    (`workers_for`) where they are measured to be faster.

    Why measured: threads that meet at a barrier every cycle each need a core. When other
    processes keep the machine's cores busy, every barrier waits for a descheduled thread's
    next time slice: beside two busy loops on a 2-core machine gpt_small's step took 263 s
    on two threads and 24.5 s on one (27 to 45 s on two with these timings). So now and then
    a short chunk (TIMING_SECONDS) runs on the other thread count, and each chunk's time per
    router or PE visit is compared with the other count's last. Several threads are taken
    only after a timing of theirs beats one thread clearly (THREADS_WIN), from a short chunk
    on; one thread as soon as it is faster. A timing that changes nothing waits twice as
    many chunks for the next, so an idle machine pays for a few short chunks on one thread.
    Results do not depend on the threads (`wse_sim.engine`), so neither do they on the
    timing."""

    timed = True  # (tests turn it off: every chunk then runs on `workers_for`'s threads)

    def __init__(self, wk: Any, first: int, least: int, most: int,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.wk, self.chunk, self.least, self.most, self.clock = wk, first, least, most, clock
        self.pays = workers_for(wk, 0.0)
        self.one = True  # one thread (else `pays`) while several pay
        self.per_visit: dict[bool, float] = {}  # one thread?: seconds a visit, last chunk
        self.gap, self.wait = 1, 0  # chunks from a timing to the next, left before it
        self.per_cycle = CHUNK_SECONDS / first  # seconds a cycle, last chunk (a guess first)
        self.timing = False
        self.workers = self.cycles = self.visits = 0
        self.started = 0.0

    def next(self) -> tuple[int, int]:
        """The worker threads and cycles of the next chunk (then call `ran`)."""
        self.workers, self.cycles = self.pays, self.chunk
        self.timing = self.pays > 1 and self.timed and self.wait == 0
        if self.pays > 1 and self.timed:
            self.workers = 1 if self.one != self.timing else self.pays
        if self.timing:
            self.cycles = max(int(TIMING_SECONDS / self.per_cycle), 1)
        self.visits = int(self.wk.stripe["visits"].sum())
        self.started = self.clock()
        return self.workers, self.cycles

    def ran(self, cycles: int) -> None:
        """The chunk `next` gave ran `cycles` cycles (fewer if the run ended)."""
        seconds = self.clock() - self.started
        visits = int(self.wk.stripe["visits"].sum()) - self.visits
        if self.timed and visits > 0:
            self.per_visit[self.workers == 1] = seconds / visits
        if self.pays > 1 and self.timed and visits > 0:
            before = self.one
            if len(self.per_visit) == 2:
                self._choose()
            if self.timing:
                self.gap = 1 if self.one != before else min(2 * self.gap, TIMING_GAP_MAX)
                self.wait = self.gap
            else:
                self.wait = max(self.wait - 1, 0)
        self.pays = workers_for(self.wk, visits / max(cycles, 1))
        self.per_cycle = max(seconds, 1e-6) / max(cycles, 1)
        self.chunk = int(min(max(min(CHUNK_SECONDS / self.per_cycle, 4.0 * self.chunk),
                                 self.least), self.most))

    def _choose(self) -> None:
        """One thread or several for the next chunks, from the two last times a visit."""
        one, several = self.per_visit[True], self.per_visit[False]
        if self.one and self.timing and several < THREADS_WIN * one:
            self.one = False
            self.chunk = self.cycles  # from a short chunk on: a busy machine may be back
        elif not self.one and one < several:
            self.one = True


def run_workers(fn: Callable[..., Any], workers: int, *args: Any) -> Any:
    """fn(*args, w) for w = 0 .. workers - 1 at once, w = 0 on this thread; returns what
    worker 0 returned (the workers of one cycle loop all return the same)."""
    threads = [threading.Thread(target=fn, args=(*args, w)) for w in range(1, workers)]
    for thread in threads:
        thread.start()
    try:
        return fn(*args, 0)
    finally:
        for thread in threads:
            thread.join()
