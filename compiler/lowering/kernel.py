"""The unit of lowering: a `Kernel` is a rectangle of PEs with a program per PE.

Conventions every kernel family follows (so any producer can feed any consumer):

Tensors between kernels are 2-D, `[rows, cols]` (activations: rows = B*T tokens in
batch-major order). A tensor travels in **lanes**: lane `j` carries the columns
`lane_cols(cols, width)[j]` of every row, one fp32 wavelet per element, row after row, and
within a row in column order. The lane width is a property of the tensor (its producer
chooses it; `StreamEnd.cols` says which columns a lane holds). Each lane is one fabric
stream from the one PE that produces it to every PE that consumes it (a multicast tree).

Row order. The forward pass streams rows in ascending order, the backward pass in
descending order (`StreamEnd.order`): causal attention's key gradient dk_j sums over the
queries i >= j, so walking the rows backwards completes it as row j passes, and every
backward kernel can stream (see `compiler.ops.attention`). Producer and consumers of a lane
agree on its order (the linker checks).

A kernel names the lanes it consumes and produces as `StreamEnd`s. In its PE programs it
refers to a stream by a *symbolic* color: an integer from `StreamIds.new()`, always
>= SYMBOLIC_BASE so it can never be mistaken for a real color. Routing later assigns a
real color per stream and rewrites the programs (`bind_colors`).

Each PE runs one or more *threads*, reset tasks on their own microthreads (`emit(...,
thread=k)`): a straight-line list of instructions, the forward part then the backward part
then the update. A forward op, its backward twin and the update of its parameters share one
kernel, so stored activations and weights never leave the PE.

Why it cannot deadlock (the argument every kernel module refers to). Every kernel is
*row-causal*: it emits row m of an output after reading at most rows <= m of its inputs (in
the stream's order; the backward's "<=" is in descending order), and each thread reads its
input streams and writes its output streams in row order. Consider the earliest row m that
some thread still waits for. Every input of row m that the thread waits for depends only
on rows <= m, all of whose producers' inputs have arrived, so it is produced; a wavelet
blocked on its way (a full FIFO, an atomic multicast whose other branch is full) is held
only by a consumer that will read it once it has read its other row-m inputs. So row m
completes, and by induction every row. What finite buffers limit is *throughput*: where
two paths of different latency rejoin (a residual add, attention's q and v), the short
path can run ahead only as far as buffers reach. Kernels that join such paths absorb the
early input into SRAM on a thread of its own and signal the compute thread through a
`Tokens` channel, so the early path may run `Tokens.capacity` blocks ahead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Literal

from compiler.lowering.ir import FabIn, FabOut, Imm, Instr, Kind, Op, Operand, Reg, vec
from wse_sim.errors import UserError
from wse_sim.program import BYTES_PER_WORD, PEProgram, Task, Trigger

SYMBOLIC_BASE = 1_000_000

RowOrder = Literal["ascending", "descending"]

# SRAM words per PE while lowering for a wafer: an allocation past it fails at once, before
# a model too large for the wafer spends minutes building programs that cannot run.
_SRAM_WORDS: ContextVar[int | None] = ContextVar("sram_words_per_pe", default=None)


@contextmanager
def sram_budget(words_per_pe: int) -> Iterator[None]:
    """Within this block, `Kernel.alloc` past `words_per_pe` words raises a UserError."""
    token = _SRAM_WORDS.set(words_per_pe)
    try:
        yield
    finally:
        _SRAM_WORDS.reset(token)


LocalPE = tuple[int, int]  # (x, y) inside the kernel's rectangle


def lane_cols(cols: int, lane_width: int) -> list[tuple[int, int]]:
    """Column ranges [start, stop) of the lanes of a tensor with `cols` columns; the last
    lane is narrower when `lane_width` does not divide `cols`."""
    return [(start, min(cols, start + lane_width)) for start in range(0, cols, lane_width)]


class StreamIds:
    """Allocates symbolic stream ids for one compilation."""

    def __init__(self) -> None:
        self._next = SYMBOLIC_BASE

    def new(self) -> int:
        self._next += 1
        return self._next - 1


@dataclass(frozen=True)
class StreamEnd:
    """One kernel's end of one lane of a tensor: the lane carries columns `cols` of every
    row, rows in `order`.

    As an output: `pes` is the single PE that sends the lane. As an input: every PE that
    receives the whole lane (multicast)."""

    tensor: str
    lane: int
    cols: tuple[int, int]
    pes: tuple[LocalPE, ...]
    stream: int  # symbolic id used in this kernel's FabIn/FabOut operands
    order: RowOrder = "ascending"

    @property
    def width(self) -> int:
        return self.cols[1] - self.cols[0]


@dataclass(frozen=True)
class LocalStream:
    """A stream inside one kernel, from one PE to one or more PEs of the same kernel (the
    PE itself for a `Tokens` channel)."""

    src: LocalPE
    dsts: tuple[LocalPE, ...]
    stream: int


@dataclass(frozen=True)
class ResultSlot:
    """Where a block of a tensor sits in one PE's SRAM after the run.

    Element (r, c) of the block `tensor[rows[0]:rows[1], cols[0]:cols[1]]` is at word
    `offset + (r - rows[0]) * row_stride + (c - cols[0]) * col_stride`."""

    tensor: str
    pe: LocalPE
    offset: int
    rows: tuple[int, int]
    cols: tuple[int, int]
    row_stride: int
    col_stride: int = 1


@dataclass
class Kernel:
    """A rectangle of `width` x `height` PEs implementing graph ops `ops`."""

    name: str
    op: str  # the op family ("matmul", "layernorm", ...)
    ops: list[str]  # graph op names implemented here (forward, backward, update)
    width: int
    height: int
    programs: dict[LocalPE, PEProgram] = field(default_factory=dict)
    inputs: list[StreamEnd] = field(default_factory=list)
    outputs: list[StreamEnd] = field(default_factory=list)
    local_streams: list[LocalStream] = field(default_factory=list)
    results: list[ResultSlot] = field(default_factory=list)
    # (rows, cols) of every tensor named in inputs, outputs and results
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    # per PE: SRAM words handed out so far, by purpose (for the fit check and reports)
    allocations: dict[LocalPE, list[tuple[str, int, int]]] = field(default_factory=dict)

    def _program(self, pe: LocalPE) -> PEProgram:
        x, y = pe
        if not (0 <= x < self.width and 0 <= y < self.height):
            raise ValueError(f"kernel {self.name}: PE {pe} outside {self.width}x{self.height}")
        prog = self.programs.get(pe)
        if prog is None:
            prog = self.programs[pe] = PEProgram(sram_words=0)
        return prog

    def alloc(self, pe: LocalPE, words: int, purpose: str) -> int:
        """Reserve `words` of SRAM on `pe`; returns the word offset (a bump allocator)."""
        prog = self._program(pe)
        offset = prog.sram_words
        prog.sram_words += words
        self.allocations.setdefault(pe, []).append((purpose, offset, words))
        limit = _SRAM_WORDS.get()
        if limit is not None and prog.sram_words > limit:
            raise UserError(
                f"op {self.name} ({self.op}): PE {pe} of its {self.width}x{self.height} "
                f"rectangle needs at least {BYTES_PER_WORD * prog.sram_words:,} bytes of SRAM, "
                f"has {BYTES_PER_WORD * limit:,} (buffer {purpose!r}: "
                f"{BYTES_PER_WORD * words:,} bytes)")
        return offset

    def emit(self, pe: LocalPE, *instrs: Instr, thread: int = 0) -> None:
        """Append instructions to thread `thread` of `pe` (a reset task on its own
        microthread; threads are created in order 0, 1, ...)."""
        tasks = self._program(pe).tasks
        if thread > len(tasks):
            raise ValueError(f"kernel {self.name}: PE {pe} has {len(tasks)} threads, "
                             f"cannot add thread {thread}")
        if thread == len(tasks):
            tasks.append(Task(id=thread, trigger=Trigger.RESET, instrs=[]))
        tasks[thread].instrs.extend(instrs)

    def new_thread(self, pe: LocalPE) -> int:
        """The number of the next thread of `pe` (for `emit`)."""
        return len(self._program(pe).tasks)

    def load(self, pe: LocalPE, offset: int, data) -> None:
        """Initial SRAM contents (weights, constants) at `offset` of `pe`."""
        self._program(pe).load(offset, data)

    def sram_words(self, pe: LocalPE) -> int:
        return self._program(pe).sram_words

    def local(self, src: LocalPE, dsts: tuple[LocalPE, ...], ids: StreamIds) -> int:
        """A new stream from `src` to `dsts` inside the kernel; its id."""
        stream = ids.new()
        self.local_streams.append(LocalStream(src, dsts, stream))
        return stream

    def lane_inputs(self, ids: StreamIds, tensor: str, cols: list[tuple[int, int]],
                    pes: list[tuple[LocalPE, ...]], order: RowOrder) -> list[int]:
        """Declare that `pes[j]` receive lane j (columns `cols[j]`) of `tensor`; returns
        each lane's stream id."""
        return self._lane_ends(self.inputs, ids, tensor, cols, pes, order)

    def lane_outputs(self, ids: StreamIds, tensor: str, cols: list[tuple[int, int]],
                     pes: list[LocalPE], order: RowOrder) -> list[int]:
        """Declare that `pes[j]` sends lane j (columns `cols[j]`) of `tensor`; returns each
        lane's stream id."""
        return self._lane_ends(self.outputs, ids, tensor, cols, [(pe,) for pe in pes], order)

    def _lane_ends(self, ends: list[StreamEnd], ids: StreamIds, tensor: str,
                   cols: list[tuple[int, int]], pes: list[tuple[LocalPE, ...]],
                   order: RowOrder) -> list[int]:
        streams = [ids.new() for _ in cols]
        for lane, (span, where, stream) in enumerate(zip(cols, pes, streams, strict=True)):
            ends.append(StreamEnd(tensor, lane, span, tuple(where), stream, order))
        return streams


