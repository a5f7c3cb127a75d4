"""A weight-streaming step projected at a shape too large to simulate: the linear layers of
every block (the fused QKV projection, the attention's projection, the MLP's two layers)
and the tied LM head, forward and backward, by the cost model (`phase_cost`,
`tests/test_streaming.py` holds it within 12% of simulated runs) and the event model
(`phase_events`) on `rows` x the wafer's width PEs. Attention's products and softmax,
LayerNorm, GELU, the embedding and the cross-entropy are left out of the time: at
Cerebras-GPT's shapes the linear layers carry three quarters of the FLOPs or more (the
family table's `linear_share`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from compiler.config import ModelConfig
from compiler.streaming.linear import (
    LinearLayer,
    Precision,
    phase_cost,
    phase_events,
    ring_slots,
)
from compiler.streaming.service import update_seconds
from wse_sim.hardware import WaferConfig


def model_layers(model: ModelConfig) -> tuple[list[LinearLayer], LinearLayer]:
    """One block's linear layers and the tied LM head."""
    d, f = model.d_model, model.d_ffn
    block = [LinearLayer("qkv", d, 3 * d), LinearLayer("proj", d, d), LinearLayer("fc", d, f),
             LinearLayer("fc2", f, d)]
    return block, LinearLayer("head", d, model.vocab_size)


def step_total(per_layer: dict[str, float], blocks: int) -> float:
    """A step's total of a per-layer figure: every block's four layers and the head."""
    return blocks * sum(v for name, v in per_layer.items() if name != "head") + per_layer["head"]


def step_seconds(cycles: float, head: LinearLayer, wafer: WaferConfig) -> float:
    """The step's time: the wafer's cycles, then the exposed update of the tied embedding
    (its gradient arrives last, `compiler.streaming.service`)."""
    return cycles / wafer.clock_hz + update_seconds(head.k * head.n, wafer)


@dataclass(frozen=True)
class Projection:
    """A projected step: `tokens` on `rows` x `cols` PEs."""

    tokens: int
    rows: int
    cols: int
    cycles: int
    seconds: float
    bounds: Counter  # cycles of layer passes by what bounds them
    events: Counter  # `phase_events` summed over the step

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    def bound(self) -> str:
        return bound_shares(self.bounds)


def bound_shares(bounds: Counter) -> str:
    """What bounds a step, as shares of its layer passes' cycles, largest first."""
    total = sum(bounds.values())
    return ", ".join(f"{name} {cycles / total:.0%}" for name, cycles in bounds.most_common()
                     if cycles / total >= 0.005)


def project(model: ModelConfig, tokens: int, wafer: WaferConfig,
            precision: Precision = "fp32") -> Projection:
    """`tokens` tokens a step on every row of `wafer` (at most one row a token). A
    UserError names the SRAM when a PE's buffers do not fit at that shape."""
    rows, cols = min(wafer.height, tokens), wafer.width
    block, head = model_layers(model)
    # Every block's layers keep their input slices for the backward (`compiler.streaming`).
    per_row = -(-tokens // rows)
    saved = model.n_layers * sum(-(-layer.k // cols) * per_row for layer in block)
    for layer in (*block, head):
        ring_slots([layer], tokens, rows, cols, wafer, saved, precision)
    cycles: dict[str, float] = {}
    bounds: Counter = Counter()
    events: Counter = Counter()
    for layer in (*block, head):
        repeat = 1 if layer is head else model.n_layers
        cycles[layer.name] = 0
        for backward in (False, True):
            cost = phase_cost(layer, tokens, rows, cols, wafer, backward=backward,
                              precision=precision)
            cycles[layer.name] += cost.cycles
            bounds[cost.bound] += repeat * cost.cycles
            events.update({k: repeat * v for k, v in
                           phase_events(layer, tokens, rows, cols, backward=backward,
                                        precision=precision).items()})
    total = round(step_total(cycles, model.n_layers) + wafer.edge_latency_cycles)
    return Projection(tokens, rows, cols, total, step_seconds(total, head, wafer), bounds,
                      events)
