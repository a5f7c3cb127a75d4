"""Strip layout and row reductions over the fabric, shared by the elementwise, LayerNorm and
cross-entropy kernels.

The strip layout
----------------
These kernels give every lane of a tensor its own PE: a *group* of PEs (a 1-high strip)
where PE `g` receives lane `g` and keeps its columns of every row in SRAM row-major (row
stride = that lane's width). Elementwise work then needs nothing from other PEs; a row
statistic (sum, max, dot product over all columns) is a per-PE partial plus a reduction
across the group over the fabric.

Every input stream is received on a thread of its own (`compiler.lowering.inbox`), so a
strip kernel never makes its producer wait while it computes or emits.

Link sharing: the kernels' cycle formulas assume each lane enters and leaves its PE at one
wavelet per cycle. Lanes of one strip that travel the same direction along the strip's row
share its links (one wavelet per cycle per link), so a G-lane strip whose consumer sits
east of it can emit at most one wavelet per cycle in total. Placing consumers so that
lanes leave on different links (e.g. below the strip) avoids it.

The reduction
-------------
1. `row_partials`: each PE reduces each row of its block to one scalar with a register
   accumulator (set, one vector op over the row, store): R rows of w columns cost
   R * (w + 2) cycles.
2. `GroupReducer.reduce`: a chain west -> east. The first PE sends its R partials, every
   next PE combines what arrives with its own partials (one `OP FabOut = FabIn, Mem`) and
   passes the vector on; the last PE keeps the result. The elements flow pipelined, so a
   reduction costs about R + (G - 1) * (L + 2) cycles (L = hop latency; a wavelet sent in
   cycle t is consumed one hop away at t + L + 2), not R * G.
3. `GroupReducer.broadcast`: the last PE multicasts the R results back to all others on one
   stream (one multicast tree): about R + (G - 1) * L + 2 cycles.
An allreduce (both) thus costs each PE about 2 R cycles plus a latency of about
(G - 1) (2 L + 2) + 2 cycles.

Why a chain: every PE takes one incoming stream, which its ramp delivers at the full rate of
one wavelet per cycle; a tree would make inner PEs merge two streams through one ramp (half
rate) to save only latency, and a strip's G is small next to R.

The group's streams (G - 1 chain links and one broadcast) are created once and carry every
reduction of the kernel in program order, so a group needs only about three colors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from compiler.lowering.inbox import PerPE
from compiler.lowering.ir import FabIn, FabOut, Imm, Instr, Mem, Op, Operand, Reg, repeat, vec
from compiler.lowering.kernel import Kernel, LocalPE, LocalStream, RowOrder, StreamIds

# Rows per block of the cross-entropy (the turn-around, which waits for every row anyway):
# its reduction round trips are spread over 8 rows.
DEFAULT_BLOCK_ROWS = 8

# The register row_partials accumulates in; kernels keep other scalars in other registers.
ACC = Reg(0)

RowOp = Literal["sum", "max", "dot"]


def reduce_latency(group: int, hop_latency: int = 1) -> int:
    """Cycles a chain reduction over `group` PEs adds to its R elements: a wavelet takes
    L + 2 cycles a hop (ramp, link, receive queue)."""
    return (group - 1) * (hop_latency + 2)


def broadcast_latency(group: int, hop_latency: int = 1) -> int:
    """Cycles the broadcast back to `group` PEs adds to its R elements (one multicast tree
    over G - 1 hops, then the receive queue)."""
    return (group - 1) * hop_latency + 2 if group > 1 else 0


def row_blocks(rows: int, block_rows: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of `rows` rows in blocks of `block_rows` (the last shorter)."""
    if block_rows <= 0:
        raise ValueError(f"block_rows must be positive, got {block_rows}")
    return [(start, min(rows, start + block_rows)) for start in range(0, rows, block_rows)]


@dataclass(frozen=True)
class Lane:
    """Lane `index` of a tensor (columns c0..c1) and the PE that owns it."""

    index: int
    pe: LocalPE
    c0: int
    c1: int

    @property
    def width(self) -> int:
        return self.c1 - self.c0

    @property
    def cols(self) -> tuple[int, int]:
        return self.c0, self.c1


