"""Generation on the simulated wafer: prefill the prompt, then decode one token per run,
the KV cache kept in SRAM between runs (`compiler.generate` describes the programs).

Every run is simulated from cycle 0 to its end: the prefill run's cycles are the time to
the first token; each decode run's cycles are the time per further token. Tokens are
chosen on the host from the logits the run leaves in SRAM.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from compiler.batch import BatchCode
from compiler.compile import Compiled
from compiler.config import RunConfig
from compiler.generate import LOGITS, compile_forward, run_batch
from compiler.graph import updated_name
from compiler.state import WaferState, initial_state, read_state, step_pes
from wse_sim.engine import Loaded, prepare_engine


@dataclass(frozen=True)
class Generated:
    """The new tokens and what each run took: the prefill run's cycles (the first token)
    and each decode run's (one token each)."""

    tokens: list[int]
    prefill_cycles: int
    decode_cycles: list[int]
    compile_seconds: float
    engine_seconds: float  # numba's (`wse_sim.engine.prepare_engine`)
    simulate_seconds: float


class _Runs:
    """One compiled forward program, loaded into the engine once, and its per-run code."""

    def __init__(self, compiled: Compiled) -> None:
        self.compiled = compiled
        self.code = BatchCode(compiled)
        self.loaded = Loaded(compiled.linked.program, compiled.cfg.wafer)
        self.caches = [updated_name(name) for name, spec in compiled.graph.tensors.items()
                       if spec.kind == "state"]

    def run(self, tokens: list[int], start: int, caches: WaferState
            ) -> tuple[np.ndarray, WaferState, int]:
        """The logits of `tokens` at positions start .., the caches after, the cycles."""
        program = self.compiled.linked.program
        tasks = self.code.pe_tasks(run_batch(tokens, start)).tasks
        result = self.loaded.run(step_pes(program, caches, tasks))
        logits = self.compiled.linked.read_tensor(result, LOGITS)
        return (logits, read_state(program, result.sram, self.caches, caches.step + 1),
                result.cycles)


def generate(cfg: RunConfig, params: dict[str, np.ndarray], prompt: list[int], count: int,
             choose: Callable[[np.ndarray], int]) -> Generated:
    """`count` tokens after `prompt` (its length and `count` checked by the caller against
    n_ctx), each chosen by `choose(logits row)`."""
    started = time.perf_counter()
    prefill = _Runs(compile_forward(cfg, params, len(prompt)))
    decode = _Runs(compile_forward(cfg, params, 1)) if count > 1 else None
    compiled = time.perf_counter()
    engine_seconds = prepare_engine(cfg.wafer)
    simulating = time.perf_counter()
    caches = initial_state(prefill.compiled.linked.program, prefill.caches)
    logits, caches, prefill_cycles = prefill.run(prompt, 0, caches)
    tokens = [choose(logits[-1])]
    decode_cycles = []
    while len(tokens) < count:
        assert decode is not None
        logits, caches, cycles = decode.run(tokens[-1:], len(prompt) + len(tokens) - 1,
                                            caches)
        tokens.append(choose(logits[0]))
        decode_cycles.append(cycles)
    return Generated(tokens, prefill_cycles, decode_cycles, compiled - started, engine_seconds,
                     time.perf_counter() - simulating)
