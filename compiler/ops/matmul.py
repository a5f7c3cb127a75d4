"""The linear layer Y = X W + b: forward, backward and SGD update on a weight-stationary grid.

Graph: kind `matmul`, inputs x [M, K], `{op}.weight` [K, N] and `{op}.bias` [N]; several
outputs split the columns into equal blocks (the fused QKV projection: `.q`, `.k`, `.v`).
It saves x and W. FLOPs: 2 M K N for the product plus M N for the bias; the backward
twice the product (dX and dW) plus M N (db).

Layout. W [K, N] is cut into lanes (`lane_cols`): K lanes k_0..k_{R-1}, N lanes
n_0..n_{C-1}. The kernel is an R-high, C-wide rectangle; PE (c, r) holds the block
W[k_r, n_c] row-major (kb x nb words, kb = |k_r|, nb = |n_c|), its gradient, and PE (c, 0)
the bias lane b[n_c] and its gradient.

Why weight-stationary: on a wafer the weights live in SRAM next to the multipliers; they
never move. Activation rows stream through the grid like through a systolic array, so the
fabric carries only activations (M x K in, M x N out) and per-row partial sums between
neighbours, and the SGD update is a local vector op where weight and gradient sit.

Forward, per row m (one REPEAT over the M rows, the k loop unrolled in its body):
  X lane r is multicast along PE row r; each PE stores its x row (all M rows when the
  backward needs them, else one) and computes its partial row p = x[m, k_r] W[k_r, n_c] as
  kb vector FMAs of nb elements (p += W[k, :] * x[k], x[k] a stride-0 scalar). The partial
  sums reduce down each column through a chain of local streams: PE (c, r > 0) sends
  p + (partial from the north), the top PE folds the bias into its first FMA and sends its
  last FMA straight to the fabric; the bottom PE's sum is Y lane c.
Backward (DEADLOCK RULE: the dY lane comes from another kernel, so each PE reads its
  column's dY lane completely into SRAM first):
  dX: per row, q = W[k_r, n_c] dy[m, n_c] as nb vector FMAs of kb elements over the strided
  columns of W (stride nb), reduced west to east along each PE row (the same chain shape);
  the east PE emits dX lane r. dX goes first: the previous layer's backward waits for it.
  dW[k_r, n_c] = x^T dy as outer products (per row, kb FMAs of nb: dW[k, :] += x[k] dy);
  db[n_c] = sum of the dy rows, on the top PE.
Update: W -= lr dW and b -= lr db, one FMA with Imm(-lr) each.

Cost (cycles; one fp32 element per cycle per PE; M rows; kb, nb as above, lw for full
lanes; `forward_cycles`, `backward_cycles` and `sram_words` below). Every vector
instruction costs one cycle per element, plus one for an FMA whose first element reads
three SRAM words (two vectors and its stride-0 scalar) against a budget of two per cycle.
Per forward row a PE spends kb (receive x) + kb nb (products) + kb - 1
(FMAs after the first term, a MUL; kb on the top row, whose first FMA adds the bias) + nb
(the chain ADD, all but the top row). The multicast x rows and the column chains keep
the grid in lock step, so the slowest PE sets the pace:

  T_fwd = M * max_PE (kb + kb nb + (kb if r = 0 else kb - 1 + nb)) + fill,

fill ~ 3 cycles a hop (ramp, link, receive queue) from the source through the R chain PEs
to the sink. With full lanes, M (lw^2 + 3 lw - 1): 92% of the cycles are FMAs at lw = 32
(tests/test_matmul_kernel.py checks this form against the simulator: within 0.1%).
Backward, per PE: M nb (receive dY) + M (kb nb + nb - 1 + [c > 0] kb) (dX) +
M (kb nb + kb) (dW) + [r = 0] M nb (db); update kb nb (+ nb for the bias). E.g. a
128-row 128x128 layer at lw = 32 (4 x 4 PEs): forward 143,250 cycles, forward + backward +
update 426,802 by the formula, 426,796 simulated.
SRAM per PE: 2 kb nb (W, dW) + M kb (x rows) + M nb (dY rows) + nb + kb (+ 2 nb for the
bias on the top row); 10,368 words of 12,288 for gpt_small's layers at lw = 32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from compiler.graph import GraphBuilder, OpSpec, ParamInit, grad_name, updated_name
from compiler.lowering.kernel import (
    Kernel,
    LocalPE,
    LocalStream,
    ResultSlot,
    StreamEnd,
    StreamIds,
    lane_cols,
)
from compiler.ops.base import OpFamily, Tensors
from wse_sim.program import FabIn, FabOut, Imm, Instr, Mem, Op, Operand, repeat, vec

if TYPE_CHECKING:
    from compiler.lower import LoweringContext

Lane = tuple[int, int]


def add_linear(b: GraphBuilder, name: str, x: str, n_out: int, *,
               out_names: tuple[str, ...] = ("out",),
               init: ParamInit = "normal") -> tuple[str, ...]:
    """`x @ weight + bias` with weight (in, out); several `out_names` split the output
    columns into equal blocks (the fused QKV projection)."""
    m, k = b.shape(x)
    w = b.param(f"{name}.weight", (k, n_out), init)
    bias = b.param(f"{name}.bias", (n_out,), "zeros")
    part = n_out // len(out_names)
    products = 2 * m * k * n_out
    return b.forward(
        name, "matmul", (x, w, bias), {f"{name}.{o}": (m, part) for o in out_names},
        flops=products + m * n_out, matmul_flops=products, bwd_flops=2 * products + m * n_out,
        saved=(x, w), attrs={"m": m, "k": k, "n": n_out})


# -- numpy ------------------------------------------------------------------------------------


def linear_forward(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return x @ weight + bias


def linear_backward(dy: np.ndarray, x: np.ndarray,
                    weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dx, dweight, dbias)."""
    return dy @ weight.T, x.T @ dy, dy.sum(axis=0)