def strip_kernel(name: str, op: str, ops: list[str],
                 lanes: list[tuple[int, int]]) -> tuple[Kernel, list[Lane]]:
    """An empty 1-high kernel with PE (j, 0) per lane j (columns `lanes[j]`)."""
    kernel = Kernel(name=name, op=op, ops=list(ops), width=len(lanes), height=1)
    return kernel, [Lane(j, (j, 0), c0, c1) for j, (c0, c1) in enumerate(lanes)]


def strip_inputs(kernel: Kernel, ids: StreamIds, tensor: str, lanes: list[Lane],
                 order: RowOrder) -> list[int]:
    """Declare that each lane's PE receives that lane of `tensor`; its stream ids."""
    return kernel.lane_inputs(ids, tensor, [lane.cols for lane in lanes],
                              [(lane.pe,) for lane in lanes], order)


def strip_outputs(kernel: Kernel, ids: StreamIds, tensor: str, lanes: list[Lane],
                  order: RowOrder) -> list[int]:
    """Declare that each lane's PE sends that lane of `tensor`; its stream ids."""
    return kernel.lane_outputs(ids, tensor, [lane.cols for lane in lanes],
                               [lane.pe for lane in lanes], order)


@dataclass
class RowwiseStrip:
    """A strip kernel of a row-wise op y = f(x) with an optional backward dx from dy: its
    lanes and their stream ids, x in and y out in ascending row order, dy in and dx out
    (None without a backward) in descending order, as the backward visits the rows."""

    kernel: Kernel
    lanes: list[Lane]
    x_in: list[int]
    y_out: list[int]
    dy_in: list[int] | None
    dx_out: list[int] | None

    @property
    def pes(self) -> list[LocalPE]:
        return [lane.pe for lane in self.lanes]


def rowwise_strip(name: str, op: str, ops: list[str], ids: StreamIds, *, rows: int,
                  lanes: list[tuple[int, int]], x: str, y: str, dy: str | None,
                  dx: str | None) -> RowwiseStrip:
    """The strip kernel of a row-wise op over [rows, cols] tensors (cols = the end of the
    last lane) x -> y and, given dy, dy -> dx."""
    kernel, strip = strip_kernel(name, op, ops, lanes)
    kernel.shapes.update({t: (rows, lanes[-1][1]) for t in (x, y, dy, dx) if t is not None})
    x_in = strip_inputs(kernel, ids, x, strip, "ascending")
    y_out = strip_outputs(kernel, ids, y, strip, "ascending")
    dy_in = dx_out = None
    if dy is not None:
        dy_in = strip_inputs(kernel, ids, dy, strip, "descending")
        dx_out = strip_outputs(kernel, ids, dx, strip, "descending")
    return RowwiseStrip(kernel, strip, x_in, y_out, dy_in, dx_out)


def alloc_all(kernel: Kernel, pes: list[LocalPE], words: int, purpose: str) -> int:
    """Allocate `words` on every PE of `pes` at one common offset (the group's PEs allocate
    the same buffers in the same order, so any PE's offset is every PE's offset)."""
    offsets = {kernel.alloc(pe, words, purpose) for pe in pes}
    if len(offsets) != 1:
        raise AssertionError(f"kernel {kernel.name}: {purpose} allocated at offsets {offsets}")
    return offsets.pop()


def rows_at(offset: int, width: int) -> Operand:
    """A row-major block at `offset` as a row operand: one row per REPEAT iteration."""
    return Mem(offset, 1, loop_stride=width)


def rows_back(last: int, width: int) -> Operand:
    """The rows of a row-major block from the one at `last` backwards: one row per REPEAT
    iteration (how a descending stream meets rows stored in ascending order)."""
    return Mem(last, 1, loop_stride=-width)


def scalar_at(offset: int, step: int = 1) -> Operand:
    """Element k * step of the vector at `offset` as the scalar of REPEAT iteration k."""
    return Mem(offset, 0, loop_stride=step)


def row_reduce(op: RowOp, *, width: int, dst: Operand, a: Operand,
               b: Operand | None = None, acc: Operand = ACC) -> list[Instr]:
    """dst = reduce over the `width` elements of `a` (three instructions, w + 2 cycles),
    accumulated in register `acc` (registers are the PE's, shared by its threads).

    "sum": sum of a; "max": max of a (-inf for a row of -inf); "dot": sum of a * b."""
    if op == "sum":
        init, body = 0.0, vec(Op.ADD, width, acc, a, acc)
    elif op == "max":
        init, body = float("-inf"), vec(Op.MAX, width, acc, a, acc)
    else:
        if b is None:
            raise ValueError("row_reduce: 'dot' needs a second operand")
        init, body = 0.0, vec(Op.FMA, width, acc, a, b, acc)
    return [vec(Op.MOV, 1, acc, Imm(init)), body, vec(Op.MOV, 1, dst, acc)]


