"""Elementwise kernels: the add (residual adds and gradient accumulation) and GELU.

Layout: a 1-high strip, PE (j, 0) owns lane j of the tensor (see rowreduce's strip layout).
Neither op needs anything from another PE, so each PE is an independent pipeline from its
input lane(s) to its output lane. Costs below are per PE, for M rows of a lane w wide,
counting one cycle per vector element (the PE's fp32 rate) and leaving out fabric latency.

build_add: y = a + b
--------------------
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

build_gelu: y = gelu(x), dx = dy * gelu'(x)
-------------------------------------------
`activation` "gelu": gelu(x) = x Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2, and
gelu'(x) = Phi(x) + x exp(-x^2 / 2) / sqrt(2 pi).
"gelu_tanh": gelu(x) = x Phi_t(x), Phi_t = (1 + tanh u) / 2, u = k x (1 + a x^2),
k = sqrt(2 / pi), a = 0.044715, and gelu'(x) = Phi_t + s (1 - tanh^2 u) / 2 with
s = k x (1 + 3 a x^2); the code uses (1 - tanh^2 u) / 2 = 2 Phi_t (1 - Phi_t), so
gelu' = Phi_t (1 + 2 s (1 - Phi_t)).

Forward, per block of rows: receive x into SRAM, build Phi in place with vector ops, emit
y = Phi * x. After the last block, while the rest of the forward pass runs downstream,
each PE turns its stored (x, Phi) into gelu'(x) in place of Phi (x is then dead). The
backward is a single streaming instruction `MUL FabOut = FabIn(dy) * Mem(gelu')`: dx leaves
as fast as dy arrives. Keeping gelu'(x) instead of x costs the same SRAM and moves the
derivative's arithmetic off the backward critical path.
Cost (cycles per element; M w elements): exact: forward 5 (receive, scale, erf, fma,
multiply-out), derivative 5, backward 1; tanh: forward 7, derivative 6, backward 1.
SRAM 2 M w + 1 block (block_rows * w) of scratch.
"""

from __future__ import annotations

import math
from typing import Literal

from compiler.lowering.kernel import Kernel, LocalStream, StreamIds
from compiler.lowering.rowreduce import (
    DEFAULT_BLOCK_ROWS,
    alloc_all,
    lane_inputs,
    lane_outputs,
    row_blocks,
    strip_kernel,
)
from wse_sim.program import FabIn, FabOut, Imm, Mem, Op, vec

Activation = Literal["gelu", "gelu_tanh"]

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_TANH_K = math.sqrt(2.0 / math.pi)
_TANH_A = 0.044715


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


def build_gelu(name: str, ops: list[str], ids: StreamIds, *, rows: int, cols: int,
               lane_width: int, activation: Activation, x_tensor: str, y_tensor: str,
               dy_tensor: str, dx_tensor: str,
               block_rows: int = DEFAULT_BLOCK_ROWS) -> Kernel:
    """y = gelu(x) forward, dx = dy * gelu'(x) backward, all [rows, cols]."""
    if activation not in ("gelu", "gelu_tanh"):
        raise ValueError(f"{name}: unknown activation {activation!r}")
    kernel, lanes = strip_kernel(name, "gelu", ops, cols, lane_width)
    pes = [lane.pe for lane in lanes]
    kernel.shapes.update({t: (rows, cols) for t in (x_tensor, y_tensor, dy_tensor, dx_tensor)})
    x_in = lane_inputs(kernel, ids, x_tensor, pes)
    y_out = lane_outputs(kernel, ids, y_tensor, pes)
    dy_in = lane_inputs(kernel, ids, dy_tensor, pes)
    dx_out = lane_outputs(kernel, ids, dx_tensor, pes)
    blocks = row_blocks(rows, block_rows)
    words = rows * lane_width
    xs = alloc_all(kernel, pes, words, f"{x_tensor} (x)")
    phi = alloc_all(kernel, pes, words, "Phi(x), then gelu'(x)")
    scratch = alloc_all(kernel, pes, min(rows, block_rows) * lane_width, "scratch block")
    tanh = activation == "gelu_tanh"
    for j, lane in enumerate(lanes):
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
        kernel.emit(pe, vec(Op.MUL, rows * w, FabOut(dx_out[j]), FabIn(dy_in[j]), Mem(phi)))
    return kernel
