"""The add: residual adds (forward) and gradient accumulations (backward), y = a + b.

Graph: kind `add` for a residual (1 FLOP per element; no backward op, its gradient is the
identity on both inputs) and kind `grad_acc` for the sum of a tensor's gradient shares
(built by `GraphBuilder.backward`; one FLOP per element per extra share). A `grad_acc` of
a parameter happens in place in the kernel that holds the parameter (the tied embedding).

Layout: a 1-high strip, PE (j, 0) owns lane j of the tensor (see rowreduce's strip
layout). The add needs nothing from another PE, so each PE is an independent pipeline from
its input lanes to its output lane. Costs are per PE, for M rows of a lane w wide,
counting one cycle per vector element and leaving out fabric latency.

Algorithm
---------
The two inputs come from different producer kernels and either may arrive first: in a
residual block the skip input is multicast by the same producer that feeds the branch,
so the branch can only make progress while the add keeps absorbing the skip, and the
branch's own output can only leave while the add absorbs it. Reading one input
completely before the other deadlocks whenever the branch streams (the MLP branch does).
So each PE absorbs both lanes at once, on two microthreads (two reset tasks), each into
its own SRAM buffer; the task reading `second` then sends a one-wavelet token to its own
PE over a self-addressed local stream, and the task that read `first` waits for that
token before it emits `ADD FabOut = Mem + Mem`. The same kernel sums the two shares of a
gradient where a tensor fans out to two consumers. It has no backward part (the gradient
of an add is the identity on both inputs). Cost: 2 M w cycles to absorb (both lanes share
the one ramp into the PE, a wavelet per cycle), a few for the token, M w to emit: 3 M w;
SRAM 2 M w + 1 words.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from compiler.graph import GraphBuilder, OpSpec
from compiler.lowering.kernel import Kernel, LocalStream, StreamIds
from compiler.lowering.rowreduce import alloc_all, lane_inputs, lane_outputs, strip_kernel
from compiler.ops.base import OpFamily, Tensors
from wse_sim.program import FabIn, FabOut, Imm, Mem, Op, vec

if TYPE_CHECKING:
    from compiler.lower import LoweringContext

FORWARD_FLOPS = 1  # per element


def add_residual(b: GraphBuilder, name: str, skip: str, branch: str) -> str:
    """The residual add `skip + branch`."""
    return b.elementwise(name, "add", (skip, branch), (FORWARD_FLOPS, 0))


def add_forward(*inputs: np.ndarray) -> np.ndarray:
    """The elementwise sum of the inputs, left to right."""
    total = inputs[0]
    for x in inputs[1:]:
        total = total + x
    return total


def build_add(name: str, ops: list[str], ids: StreamIds, *, rows: int, cols: int,
              lane_width: int, first: str, second: str, out: str) -> Kernel:
    """out = first + second, both [rows, cols]; `first` is the input whose producer comes
    earlier in the graph (read completely before `second` is streamed)."""
    kernel, lanes = strip_kernel(name, "add", ops, cols, lane_width)
    pes = [lane.pe for lane in lanes]
    kernel.shapes.update({first: (rows, cols), second: (rows, cols), out: (rows, cols)})
    a_in = lane_inputs(kernel, ids, first, pes)
    b_in = lane_inputs(kernel, ids, second, pes)
    y_out = lane_outputs(kernel, ids, out, pes)
    a_buf = alloc_all(kernel, pes, rows * lane_width, f"{first} lane")
    b_buf = alloc_all(kernel, pes, rows * lane_width, f"{second} lane")
    token = alloc_all(kernel, pes, 1, "join token")
    for j, lane in enumerate(lanes):
        n = rows * lane.width
        joined = ids.new()
        kernel.local_streams.append(LocalStream(lane.pe, (lane.pe,), joined))
        kernel.emit(
            lane.pe,
            vec(Op.MOV, n, Mem(a_buf), FabIn(a_in[j])),
            vec(Op.MOV, 1, Mem(token), FabIn(joined)),
            vec(Op.ADD, n, FabOut(y_out[j]), Mem(a_buf), Mem(b_buf)),
        )
        kernel.add_task(
            lane.pe,
            vec(Op.MOV, n, Mem(b_buf), FabIn(b_in[j])),
            vec(Op.MOV, 1, FabOut(joined), Imm(1.0)),
        )
    return kernel


def cycles(rows: int, lane_width: int) -> int:
    """Cycles of a lone add kernel: both lanes through the PE's one ramp (2 M w), then one
    ADD per element out (M w); the join token's few cycles are left out."""
    return 3 * rows * lane_width


def sram_words(rows: int, lane_width: int) -> int:
    """Words per PE: both input lanes and the join token."""
    return 2 * rows * lane_width + 1


class Add(OpFamily):
    kinds = ("add", "grad_acc")

    def forward(self, op: OpSpec, t: Tensors) -> None:
        t[op.outputs[0]] = add_forward(*(t[x] for x in op.inputs))

    def lower(self, ctx: LoweringContext, op: OpSpec) -> Kernel | None:
        if op.kind == "grad_acc" and ctx.graph.tensors[op.attrs["tensor"]].kind == "parameter":
            return None  # the kernel holding the parameter accumulates in place
        if len(op.inputs) != 2:
            raise NotImplementedError(f"{op.name}: add of {len(op.inputs)} tensors")
        first, second = ctx.earlier_first(*op.inputs)
        out = op.outputs[0]
        rows, cols = ctx.rows_cols(out)
        return build_add(op.name, [op.name], ctx.ids, rows=rows, cols=cols,
                         lane_width=ctx.lane_width, first=first, second=second, out=out)


FAMILY = Add()