# -- kernel -----------------------------------------------------------------------------------


@dataclass
class WeightGrid:
    """A [K, N] matrix held block-wise on an R x C rectangle of `kernel` (from column x0):
    PE (x0 + c, r) holds W[k_lanes[r], n_lanes[c]] row-major at `weight[pe]` and, with a
    backward, its gradient at `grad[pe]` (zero until accumulated)."""

    kernel: Kernel
    rows: int  # M: activation rows streamed through
    k_lanes: list[Lane]
    n_lanes: list[Lane]
    weight: dict[LocalPE, int] = field(default_factory=dict)
    grad: dict[LocalPE, int] = field(default_factory=dict)
    x_rows: dict[LocalPE, int] = field(default_factory=dict)  # stored x rows (forward)
    dy_rows: dict[LocalPE, int] = field(default_factory=dict)  # stored dY rows (backward)

    def block(self, pe: LocalPE) -> tuple[int, int]:
        """(kb, nb): the block shape of PE `pe`."""
        (k0, k1), (n0, n1) = self.k_lanes[pe[1]], self.n_lanes[pe[0]]
        return k1 - k0, n1 - n0

    def pes(self) -> list[LocalPE]:
        return [(c, r) for r in range(len(self.k_lanes)) for c in range(len(self.n_lanes))]


def place_weights(kernel: Kernel, rows: int, matrix: np.ndarray, lane_width: int, *,
                  backward: bool) -> WeightGrid:
    """Load `matrix` [K, N] block-wise onto the kernel's PEs (a gradient buffer too when
    `backward`)."""
    k, n = matrix.shape
    grid = WeightGrid(kernel, rows, lane_cols(k, lane_width), lane_cols(n, lane_width))
    for pe in grid.pes():
        (k0, k1), (n0, n1) = grid.k_lanes[pe[1]], grid.n_lanes[pe[0]]
        grid.weight[pe] = kernel.alloc(pe, (k1 - k0) * (n1 - n0), "weight block")
        kernel.load(pe, grid.weight[pe], matrix[k0:k1, n0:n1])
        if backward:
            grid.grad[pe] = kernel.alloc(pe, (k1 - k0) * (n1 - n0), "weight gradient")
    return grid


def chain(kernel: Kernel, ids: StreamIds, pes: list[LocalPE]) -> list[int]:
    """Local streams pes[i] -> pes[i + 1] (a reduction chain); their ids."""
    streams = []
    for src, dst in zip(pes, pes[1:], strict=False):
        streams.append(ids.new())
        kernel.local_streams.append(LocalStream(src, (dst,), streams[-1]))
    return streams


