"""GELU: y = gelu(x), dx = dy * gelu'(x).

Graph: kind `gelu` (attribute `activation`), saves its input. FLOPs per element: forward 8,
backward 12 (erf or tanh counted as one).

Layout: a 1-high strip, PE (j, 0) owns lane j of the tensor (see rowreduce's strip
layout); nothing is needed from another PE. Costs are per PE, for M rows of a lane w
wide, one cycle per vector element, fabric latency left out.

Algorithm
---------
`activation` "gelu": gelu(x) = x Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2, and
gelu'(x) = Phi(x) + x exp(-x^2 / 2) / sqrt(2 pi).
"gelu_tanh": gelu(x) = x Phi_t(x), Phi_t = (1 + tanh u) / 2, u = k x (1 + a x^2),
k = sqrt(2 / pi), a = 0.044715, and gelu'(x) = Phi_t + s (1 - tanh^2 u) / 2 with
s = k x (1 + 3 a x^2); the code uses (1 - tanh^2 u) / 2 = 2 Phi_t (1 - Phi_t), so
gelu' = Phi_t (1 + 2 s (1 - Phi_t)).

Forward, per row: a thread of its own receives x into SRAM (compiler.lowering.inbox: the
producer never waits while a row is emitted); the compute thread waits for the row's
token, builds Phi in place with vector ops, emits y = Phi * x, then turns the row's (x,
Phi) into gelu'(x) in place of Phi (x is then dead), off the critical path while the
consumer works on the row. The backward receives dy rows (a matmul's dX, element by
element) on a thread of its own into a two-row ring and emits each dx row whole, `MUL
FabOut = Mem(dy row) * Mem(gelu' row)`, as the matmul that reads it needs
(compiler.ops.matmul). Keeping gelu'(x) instead of x costs the same SRAM and keeps the
derivative's arithmetic out of the backward.
Cost (cycles per element; M w elements): exact: forward 4 (scale, erf, fma, multiply-out),
derivative 5, backward 1; tanh: forward 6, derivative 6, backward 1; plus the token wait, a
cycle per row; in the backward the token and the slot's credit, and the receiving thread's
credit and token wavelets, which take the ramps that dx streams through: 4 per row. Every
forward pass writes SRAM, so the receiving thread's write of each x element (one write
port) costs the compute thread a cycle: 1 more per element.
SRAM 2 M w + one row of scratch + two dy rows.
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING, Literal

import numpy as np

from compiler.graph import GraphBuilder, OpSpec
from compiler.lowering.inbox import RING, Inbox, PerPE, RowStore, inbox, rounds
from compiler.lowering.ir import FabOut, Imm, Instr, Mem, Op, Operand, repeat, vec
from compiler.lowering.kernel import Kernel, LocalPE, StreamIds
from compiler.lowering.rowreduce import alloc_all, rowwise_strip
from compiler.ops.base import OpFamily, Tensors

if TYPE_CHECKING:
    from compiler.lower import LoweringContext

Activation = Literal["gelu", "gelu_tanh"]

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_TANH_K = math.sqrt(2.0 / math.pi)
_TANH_A = 0.044715
FORWARD_FLOPS = 8  # per element
BACKWARD_FLOPS = 12

_erf = np.frompyfunc(math.erf, 1, 1)  # numpy has no erf; exact GELU needs it


def add_gelu(b: GraphBuilder, name: str, x: str, activation: Activation) -> str:
    """The GELU op on `x`; it saves `x` for the backward."""
    return b.elementwise(name, "gelu", (x,), (FORWARD_FLOPS, BACKWARD_FLOPS), saved=(x,),
                         attrs={"activation": activation})


# -- numpy ------------------------------------------------------------------------------------


def gelu_forward(x: np.ndarray, activation: Activation) -> np.ndarray:
    if activation == "gelu":
        return 0.5 * x * (1 + _erf(x / math.sqrt(2)).astype(x.dtype))
    u = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
    return 0.5 * x * (1 + np.tanh(u))


def gelu_backward(dy: np.ndarray, x: np.ndarray, activation: Activation) -> np.ndarray:
    """dx = dy * gelu'(x)."""
    return dy * gelu_derivative(x, activation)


def gelu_derivative(x: np.ndarray, activation: Activation) -> np.ndarray:
    """d gelu(x) / dx, elementwise."""
    if activation == "gelu":
        cdf = 0.5 * (1 + _erf(x / math.sqrt(2)).astype(x.dtype))
        return cdf + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    c = math.sqrt(2 / math.pi)
    th = np.tanh(c * (x + 0.044715 * x**3))
    return 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * c * (1 + 3 * 0.044715 * x * x)


# -- kernel -----------------------------------------------------------------------------------


