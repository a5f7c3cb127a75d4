"""Graph -> kernels: every op of the training step lands in exactly one kernel.

`lower` asks each op's family (`compiler.ops`) for the kernel the op starts; a family
returns None for an op that lives in another op's kernel. A forward op, its backward twin
and the updates of its parameters share one kernel (the backward needs the stored
activations and the weights; the update is local where weight and gradient sit). Fusions,
each exact, are the families' own:

* `embed` and `lm_head` (tied embeddings) are one kernel holding the single copy of
  `wte.weight`, so `wte.weight.grad_acc` (the sum of both uses' gradients) happens in place.
* `attn.scores`, `attn.mask`, `attn.softmax` and `attn.values` (and their backward twins)
  are one attention kernel: the masked scores are never computed, the probabilities never
  leave the PEs.
* The three QKV outputs q, k, v are the column blocks of one [M, 3d] stream tensor
  `{op}.out`, cut into lanes per block (`compiler.plan`), that the attention kernel reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from compiler.graph import OpSpec, TrainingGraph
from compiler.inputs import Batch
from compiler.lowering.kernel import Kernel, StreamIds, sram_budget
from compiler.ops import family_of
from compiler.ops.attention import AttnShape, fit_key_pes
from compiler.ops.update import UpdateRule
from compiler.plan import Plan, plan_step
from wse_sim.errors import UserError
from wse_sim.hardware import WaferConfig


@dataclass
class LoweringContext:
    """What a family's `lower` may use: the graph, the initial values, the batch, the lane
    width, the stream id allocator, and look-ups that name the tensors an op's kernel
    streams."""

    graph: TrainingGraph
    params: dict[str, np.ndarray]  # initial weights by parameter name (float64)
    batch: Batch  # the batch the code is built for (`compiler.batch` rebuilds it per run)
    plan: Plan
    ids: StreamIds = field(default_factory=StreamIds)
    defer_update: bool = False  # a micro-batch before the step's last (`UpdateRule.deferred`)

    @property
    def wafer(self) -> WaferConfig:
        return self.graph.cfg.wafer

    @property
    def tokens(self) -> np.ndarray:
        """The batch's input tokens (B, T)."""
        return self.batch.tokens

    @property
    def update(self) -> UpdateRule:
        """The optimizer update every parameter-holding kernel applies."""
        return replace(UpdateRule.of(self.graph.cfg.training), deferred=self.defer_update)

    def dy(self, name: str) -> str | None:
        """The gradient of op `name`'s (first) output, as its backward twin reads it (for an
        output that feeds an add, the add's output gradient); None in a forward-only graph."""
        backward = self.graph.ops.get(f"{name}.bwd")
        return None if backward is None else backward.inputs[0]

    def dx(self, name: str) -> str | None:
        """The gradient of op `name`'s first input, as its backward twin writes it; None in
        a forward-only graph."""
        backward = self.graph.ops.get(f"{name}.bwd")
        return None if backward is None else backward.outputs[0]

    def param(self, name: str) -> np.ndarray:
        """The initial value of parameter `name` as the wafer holds it (float32)."""
        return np.asarray(self.params[name], dtype=np.float32)

    def ops_with_updates(self, name: str, *params: str) -> list[str]:
        """Op `name`, its backward twin if it has one, and the updates of `params`."""
        ops = [name]
        if self.graph.backward_of(name) is not None:
            ops.append(f"{name}.bwd")
        return ops + [f"{p}.update" for p in params]

    def rows_cols(self, tensor: str) -> tuple[int, int]:
        rows, cols = self.graph.tensors[tensor].shape
        return rows, cols

    def lanes(self, tensor: str) -> list[tuple[int, int]]:
        """The lanes `tensor` streams in (a fused QKV output is 3 d_model wide)."""
        base = self.plan.sections.get(tensor.removeprefix("grad:"))
        cols = 3 * base if base is not None else self.rows_cols(tensor)[1]
        return self.plan.lanes(tensor, cols)

    def attention_shape(self, op: OpSpec, qkv: str, out: str) -> AttnShape:
        """The attention kernel's shape for scores op `op`: the plan's PEs per head group,
        at least as many as SRAM needs."""
        a = op.attrs
        shape = AttnShape(a["batch"], a["seq_len"], a["heads"], a["d_head"], self.lanes(qkv),
                          self.lanes(out), 1)
        block = op.name.rsplit(".", 1)[0]
        groups = fit_key_pes(block, shape, self.wafer.sram_words_per_pe,
                             at_least=self.plan.key_pes.get(block, 1))
        return AttnShape(**{**shape.__dict__, "key_pes": groups})

    def earlier_first(self, a: str, b: str) -> tuple[str, str]:
        """The two tensors ordered by their producers' place in the graph."""
        order = list(self.graph.ops)
        rank = {t: order.index(self.graph.producer(t)) for t in (a, b)}
        return (a, b) if rank[a] <= rank[b] else (b, a)