def emit_row_products(kernel: Kernel, pe: LocalPE, *, rows: int, prefix: list[Instr],
                      terms: int, width: int, mat: int, term_step: int, elem_stride: int,
                      scalars: int, scalar_loop: int, acc: int, first_addend: Operand | None,
                      out: Operand, chain_in: int | None) -> None:
    """Per row (a REPEAT of `rows`): run `prefix`, then acc = first_addend + sum over s <
    `terms` of A_s * v[s], A_s the `width`-vector at `mat + s term_step` with element
    stride `elem_stride`, v[s] the scalar at `scalars + s` (advancing `scalar_loop` per row);
    send acc + (a wavelet per element from `chain_in`) to `out`, or without a chain input
    the last term's result straight to `out`."""

    def term(s: int, dst: Operand, addend: Operand | None) -> Instr:
        a, b = Mem(mat + s * term_step, elem_stride), Mem(scalars + s, 0, scalar_loop)
        if addend is None:
            return vec(Op.MUL, width, dst, a, b)
        return vec(Op.FMA, width, dst, a, b, addend)

    body = list(prefix)
    for s in range(terms):
        last_direct = chain_in is None and s == terms - 1
        body.append(term(s, out if last_direct else Mem(acc),
                         first_addend if s == 0 else Mem(acc)))
    if chain_in is not None:
        body.append(vec(Op.ADD, width, out, Mem(acc), FabIn(chain_in)))
    kernel.emit(pe, *repeat(rows, body))


def emit_forward(grid: WeightGrid, ids: StreamIds, *, x_tensor: str, y_tensor: str,
                 bias: dict[int, int] | None, keep_x: bool) -> None:
    """Y = X W (+ bias lane c at word bias[c] of PE (c, 0)); stores x rows if `keep_x`."""
    kernel, rows = grid.kernel, grid.rows
    n_r, n_c = len(grid.k_lanes), len(grid.n_lanes)
    x_ids = [ids.new() for _ in range(n_r)]
    y_ids = [ids.new() for _ in range(n_c)]
    chains = [chain(kernel, ids, [(c, r) for r in range(n_r)]) for c in range(n_c)]
    for r in range(n_r):
        kernel.inputs.append(StreamEnd(x_tensor, r, tuple((c, r) for c in range(n_c)),
                                       x_ids[r]))
    for c in range(n_c):
        kernel.outputs.append(StreamEnd(y_tensor, c, ((c, n_r - 1),), y_ids[c]))
    for pe in grid.pes():
        c, r = pe
        kb, nb = grid.block(pe)
        xs = grid.x_rows[pe] = kernel.alloc(pe, rows * kb if keep_x else kb, "x rows")
        loop = kb if keep_x else 0
        emit_row_products(
            kernel, pe, rows=rows, prefix=[vec(Op.MOV, kb, Mem(xs, 1, loop), FabIn(x_ids[r]))],
            terms=kb, width=nb, mat=grid.weight[pe], term_step=nb, elem_stride=1,
            scalars=xs, scalar_loop=loop, acc=kernel.alloc(pe, nb, "partial row"),
            first_addend=Mem(bias[c]) if bias is not None and r == 0 else None,
            out=FabOut(y_ids[c] if r == n_r - 1 else chains[c][r]),
            chain_in=chains[c][r - 1] if r > 0 else None)


def emit_backward(grid: WeightGrid, ids: StreamIds, *, dy_tensor: str,
                  dx_tensor: str | None) -> None:
    """Read dY, send dX (if `dx_tensor`), accumulate dW into `grid.grad`."""
    kernel, rows = grid.kernel, grid.rows
    n_r, n_c = len(grid.k_lanes), len(grid.n_lanes)
    dy_ids = [ids.new() for _ in range(n_c)]
    for c in range(n_c):
        kernel.inputs.append(StreamEnd(dy_tensor, c, tuple((c, r) for r in range(n_r)),
                                       dy_ids[c]))
    for pe in grid.pes():
        nb = grid.block(pe)[1]
        dys = grid.dy_rows[pe] = kernel.alloc(pe, rows * nb, "dY rows")
        kernel.emit(pe, vec(Op.MOV, rows * nb, Mem(dys), FabIn(dy_ids[pe[0]])))
    if dx_tensor is not None:
        dx_ids = [ids.new() for _ in range(n_r)]
        chains = [chain(kernel, ids, [(c, r) for c in range(n_c)]) for r in range(n_r)]
        for r in range(n_r):
            kernel.outputs.append(StreamEnd(dx_tensor, r, ((n_c - 1, r),), dx_ids[r]))
        for pe in grid.pes():
            c, r = pe
            kb, nb = grid.block(pe)
            emit_row_products(
                kernel, pe, rows=rows, prefix=[], terms=nb, width=kb, mat=grid.weight[pe],
                term_step=1, elem_stride=nb, scalars=grid.dy_rows[pe], scalar_loop=nb,
                acc=kernel.alloc(pe, kb, "partial dx row"), first_addend=None,
                out=FabOut(dx_ids[r] if c == n_c - 1 else chains[r][c]),
                chain_in=chains[r][c - 1] if c > 0 else None)
    for pe in grid.pes():
        kb, nb = grid.block(pe)
        dw, xs, dys = grid.grad[pe], grid.x_rows[pe], grid.dy_rows[pe]
        kernel.emit(pe, *repeat(rows, [
            vec(Op.FMA, nb, Mem(dw + k * nb), Mem(dys, 1, nb), Mem(xs + k, 0, kb),
                Mem(dw + k * nb))
            for k in range(kb)]))