# The register a thread receives tokens into (a register, so waiting writes no SRAM);
# kernels keep their other scalars in the registers below it.
TOKEN_REG = 15


@dataclass(frozen=True)
class Tokens:
    """A one-PE channel between two threads: `signal` sends a one-wavelet token to the PE
    itself, `wait` consumes one. The wavelets wait in the router's RAMP FIFO and the PE's
    receive queue, so up to `capacity` = 2 x queue_depth signals may be outstanding before
    the signalling thread blocks: that is how far ahead it may run."""

    stream: int
    capacity: int

    @classmethod
    def create(cls, kernel: Kernel, pe: LocalPE, ids: StreamIds, queue_depth: int) -> Tokens:
        return cls(kernel.local(pe, (pe,), ids), 2 * queue_depth)


    def signal(self) -> Instr:
        return vec(Op.MOV, 1, FabOut(self.stream), Imm(1.0))

    def wait(self) -> Instr:
        return vec(Op.MOV, 1, Reg(TOKEN_REG), FabIn(self.stream))


def ring_slots(queue_depth: int) -> int:
    """Slots of a ring that a thread fills, signalling each slot on a `Tokens` channel, and
    another drains: when the filler blocks on its (capacity + 1)-th outstanding token it
    has filled one slot more, and the drainer may still be reading the oldest."""
    return 2 * queue_depth + 2


