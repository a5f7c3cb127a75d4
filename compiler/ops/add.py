"""The add: residual adds (forward) and gradient accumulations (backward), y = a + b.

Graph: kind `add` for a residual (1 FLOP per element; no backward op, its gradient is the
identity on both inputs) and kind `grad_acc` for the sum of a tensor's gradient shares
(built by `GraphBuilder.backward`; one FLOP per element per extra share). A `grad_acc` of
a parameter happens in place in the kernel that holds the parameter (the tied embedding).

Layout: a 1-high strip, PE (j, 0) owns lane j of the tensor (see rowreduce's strip
layout). The add needs nothing from another PE, so each PE is an independent pipeline from
its input lanes to its output lane.

Algorithm. The two inputs take paths of different lengths from a common source: in a
residual block the skip input x is multicast by the producer that also feeds the branch
(LayerNorm, attention or MLP, projection), and the branch's output arrives many rows
later. If the add read the two in lock step, the skip path could run ahead of the branch
only by the few wavelets its FIFOs hold, and the producer, blocked on the skip, would
starve the branch: one row through the branch at a time. So each PE absorbs the early
input (`first`: the one whose producer comes earlier in the graph) on a thread of its own
into a ring of SRAM blocks of `block_rows` rows, and signals each block on a `Tokens`
channel; the main thread waits for a block's token, then streams `ADD FabOut = Mem +
FabIn(second)` as the late input arrives. The absorber can run `Tokens.capacity` blocks
ahead (8 with queue depth 4), so the ring has capacity + 2 blocks: when the absorber blocks
on its (capacity + 1)-th outstanding token it has written one block more, and the main
thread may still be reading the oldest one (DEADLOCK: compiler.lowering.kernel; the
absorber is the only reader of `first`, the main thread the only reader of `second`).
The same kernel, with rows descending, sums the two shares of a gradient.

Cost per PE (M rows, lane w; `cycles` below): M w to absorb, M w for the ADDs, both
through the PE's one ramp (2 M w), and a token per block through the same ramp.
SRAM: (capacity + 2) block_rows w words (or all M rows if fewer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from compiler.graph import GraphBuilder, OpSpec
from compiler.lowering.ir import FabIn, FabOut, Instr, Mem, Op, repeat, vec
from compiler.lowering.kernel import Kernel, RowOrder, StreamIds, Tokens, ring_slots
from compiler.lowering.rowreduce import row_blocks, strip_inputs, strip_kernel, strip_outputs
from compiler.ops.base import OpFamily, Tensors

if TYPE_CHECKING:
    from compiler.lower import LoweringContext

FORWARD_FLOPS = 1  # per element
BLOCK_ROWS = 4  # rows per token: the skip path may run 4 x Tokens.capacity rows ahead


def add_residual(b: GraphBuilder, name: str, skip: str, branch: str) -> str:
    """The residual add `skip + branch`."""
    return b.elementwise(name, "add", (skip, branch), (FORWARD_FLOPS, 0))


def add_forward(*inputs: np.ndarray) -> np.ndarray:
    """The elementwise sum of the inputs, left to right."""
    total = inputs[0]
    for x in inputs[1:]:
        total = total + x
    return total


def build_add(name: str, ops: list[str], ids: StreamIds, *, rows: int,
              lanes: list[tuple[int, int]], first: str, second: str, out: str,
              order: RowOrder, queue_depth: int, block_rows: int = BLOCK_ROWS) -> Kernel:
    """out = first + second, all [rows, cols] in `lanes`, rows in `order`; `first` is the
    input that arrives early (the short path; see the module docstring)."""
    cols = lanes[-1][1]
    kernel, strip = strip_kernel(name, "add", ops, lanes)
    kernel.shapes.update({first: (rows, cols), second: (rows, cols), out: (rows, cols)})
    a_in = strip_inputs(kernel, ids, first, strip, order)
    b_in = strip_inputs(kernel, ids, second, strip, order)
    y_out = strip_outputs(kernel, ids, out, strip, order)
    blocks = row_blocks(rows, block_rows)
    for lane in strip:
        tokens = Tokens.create(kernel, lane.pe, ids, queue_depth)
        slots = min(len(blocks), ring_slots(queue_depth))
        w = lane.width
        ring = kernel.alloc(lane.pe, slots * block_rows * w, f"{first} ring")
        absorb = [[vec(Op.MOV, (r1 - r0) * w, Mem(ring + (b % slots) * block_rows * w),
                       FabIn(a_in[lane.index])), tokens.signal()]
                  for b, (r0, r1) in enumerate(blocks)]
        combine = [[tokens.wait(), vec(Op.ADD, (r1 - r0) * w, FabOut(y_out[lane.index]),
                                       Mem(ring + (b % slots) * block_rows * w),
                                       FabIn(b_in[lane.index]))]
                   for b, (r0, r1) in enumerate(blocks)]
        whole = rows // block_rows  # blocks of block_rows rows (the last may be shorter)
        kernel.emit(lane.pe, *_rounds(combine, slots, whole))
        kernel.emit(lane.pe, *_rounds(absorb, slots, whole), thread=1)
    return kernel


def _rounds(per_block: list[list[Instr]], slots: int, whole: int) -> list[Instr]:
    """The blocks' instructions with every round of `slots` whole blocks (the ring wraps
    after one) as one REPEAT body."""
    full = whole // slots * slots
    body = [instr for block in per_block[:slots] for instr in block]
    head = repeat(full // slots, body) if full else []
    return head + [instr for block in per_block[full:] for instr in block]


def cycles(rows: int, lane_width: int, block_rows: int = BLOCK_ROWS) -> int:
    """Cycles of a lone add kernel fed at full rate: both inputs through the PE's one ramp
    (2 M w) and the main thread's token per block (its wavelet takes the ramp too)."""
    return 2 * rows * lane_width + -(-rows // block_rows)


def sram_words(rows: int, lane_width: int, queue_depth: int,
               block_rows: int = BLOCK_ROWS) -> int:
    """Words per PE: the ring of blocks of the early input."""
    blocks = -(-rows // block_rows)
    return min(blocks, ring_slots(queue_depth)) * block_rows * lane_width


def _in_place(ctx: LoweringContext, op: OpSpec) -> bool:
    """A parameter's gradient sum happens in the kernel that holds the parameter."""
    return op.kind == "grad_acc" and ctx.graph.tensors[op.attrs["tensor"]].kind == "parameter"


class Add(OpFamily):
    kinds = ("add", "grad_acc")

    def forward(self, op: OpSpec, t: Tensors) -> None:
        t[op.outputs[0]] = add_forward(*(t[x] for x in op.inputs))

    def pes(self, ctx: LoweringContext, op: OpSpec) -> int:
        return 0 if _in_place(ctx, op) else len(ctx.lanes(op.outputs[0]))

    def lower(self, ctx: LoweringContext, op: OpSpec) -> Kernel | None:
        if _in_place(ctx, op):
            return None
        if len(op.inputs) != 2:
            raise NotImplementedError(f"{op.name}: add of {len(op.inputs)} tensors")
        first, second = ctx.earlier_first(*op.inputs)
        out = op.outputs[0]
        rows, _ = ctx.rows_cols(out)
        order = "ascending" if op.kind == "add" else "descending"
        return build_add(op.name, [op.name], ctx.ids, rows=rows, lanes=ctx.lanes(out),
                         first=first, second=second, out=out, order=order,
                         queue_depth=ctx.wafer.queue_depth)


FAMILY = Add()
