"""LayerNorm: forward, backward and the SGD update of gamma and beta on one strip.

Graph: kind `layernorm` (attribute `eps`), parameters `{op}.weight` (gamma, ones) and
`{op}.bias` (beta, zeros); it also outputs the row statistics `{op}.mean`, `{op}.rstd`,
saved with x and gamma for the backward. FLOPs per element: forward 7, backward 13.

y = xhat * gamma + beta, xhat = (x - mean) * rstd, rstd = 1 / sqrt(var + eps) per row
(biased variance, over all D columns). Backward with g = dy * gamma:
dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), dgamma = sum_rows dy * xhat,
dbeta = sum_rows dy; update p -= lr * dp.

Layout and algorithm
--------------------
A 1-high strip, PE (j, 0) owns lane j (w columns): its slice of gamma, beta and their
gradients, and the xhat rows and rstd it saves for the backward. Rows go in blocks of R
(see rowreduce). Per block, each PE:

forward: receive the x block into the xhat store; row sums -> allreduce -> mean; subtract
(two-pass variance: numerically the reference's formula, not E[x^2] - mean^2); row sums of
squares -> allreduce -> rstd; scale to xhat in place; emit xhat * gamma + beta row by row.
backward: receive the dy block; dbeta += dy; t = dy * xhat; dgamma += t; row partials of
sum(gamma dy) and sum(gamma t) -> one allreduce of both (2R words, one chain);
t = xhat * P + Q with P = -rstd mean(g xhat), Q = -rstd mean(g); emit
dx = (dy * gamma) * rstd + t.
update: gamma and beta by the optimizer (`compiler.ops.update`; SGD one FMA of w each).

Each PE reads one input stream at a time (x, then after its forward output dy), and the
only coupling between PEs is the per-block allreduce, so consuming dy block by block keeps
the deadlock rule's guarantee: no PE waits on one stream while another goes unread.

Cycle cost per PE (one cycle per vector element; M rows, lane w, G = lanes, R = block;
`cycles` below):
forward  7 M w + 11 M + (M / R) * 2 * allreduce latency
         (receive Mw, two row partials M(w+2) each, subtract Mw, scale Mw, emit 2Mw,
          two allreduces 2M each, mean/var/rstd 3M),
backward 9 M w + 12 M + (M / R) * allreduce latency
         (receive, dbeta, t, dgamma, t', g, emit: 7Mw; two row partials M(w+2) each;
          one allreduce of 2M words twice: 4M; scalings 4M),
update   2 w; an allreduce's latency is in rowreduce (about 4 (G - 1) + 2 cycles).
SRAM per PE: M w (xhat) + M (rstd) + 2 R w (dy, t blocks) + 4 w + w + 2 R.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from compiler.graph import GraphBuilder, OpSpec
from compiler.lowering.kernel import Kernel, StreamIds
from compiler.lowering.rowreduce import (
    DEFAULT_BLOCK_ROWS,
    GroupReducer,
    alloc_all,
    broadcast_latency,
    reduce_latency,
    row_blocks,
    row_partials,
    rows_at,
    rows_back,
    scalar_at,
    strip_inputs,
    strip_kernel,
    strip_outputs,
)
from compiler.ops.base import OpFamily, Tensors
from compiler.ops.update import UpdateRule, emit_update
from wse_sim.program import FabIn, FabOut, Imm, Mem, Op, repeat, vec

if TYPE_CHECKING:
    from compiler.lower import LoweringContext

FORWARD_FLOPS = 7  # per element
BACKWARD_FLOPS = 13


def add_layernorm(b: GraphBuilder, name: str, x: str) -> str:
    """LayerNorm `name` over the columns of x [M, D]; returns its output."""
    m, d = b.shape(x)
    gamma = b.param(f"{name}.weight", (d,), "ones")
    beta = b.param(f"{name}.bias", (d,), "zeros")
    mean, rstd = f"{name}.mean", f"{name}.rstd"
    (out,) = b.forward(
        name, "layernorm", (x, gamma, beta), {f"{name}.out": (m, d)},
        stats={mean: (m, 1), rstd: (m, 1)}, flops=FORWARD_FLOPS * m * d,
        bwd_flops=BACKWARD_FLOPS * m * d, saved=(x, gamma, mean, rstd),
        attrs={"eps": b.cfg.model.ln_eps})
    return out


# -- numpy ------------------------------------------------------------------------------------


def layernorm_forward(x: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                      eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(out, mean, rstd) with the biased variance; mean and rstd are [M, 1]."""
    mean = x.mean(axis=1, keepdims=True)
    rstd = 1 / np.sqrt(((x - mean) ** 2).mean(axis=1, keepdims=True) + eps)
    return (x - mean) * rstd * weight + bias, mean, rstd