def row_partials(op: RowOp, *, rows: int, width: int, dst: int, a: Operand,
                 b: Operand | None = None) -> list[Instr]:
    """Instructions for dst[r] = reduce over the `width` elements of row r of `a`, r < rows
    (`row_reduce` in a REPEAT). `a` (and `b` for "dot") are memory operands at row 0 whose
    `loop_stride` steps to the next row (0 for a vector shared by all rows, e.g. gamma)."""
    return repeat(rows, row_reduce(op, width=width, dst=scalar_at(dst), a=a, b=b))


@dataclass(frozen=True)
class GroupReducer:
    """Reductions across one group of PEs (chain order: `pes[0]` first, `pes[-1]` holds the
    results). Every PE of the group must call reduce/broadcast in the same order, with
    vectors at the same SRAM offset on every PE (see `alloc_all`)."""

    kernel: Kernel
    pes: tuple[LocalPE, ...]
    chain: tuple[int, ...]  # chain[i]: pes[i] -> pes[i + 1]
    bcast: int | None  # pes[-1] -> all others (None for a group of one)

    @classmethod
    def create(cls, kernel: Kernel, ids: StreamIds, pes: list[LocalPE]) -> GroupReducer:
        chain = []
        for src, dst in zip(pes, pes[1:], strict=False):
            stream = ids.new()
            kernel.local_streams.append(LocalStream(src, (dst,), stream))
            chain.append(stream)
        bcast = None
        if len(pes) > 1:
            bcast = ids.new()
            kernel.local_streams.append(LocalStream(pes[-1], tuple(pes[:-1]), bcast))
        return cls(kernel, tuple(pes), tuple(chain), bcast)

    @property
    def last(self) -> LocalPE:
        return self.pes[-1]

    def reduce_instrs(self, offset: int, n: int, op: Op) -> PerPE:
        """Each PE's instructions by which words offset..offset+n of the last PE become OP
        over the group (ADD or MAX) of everyone's words there; the other PEs' words are
        left as they were."""
        if len(self.pes) == 1:
            return {}
        out = {self.pes[0]: [vec(Op.MOV, n, FabOut(self.chain[0]), Mem(offset))]}
        for i, pe in enumerate(self.pes[1:-1], start=1):
            out[pe] = [vec(op, n, FabOut(self.chain[i]), FabIn(self.chain[i - 1]), Mem(offset))]
        out[self.last] = [vec(op, n, Mem(offset), FabIn(self.chain[-1]), Mem(offset))]
        return out

    def broadcast_instrs(self, offset: int, n: int) -> PerPE:
        """Each PE's instructions that copy words offset..offset+n of the last PE to the
        same words of all others."""
        if self.bcast is None:
            return {}
        out = {pe: [vec(Op.MOV, n, Mem(offset), FabIn(self.bcast))] for pe in self.pes[:-1]}
        out[self.last] = [vec(Op.MOV, n, FabOut(self.bcast), Mem(offset))]
        return out

    def allreduce_instrs(self, offset: int, n: int, op: Op) -> PerPE:
        """Every PE's words offset..offset+n become OP over the group of them (in place)."""
        out = self.reduce_instrs(offset, n, op)
        for pe, instrs in self.broadcast_instrs(offset, n).items():
            out[pe] = out.get(pe, []) + instrs
        return out

    def _emit(self, instrs: PerPE) -> None:
        for pe, program in instrs.items():
            self.kernel.emit(pe, *program)

    def reduce(self, offset: int, n: int, op: Op) -> None:
        """Emit `reduce_instrs`."""
        self._emit(self.reduce_instrs(offset, n, op))

    def broadcast(self, offset: int, n: int) -> None:
        """Emit `broadcast_instrs`."""
        self._emit(self.broadcast_instrs(offset, n))

    def allreduce(self, offset: int, n: int, op: Op) -> None:
        """Emit `allreduce_instrs`."""
        self._emit(self.allreduce_instrs(offset, n, op))