def bind_colors(instrs: list[Instr], colors: dict[int, int], where: str) -> list[Instr]:
    """Rewrite symbolic stream ids in fabric operands to the colors routing chose (a
    symbolic id missing from `colors` is a compiler bug named by `where`). Instructions
    that name no stream are kept as they are: most of a model's are not on the fabric, and
    rebuilding them dominated linking."""
    bound: dict[Operand, Operand] = {}  # each distinct operand (kind, id, fp16 or not)

    def bind(operand: Operand) -> Operand:
        kind = operand.kind
        if (kind is not Kind.FABIN and kind is not Kind.FABOUT) or operand.color < SYMBOLIC_BASE:
            return operand
        new = bound.get(operand)
        if new is None:
            if operand.color not in colors:
                raise ValueError(f"{where}: stream id {operand.color} is not declared in the "
                                 f"kernel's inputs, outputs or local streams")
            new = bound[operand] = replace(operand, color=colors[operand.color])
        return new

    out = []
    for i in instrs:
        # any operand but a fabric one has color -1: one test skips the instructions that
        # name no stream without looking at their operands one by one
        if max(i.dst.color, i.a.color, i.b.color, i.c.color) >= SYMBOLIC_BASE:
            dst, a, b, c = bind(i.dst), bind(i.a), bind(i.b), bind(i.c)
            if dst is not i.dst or a is not i.a or b is not i.b or c is not i.c:
                i = Instr(i.op, i.n, dst, a, b, c, i.count, i.body, i.task)
        out.append(i)
    return out