def layernorm_backward(dy: np.ndarray, x: np.ndarray, weight: np.ndarray, mean: np.ndarray,
                       rstd: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dx, dweight, dbias)."""
    xhat = (x - mean) * rstd
    dxhat = dy * weight
    dx = rstd * (dxhat - dxhat.mean(axis=1, keepdims=True)
                 - xhat * (dxhat * xhat).mean(axis=1, keepdims=True))
    return dx, (dy * xhat).sum(axis=0), dy.sum(axis=0)


# -- kernel -----------------------------------------------------------------------------------


def build_layernorm(name: str, ops: list[str], ids: StreamIds, *, rows: int,
                    lanes: list[tuple[int, int]], gamma: np.ndarray, beta: np.ndarray,
                    eps: float, update: UpdateRule, x_tensor: str, y_tensor: str, dy_tensor: str,
                    dx_tensor: str, gamma_name: str, beta_name: str,
                    block_rows: int = DEFAULT_BLOCK_ROWS) -> Kernel:
    """LayerNorm over the columns of x [rows, cols] (cols = the end of the last lane), the
    tensors in `lanes`, with parameters gamma, beta [cols]; results grad:/updated: of
    `gamma_name` and `beta_name`."""
    cols = lanes[-1][1]
    kernel, strip = strip_kernel(name, "layernorm", ops, lanes)
    pes = [lane.pe for lane in strip]
    kernel.shapes.update({t: (rows, cols) for t in (x_tensor, y_tensor, dy_tensor, dx_tensor)})
    x_in = strip_inputs(kernel, ids, x_tensor, strip, "ascending")
    y_out = strip_outputs(kernel, ids, y_tensor, strip, "ascending")
    dy_in = strip_inputs(kernel, ids, dy_tensor, strip, "descending")
    dx_out = strip_outputs(kernel, ids, dx_tensor, strip, "descending")
    reducer = GroupReducer.create(kernel, ids, pes)

    blocks = row_blocks(rows, block_rows)
    rb = min(rows, block_rows)
    lw = max(lane.width for lane in strip)
    xhat = alloc_all(kernel, pes, rows * lw, f"xhat of {x_tensor}")
    rstd = alloc_all(kernel, pes, rows, "rstd")
    params = alloc_all(kernel, pes, 2 * lw, "gamma | beta")  # beta at params + w
    grads = alloc_all(kernel, pes, 2 * lw, "dgamma | dbeta")  # dbeta at grads + w
    scratch = alloc_all(kernel, pes, lw, "scaled row")
    dy_blk = alloc_all(kernel, pes, rb * lw, "dy block")
    t_blk = alloc_all(kernel, pes, rb * lw, "t block")
    stat = alloc_all(kernel, pes, 2 * rb, "row statistics")
    inv_d = 1.0 / cols
    for lane in strip:
        kernel.load(lane.pe, params,
                    np.concatenate([gamma[lane.c0:lane.c1], beta[lane.c0:lane.c1]]))

    # The group's PEs run the same phases; each allreduce sits between two phases.
    for r0, r1 in blocks:
        r = r1 - r0
        for lane in strip:
            w, xh = lane.width, xhat + r0 * lane.width
            kernel.emit(lane.pe, vec(Op.MOV, r * w, Mem(xh), FabIn(x_in[lane.index])),
                        *row_partials("sum", rows=r, width=w, dst=stat, a=rows_at(xh, w)))
        reducer.allreduce(stat, r, Op.ADD)
        for lane in strip:
            w, xh = lane.width, rows_at(xhat + r0 * lane.width, lane.width)
            kernel.emit(
                lane.pe,
                vec(Op.MUL, r, Mem(stat), Mem(stat), Imm(inv_d)),  # mean
                *repeat(r, [vec(Op.SUB, w, xh, xh, scalar_at(stat))]),
                *row_partials("dot", rows=r, width=w, dst=stat, a=xh, b=xh),
            )
        reducer.allreduce(stat, r, Op.ADD)
        for lane in strip:
            w, xh = lane.width, rows_at(xhat + r0 * lane.width, lane.width)
            gamma_row, beta_row = Mem(params), Mem(params + w)
            kernel.emit(
                lane.pe,
                vec(Op.FMA, r, Mem(stat), Mem(stat), Imm(inv_d), Imm(eps)),  # var + eps
                vec(Op.RSQRT, r, Mem(rstd + r0), Mem(stat)),
                *repeat(r, [vec(Op.MUL, w, xh, xh, scalar_at(rstd + r0))]),
                *repeat(r, [
                    vec(Op.MUL, w, Mem(scratch), xh, gamma_row),
                    vec(Op.ADD, w, FabOut(y_out[lane.index]), Mem(scratch), beta_row),
                ]),
            )

    # Backward: blocks last to first, each block's rows arriving last to first; the block
    # buffers hold them in arrival order, the stored xhat rows and rstd are read backwards.
    for r0, r1 in reversed(blocks):
        r = r1 - r0
        rstd_back = Mem(rstd + r1 - 1, -1)  # rstd of the block's rows in arrival order
        for lane in strip:
            w = lane.width
            xh = rows_back(xhat + (r1 - 1) * w, w)
            dy, t, gamma_row = rows_at(dy_blk, w), rows_at(t_blk, w), Mem(params)
            kernel.emit(
                lane.pe,
                vec(Op.MOV, r * w, Mem(dy_blk), FabIn(dy_in[lane.index])),
                *repeat(r, [vec(Op.ADD, w, Mem(grads + w), Mem(grads + w), dy)]),  # dbeta
                *repeat(r, [vec(Op.MUL, w, t, dy, xh)]),
                *repeat(r, [vec(Op.ADD, w, Mem(grads), Mem(grads), t)]),  # dgamma
                # stat[0:r] = sum(g), stat[rb:rb+r] = sum(g xhat): one allreduce for both
                *row_partials("dot", rows=r, width=w, dst=stat, a=dy, b=gamma_row),
                *row_partials("dot", rows=r, width=w, dst=stat + rb, a=t, b=gamma_row),
            )
        reducer.allreduce(stat, 2 * rb, Op.ADD)
        for lane in strip:
            w = lane.width
            xh = rows_back(xhat + (r1 - 1) * w, w)
            dy, t, rs = rows_at(dy_blk, w), rows_at(t_blk, w), scalar_at(rstd + r1 - 1, -1)
            kernel.emit(
                lane.pe,
                vec(Op.MUL, r, Mem(stat), Mem(stat), rstd_back),
                vec(Op.MUL, r, Mem(stat + rb), Mem(stat + rb), rstd_back),
                vec(Op.MUL, 2 * rb, Mem(stat), Mem(stat), Imm(-inv_d)),  # Q | P
                *repeat(r, [vec(Op.FMA, w, t, xh, scalar_at(stat + rb), scalar_at(stat))]),
                *repeat(r, [vec(Op.MUL, w, dy, dy, Mem(params))]),  # g
                *repeat(r, [vec(Op.FMA, w, FabOut(dx_out[lane.index]), dy, rs, t)]),
            )

    for lane in strip:
        w, pe, cs = lane.width, lane.pe, lane.cols
        for param, offset in ((gamma_name, 0), (beta_name, w)):
            emit_update(kernel, pe, update, param, (1, cols), weight=params + offset,
                        grad=grads + offset, rows=(0, 1), cols=cs, row_stride=w)
    return kernel


# -- cost -------------------------------------------------------------------------------------


def cycles(rows: int, cols: int, lane_width: int,
           block_rows: int = DEFAULT_BLOCK_ROWS) -> int:
    """Cycles of a lone LayerNorm kernel: forward, backward and update of the docstring;
    per block of rows the latencies of its three allreduces and its 12 REPEAT
    instructions; and per row one cycle for the FMA whose first element reads a vector and
    two scalars (three words against two reads a cycle)."""
    m, w = rows, lane_width
    group = math.ceil(cols / lane_width)
    per_block = 3 * (reduce_latency(group) + broadcast_latency(group)) + 12
    return ((7 * m * w + 11 * m) + (9 * m * w + 12 * m) + 2 * w
            + math.ceil(rows / block_rows) * per_block + m)


def sram_words(rows: int, lane_width: int, block_rows: int = DEFAULT_BLOCK_ROWS) -> int:
    """Words per PE: xhat, rstd, gamma | beta and their gradients, a scaled row, the dy and
    t blocks and the row statistics."""
    rb, w = min(rows, block_rows), lane_width
    return rows * w + rows + 4 * w + w + 2 * rb * w + 2 * rb


class LayerNorm(OpFamily):
    kinds = ("layernorm",)

    def forward(self, op: OpSpec, t: Tensors) -> None:
        x, weight, bias = op.inputs
        out, mean, rstd = op.outputs
        t[out], t[mean], t[rstd] = layernorm_forward(t[x], t[weight], t[bias],
                                                     op.attrs["eps"])

    def backward(self, op: OpSpec, t: Tensors) -> None:
        dy, x, weight, mean, rstd = op.inputs
        dx, dweight, dbias = op.outputs
        t[dx], t[dweight], t[dbias] = layernorm_backward(t[dy], t[x], t[weight], t[mean],
                                                         t[rstd])

    def lower(self, ctx: LoweringContext, op: OpSpec) -> Kernel:
        x, gamma, beta = op.inputs
        rows, _ = ctx.rows_cols(x)
        return build_layernorm(
            op.name, ctx.ops_with_updates(op.name, gamma, beta), ctx.ids, rows=rows,
            lanes=ctx.lanes(x), gamma=ctx.param(gamma),
            beta=ctx.param(beta), eps=op.attrs["eps"], update=ctx.update, x_tensor=x,
            y_tensor=op.outputs[0], dy_tensor=ctx.dy(op.name), dx_tensor=ctx.dx(op.name),
            gamma_name=gamma, beta_name=beta)


FAMILY = LayerNorm()
