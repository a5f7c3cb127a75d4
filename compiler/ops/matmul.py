"""The linear layer Y = X W + b: forward, backward and SGD update on a weight-stationary grid.

Graph: kind `matmul`, inputs x [M, K], `{op}.weight` [K, N] and `{op}.bias` [N]; several
outputs split the columns into equal blocks (the fused QKV projection: `.q`, `.k`, `.v`).
It saves x and W. FLOPs: 2 M K N for the product plus M N for the bias; the backward
twice the product (dX and dW) plus M N (db).

Layout. The K columns of x arrive in lanes k_0..k_{R-1} (the producer's lanes), the N
columns of Y leave in lanes n_0..n_{C-1} (this kernel's choice). The kernel is an R-high,
C-wide rectangle; PE (c, r) holds the block W[k_r, n_c] row-major (kb x nb words, kb =
|k_r|, nb = |n_c|) and its gradient, PE (c, 0) the bias lane b[n_c] and its gradient. On a
wafer the weights live in SRAM next to the multipliers and never move: activation rows
stream through the grid like through a systolic array, and the SGD update is a local
vector op where weight and gradient sit.

Inputs are read in line, a row before its work: every kernel that feeds a matmul (the
strip kernels, attention, the adds of their outputs, cross-entropy) emits each row whole,
at one wavelet a cycle, so reading a row takes kb (or nb) cycles, and a PE with one thread
lets the simulator run its memory-only vector ops in bulk. (A matmul's own output arrives
element by element over its whole row time; its consumers receive it on threads of their
own, `compiler.lowering.inbox`.)
Forward, rows ascending, per row m (one REPEAT over the M rows, every PE):
  x lane r is multicast along PE row r; each PE stores its x row (the backward's dW needs
  every row) and computes nb dot products of kb terms
  (`compiler.lowering.dots`): output n is x[m, k_r] . W[k_r, n], seeded by the partial
  sum of output n arriving from the PE above (the top row seeds with the bias), sent to
  the PE below; the bottom PE's outputs are Y lane c. The partial sums flow element by
  element, so the column works as a pipeline: PE r + 1 starts output n as soon as PE r
  has sent it.
Backward, rows descending (DEADLOCK: see compiler.lowering.kernel; each PE reads its one
  dY lane and its west neighbour's partials in row order), per row m:
  dY lane c is multicast down PE column c; each PE stores the row, computes kb dot
  products of nb terms, dX[m, k] = dY[m, n_c] . W[k, n_c], seeded by the partial from the
  PE to the west and sent east; the east PE's outputs are dX lane r. Then, while dX moves
  on, it accumulates dW[k_r, n_c] += x[m, k_r]^T dY[m, n_c] (kb FMAs of nb) and on the top
  row db[n_c] += dY[m, n_c]: the weight gradient costs no extra pass and keeps no dY rows.
Update: W and b by the optimizer's update (`compiler.ops.update.emit_update`: SGD one FMA
each, AdamW with the moments beside them).

Cost (one fp32 element per cycle per PE; `forward_cycles`, `backward_cycles`,
`sram_words` below). Per forward row a PE spends kb cycles receiving its x row and kb nb
on its dot products, plus nb on the top row (the bias is a third SRAM read in each dot's
first cycle). The multicast x rows and the column chains keep a column in lock step, so
the slowest PE sets the pace: T_fwd = M max(kb + kb nb + [r = 0] nb) + fill. Per backward
row: nb (receive dY) + kb nb (dX) + kb (nb + 1) (dW: each FMA's first element also loads
its x[m, k] scalar, a third read) + [r = 0] nb (db). With kb = nb = w, 94% of the forward
and 95% of the backward cycles are FMAs at w = 32, 80% and 86% at w = 8.
SRAM per PE: 2 kb nb (W, dW) + M kb (x rows) + nb (the dY row) (+ 2 nb for the bias).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from compiler.graph import GraphBuilder, OpSpec, ParamInit, grad_name
from compiler.lowering.dots import Walk, dot_cycles, dots
from compiler.lowering.ir import FabIn, FabOut, Mem, Op, repeat, vec
from compiler.lowering.kernel import Kernel, LocalPE, StreamIds
from compiler.ops.base import OpFamily, Tensors
from compiler.ops.update import UpdateRule, emit_update

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
    """A [K, N] matrix held block-wise on an R x C rectangle of `kernel`: PE (c, r) holds
    W[k_lanes[r], n_lanes[c]] row-major at `weight[pe]` and, with a backward, its gradient
    at `grad[pe]` (zero until accumulated) and the stored x rows at `x_rows[pe]`."""

    kernel: Kernel
    rows: int  # M: activation rows streamed through
    k_lanes: list[Lane]
    n_lanes: list[Lane]
    weight: dict[LocalPE, int] = field(default_factory=dict)
    grad: dict[LocalPE, int] = field(default_factory=dict)
    x_rows: dict[LocalPE, int] = field(default_factory=dict)

    def block(self, pe: LocalPE) -> tuple[int, int]:
        """(kb, nb): the block shape of PE `pe`."""
        (k0, k1), (n0, n1) = self.k_lanes[pe[1]], self.n_lanes[pe[0]]
        return k1 - k0, n1 - n0

    def pes(self) -> list[LocalPE]:
        return [(c, r) for r in range(len(self.k_lanes)) for c in range(len(self.n_lanes))]


def place_weights(kernel: Kernel, rows: int, matrix: np.ndarray, k_lanes: list[Lane],
                  n_lanes: list[Lane], *, backward: bool) -> WeightGrid:
    """Load `matrix` [K, N] block-wise onto the kernel's PEs (with a gradient buffer and
    room for the x rows when `backward`)."""
    grid = WeightGrid(kernel, rows, k_lanes, n_lanes)
    for pe in grid.pes():
        (k0, k1), (n0, n1) = k_lanes[pe[1]], n_lanes[pe[0]]
        grid.weight[pe] = kernel.alloc(pe, (k1 - k0) * (n1 - n0), "weight block")
        kernel.load(pe, grid.weight[pe], matrix[k0:k1, n0:n1])
        if backward:
            grid.grad[pe] = kernel.alloc(pe, (k1 - k0) * (n1 - n0), "weight gradient")
    return grid


def emit_forward(grid: WeightGrid, ids: StreamIds, *, x_tensor: str, y_tensor: str,
                 bias: dict[int, int] | None, keep_x: bool) -> None:
    """Y = X W (+ bias lane c at word bias[c] of PE (c, 0)), rows ascending; stores every
    x row if `keep_x` (else one)."""
    kernel, rows = grid.kernel, grid.rows
    n_r, n_c = len(grid.k_lanes), len(grid.n_lanes)
    x_ids = kernel.lane_inputs(ids, x_tensor, grid.k_lanes,
                               [tuple((c, r) for c in range(n_c)) for r in range(n_r)],
                               "ascending")
    y_ids = kernel.lane_outputs(ids, y_tensor, grid.n_lanes,
                                [(c, n_r - 1) for c in range(n_c)], "ascending")
    down = {(c, r): kernel.local((c, r), ((c, r + 1),), ids)
            for c in range(n_c) for r in range(n_r - 1)}
    for pe in grid.pes():
        c, r = pe
        kb, nb = grid.block(pe)
        xs = grid.x_rows[pe] = kernel.alloc(pe, rows * kb if keep_x else kb, "x rows")
        step = kb if keep_x else 0
        out = FabOut(y_ids[c] if r == n_r - 1 else down[pe])
        if r > 0:
            seed = [FabIn(down[(c, r - 1)])] * nb
        elif bias is not None:
            seed = [Mem(bias[c] + n, 0) for n in range(nb)]  # a scalar: a third read
        else:
            seed = None
        body = [vec(Op.MOV, kb, Mem(xs, 1, step), FabIn(x_ids[r]))]
        body += dots(nb, kb, Walk(grid.weight[pe], nb, 1), Walk(xs, 1, 0, step), acc=0,
                     out=[out] * nb, seed=seed)
        kernel.emit(pe, *repeat(rows, body))


def emit_backward(grid: WeightGrid, ids: StreamIds, *, dy_tensor: str, dx_tensor: str | None,
                  bias_grad: dict[int, int] | None) -> None:
    """Rows descending: read dY, send dX (if `dx_tensor`), accumulate dW into `grid.grad`
    and db into `bias_grad[c]` of PE (c, 0)."""
    kernel, rows = grid.kernel, grid.rows
    n_r, n_c = len(grid.k_lanes), len(grid.n_lanes)
    dy_ids = kernel.lane_inputs(ids, dy_tensor, grid.n_lanes,
                                [tuple((c, r) for r in range(n_r)) for c in range(n_c)],
                                "descending")
    dx_ids, east = None, {}
    if dx_tensor is not None:
        dx_ids = kernel.lane_outputs(ids, dx_tensor, grid.k_lanes,
                                     [(n_c - 1, r) for r in range(n_r)], "descending")
        east = {(c, r): kernel.local((c, r), ((c + 1, r),), ids)
                for r in range(n_r) for c in range(n_c - 1)}
    for pe in grid.pes():
        c, r = pe
        kb, nb = grid.block(pe)
        dy = kernel.alloc(pe, nb, "dY row")
        last_x = grid.x_rows[pe] + (rows - 1) * kb  # rows run backwards
        body = [vec(Op.MOV, nb, Mem(dy), FabIn(dy_ids[c]))]
        if dx_ids is not None:
            out = FabOut(dx_ids[r] if c == n_c - 1 else east[pe])
            seed = [FabIn(east[(c - 1, r)])] * kb if c > 0 else None
            body += dots(kb, nb, Walk(grid.weight[pe], 1, nb), Walk(dy, 1), acc=0,
                         out=[out] * kb, seed=seed)
        dw = grid.grad[pe]
        body += [vec(Op.FMA, nb, Mem(dw + k * nb), Mem(dy), Mem(last_x + k, 0, -kb),
                     Mem(dw + k * nb)) for k in range(kb)]
        if r == 0 and bias_grad is not None:
            body.append(vec(Op.ADD, nb, Mem(bias_grad[c]), Mem(bias_grad[c]), Mem(dy)))
        kernel.emit(pe, *repeat(rows, body))


def update_weights(grid: WeightGrid, update: UpdateRule, name: str, *,
                   transposed: bool = False) -> None:
    """The optimizer update of the grid's matrix, parameter `name` (stored as the transpose
    of the parameter when `transposed`), with its result slots."""
    k, n = grid.k_lanes[-1][1], grid.n_lanes[-1][1]
    for pe in grid.pes():
        k_lane, n_lane = grid.k_lanes[pe[1]], grid.n_lanes[pe[0]]
        nb = n_lane[1] - n_lane[0]
        at = {"weight": grid.weight[pe], "grad": grid.grad[pe]}
        if transposed:
            emit_update(grid.kernel, pe, update, name, (n, k), **at, rows=n_lane, cols=k_lane,
                        row_stride=1, col_stride=nb)
        else:
            emit_update(grid.kernel, pe, update, name, (k, n), **at, rows=k_lane, cols=n_lane,
                        row_stride=nb)


def build_linear(name: str, ops: list[str], ids: StreamIds, *, rows: int, k_lanes: list[Lane],
                 n_lanes: list[Lane], weight: np.ndarray, bias: np.ndarray | None,
                 update: UpdateRule,
                 x_tensor: str, y_tensor: str, dy_tensor: str | None = None,
                 dx_tensor: str | None = None, weight_name: str,
                 bias_name: str | None = None) -> Kernel:
    """The kernel of Y = X W + b ([rows, K] x [K, N]) with x arriving in `k_lanes` and Y
    leaving in `n_lanes`; with `dy_tensor` also its backward (dX only if `dx_tensor`) and
    the optimizer update of W and b. Result slots (with a backward): grad:/updated: (and
    the moments, `compiler.ops.update`) of `weight_name` ([K, N]) and `bias_name`
    ([1, N])."""
    k, n = k_lanes[-1][1], n_lanes[-1][1]
    if weight.shape != (k, n):
        raise ValueError(f"{name}: weight has shape {weight.shape}, lanes cover {(k, n)}")
    if bias is not None and (bias.shape != (n,) or bias_name is None):
        raise ValueError(f"{name}: bias must have shape {(n,)} and a bias_name")
    if dx_tensor is not None and dy_tensor is None:
        raise ValueError(f"{name}: dX needs dY")
    backward = dy_tensor is not None
    kernel = Kernel(name=name, op="matmul", ops=list(ops), width=len(n_lanes),
                    height=len(k_lanes), shapes={x_tensor: (rows, k), y_tensor: (rows, n)})
    grid = place_weights(kernel, rows, weight, k_lanes, n_lanes, backward=backward)
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
    emit_backward(grid, ids, dy_tensor=dy_tensor, dx_tensor=dx_tensor,
                  bias_grad=bias_grad if bias is not None else None)
    update_weights(grid, update, weight_name)
    if bias is not None:
        for c, lane in enumerate(n_lanes):
            emit_update(kernel, (c, 0), update, bias_name, (1, n), weight=bias_at[c],
                        grad=bias_grad[c], rows=(0, 1), cols=lane, row_stride=lane[1] - lane[0])
    return kernel


# -- cost -------------------------------------------------------------------------------------


def _blocks(k_lanes: list[Lane], n_lanes: list[Lane]) -> list[tuple[int, int, int, int]]:
    """(c, r, kb, nb) of every PE of the grid."""
    return [(c, r, k1 - k0, n1 - n0) for r, (k0, k1) in enumerate(k_lanes)
            for c, (n0, n1) in enumerate(n_lanes)]


def forward_row_cycles(kb: int, nb: int, *, top_row_bias: bool) -> int:
    """One forward row on a PE: receive kb, nb dots of kb terms (+ nb for a bias seed)."""
    return kb + dot_cycles(nb, kb, memory_seed=top_row_bias)


def backward_row_cycles(kb: int, nb: int, *, dx: bool, top_row_bias: bool) -> int:
    """One backward row on a PE: receive nb, kb dots of nb terms (dX), kb FMAs of nb that
    each read a third word in their first cycle (dW), nb (db on the top row)."""
    return (nb + (dot_cycles(kb, nb) if dx else 0) + kb * (nb + 1)
            + (nb if top_row_bias else 0))


def forward_cycles(rows: int, k_lanes: list[Lane], n_lanes: list[Lane], *,
                   bias: bool = True) -> int:
    """A lone forward pass: the slowest PE's rows (the grid runs in lock step) plus the
    fill: each PE below the top starts its first dot when the one above has finished its
    own (kb cycles and 3 a hop: ramp, link, receive queue), and 6 cycles to and from the
    neighbouring kernels."""
    per_row = max(forward_row_cycles(kb, nb, top_row_bias=bias and r == 0)
                  for _, r, kb, nb in _blocks(k_lanes, n_lanes))
    kb_max = max(k1 - k0 for k0, k1 in k_lanes)
    return rows * per_row + (len(k_lanes) - 1) * (kb_max + 3) + 6


def backward_cycles(rows: int, k_lanes: list[Lane], n_lanes: list[Lane], *,
                    bias: bool = True, dx: bool = True) -> int:
    """The backward pass and the update, after the forward, on the busiest PE."""
    return max(rows * backward_row_cycles(kb, nb, dx=dx, top_row_bias=bias and r == 0)
               + kb * nb + (nb if bias and r == 0 else 0)
               for _, r, kb, nb in _blocks(k_lanes, n_lanes))


def sram_words(rows: int, kb: int, nb: int, *, top_row_bias: bool) -> int:
    """Words of a PE with a kb x nb block: W and dW, its x rows, the dY row, and on the
    top row the bias lane and its gradient."""
    return 2 * kb * nb + rows * kb + nb + (2 * nb if top_row_bias else 0)


def _output(op: OpSpec) -> str:
    """The tensor a matmul streams: its output, or for the fused QKV product one [M, 3d]
    tensor `{op}.out` (see compiler.lower)."""
    return op.outputs[0] if len(op.outputs) == 1 else f"{op.name}.out"


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

    def pes(self, ctx: LoweringContext, op: OpSpec) -> int:
        return len(ctx.lanes(op.inputs[0])) * len(ctx.lanes(_output(op)))

    def lower(self, ctx: LoweringContext, op: OpSpec) -> Kernel:
        x, weight, bias = op.inputs
        rows, _ = ctx.rows_cols(x)
        y = _output(op)
        dy = (ctx.dy(op.name) if len(op.outputs) == 1
              else grad_name(y) if ctx.graph.backward_of(op.name) else None)
        return build_linear(
            op.name, ctx.ops_with_updates(op.name, weight, bias), ctx.ids, rows=rows,
            k_lanes=ctx.lanes(x), n_lanes=ctx.lanes(y), weight=ctx.param(weight),
            bias=ctx.param(bias), update=ctx.update, x_tensor=x, y_tensor=y, dy_tensor=dy,
            dx_tensor=ctx.dx(op.name), weight_name=weight, bias_name=bias)


FAMILY = Matmul()