def emit_sum_rows(kernel: Kernel, pe: LocalPE, *, rows: int, width: int, src: int,
                  dst: int) -> None:
    """dst[:width] += sum of the `rows` rows of `src` (row-major, `width` words each)."""
    kernel.emit(pe, *repeat(rows, [vec(Op.ADD, width, Mem(dst), Mem(src, 1, width),
                                       Mem(dst))]))


def emit_sgd(kernel: Kernel, pe: LocalPE, param: int, grad: int, words: int, lr: float) -> None:
    """param -= lr * grad, one vector FMA."""
    kernel.emit(pe, vec(Op.FMA, words, Mem(param), Mem(grad), Imm(-lr), Mem(param)))


def weight_slots(grid: WeightGrid, name: str, *, transposed: bool = False) -> None:
    """Result slots grad:`name` and updated:`name` of the grid's matrix (stored as the
    transpose of the parameter when `transposed`)."""
    for pe in grid.pes():
        k_lane, n_lane = grid.k_lanes[pe[1]], grid.n_lanes[pe[0]]
        nb = n_lane[1] - n_lane[0]
        for tensor, offset in ((grad_name(name), grid.grad[pe]),
                               (updated_name(name), grid.weight[pe])):
            if transposed:
                slot = ResultSlot(tensor, pe, offset, n_lane, k_lane, row_stride=1,
                                  col_stride=nb)
            else:
                slot = ResultSlot(tensor, pe, offset, k_lane, n_lane, row_stride=nb)
            grid.kernel.results.append(slot)


def build_linear(name: str, ops: list[str], ids: StreamIds, *, rows: int, k: int, n: int,
                 lane_width: int, weight: np.ndarray, bias: np.ndarray | None, lr: float,
                 x_tensor: str, y_tensor: str, dy_tensor: str | None = None,
                 dx_tensor: str | None = None, weight_name: str,
                 bias_name: str | None = None) -> Kernel:
    """The kernel of Y = X W + b ([rows, k] x [k, n]); with `dy_tensor` also its backward
    (dX only if `dx_tensor`) and the SGD update of W and b. Result slots (with a backward):
    grad:/updated: of `weight_name` ([k, n]) and `bias_name` ([1, n])."""
    if weight.shape != (k, n):
        raise ValueError(f"{name}: weight has shape {weight.shape}, expected {(k, n)}")
    if bias is not None and (bias.shape != (n,) or bias_name is None):
        raise ValueError(f"{name}: bias must have shape {(n,)} and a bias_name")
    if dx_tensor is not None and dy_tensor is None:
        raise ValueError(f"{name}: dX needs dY")
    backward = dy_tensor is not None
    k_lanes, n_lanes = lane_cols(k, lane_width), lane_cols(n, lane_width)
    kernel = Kernel(name=name, op="matmul", ops=list(ops), width=len(n_lanes),
                    height=len(k_lanes), shapes={x_tensor: (rows, k), y_tensor: (rows, n)})
    grid = place_weights(kernel, rows, weight, lane_width, backward=backward)
    bias_at: dict[int, int] = {}
    bias_grad: dict[int, int] = {}
    if bias is not None:
        for c, (n0, n1) in enumerate(n_lanes):
            bias_at[c] = kernel.alloc((c, 0), n1 - n0, "bias lane")
            kernel.load((c, 0), bias_at[c], bias[n0:n1])
            if backward:
                bias_grad[c] = kernel.alloc((c, 0), n1 - n0, "bias gradient")
    emit_forward(grid, ids, x_tensor=x_tensor, y_tensor=y_tensor,
                 bias=bias_at if bias is not None else None, keep_x=backward)
    if not backward:
        return kernel
    kernel.shapes[dy_tensor] = (rows, n)
    if dx_tensor is not None:
        kernel.shapes[dx_tensor] = (rows, k)
    emit_backward(grid, ids, dy_tensor=dy_tensor, dx_tensor=dx_tensor)
    for c, (n0, n1) in enumerate(n_lanes if bias is not None else []):
        emit_sum_rows(kernel, (c, 0), rows=rows, width=n1 - n0, src=grid.dy_rows[(c, 0)],
                      dst=bias_grad[c])
    for pe in grid.pes():
        kb, nb = grid.block(pe)
        emit_sgd(kernel, pe, grid.weight[pe], grid.grad[pe], kb * nb, lr)
    weight_slots(grid, weight_name)
    if bias is not None:
        for c, lane in enumerate(n_lanes):
            emit_sgd(kernel, (c, 0), bias_at[c], bias_grad[c], lane[1] - lane[0], lr)
            for tensor, offset in ((grad_name(bias_name), bias_grad[c]),
                                   (updated_name(bias_name), bias_at[c])):
                kernel.results.append(ResultSlot(tensor, (c, 0), offset, (0, 1), lane,
                                                 row_stride=lane[1] - lane[0]))
                kernel.shapes[tensor] = (1, n)
    for tensor in (grad_name(weight_name), updated_name(weight_name)):
        kernel.shapes[tensor] = (k, n)
    return kernel


