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

The forward reads x in line, a row before its work: every kernel that feeds a matmul (the
strip kernels, attention, the adds of their outputs, cross-entropy) emits each row whole,
at one wavelet a cycle, so reading a row takes kb cycles. (A matmul's own output arrives
element by element over its whole row time; its consumers receive it on threads of their
own, `compiler.lowering.inbox`.) The backward receives dY on a thread of its own: the dX
it feeds is the step's critical path, and the nb cycles of reading a row in line were 4%
of a row at w = 12 and 10% for a QKV block of 4 x 32, which set the backward's pace.
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
  dY lane c is multicast down PE column c; each PE receives the row on a thread of its
  own and keeps every row (`compiler.lowering.inbox`: the next rows arrive while this one
  is worked on, and the receiving thread waits for nothing but the stream; a ring of a
  few rows would need a credit channel, one more color on every matmul PE, or a REPEAT
  body of as many rows as the ring has slots), computes kb dot products of nb terms,
  dX[m, k] = dY[m, n_c] . W[k, n_c], seeded by the partial from the PE to the west and
  sent east; the east PE's outputs are dX lane r. Then, while dX moves on, it accumulates
  dW[k_r, n_c] += x[m, k_r]^T dY[m, n_c] (kb FMAs of nb) and on the top row db[n_c] +=
  dY[m, n_c]: the weight gradient costs no extra pass. In mixed precision the compute
  thread receives each dY row itself (it scales the row as it arrives, which costs the
  same from a store) into one fp16 row.
Update: W and b by the optimizer's update (`compiler.ops.update.emit_update`: SGD one FMA
each, AdamW with the moments beside them).

Cost (one fp32 element per cycle per PE; `forward_cycles`, `backward_cycles`,
`sram_words` below). Per forward row a PE spends kb cycles receiving its x row and kb nb
on its dot products, plus nb on the top row (the bias is a third SRAM read in each dot's
first cycle). The multicast x rows and the column chains keep a column in lock step, so
the slowest PE sets the pace: T_fwd = M max(kb + kb nb + [r = 0] nb) + fill. Per backward
row: 1 (the dY row's token) + kb nb (dX) + kb (nb + 1) (dW: each FMA's first element
also loads its x[m, k] scalar, a third read) + [r = 0] nb (db). With
kb = nb = w, 97% of the forward and 98% of the backward cycles are FMAs at w = 32, 89%
and 93% at w = 8.
SRAM per PE: 2 kb nb (W, dW) + M kb (x rows) + M nb (dY rows) (+ 2 nb for the bias).

Blocks narrower than a lane (`k_block`, chosen by `compiler.plan`). A lane wider than the
pace allows (attention's whole heads against lanes of w < d_head: a 11 x 32 block does
2.9x the multiply-adds of a 11 x 11 one) is cut into blocks of k_block rows of W, one PE
row each; the partial sums run down all of them as before. Every PE of the lane's rows
gets the whole x row (one multicast) and stores it. Those rows run a hop apart in the
chain, so a reading compute thread would hold the multicast, and with it the lane's top
row, to the lag of its bottom one: each receives on a thread of its own into the x store
(`compiler.lowering.inbox`; all rows, forward-only too), and a forward row costs the
token and the dots, max(lane, 1 + nb kb) (+ nb on the top row). Backward: dX of the lane
leaves from its top row's east PE, which sends its own kb columns and then passes on
those of the blocks below it, each lower east PE sending its own from memory and then
passing on the rest: `below` columns a row more on the east column (the stored dY rows
let the lower blocks run ahead, so their dX is there when it is passed on; in mixed
precision, where dY is not queued, a hop more; `backward_row_cycles`). SRAM: the x rows
are the lane's, M x lane (+ kb for the dX row of a lower east PE).

