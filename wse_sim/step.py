"""One training step of a compiled program on the engine: its micro-batches in turn.

A step of W micro-batches (`training.micro_batch_size`; W = 1 without) runs the one
compiled program W times (`wse_sim.engine.Loaded`), each run from cycle 0:

* micro-batch k's code is the compiled code rebuilt for its tokens, and every micro-batch
  but the last leaves the optimizer's update out (`compiler.batch`);
* its SRAM starts from the step's state (weights and optimizer state: `compiler.state`)
  with the gradient accumulators that micro-batch k - 1 left, so the gradients sum over
  the micro-batches and the last one's update applies the step's gradient once.

Micro-batch k + 1 starts when k has finished on every PE: the step's cycles are the runs'
sum and its counters their sums (`Stats.then`). That is a wafer-wide barrier between
micro-batches whose own cost is not modelled (a few hundred cycles for a signal to cross
the wafer), and no overlap: the next micro-batch's forward could start in the first
kernels while the last ones still run the backward, which this schedule leaves out.

The step's results: its loss is the sum of the micro-batches' shares (each divides by the
step's predictions, `compiler.ops.cross_entropy`), added in float64 on the host; its logits
are their rows in order; the gradients, the updated weights and the optimizer state are
those the last run left.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from compiler.batch import BatchCode
from compiler.check import read_results
from compiler.compile import Compiled
from compiler.graph import grad_name
from compiler.inputs import Batch
from compiler.state import WaferState, step_pes
from wse_sim.engine import Loaded, SimResult
from wse_sim.errors import SimulationStopped
from wse_sim.stats import Stats


class StepStopped(SimulationStopped):
    """A step stopped before its end: `cycle` counts from the step's start, `stats` are
    the step's counters so far, `result` the stopped micro-batch's partial result."""

    def __init__(self, message: str, *, cycle: int, reason: str, result: SimResult,
                 stats: Stats) -> None:
        super().__init__(message, cycle=cycle, reason=reason, result=result)
        self.stats = stats


@dataclass(frozen=True)
class StepRun:
    """A step's simulated results (`compiler.check.read_results`' names), its counters,
    the last micro-batch's run (whose SRAM holds the state after the step), and the
    instructions the host rewrote for it."""

    results: dict[str, np.ndarray]
    stats: Stats
    last: SimResult
    rewritten: int

    @property
    def cycles(self) -> int:
        return self.stats.cycles


def run_micro_batches(compiled: Compiled, loaded: Loaded, code: BatchCode,
                      state: WaferState, batch: Batch, *, max_cycles: int | None = None,
                      progress: Callable[[int], None] | None = None,
                      interruptible: bool = False) -> StepRun:
    """Simulate the step of `compiled` (loaded as `loaded`) on `batch` from `state`
    (module docstring). `max_cycles` bounds the whole step's cycles and `progress` gets
    the step's cycle; a stopped run raises StepStopped."""
    program, parameters = compiled.linked.program, compiled.graph.parameters
    micro = batch.micro_batches(compiled.cfg.training.micro_batch)
    stats: Stats | None = None
    losses, logits = [], []
    rewritten = 0
    for k, part in enumerate(micro):
        last = k == len(micro) - 1
        code_k = code.pe_tasks(part, defer_update=not last)
        rewritten += code_k.instructions
        offset = stats.cycles if stats is not None else 0

        def reached(cycle: int, offset: int = offset) -> None:
            if progress is not None:
                progress(offset + cycle)

        try:
            result = loaded.run(
                step_pes(program, state, code_k.tasks),
                max_cycles=None if max_cycles is None else max(max_cycles - offset, 0),
                progress=reached, interruptible=interruptible)
        except SimulationStopped as stop:
            raise _stopped(stop, stats, k, len(micro), max_cycles) from None
        stats = result.stats if stats is None else stats.then(result.stats)
        simulated = read_results(compiled.linked, result, parameters)
        losses.append(float(simulated["loss"].ravel()[0]))
        logits.append(simulated["logits"])
        if not last:  # the next micro-batch adds to these gradients
            grads = {name: simulated[name] for name in map(grad_name, parameters)}
            state = WaferState(state.step, {**state.tensors, **grads})
    assert stats is not None
    simulated["loss"] = np.array([[sum(losses)]])
    simulated["logits"] = np.concatenate(logits)
    return StepRun(simulated, stats, result, rewritten)


def _stopped(stop: SimulationStopped, before: Stats | None, k: int, count: int,
             max_cycles: int | None) -> StepStopped:
    """`stop` of micro-batch k (of `count`) as the step's: its message in the step's
    cycles and the step's limit, the engine's account of what still ran kept."""
    stats = stop.result.stats if before is None else before.then(stop.result.stats)
    message = str(stop)
    if count > 1:
        why = (f"reached max_cycles={max_cycles}" if stop.reason == "max_cycles"
               else "interrupted (Ctrl-C)")
        still = message.split("; ", 1)[1]
        message = (f"stopped at cycle {stats.cycles:,}: {why} in micro-batch {k + 1} of "
                   f"{count} (its cycle {stop.cycle:,}); {still}")
    return StepStopped(message, cycle=stats.cycles, reason=stop.reason, result=stop.result,
                       stats=stats)
