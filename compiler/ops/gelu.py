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

Forward, per block of rows: receive x into SRAM, build Phi in place with vector ops, emit
y = Phi * x. After the last block, while the rest of the forward pass runs downstream,
each PE turns its stored (x, Phi) into gelu'(x) in place of Phi (x is then dead). The
backward streams one instruction per row, rows descending, `MUL FabOut = FabIn(dy) *
Mem(gelu' row)`: dx leaves as fast as dy arrives. Keeping gelu'(x) instead of x costs the
same SRAM and moves the derivative's arithmetic off the backward critical path.
Cost (cycles per element; M w elements): exact: forward 5 (receive, scale, erf, fma,
multiply-out), derivative 5, backward 1; tanh: forward 7, derivative 6, backward 1.
SRAM 2 M w + 1 block (block_rows * w) of scratch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import numpy as np

from compiler.graph import GraphBuilder, OpSpec
from compiler.lowering.kernel import Kernel, StreamIds
from compiler.lowering.rowreduce import (
    DEFAULT_BLOCK_ROWS,
    alloc_all,
    row_blocks,
    rows_back,
    strip_inputs,
    strip_kernel,
    strip_outputs,
)
from compiler.ops.base import OpFamily, Tensors
from wse_sim.program import FabIn, FabOut, Imm, Mem, Op, repeat, vec

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
               y_tensor: str, dy_tensor: str, dx_tensor: str,
               block_rows: int = DEFAULT_BLOCK_ROWS) -> Kernel:
    """y = gelu(x) forward, dx = dy * gelu'(x) backward, all [rows, cols] in `lanes`."""
    if activation not in ("gelu", "gelu_tanh"):
        raise ValueError(f"{name}: unknown activation {activation!r}")
    cols = lanes[-1][1]
    kernel, strip = strip_kernel(name, "gelu", ops, lanes)
    pes = [lane.pe for lane in strip]
    kernel.shapes.update({t: (rows, cols) for t in (x_tensor, y_tensor, dy_tensor, dx_tensor)})
    x_in = strip_inputs(kernel, ids, x_tensor, strip, "ascending")
    y_out = strip_outputs(kernel, ids, y_tensor, strip, "ascending")
    dy_in = strip_inputs(kernel, ids, dy_tensor, strip, "descending")
    dx_out = strip_outputs(kernel, ids, dx_tensor, strip, "descending")
    blocks = row_blocks(rows, block_rows)
    lane_width = max(lane.width for lane in strip)
    words = rows * lane_width
    xs = alloc_all(kernel, pes, words, f"{x_tensor} (x)")
    phi = alloc_all(kernel, pes, words, "Phi(x), then gelu'(x)")
    scratch = alloc_all(kernel, pes, min(rows, block_rows) * lane_width, "scratch block")
    tanh = activation == "gelu_tanh"
    for j, lane in enumerate(strip):
        pe, w = lane.pe, lane.width
        for r0, r1 in blocks:
            n, x, p = (r1 - r0) * w, Mem(xs + r0 * w), Mem(phi + r0 * w)
            kernel.emit(pe, vec(Op.MOV, n, x, FabIn(x_in[j])))
            if tanh:
                kernel.emit(
                    pe,
                    vec(Op.MUL, n, p, x, x),
                    vec(Op.FMA, n, p, p, Imm(_TANH_K * _TANH_A), Imm(_TANH_K)),
                    vec(Op.MUL, n, p, p, x),  # u
                    vec(Op.TANH, n, p, p),
                )
            else:
                kernel.emit(pe, vec(Op.MUL, n, p, x, Imm(_INV_SQRT2)), vec(Op.ERF, n, p, p))
            kernel.emit(
                pe,
                vec(Op.FMA, n, p, p, Imm(0.5), Imm(0.5)),  # Phi
                vec(Op.MUL, n, FabOut(y_out[j]), p, x),
            )
        for r0, r1 in blocks:
            n, x, p, s = (r1 - r0) * w, Mem(xs + r0 * w), Mem(phi + r0 * w), Mem(scratch)
            if tanh:
                kernel.emit(
                    pe,
                    vec(Op.MUL, n, s, x, x),
                    vec(Op.FMA, n, s, s, Imm(3.0 * _TANH_K * _TANH_A), Imm(_TANH_K)),
                    vec(Op.MUL, n, s, s, x),  # s = k x (1 + 3 a x^2)
                    vec(Op.FMA, n, x, p, Imm(-2.0), Imm(2.0)),  # 2 (1 - Phi_t), over x
                    vec(Op.FMA, n, x, x, s, Imm(1.0)),
                    vec(Op.MUL, n, p, p, x),
                )
            else:
                kernel.emit(
                    pe,
                    vec(Op.MUL, n, s, x, Imm(-0.5)),
                    vec(Op.FMA, n, s, s, x, Imm(-_LOG_SQRT_2PI)),
                    vec(Op.EXP, n, s, s),  # phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
                    vec(Op.MUL, n, s, s, x),
                    vec(Op.ADD, n, p, p, s),
                )
        kernel.emit(pe, *repeat(rows, [vec(Op.MUL, w, FabOut(dx_out[j]), FabIn(dy_in[j]),
                                            rows_back(phi + (rows - 1) * w, w))]))
    return kernel


# -- cost -------------------------------------------------------------------------------------

# Vector passes per element (see the docstring): forward, derivative, backward.
PASSES = {"gelu": 5 + 5 + 1, "gelu_tanh": 7 + 6 + 1}


def cycles(rows: int, lane_width: int, activation: Activation) -> int:
    """Cycles of a lone GELU kernel (its lanes run in parallel)."""
    return PASSES[activation] * rows * lane_width


def sram_words(rows: int, lane_width: int, block_rows: int = DEFAULT_BLOCK_ROWS) -> int:
    """Words per PE: x, Phi (then gelu'), one scratch block."""
    return 2 * rows * lane_width + min(rows, block_rows) * lane_width


class Gelu(OpFamily):
    kinds = ("gelu",)

    def forward(self, op: OpSpec, t: Tensors) -> None:
        (x,) = op.inputs
        t[op.outputs[0]] = gelu_forward(t[x], op.attrs["activation"])

    def backward(self, op: OpSpec, t: Tensors) -> None:
        dy, x = op.inputs
        t[op.outputs[0]] = gelu_backward(t[dy], t[x], op.attrs["activation"])

    def lower(self, ctx: LoweringContext, op: OpSpec) -> Kernel:
        (x,) = op.inputs
        rows, _ = ctx.rows_cols(x)
        return build_gelu(
            op.name, ctx.ops_with_updates(op.name), ctx.ids, rows=rows, lanes=ctx.lanes(x),
            activation=op.attrs["activation"], x_tensor=x,
            y_tensor=op.outputs[0], dy_tensor=ctx.dy(op.name), dx_tensor=ctx.dx(op.name))


FAMILY = Gelu()