Mixed precision (`compile.precision: mixed`, `precision="mixed"`; the tied LM head of
`compiler.ops.embedding` uses the same grid code). fp16: the stored x rows and the dY row
(converted on arrival: the producers still stream fp32 wavelets), and two fp16 copies of
W, W^T for the forward's dots and W for dX's, so that both walk unit-stride fp16 vectors
(rows padded to an even count of halves, 32-bit aligned). fp32: the master W and b, dW
and db, the partial sums that flow down and east, Y and dX, and the update. The fp16
copies are not state: each pass converts the master it starts from (`half_copy`: W^T
before the forward, W before the backward), so a training loop that carries only the
fp32 master from step to step (`compiler.state`) stays right. Every product
is fp16 x fp16 (exact in fp32) accumulated in fp32 (the SDK's @fmachs). Gradients of
activations are often below fp16's normal range (2^-14; gpt_tiny's QKV dY is ~3e-6), so
dY is multiplied by S = `loss_scale` (a power of two) before its rounding, and dX (on the
last column, as it leaves), dW and db (after the rows) are divided by S: both exact, so
the numpy twin rounds x, W and S dY to fp16, divides by S and is otherwise the fp32
formula. Cycles: a dot of K terms takes 2 + ceil((K - 2) / s) instead of K, s =
`half_dot_step` = min(mixed SIMD width, the two 32-bit read ports: a word a pair per
factor) = 2 on WSE-2 (fmachs is SIMD-2 there) and on WSE-3 (fmachs SIMD-4, port-bound),
so the multiply part takes ~1/2 of fp32's (not 1/4: the fp16-only @fmach is SIMD-4, but
it accumulates in fp16). Per forward row kb + nb (2 + ceil((kb - 2) / s)) + [r = 0] nb;
per backward row nb (S dY) + nb / c (to fp16; c = the conversion width, 1 on WSE-2) +
kb (2 + ceil((nb - 2) / s)) + kb (nb + 1) + [r = 0] nb + [last column] kb (dX / S): dW and
db accumulate into fp32 SRAM at one 32-bit write an element, as in fp32. After the rows:
kb nb + [r = 0] nb (dW / S, db / S); before each pass its copy, 1 + kb nb / c
(`half_copy_cycles`). At kb = nb = 16 a top-row forward row takes 176 cycles instead of
288; at 32, a forward and backward row 2,336 instead of 3,202.
SRAM: 2 kb nb + (nb even(kb) + kb even(nb) + M even(kb) + nb) / 2 + nb (S dY in fp32)
(+ 2 nb for the bias, + kb on the last column), `sram_words`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from compiler.graph import GraphBuilder, OpSpec, ParamInit, grad_name
from compiler.lowering.dots import Walk, dot_cycles, dots
from compiler.lowering.inbox import RowStore, inbox
from compiler.lowering.ir import FabIn, FabOut, Imm, Instr, Mem, Op, repeat, vec
from compiler.lowering.kernel import Kernel, LocalPE, StreamIds, lane_cols
from compiler.ops.base import OpFamily, Tensors
from compiler.ops.update import UpdateRule, emit_update
from wse_sim.hardware import WaferConfig
from wse_sim.program import simd_width

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
    attrs: dict[str, object] = {"m": m, "k": k, "n": n_out}
    if b.cfg.compile.precision == "mixed":
        attrs.update(precision="mixed", loss_scale=b.cfg.compile.loss_scale)
    return b.forward(
        name, "matmul", (x, w, bias), {f"{name}.{o}": (m, part) for o in out_names},
        flops=products + m * n_out, matmul_flops=products, bwd_flops=2 * products + m * n_out,
        saved=(x, w), attrs=attrs)


# -- numpy ------------------------------------------------------------------------------------


def to_half(a: np.ndarray) -> np.ndarray:
    """`a` rounded to fp16 (to nearest even), in its own dtype: what the wafer stores when it
    writes a value to a half destination."""
    a = np.asarray(a)
    with np.errstate(over="ignore"):
        return a.astype(np.float16).astype(a.dtype)


def linear_forward(x: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                   half: bool = False) -> np.ndarray:
    """x W + b; `half` (mixed precision): the factors rounded to fp16, the products summed
    (and the bias added) in the arrays' precision."""
    if half:
        x, weight = to_half(x), to_half(weight)
    return x @ weight + bias


