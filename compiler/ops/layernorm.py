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
gradients, and the xhat rows and rstd it saves for the backward. Rows stream one at a time
(compiler.lowering.inbox): a thread of its own receives each x row into the xhat store,
another each dy row into a ring, and the compute thread, per row:

forward: row sum -> allreduce -> mean; subtract (two-pass variance: numerically the
reference's formula, not E[x^2] - mean^2); row sum of squares -> allreduce -> rstd; scale
to xhat in place; emit xhat * gamma + beta.
backward (rows descending): dbeta += dy; t = dy * xhat; dgamma += t; partials of sum(gamma
dy) and sum(gamma t) -> one allreduce of both; t = xhat * P + Q with P = -rstd mean(g
xhat), Q = -rstd mean(g); emit dx = (dy * gamma) * rstd + t.
update: gamma and beta by the optimizer (`compiler.ops.update`; SGD one FMA of w each).

Deadlock (compiler.lowering.kernel): the kernel is row-causal; each stream has one reader
thread, which takes it in row order, and the only coupling between PEs is the per-row
allreduce, which every PE joins in the same order.

Cycle cost of the compute thread per PE and row (one cycle per vector element; lane w,
G = lanes; `cycles` below):
forward  6 w + 9 (wait 1, two row partials w + 2 each, mean 1, subtract w, var + eps 1,
         rsqrt 1, scale w, gamma w, emit w) + two allreduces of one word (2 cycles each,
         plus the latency of rowreduce: about 4 (G - 1) + 2 cycles),
backward 8 w + 11 (wait 1, dbeta, t, dgamma w each, two dot partials w + 2 each, three
         scalings 1 + 1 + 2, t', g, emit w each, credit 1) + one allreduce of two words
         (4 + latency),
update   2 w. The receiving threads take w cycles a row each, alongside.
SRAM per PE: M w (xhat) + M (rstd) + 4 w (gamma, beta and gradients) + 2 w (scaled row,
t row) + 2 w (the dy ring) + 2.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from compiler.graph import GraphBuilder, OpSpec
from compiler.lowering.inbox import RING, PerPE, RowStore, inbox, join, rounds
from compiler.lowering.ir import FabOut, Imm, Mem, Op, vec
from compiler.lowering.kernel import Kernel, StreamIds
from compiler.lowering.rowreduce import (
    GroupReducer,
    alloc_all,
    broadcast_latency,
    reduce_latency,
    row_reduce,
    rowwise_strip,
)
from compiler.ops.base import OpFamily, Tensors
from compiler.ops.update import UpdateRule, emit_update

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
                    eps: float, update: UpdateRule, x_tensor: str, y_tensor: str,
                    dy_tensor: str | None, dx_tensor: str | None, gamma_name: str,
                    beta_name: str, queue_depth: int) -> Kernel:
    """LayerNorm over the columns of x [rows, cols] (cols = the end of the last lane), the
    tensors in `lanes`, with parameters gamma, beta [cols]; results grad:/updated: of
    `gamma_name` and `beta_name`. Without `dy_tensor` the forward only (no backward, no
    update, no results)."""
    backward = dy_tensor is not None
    cols = lanes[-1][1]
    rs = rowwise_strip(name, "layernorm", ops, ids, rows=rows, lanes=lanes, x=x_tensor,
                       y=y_tensor, dy=dy_tensor, dx=dx_tensor)
    kernel, strip, pes = rs.kernel, rs.lanes, rs.pes
    x_in, y_out, dy_in, dx_out = rs.x_in, rs.y_out, rs.dy_in, rs.dx_out
    reducer = GroupReducer.create(kernel, ids, pes)

    lw = max(lane.width for lane in strip)
    xhat = alloc_all(kernel, pes, rows * lw, f"xhat of {x_tensor}")
    rstd = RowStore(alloc_all(kernel, pes, rows, "rstd"), 1, rows)
    params = alloc_all(kernel, pes, 2 * lw, "gamma | beta")  # beta at params + w
    grads = alloc_all(kernel, pes, 2 * lw, "dgamma | dbeta")  # dbeta at grads + w
    scratch = alloc_all(kernel, pes, lw, "scaled row")
    t_row = alloc_all(kernel, pes, lw, "t row")
    dy_ring = alloc_all(kernel, pes, RING * lw, "dy ring")
    stat = alloc_all(kernel, pes, 2, "row statistics")
    inv_d = 1.0 / cols
    xs, dys = {}, {}
    for lane in strip:
        w = lane.width
        kernel.load(lane.pe, params,
                    np.concatenate([gamma[lane.c0:lane.c1], beta[lane.c0:lane.c1]]))
        xs[lane.pe] = inbox(kernel, lane.pe, ids, x_in[lane.index], RowStore(xhat, w, rows),
                            queue_depth=queue_depth)
        if backward:
            dys[lane.pe] = inbox(kernel, lane.pe, ids, dy_in[lane.index],
                                 RowStore(dy_ring, w, rows, ring=RING), queue_depth=queue_depth,
                                 after=xs[lane.pe])

    def forward_row(i: int, loop: int) -> PerPE:
        body: PerPE = {}
        for lane in strip:
            w, xh = lane.width, xs[lane.pe].store.row(i, loop)
            body[lane.pe] = [*xs[lane.pe].take(),
                             *row_reduce("sum", width=w, dst=Mem(stat), a=xh)]
        join(body, reducer.allreduce_instrs(stat, 1, Op.ADD))
        for lane in strip:
            w, xh = lane.width, xs[lane.pe].store.row(i, loop)
            body[lane.pe] += [vec(Op.MUL, 1, Mem(stat), Mem(stat), Imm(inv_d)),  # mean
                              vec(Op.SUB, w, xh, xh, Mem(stat, 0)),
                              *row_reduce("dot", width=w, dst=Mem(stat), a=xh, b=xh)]
        join(body, reducer.allreduce_instrs(stat, 1, Op.ADD))
        for lane in strip:
            w, xh, rs = lane.width, xs[lane.pe].store.row(i, loop), rstd.scalar(i, loop)
            body[lane.pe] += [
                vec(Op.FMA, 1, Mem(stat), Mem(stat), Imm(inv_d), Imm(eps)),  # var + eps
                vec(Op.RSQRT, 1, rstd.row(i, loop), Mem(stat)),
                vec(Op.MUL, w, xh, xh, rs),
                vec(Op.MUL, w, Mem(scratch), xh, Mem(params)),
                vec(Op.ADD, w, FabOut(y_out[lane.index]), Mem(scratch), Mem(params + w)),
            ]
        return body

    def backward_row(i: int, loop: int) -> PerPE:
        """Row rows - 1 - i: the stored xhat rows and rstd are read backwards."""
        body: PerPE = {}
        for lane in strip:
            w, pe = lane.width, lane.pe
            xh, dy, t = (xs[pe].store.row(i, loop, backwards=True), dys[pe].store.row(i, loop),
                         Mem(t_row))
            body[pe] = [
                *dys[pe].take(),
                vec(Op.ADD, w, Mem(grads + w), Mem(grads + w), dy),  # dbeta
                vec(Op.MUL, w, t, dy, xh),
                vec(Op.ADD, w, Mem(grads), Mem(grads), t),  # dgamma
                # stat = [sum(g), sum(g xhat)]: one allreduce for both
                *row_reduce("dot", width=w, dst=Mem(stat), a=dy, b=Mem(params)),
                *row_reduce("dot", width=w, dst=Mem(stat + 1), a=t, b=Mem(params)),
            ]
        join(body, reducer.allreduce_instrs(stat, 2, Op.ADD))
        for lane in strip:
            w, pe = lane.width, lane.pe
            xh, dy, t = (xs[pe].store.row(i, loop, backwards=True), dys[pe].store.row(i, loop),
                         Mem(t_row))
            rs = rstd.scalar(i, loop, backwards=True)
            body[pe] += [
                vec(Op.MUL, 1, Mem(stat), Mem(stat), rs),
                vec(Op.MUL, 1, Mem(stat + 1), Mem(stat + 1), rs),
                vec(Op.MUL, 2, Mem(stat), Mem(stat), Imm(-inv_d)),  # Q | P
                vec(Op.FMA, w, t, xh, Mem(stat + 1, 0), Mem(stat, 0)),
                vec(Op.MUL, w, dy, dy, Mem(params)),  # g
                vec(Op.FMA, w, FabOut(dx_out[lane.index]), dy, rs, t),
                *dys[pe].release(),
            ]
        return body

    for pe, instrs in rounds(range(rows), 1, forward_row).items():
        kernel.emit(pe, *instrs)
    if not backward:
        return kernel
    for pe, instrs in rounds(range(rows), RING, backward_row).items():
        kernel.emit(pe, *dys[pe].open(), *instrs)
    for lane in strip:
        w, pe, cs = lane.width, lane.pe, lane.cols
        for param, offset in ((gamma_name, 0), (beta_name, w)):
            emit_update(kernel, pe, update, param, (1, cols), weight=params + offset,
                        grad=grads + offset, rows=(0, 1), cols=cs, row_stride=w)
    return kernel


# -- cost -------------------------------------------------------------------------------------


def cycles(rows: int, cols: int, lane_width: int) -> int:
    """Cycles of a lone LayerNorm kernel fed at full rate: the compute thread's forward,
    backward and update of the docstring, with each allreduce's latency per row."""
    m, w = rows, lane_width
    group = math.ceil(cols / lane_width)
    latency = reduce_latency(group) + broadcast_latency(group)
    forward = 6 * w + 9 + 2 * (2 + latency)
    backward = 8 * w + 11 + 4 + latency
    return m * (forward + backward) + 2 * w


def sram_words(rows: int, lane_width: int) -> int:
    """Words per PE: xhat, rstd, gamma | beta and their gradients, the scaled and t rows,
    the dy ring and the row statistics."""
    w = lane_width
    return rows * w + rows + 4 * w + 2 * w + RING * w + 2


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

    def pes(self, ctx: LoweringContext, op: OpSpec) -> int:
        return len(ctx.lanes(op.inputs[0]))

    def lower(self, ctx: LoweringContext, op: OpSpec) -> Kernel:
        x, gamma, beta = op.inputs
        rows, _ = ctx.rows_cols(x)
        return build_layernorm(
            op.name, ctx.ops_with_updates(op.name, gamma, beta), ctx.ids, rows=rows,
            lanes=ctx.lanes(x), gamma=ctx.param(gamma),
            beta=ctx.param(beta), eps=op.attrs["eps"], update=ctx.update, x_tensor=x,
            y_tensor=op.outputs[0], dy_tensor=ctx.dy(op.name), dx_tensor=ctx.dx(op.name),
            gamma_name=gamma, beta_name=beta, queue_depth=ctx.wafer.queue_depth)


FAMILY = LayerNorm()
