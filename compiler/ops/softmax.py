"""Attention softmax: P = softmax over each head's T key columns of S [M, H*T], and its
backward dS = P * (dP - rowsum(dP * P)).

Graph: kind `softmax`, input the masked scores, output P (saved for the backward, which
needs only P). FLOPs per element: forward 5 (max, subtract, exp, sum, divide), backward 4
(product, sum, subtract, product).

Layout and algorithm
--------------------
Head h owns columns h*T .. (h+1)*T - 1, i.e. G = T / lw lanes (lw must divide T). The
kernel is G x H PEs: PE (c, h) owns lane h*G + c, and PE row h is the reduction group of
head h (rowreduce's chain + multicast). Rows go in blocks of R. Per block, each PE:

forward: receive the S block into the P store; row max partials -> allreduce(max);
subtract the max and exp in place; row sum partials -> allreduce(sum); divide in place;
emit the P block. P stays in SRAM for the backward.
backward: receive the dP block; row partials of sum(dP * P) -> allreduce(sum);
dP - rowsum in place; emit dS = (dP - rowsum) * P.

Masking: masked scores arrive as -inf. A row's max is finite (its own key is never masked),
so exp(-inf - max) = 0 exactly and P is exactly 0 there; a PE whose whole lane is masked
for a row contributes -inf to the max and 0 to the sum. dS = 0 * (finite) = 0 there too.
The max subtraction keeps exp from overflowing whatever the scores' range.

Each PE reads one input stream at a time (S, then dP after its forward output), and PEs
couple only through the per-block allreduces, so streaming dP block by block cannot
deadlock (see layernorm).

Cycle cost per PE (one cycle per vector element; M rows, w = lw; `cycles` below):
forward  7 M w + 8 M + (M / R) * 2 * allreduce latency
         (receive, subtract, exp, divide, emit: 5 M w; two row partials M (w + 2) each;
          two allreduces 2 M each, none when G = 1),
backward 4 M w + 4 M + (M / R) * allreduce latency
         (receive, subtract, emit: 3 M w; a row partial M (w + 2); an allreduce 2 M);
an allreduce's latency is in rowreduce (about 4 (G - 1) + 2 cycles). Lanes that share
links (G > 1 with all consumers to one side) make these rates lower: see rowreduce.
SRAM per PE: M w (P) + R w (dP block) + R.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from compiler.graph import GraphBuilder, OpSpec
from compiler.lowering.kernel import Kernel, StreamIds, lane_cols
from compiler.lowering.rowreduce import (
    DEFAULT_BLOCK_ROWS,
    GroupReducer,
    Lane,
    alloc_all,
    lane_inputs,
    lane_outputs,
    row_blocks,
    row_partials,
    rows_at,
    scalar_at,
)
from compiler.ops.base import OpFamily, Tensors
from wse_sim.errors import UserError
from wse_sim.program import FabIn, FabOut, Mem, Op, repeat, vec

if TYPE_CHECKING:
    from compiler.lower import LoweringContext

FORWARD_FLOPS = 5  # per element
BACKWARD_FLOPS = 4


def add_softmax(b: GraphBuilder, name: str, scores: str, heads: dict[str, Any]) -> str:
    """The softmax op over masked `scores`; `heads` are the attention attributes."""
    return b.elementwise(name, "softmax", (scores,), (FORWARD_FLOPS, BACKWARD_FLOPS),
                         saved=(f"{name}.out",), attrs=heads)


# -- numpy ------------------------------------------------------------------------------------


def softmax_forward(s: np.ndarray, heads: int) -> np.ndarray:
    """P [M, H*T]: softmax of each head's T columns of s (-inf entries give exactly 0)."""
    rows = s.shape[0]
    s3 = s.reshape(rows, heads, -1)
    p = np.exp(s3 - s3.max(axis=2, keepdims=True))
    p /= p.sum(axis=2, keepdims=True)
    return p.reshape(s.shape)


def softmax_backward(dp: np.ndarray, p: np.ndarray, heads: int) -> np.ndarray:
    """dS = P * (dP - rowsum(dP * P)) per head."""
    rows = p.shape[0]
    p3, dp3 = p.reshape(rows, heads, -1), dp.reshape(rows, heads, -1)
    return (p3 * (dp3 - (dp3 * p3).sum(axis=2, keepdims=True))).reshape(p.shape)