def build_gelu(name: str, ops: list[str], ids: StreamIds, *, rows: int,
               lanes: list[tuple[int, int]], activation: Activation, x_tensor: str,
               y_tensor: str, dy_tensor: str | None, dx_tensor: str | None,
               queue_depth: int) -> Kernel:
    """y = gelu(x) forward, dx = dy * gelu'(x) backward, all [rows, cols] in `lanes`;
    without `dy_tensor` the forward only."""
    backward = dy_tensor is not None
    if activation not in ("gelu", "gelu_tanh"):
        raise ValueError(f"{name}: unknown activation {activation!r}")
    rs = rowwise_strip(name, "gelu", ops, ids, rows=rows, lanes=lanes, x=x_tensor,
                       y=y_tensor, dy=dy_tensor, dx=dx_tensor)
    kernel, strip, pes = rs.kernel, rs.lanes, rs.pes
    x_in, y_out, dy_in, dx_out = rs.x_in, rs.y_out, rs.dy_in, rs.dx_out
    lane_width = max(lane.width for lane in strip)
    xs = alloc_all(kernel, pes, rows * lane_width, f"{x_tensor} (x)")
    phi = alloc_all(kernel, pes, rows * lane_width, "Phi(x), then gelu'(x)")
    s = Mem(alloc_all(kernel, pes, lane_width, "scratch row"))
    dy_ring = alloc_all(kernel, pes, RING * lane_width, "dy ring")
    tanh = activation == "gelu_tanh"
    for j, lane in enumerate(strip):
        pe, w = lane.pe, lane.width
        x_rows = inbox(kernel, pe, ids, x_in[j], RowStore(xs, w, rows), queue_depth=queue_depth)
        p_rows = RowStore(phi, w, rows)
        kernel.emit(pe, *repeat(rows, [*x_rows.take(), *forward_and_derivative(
            w, x_rows.store.row(0, 1), p_rows.row(0, 1), s, FabOut(y_out[j]), tanh)]))
        if backward:
            # dy arrives element by element (a matmul's dX): received apart, each dx row is
            # emitted whole, as a matmul reading it in line needs (compiler.ops.matmul)
            dy = inbox(kernel, pe, ids, dy_in[j], RowStore(dy_ring, w, rows, RING),
                       queue_depth=queue_depth, after=x_rows)
            backward_row = partial(_backward_row, pe, dy, p_rows, FabOut(dx_out[j]))
            kernel.emit(pe, *dy.open(), *rounds(range(rows), RING, backward_row)[pe])
    return kernel


def _backward_row(pe: LocalPE, dy: Inbox, gelu_prime: RowStore, out: Operand, i: int,
                  loop: int) -> PerPE:
    """Backward row i (row rows - 1 - i): dx = dy * gelu'(x), emitted whole."""
    return {pe: [*dy.take(), vec(Op.MUL, dy.store.width, out, dy.store.row(i, loop),
                                 gelu_prime.row(i, loop, backwards=True)), *dy.release()]}


def forward_and_derivative(w: int, x: Operand, p: Operand, s: Operand, out: Operand,
                 tanh: bool) -> list[Instr]:
    """One row: Phi into p, y = Phi x out, then gelu'(x) into p (x and s are scratch)."""
    if tanh:
        instrs = [vec(Op.MUL, w, p, x, x),
                  vec(Op.FMA, w, p, p, Imm(_TANH_K * _TANH_A), Imm(_TANH_K)),
                  vec(Op.MUL, w, p, p, x),  # u
                  vec(Op.TANH, w, p, p)]
    else:
        instrs = [vec(Op.MUL, w, p, x, Imm(_INV_SQRT2)), vec(Op.ERF, w, p, p)]
    instrs += [vec(Op.FMA, w, p, p, Imm(0.5), Imm(0.5)),  # Phi
               vec(Op.MUL, w, out, p, x)]
    if tanh:  # gelu' = Phi_t (1 + 2 s (1 - Phi_t)), s = k x (1 + 3 a x^2)
        return instrs + [vec(Op.MUL, w, s, x, x),
                         vec(Op.FMA, w, s, s, Imm(3.0 * _TANH_K * _TANH_A), Imm(_TANH_K)),
                         vec(Op.MUL, w, s, s, x),
                         vec(Op.FMA, w, x, p, Imm(-2.0), Imm(2.0)),  # 2 (1 - Phi_t), over x
                         vec(Op.FMA, w, x, x, s, Imm(1.0)),
                         vec(Op.MUL, w, p, p, x)]
    # gelu' = Phi + x phi(x), phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
    return instrs + [vec(Op.MUL, w, s, x, Imm(-0.5)),
                     vec(Op.FMA, w, s, s, x, Imm(-_LOG_SQRT_2PI)),
                     vec(Op.EXP, w, s, s),
                     vec(Op.MUL, w, s, s, x),
                     vec(Op.ADD, w, p, p, s)]


# -- cost -------------------------------------------------------------------------------------

# Cycles per element (see the docstring): receive, forward, derivative, backward.
PASSES = {"gelu": 1 + 4 + 5 + 1, "gelu_tanh": 1 + 6 + 6 + 1}


def cycles(rows: int, lane_width: int, activation: Activation) -> int:
    """Cycles of a lone GELU kernel fed at full rate (its lanes run in parallel): the
    passes over every element, 1 cycle per forward row and 4 per backward row for the
    tokens and credits."""
    return PASSES[activation] * rows * lane_width + 5 * rows


def sram_words(rows: int, lane_width: int) -> int:
    """Words per PE: x, Phi (then gelu'), one scratch row, the dy ring."""
    return 2 * rows * lane_width + lane_width + RING * lane_width


class Gelu(OpFamily):
    kinds = ("gelu",)

    def forward(self, op: OpSpec, t: Tensors) -> None:
        (x,) = op.inputs
        t[op.outputs[0]] = gelu_forward(t[x], op.attrs["activation"])

    def backward(self, op: OpSpec, t: Tensors) -> None:
        dy, x = op.inputs
        t[op.outputs[0]] = gelu_backward(t[dy], t[x], op.attrs["activation"])

    def pes(self, ctx: LoweringContext, op: OpSpec) -> int:
        return len(ctx.lanes(op.inputs[0]))

    def lower(self, ctx: LoweringContext, op: OpSpec) -> Kernel:
        (x,) = op.inputs
        rows, _ = ctx.rows_cols(x)
        return build_gelu(
            op.name, ctx.ops_with_updates(op.name), ctx.ids, rows=rows, lanes=ctx.lanes(x),
            activation=op.attrs["activation"], x_tensor=x,
            y_tensor=op.outputs[0], dy_tensor=ctx.dy(op.name), dx_tensor=ctx.dx(op.name),
            queue_depth=ctx.wafer.queue_depth)


FAMILY = Gelu()