def lower(graph: TrainingGraph, params: dict[str, np.ndarray], batch: Batch,
          plan: Plan) -> list[Kernel]:
    """The kernels of one training step, in graph order; every graph op is in exactly one.
    A kernel that needs more SRAM on a PE than the wafer has is a UserError, raised as soon
    as its allocation passes the limit."""
    ctx = LoweringContext(graph, params, batch, plan)
    kernels = []
    with sram_budget(graph.cfg.wafer.sram_words_per_pe):
        for op in graph.ops.values():
            kernel = family_of(op).lower(ctx, op) if _starts_kernel(op) else None
            if kernel is not None:
                kernels.append(kernel)
    covered = [o for k in kernels for o in k.ops]
    missing = set(graph.ops) - set(covered)
    if missing or len(covered) != len(set(covered)):
        raise AssertionError(f"ops not lowered exactly once: missing {sorted(missing)}")
    return kernels


def step_pes(graph: TrainingGraph, batch: Batch, plan: Plan) -> int:
    """The PEs of the step's kernels under `plan`, counted without building them."""
    ctx = LoweringContext(graph, {}, batch, plan)
    return sum(family_of(op).pes(ctx, op) for op in graph.ops.values() if _starts_kernel(op))


def size_step(graph: TrainingGraph, batch: Batch, budget: int) -> Plan:
    """The plan with the narrowest lanes whose kernels fit in `budget` PEs: the narrower
    the lanes, the more PEs share the work and the faster each row (a matmul's row takes
    about w^2 cycles a pass), and `plan_step` keeps attention at the matmuls' pace.

    Wider lanes need fewer PEs but more SRAM per PE, so the widths that fit SRAM (as far as
    sizing sees it: attention's, the largest per PE; lowering checks every kernel) are 1 up
    to some widest, and along them the PE count falls (one width's rounding aside): two
    bisections find the widest, then the narrowest within the budget. A budget below the
    widest's count is a UserError."""

    def count(width: int) -> int | None:
        """The step's PEs at lane width `width`, None if a kernel cannot fit its SRAM."""
        try:
            return step_pes(graph, batch, plan_step(graph, width))
        except UserError:
            return None

    def first(lo: int, hi: int, ok: Callable[[int], bool]) -> int:
        """The smallest width in lo..hi for which `ok` holds (`ok(hi)` does)."""
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
        return lo

    d_model = graph.cfg.model.d_model
    if count(1) is None:
        raise UserError("compile.pes: the step does not fit the PEs' SRAM at any lane width")
    widest = first(1, d_model + 1, lambda w: w > d_model or count(w + 1) is None)
    least = count(widest)
    assert least is not None
    if least > budget:
        raise UserError(f"compile.pes: the step needs at least {least:,} PEs (lane width "
                        f"{widest}, the widest whose kernels fit SRAM), the budget is "
                        f"{budget:,}")
    return plan_step(graph, first(1, widest, lambda w: (count(w) or budget + 1) <= budget))


def choose_plan(graph: TrainingGraph, batch: Batch) -> Plan:
    """The plan the config asks for: sized to `compile.pes`, or with `compile.lane_width`
    lanes (default d_head)."""
    options = graph.cfg.compile
    if options.pes is not None:
        return size_step(graph, batch, options.pes)
    return plan_step(graph, options.lane_width or graph.cfg.model.d_head)


def _starts_kernel(op: OpSpec) -> bool:
    """Backward twins and updates always live in their forward op's kernel."""
    return op.phase == "forward" or op.kind == "grad_acc"