# -- cost -------------------------------------------------------------------------------------


def _blocks(k: int, n: int, lane_width: int) -> list[tuple[int, int, int, int]]:
    """(c, r, kb, nb) of every PE of the grid."""
    return [(c, r, k1 - k0, n1 - n0)
            for r, (k0, k1) in enumerate(lane_cols(k, lane_width))
            for c, (n0, n1) in enumerate(lane_cols(n, lane_width))]


def forward_cycles(rows: int, k: int, n: int, lane_width: int) -> int:
    """A lone forward pass with bias: per row a PE (c, r) receives its x row (kb cycles),
    runs kb FMA/MUL instructions of nb elements (kb nb, plus one cycle for each instruction
    whose first element reads three SRAM words against a budget of two: all kb FMAs on the
    top row, whose first addend is the bias, kb - 1 elsewhere) and, below the top row, adds
    the partial from the north (nb). The multicast x rows and the column chains keep the
    grid in lock step, so the slowest PE sets the pace; the fill is 3 cycles a hop (ramp,
    link, receive queue) from the source through the R chain PEs to the sink."""
    per_row = max(kb + kb * nb + (kb if r == 0 else kb - 1 + nb)
                  for _, r, kb, nb in _blocks(k, n, lane_width))
    return rows * per_row + 3 * (len(lane_cols(k, lane_width)) + 2)


def backward_cycles(rows: int, k: int, n: int, lane_width: int) -> int:
    """The backward with dX and the updates, after the forward, on the busiest PE: dY rows
    (M nb), dX partials (M (kb nb + nb - 1) plus M kb to add the west partial), dW
    (M (kb nb + kb)), db on the top row (M nb) and the updates (kb nb, + nb on the top
    row)."""
    return max(rows * nb + rows * (kb * nb + nb - 1 + (kb if c > 0 else 0))
               + rows * (kb * nb + kb) + (rows * nb + nb if r == 0 else 0) + kb * nb
               for c, r, kb, nb in _blocks(k, n, lane_width))


def sram_words(rows: int, kb: int, nb: int, *, top_row: bool) -> int:
    """Words of a PE with a kb x nb block: W and dW, its x and dY rows, the partial rows,
    and on the top row the bias lane and its gradient."""
    return 2 * kb * nb + rows * kb + rows * nb + nb + kb + (2 * nb if top_row else 0)


class Matmul(OpFamily):
    kinds = ("matmul",)

    def forward(self, op: OpSpec, t: Tensors) -> None:
        x, weight, bias = op.inputs
        y = linear_forward(t[x], t[weight], t[bias])
        for name, part in zip(op.outputs, np.split(y, len(op.outputs), axis=1), strict=True):
            t[name] = part

    def backward(self, op: OpSpec, t: Tensors) -> None:
        *dys, x, weight = op.inputs
        dx, dweight, dbias = op.outputs
        dy = np.concatenate([t[d] for d in dys], axis=1)
        t[dx], t[dweight], t[dbias] = linear_backward(dy, t[x], t[weight])

    def lower(self, ctx: LoweringContext, op: OpSpec) -> Kernel:
        x, weight, bias = op.inputs
        rows, k = ctx.rows_cols(x)
        # The fused QKV product streams one [M, 3d] tensor `{op}.out` (see compiler.lower).
        y, dy = ((op.outputs[0], ctx.dy(op.name)) if len(op.outputs) == 1
                 else (f"{op.name}.out", grad_name(f"{op.name}.out")))
        return build_linear(
            op.name, ctx.ops_with_updates(op.name, weight, bias), ctx.ids, rows=rows, k=k,
            n=op.attrs["n"], lane_width=ctx.lane_width, weight=ctx.param(weight),
            bias=ctx.param(bias), lr=ctx.lr, x_tensor=x, y_tensor=y, dy_tensor=dy,
            dx_tensor=ctx.dx(op.name), weight_name=weight, bias_name=bias)


FAMILY = Matmul()