def linear_backward(dy: np.ndarray, x: np.ndarray, weight: np.ndarray, half: bool = False,
                    scale: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dx, dweight, dbias); `half`: every factor (and the dy that db sums) rounded to
    fp16 first, dy scaled by `scale` (a power of two) before its rounding and unscaled
    after (both exact)."""
    if half:
        dy, x, weight = to_half(dy * scale) / scale, to_half(x), to_half(weight)
    return dy @ weight.T, x.T @ dy, dy.sum(axis=0)


# -- kernel -----------------------------------------------------------------------------------


def block_rows(k_lanes: list[Lane], k_block: int | None) -> list[tuple[int, Lane]]:
    """The grid's PE rows, top to bottom: (input lane, the K columns of its blocks), each
    lane cut into blocks of `k_block` columns (the last narrower; None: whole lanes)."""
    return [(r, (k0 + a, k0 + b)) for r, (k0, k1) in enumerate(k_lanes)
            for a, b in lane_cols(k1 - k0, k_block or k1 - k0)]


@dataclass
class WeightGrid:
    """A [K, N] matrix held block-wise on an R x C rectangle of `kernel`: PE (c, r) holds
    W[K block of row r, n_lanes[c]] row-major at `weight[pe]` and, with a backward, its
    gradient at `grad[pe]` (zero until accumulated) and the stored x rows at `x_rows[pe]`.
    PE row r takes K block `k_rows[r]` of an input lane; a lane has one row or several."""

    kernel: Kernel
    rows: int  # M: activation rows streamed through
    k_lanes: list[Lane]
    n_lanes: list[Lane]
    k_rows: list[tuple[int, Lane]]  # `block_rows`: (input lane, K block) per PE row
    weight: dict[LocalPE, int] = field(default_factory=dict)
    grad: dict[LocalPE, int] = field(default_factory=dict)
    x_rows: dict[LocalPE, int] = field(default_factory=dict)  # words; halves if `half`
    half: bool = False  # mixed precision: fp16 copies of W, fp16 x and dY rows
    weight16: dict[LocalPE, int] = field(default_factory=dict)  # W row-major, rows nbe halves
    weight16t: dict[LocalPE, int] = field(default_factory=dict)  # W^T, rows kbe halves

    def block(self, pe: LocalPE) -> tuple[int, int]:
        """(kb, nb): the block shape of PE `pe`."""
        (k0, k1), (n0, n1) = self.k_rows[pe[1]][1], self.n_lanes[pe[0]]
        return k1 - k0, n1 - n0

    def lane_part(self, pe: LocalPE) -> tuple[int, int, int]:
        """(input lane, its width, the block's first column within it) of PE `pe`."""
        lane, (k0, _) = self.k_rows[pe[1]]
        l0, l1 = self.k_lanes[lane]
        return lane, l1 - l0, k0 - l0

    def rows_of(self, lane: int) -> list[int]:
        """The PE rows of input lane `lane`, top to bottom."""
        return [r for r, (owner, _) in enumerate(self.k_rows) if owner == lane]

    def pes(self) -> list[LocalPE]:
        return [(c, r) for r in range(len(self.k_rows)) for c in range(len(self.n_lanes))]


def even(count: int) -> int:
    """`count` rounded up to even: a row of halves padded so the next row starts 32-bit
    aligned."""
    return count + count % 2


def alloc_halves(kernel: Kernel, pe: LocalPE, halves: int, purpose: str) -> int:
    """Room for `halves` fp16 values on `pe`; returns the offset in halves (even)."""
    return 2 * kernel.alloc(pe, (halves + 1) // 2, purpose)


def place_weights(kernel: Kernel, rows: int, matrix: np.ndarray, k_lanes: list[Lane],
                  n_lanes: list[Lane], *, backward: bool, half: bool = False,
                  k_block: int | None = None) -> WeightGrid:
    """Load `matrix` [K, N] block-wise onto the kernel's PEs, K lanes cut into blocks of
    `k_block` rows (with a gradient buffer and room for the x rows when `backward`; with
    `half`, also room for its fp16 copies, transposed and, with `backward`, row-major). With
    `half` a block must start at an even column of its lane: `k_block` even."""
    if half and k_block is not None and k_block % 2:
        raise ValueError(f"{kernel.name}: fp16 x rows need an even k_block, got {k_block}")
    grid = WeightGrid(kernel, rows, k_lanes, n_lanes, block_rows(k_lanes, k_block), half=half)
    for pe in grid.pes():
        (k0, k1), (n0, n1) = grid.k_rows[pe[1]][1], n_lanes[pe[0]]
        grid.weight[pe] = kernel.alloc(pe, (k1 - k0) * (n1 - n0), "weight block")
        kernel.load(pe, grid.weight[pe], matrix[k0:k1, n0:n1])
        if backward:
            grid.grad[pe] = kernel.alloc(pe, (k1 - k0) * (n1 - n0), "weight gradient")
        if half:  # made from the master by the pass that uses them (`half_copy`)
            kb, nb = k1 - k0, n1 - n0
            grid.weight16t[pe] = alloc_halves(kernel, pe, nb * even(kb), "fp16 weight^T")
            if backward:
                grid.weight16[pe] = alloc_halves(kernel, pe, kb * even(nb), "fp16 weight")
    return grid


def emit_forward(grid: WeightGrid, ids: StreamIds, *, x_tensor: str, y_tensor: str,
                 bias: dict[int, int] | None, keep_x: bool,
                 queue_depth: int | None = None) -> None:
    """Y = X W (+ bias lane c at word bias[c] of PE (c, 0)), rows ascending; stores every
    x row if `keep_x` (else one). Every PE of a lane's rows stores the whole lane's x rows
    (every row, on a receiving thread: module docstring) and multiplies its block's
    columns of them."""
    kernel, rows = grid.kernel, grid.rows
    n_r, n_c = len(grid.k_rows), len(grid.n_lanes)
    x_ids = kernel.lane_inputs(ids, x_tensor, grid.k_lanes,
                               [tuple((c, r) for r in grid.rows_of(lane) for c in range(n_c))
                                for lane in range(len(grid.k_lanes))],
                               "ascending")
    y_ids = kernel.lane_outputs(ids, y_tensor, grid.n_lanes,
                                [(c, n_r - 1) for c in range(n_c)], "ascending")
    down = {(c, r): kernel.local((c, r), ((c, r + 1),), ids)
            for c in range(n_c) for r in range(n_r - 1)}
    for pe in grid.pes():
        c, r = pe
        kb, nb = grid.block(pe)
        lane, kl, off = grid.lane_part(pe)
        split = kb < kl
        keep = keep_x or split
        out = FabOut(y_ids[c] if r == n_r - 1 else down[pe])
        if r > 0:
            seed = [FabIn(down[(c, r - 1)])] * nb
        elif bias is not None:
            seed = [Mem(bias[c] + n, 0) for n in range(nb)]  # a scalar: a third read
        else:
            seed = None
        if grid.half:  # x rows stored in fp16 (rows of even(kl) halves), W^T's fp16 copy
            row = even(kl)
            xs = grid.x_rows[pe] = alloc_halves(kernel, pe, rows * row if keep else row,
                                                "fp16 x rows")
            w_walk = Walk(grid.weight16t[pe], 1, even(kb), half=True)
        else:
            row = kl
            xs = grid.x_rows[pe] = kernel.alloc(pe, rows * kl if keep else kl, "x rows")
            w_walk = Walk(grid.weight[pe], nb, 1)
        step = row if keep else 0
        if split:
            if queue_depth is None:
                raise ValueError(f"{kernel.name}: blocks of a lane's rows need the queue depth")
            box = inbox(kernel, pe, ids, [(x_ids[lane], (0, kl))],
                        RowStore(xs, row, rows, half=grid.half), queue_depth=queue_depth)
            body = box.take()
        else:
            body = [vec(Op.MOV, kl, Mem(xs, 1, step, half=grid.half), FabIn(x_ids[lane]))]
        body += dots(nb, kb, w_walk, Walk(xs + off, 1, 0, step, half=grid.half), acc=0,
                     out=[out] * nb, seed=seed)
        if grid.half:
            kernel.emit(pe, *half_copy(grid, pe, transposed=True))
        kernel.emit(pe, *repeat(rows, body))


def emit_backward(grid: WeightGrid, ids: StreamIds, *, dy_tensor: str, dx_tensor: str | None,
                  bias_grad: dict[int, int] | None, queue_depth: int, scale: int = 1) -> None:
    """Rows descending: read dY, send dX (if `dx_tensor`), accumulate dW into `grid.grad`
    and db into `bias_grad[c]` of PE (c, 0). With fp16 (`grid.half`), dY is scaled by
    `scale` (a power of two) before its rounding and every product divided by it. dY
    arrives on a receiving thread that stores every row (`compiler.lowering.inbox`), so
    the next rows come in while this one's dots run. A lane of several PE rows leaves from
    its top row's east PE: each east PE of the lane sends its own dX columns and then
    passes on those of the blocks below it (from the east PE below), up. (Passed down
    instead, each PE's dots would wait for those above it, and the multicast dY would hold
    the whole column to that chain's pace.)"""
    kernel, rows = grid.kernel, grid.rows
    n_r, n_c = len(grid.k_rows), len(grid.n_lanes)
    dy_ids = kernel.lane_inputs(ids, dy_tensor, grid.n_lanes,
                                [tuple((c, r) for r in range(n_r)) for c in range(n_c)],
                                "descending")
    dx_ids, east, up = None, {}, {}
    if dx_tensor is not None:
        dx_ids = kernel.lane_outputs(ids, dx_tensor, grid.k_lanes,
                                     [(n_c - 1, grid.rows_of(lane)[0])
                                      for lane in range(len(grid.k_lanes))], "descending")
        east = {(c, r): kernel.local((c, r), ((c + 1, r),), ids)
                for r in range(n_r) for c in range(n_c - 1)}
        up = {r: kernel.local((n_c - 1, r + 1), ((n_c - 1, r),), ids)  # row r + 1 -> r
              for r in range(n_r - 1) if grid.k_rows[r + 1][0] == grid.k_rows[r][0]}
    half = grid.half
    for pe in grid.pes():
        c, r = pe
        kb, nb = grid.block(pe)
        lane, kl, off = grid.lane_part(pe)
        if half:  # S dY in fp32, then rounded to fp16; W's row-major fp16 copy (the
            # compute thread scales dY as it arrives: no cheaper from a store)
            dy = alloc_halves(kernel, pe, nb, "fp16 dY row")
            dy32 = kernel.alloc(pe, nb, "scaled dY row")
            body = [vec(Op.MUL, nb, Mem(dy32), FabIn(dy_ids[c]), Imm(scale)),
                    vec(Op.MOV, nb, Mem(dy, half=True), Mem(dy32))]
            dy_row = Mem(dy, half=True)
            x_row = even(kl)
            w_walk = Walk(grid.weight16[pe], 1, even(nb), half=True)
        else:
            dy_in = inbox(kernel, pe, ids, dy_ids[c],
                          RowStore(kernel.alloc(pe, rows * nb, "dY rows"), nb, rows),
                          queue_depth=queue_depth)
            body = dy_in.take()
            dy_row = dy_in.store.row(0, 1)  # a row further each REPEAT iteration
            x_row = kl
            w_walk = Walk(grid.weight[pe], 1, nb)
        dy_walk = Walk(dy_row.offset, 1, loop=dy_row.loop_stride, half=half)
        last_x = grid.x_rows[pe] + (rows - 1) * x_row + off  # rows run backwards
        if dx_ids is not None:
            if c < n_c - 1:
                out = FabOut(east[pe])
            else:
                out = FabOut(up[r - 1] if off else dx_ids[lane])
            seed = [FabIn(east[(c - 1, r)])] * kb if c > 0 else None
            if c == n_c - 1 and (half or off):
                # into memory first: the sums of S dY W are divided by S as they leave, and
                # a lower block's dX leaves in one burst, so that its dots need not wait
                # for the PE above to pass them on (the queue between them holds a few)
                dx = kernel.alloc(pe, kb, "dX row")
                body += dots(kb, nb, w_walk, dy_walk, acc=0,
                             out=[Mem(dx + k) for k in range(kb)], seed=seed)
                body.append(vec(Op.MUL, kb, out, Mem(dx), Imm(1 / scale)) if half
                            else vec(Op.MOV, kb, out, Mem(dx)))
            else:
                body += dots(kb, nb, w_walk, dy_walk, acc=0, out=[out] * kb, seed=seed)
            below = kl - off - kb
            if c == n_c - 1 and below:  # the lane's columns after this block, in order
                body.append(vec(Op.MOV, below, out, FabIn(up[r])))
        if half and dx_ids is not None:
            kernel.emit(pe, *half_copy(grid, pe, transposed=False))
        dw = grid.grad[pe]
        body += [vec(Op.FMA, nb, Mem(dw + k * nb), dy_row,
                     Mem(last_x + k, 0, -x_row, half=half), Mem(dw + k * nb))
                 for k in range(kb)]
        if r == 0 and bias_grad is not None:
            body.append(vec(Op.ADD, nb, Mem(bias_grad[c]), Mem(bias_grad[c]), dy_row))
        kernel.emit(pe, *repeat(rows, body))
        if half:  # S dW and S db, divided by S
            kernel.emit(pe, vec(Op.MUL, kb * nb, Mem(dw), Mem(dw), Imm(1 / scale)))
            if r == 0 and bias_grad is not None:
                kernel.emit(pe, vec(Op.MUL, nb, Mem(bias_grad[c]), Mem(bias_grad[c]),
                                    Imm(1 / scale)))


def half_copy(grid: WeightGrid, pe: LocalPE, *, transposed: bool) -> list[Instr]:
    """The fp16 copy of PE `pe`'s W block (row-major; W^T if `transposed`) converted from
    the fp32 master (fs2h), emitted before the pass that multiplies with it: the copies are
    never state (a training loop carries only the master from step to step)."""
    kb, nb = grid.block(pe)
    w = grid.weight[pe]
    if transposed:
        return repeat(nb, [vec(Op.MOV, kb, Mem(grid.weight16t[pe], 1, even(kb), half=True),
                               Mem(w, nb, 1))])
    return repeat(kb, [vec(Op.MOV, nb, Mem(grid.weight16[pe], 1, even(nb), half=True),
                           Mem(w, 1, nb))])


def update_weights(grid: WeightGrid, update: UpdateRule, name: str, *,
                   transposed: bool = False) -> None:
    """The optimizer update of the grid's matrix, parameter `name` (stored as the transpose
    of the parameter when `transposed`), with its result slots."""
    k, n = grid.k_lanes[-1][1], grid.n_lanes[-1][1]
    for pe in grid.pes():
        k_lane, n_lane = grid.k_rows[pe[1]][1], grid.n_lanes[pe[0]]
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
                 bias_name: str | None = None, precision: str = "fp32",
                 loss_scale: int = 1, k_block: int | None = None,
                 queue_depth: int | None = None) -> Kernel:
    """The kernel of Y = X W + b ([rows, K] x [K, N]) with x arriving in `k_lanes` and Y
    leaving in `n_lanes`; with `dy_tensor` also its backward (dX only if `dx_tensor`) and
    the optimizer update of W and b. Result slots (with a backward): grad:/updated: (and
    the moments, `compiler.ops.update`) of `weight_name` ([K, N]) and `bias_name`
    ([1, N]). `precision` "mixed": fp16 multiplies, fp32 accumulation, dY scaled by
    `loss_scale` before its fp16 rounding (module docstring). `k_block`: blocks of that
    many K columns, several PE rows a lane (module docstring, "Blocks narrower than a
    lane"), whose receiving threads' token channels hold 2 `queue_depth` tokens."""
    k, n = k_lanes[-1][1], n_lanes[-1][1]
    if weight.shape != (k, n):
        raise ValueError(f"{name}: weight has shape {weight.shape}, lanes cover {(k, n)}")
    if bias is not None and (bias.shape != (n,) or bias_name is None):
        raise ValueError(f"{name}: bias must have shape {(n,)} and a bias_name")
    if dx_tensor is not None and dy_tensor is None:
        raise ValueError(f"{name}: dX needs dY")
    backward = dy_tensor is not None
    kernel = Kernel(name=name, op="matmul", ops=list(ops), width=len(n_lanes),
                    height=len(block_rows(k_lanes, k_block)),
                    shapes={x_tensor: (rows, k), y_tensor: (rows, n)})
    half = precision == "mixed"
    grid = place_weights(kernel, rows, weight, k_lanes, n_lanes, backward=backward, half=half,
                         k_block=k_block)
    bias_at: dict[int, int] = {}
    bias_grad: dict[int, int] = {}
    if bias is not None:
        for c, (n0, n1) in enumerate(n_lanes):
            bias_at[c] = kernel.alloc((c, 0), n1 - n0, "bias lane")
            kernel.load((c, 0), bias_at[c], bias[n0:n1])
            if backward:
                bias_grad[c] = kernel.alloc((c, 0), n1 - n0, "bias gradient")
    emit_forward(grid, ids, x_tensor=x_tensor, y_tensor=y_tensor,
                 bias=bias_at if bias is not None else None, keep_x=backward,
                 queue_depth=queue_depth)
    if not backward:
        return kernel
    kernel.shapes[dy_tensor] = (rows, n)
    if dx_tensor is not None:
        kernel.shapes[dx_tensor] = (rows, k)
    if queue_depth is None:
        raise ValueError(f"{name}: a backward receives dY on a thread: it needs the queue depth")
    emit_backward(grid, ids, dy_tensor=dy_tensor, dx_tensor=dx_tensor,
                  bias_grad=bias_grad if bias is not None else None, queue_depth=queue_depth,
                  scale=loss_scale)
    update_weights(grid, update, weight_name)
    if bias is not None:
        for c, lane in enumerate(n_lanes):
            emit_update(kernel, (c, 0), update, bias_name, (1, n), weight=bias_at[c],
                        grad=bias_grad[c], rows=(0, 1), cols=lane, row_stride=lane[1] - lane[0])
    return kernel


# -- cost -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridPE:
    """A PE of the grid for the cost model: its place, block shape and input lane."""

    c: int
    r: int
    kb: int
    nb: int
    lane: int  # the width of the input lane it receives
    offset: int  # the lane's columns in the blocks above it

    @property
    def below(self) -> int:
        """The lane's columns in the blocks below it (dX it passes on, east column)."""
        return self.lane - self.offset - self.kb


def grid_pes(k_lanes: list[Lane], n_lanes: list[Lane],
             k_block: int | None = None) -> list[GridPE]:
    """Every PE of the grid, blocks as `block_rows` cuts them."""
    return [GridPE(c, r, k1 - k0, n1 - n0, lk1 - lk0, k0 - lk0)
            for r, (lane, (k0, k1)) in enumerate(block_rows(k_lanes, k_block))
            for lk0, lk1 in [k_lanes[lane]] for c, (n0, n1) in enumerate(n_lanes)]


def forward_row_cycles(kb: int, nb: int, *, top_row_bias: bool, step: int = 1,
                       lane: int | None = None) -> int:
    """One forward row on a PE: receive kb, nb dots of kb terms (+ nb for a bias seed);
    `step` > 1: mixed precision, the dots' middle terms `step` a cycle (`half_dot_step`).
    A block of a wider lane (`lane` > kb columns) receives on a thread of its own: the row
    costs its token and the dots, and no less than receiving the lane."""
    products = dot_cycles(nb, kb, memory_seed=top_row_bias, step=step)
    if lane is not None and lane > kb:
        return max(lane, 1 + products)
    return kb + products


def backward_row_cycles(kb: int, nb: int, *, dx: bool, top_row_bias: bool, step: int = 1,
                        convert_step: int = 0, last_column: bool = False,
                        below: int = 0, buffered: bool = False) -> int:
    """One backward row on a PE: the dY row's token (it arrives on a receiving thread), kb
    dots of nb terms (dX), kb FMAs of nb that each read a third word in their first cycle
    (dW), nb (db on the top row); on the last column of a lane's upper rows also the
    `below` dX columns it passes on, and of its lower rows (`buffered`) the kb it sends
    from memory. With `convert_step` (mixed precision) the compute thread receives the dY
    row itself, nb cycles that scale it, then converts it to fp16; on the last column dX's
    kb divisions by the scale as it leaves."""
    # passing on waits a hop for the first word, unless dY rows queue in an inbox: then
    # the blocks below run ahead of this one, and their dX is already waiting
    passed_on = below + (3 if convert_step else 0) if last_column and below else 0
    receive = nb if convert_step else 1
    cycles = (receive + (dot_cycles(kb, nb, step=step) + passed_on if dx else 0)
              + kb * (nb + 1) + (nb if top_row_bias else 0))
    if convert_step:
        cycles += -(-nb // convert_step)
    if dx and last_column and (convert_step or buffered):
        cycles += kb
    return cycles


def half_copy_cycles(kb: int, nb: int, convert_step: int, *, transposed: bool) -> int:
    """`half_copy` of a kb x nb block: a REPEAT and kb nb conversions, `convert_step` a
    cycle (`half_convert_step`), in rows of kb (W^T) or of nb."""
    if transposed:
        return 1 + nb * -(-kb // convert_step)
    return 1 + kb * -(-nb // convert_step)


def half_convert_step(wafer: WaferConfig) -> int:
    """Elements a cycle of an fp32 -> fp16 vector conversion (fs2h) into unit-stride
    halves."""
    return simd_width(vec(Op.MOV, 2, Mem(0, half=True), Mem(0)), wafer)


def forward_cycles(rows: int, k_lanes: list[Lane], n_lanes: list[Lane], *,
                   bias: bool = True, step: int = 1, convert_step: int = 0,
                   k_block: int | None = None) -> int:
    """A lone forward pass: the slowest PE's rows (the grid runs in lock step) plus the
    fill: each PE below the top starts its first dot when the one above has finished its
    own (a dot of kb terms and 3 a hop: ramp, link, receive queue), and 6 cycles to and
    from the neighbouring kernels, and with blocks of a wider lane the first row's
    receiving before its token. Mixed precision: `step` (`half_dot_step`) and
    `convert_step` (`half_convert_step`: W^T's fp16 copy made first)."""
    pes = grid_pes(k_lanes, n_lanes, k_block)
    per_row = max(forward_row_cycles(p.kb, p.nb, top_row_bias=bias and p.r == 0, step=step,
                                     lane=p.lane) for p in pes)
    kb_max = max(p.kb for p in pes)
    copy = (max(half_copy_cycles(p.kb, p.nb, convert_step, transposed=True) for p in pes)
            if convert_step else 0)
    first = max((p.lane for p in pes if p.kb < p.lane), default=0)  # received before its token
    return (copy + first + rows * per_row + pes[-1].r * (dot_cycles(1, kb_max, step=step) + 3)
            + 6)


def backward_cycles(rows: int, k_lanes: list[Lane], n_lanes: list[Lane], *,
                    bias: bool = True, dx: bool = True, step: int = 1,
                    convert_step: int = 0, k_block: int | None = None) -> int:
    """The backward pass and the SGD update, after the forward, on the busiest PE; with
    `convert_step` (mixed precision) also W's fp16 copy first (for dX) and dW's and db's
    division by the scale."""
    last = len(n_lanes) - 1
    return max(rows * backward_row_cycles(p.kb, p.nb, dx=dx, top_row_bias=bias and p.r == 0,
                                          step=step, convert_step=convert_step,
                                          last_column=p.c == last, below=p.below,
                                          buffered=p.offset > 0)
               + (p.kb * p.nb + (p.nb if bias and p.r == 0 else 0)) * (2 if convert_step else 1)
               + (half_copy_cycles(p.kb, p.nb, convert_step, transposed=False)
                  if convert_step and dx else 0)
               for p in grid_pes(k_lanes, n_lanes, k_block))


def sram_words(rows: int, kb: int, nb: int, *, top_row_bias: bool, half: bool = False,
               last_column: bool = False, lane: int | None = None,
               buffered: bool = False) -> int:
    """Words of a PE with a kb x nb block: W and dW, its x rows (of the whole input lane,
    `lane` columns, default kb), the dY rows (nb a row), on the top row the bias lane and
    its gradient, and on the last column of a lane's lower rows (`buffered`) the dX row;
    `half` (mixed precision): the x rows and one dY row in fp16 (rows padded to an even
    count of halves), two fp16 copies of W, the scaled dY row in fp32 and on the last
    column the dX row."""
    bias = 2 * nb if top_row_bias else 0
    lane = lane or kb
    if not half:
        return (2 * kb * nb + rows * (lane + nb) + bias
                + (kb if last_column and buffered else 0))

    def words(halves: int) -> int:
        return (halves + 1) // 2

    return (2 * kb * nb + words(nb * even(kb)) + words(kb * even(nb))
            + words(rows * even(lane)) + words(nb) + nb + bias + (kb if last_column else 0))


def balanced_k_block(lane: int, nb: int, pace: tuple[int, int]) -> int | None:
    """The widest K block (at most `lane`) with which a grid whose input lanes are `lane`
    and output lanes `nb` columns wide takes at most `pace` (forward, backward) cycles a
    row; None if whole lanes do, 1 if no block does (the receiving alone is too slow)."""
    def keeps_pace(kb: int) -> bool:
        return (forward_row_cycles(kb, nb, top_row_bias=False, lane=lane) <= pace[0]
                and backward_row_cycles(kb, nb, dx=True, top_row_bias=False,
                                        last_column=True, below=lane - kb) <= pace[1])

    if keeps_pace(lane):
        return None
    return next((kb for kb in range(lane - 1, 0, -1) if keeps_pace(kb)), 1)


def is_mixed(op: OpSpec) -> bool:
    """Whether `op` (forward or backward) multiplies in fp16 (`compile.precision: mixed`)."""
    return op.attrs.get("precision") == "mixed"


def output_tensor(op: OpSpec) -> str:
    """The tensor a matmul streams: its output, or for the fused QKV product one [M, 3d]
    tensor `{op}.out` (see compiler.lower)."""
    return op.outputs[0] if len(op.outputs) == 1 else f"{op.name}.out"


class Matmul(OpFamily):
    kinds = ("matmul",)

    def forward(self, op: OpSpec, t: Tensors) -> None:
        x, weight, bias = op.inputs
        y = linear_forward(t[x], t[weight], t[bias], half=is_mixed(op))
        for name, part in zip(op.outputs, np.split(y, len(op.outputs), axis=1), strict=True):
            t[name] = part

    def backward(self, op: OpSpec, t: Tensors) -> None:
        *dys, x, weight = op.inputs
        dx, dweight, dbias = op.outputs
        dy = np.concatenate([t[d] for d in dys], axis=1)
        t[dx], t[dweight], t[dbias] = linear_backward(dy, t[x], t[weight], half=is_mixed(op),
                                                      scale=op.attrs.get("loss_scale", 1))

    def pes(self, ctx: LoweringContext, op: OpSpec) -> int:
        k_lanes = ctx.lanes(op.inputs[0])
        return (len(block_rows(k_lanes, ctx.plan.k_blocks.get(op.name)))
                * len(ctx.lanes(output_tensor(op))))

    def lower(self, ctx: LoweringContext, op: OpSpec) -> Kernel:
        x, weight, bias = op.inputs
        rows, _ = ctx.rows_cols(x)
        y = output_tensor(op)
        dy = (ctx.dy(op.name) if len(op.outputs) == 1
              else grad_name(y) if ctx.graph.backward_of(op.name) else None)
        return build_linear(
            op.name, ctx.ops_with_updates(op.name, weight, bias), ctx.ids, rows=rows,
            k_lanes=ctx.lanes(x), n_lanes=ctx.lanes(y), weight=ctx.param(weight),
            bias=ctx.param(bias), update=ctx.update, x_tensor=x, y_tensor=y, dy_tensor=dy,
            dx_tensor=ctx.dx(op.name), weight_name=weight, bias_name=bias,
            precision=op.attrs.get("precision", "fp32"),
            loss_scale=op.attrs.get("loss_scale", 1), k_block=ctx.plan.k_blocks.get(op.name),
            queue_depth=ctx.wafer.queue_depth)


FAMILY = Matmul()
