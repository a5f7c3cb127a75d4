"""Attention softmax kernel: P = softmax over each head's T key columns of S [M, H*T], and
its backward dS = P * (dP - rowsum(dP * P)).

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

Cycle cost per PE (one cycle per vector element; M rows, w = lw):
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
from wse_sim.errors import UserError
from wse_sim.program import FabIn, FabOut, Mem, Op, repeat, vec


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