def build_softmax(name: str, ops: list[str], ids: StreamIds, *, rows: int, heads: int,
                  seq_len: int, lane_width: int, s_tensor: str, p_tensor: str, dp_tensor: str,
                  ds_tensor: str, block_rows: int = DEFAULT_BLOCK_ROWS) -> Kernel:
    """Row softmax of S [rows, heads*seq_len] per head, and its backward."""
    if seq_len % lane_width:
        raise UserError(f"op {name}: lane width {lane_width} must divide seq_len {seq_len} "
                        f"(attention lanes may not straddle heads)")
    group = seq_len // lane_width
    cols = heads * seq_len
    kernel = Kernel(name=name, op="softmax", ops=list(ops), width=group, height=heads)
    lanes = [Lane(j, (j % group, j // group), c0, c1)
             for j, (c0, c1) in enumerate(lane_cols(cols, lane_width))]
    pes = [lane.pe for lane in lanes]
    kernel.shapes.update({t: (rows, cols) for t in (s_tensor, p_tensor, dp_tensor, ds_tensor)})
    s_in = lane_inputs(kernel, ids, s_tensor, pes)
    p_out = lane_outputs(kernel, ids, p_tensor, pes)
    dp_in = lane_inputs(kernel, ids, dp_tensor, pes)
    ds_out = lane_outputs(kernel, ids, ds_tensor, pes)
    reducers = [GroupReducer.create(kernel, ids, [(c, h) for c in range(group)])
                for h in range(heads)]

    w = lane_width
    blocks = row_blocks(rows, block_rows)
    rb = min(rows, block_rows)
    probs = alloc_all(kernel, pes, rows * w, f"{p_tensor} lane")
    dp_blk = alloc_all(kernel, pes, rb * w, "dP block")
    stat = alloc_all(kernel, pes, rb, "row statistic")

    def allreduce(n: int, op: Op) -> None:
        for reducer in reducers:
            reducer.allreduce(stat, n, op)

    for r0, r1 in blocks:
        r, p = r1 - r0, probs + r0 * w
        for lane in lanes:
            kernel.emit(lane.pe, vec(Op.MOV, r * w, Mem(p), FabIn(s_in[lane.index])),
                        *row_partials("max", rows=r, width=w, dst=stat, a=rows_at(p, w)))
        allreduce(r, Op.MAX)
        for lane in lanes:
            kernel.emit(
                lane.pe,
                *repeat(r, [vec(Op.SUB, w, rows_at(p, w), rows_at(p, w), scalar_at(stat))]),
                vec(Op.EXP, r * w, Mem(p), Mem(p)),
                *row_partials("sum", rows=r, width=w, dst=stat, a=rows_at(p, w)),
            )
        allreduce(r, Op.ADD)
        for lane in lanes:
            kernel.emit(
                lane.pe,
                *repeat(r, [vec(Op.DIV, w, rows_at(p, w), rows_at(p, w), scalar_at(stat))]),
                vec(Op.MOV, r * w, FabOut(p_out[lane.index]), Mem(p)),
            )

    for r0, r1 in blocks:
        r, p, dp = r1 - r0, probs + r0 * w, rows_at(dp_blk, w)
        for lane in lanes:
            kernel.emit(lane.pe, vec(Op.MOV, r * w, Mem(dp_blk), FabIn(dp_in[lane.index])),
                        *row_partials("dot", rows=r, width=w, dst=stat, a=dp, b=rows_at(p, w)))
        allreduce(r, Op.ADD)
        for lane in lanes:
            kernel.emit(
                lane.pe,
                *repeat(r, [vec(Op.SUB, w, dp, dp, scalar_at(stat))]),
                vec(Op.MUL, r * w, FabOut(ds_out[lane.index]), Mem(dp_blk), Mem(p)),
            )
    return kernel


# -- cost -------------------------------------------------------------------------------------


def cycles(rows: int, heads: int, seq_len: int, lane_width: int,
           block_rows: int = DEFAULT_BLOCK_ROWS) -> int:
    """Cycles of a lone kernel with one lane per head (T = lane width): the docstring's
    forward and backward less their allreduces, which a head of one lane skips, and 6
    REPEAT instructions per block of rows. Wider heads add 6 M plus the allreduce
    latencies, and their lanes share links (see rowreduce)."""
    if seq_len != lane_width:
        raise ValueError("softmax.cycles: the closed form covers one lane per head")
    m, w = rows, lane_width
    return (7 * m * w + 4 * m) + (4 * m * w + 2 * m) + 6 * math.ceil(rows / block_rows)


def sram_words(rows: int, lane_width: int, block_rows: int = DEFAULT_BLOCK_ROWS) -> int:
    """Words per PE: the P lane, one dP block and one row statistic per block row."""
    rb = min(rows, block_rows)
    return rows * lane_width + rb * lane_width + rb


class Softmax(OpFamily):
    kinds = ("softmax",)

    def forward(self, op: OpSpec, t: Tensors) -> None:
        (s,) = op.inputs
        t[op.outputs[0]] = softmax_forward(t[s], op.attrs["heads"])

    def backward(self, op: OpSpec, t: Tensors) -> None:
        dp, p = op.inputs
        t[op.outputs[0]] = softmax_backward(t[dp], t[p], op.attrs["heads"])

    def lower(self, ctx: LoweringContext, op: OpSpec) -> Kernel:
        (s,) = op.inputs
        rows, _ = ctx.rows_cols(s)
        return build_softmax(
            op.name, ctx.ops_with_updates(op.name), ctx.ids, rows=rows,
            heads=op.attrs["heads"], seq_len=op.attrs["seq_len"], lane_width=ctx.lane_width,
            s_tensor=s, p_tensor=op.outputs[0], dp_tensor=ctx.dy(op.name),
            ds_tensor=ctx.dx(op.name))


FAMILY = Softmax()
