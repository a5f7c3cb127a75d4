"""The unit of lowering: a `Kernel` is a rectangle of PEs with a program per PE.

Conventions every kernel family follows (so any producer can feed any consumer):

Tensors between kernels are 2-D, `[rows, cols]` (activations: rows = B*T tokens in
batch-major order). A tensor travels in **lanes**: lane `j` carries columns
`lane_cols(cols, lane_width)[j]` of every row, rows in order 0..rows-1, one fp32 wavelet
per element, row-major within the lane. Each lane is one fabric stream from the one PE
that produces it to every PE that consumes it (a multicast tree).

A kernel names the lanes it consumes and produces as `StreamEnd`s. In its PE programs it
refers to a stream by a *symbolic* color: an integer from `StreamIds.new()`, always
>= SYMBOLIC_BASE so it can never be mistaken for a real color. Routing later assigns a
real color per stream and rewrites the programs (`bind_colors`).

Each PE of a kernel runs one main task started at reset: a straight-line list of
instructions (forward part, then backward part, then the SGD update); `add_task` gives a PE
further reset tasks that run concurrently on other microthreads. The forward op, its backward twin
and the update of its parameters share one kernel, so stored activations and weights
never leave the PE.

Deadlock-freedom rule for kernels with several input streams (the fabric buffers only a
few wavelets per hop): streams from the same producer kernel are read interleaved in the
order the producer emits them (row by row); streams from different producers are read
completely into SRAM, in the order of the producers' position in the graph, before the
kernel computes from them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace

from wse_sim.errors import UserError
from wse_sim.program import BYTES_PER_WORD, Instr, Kind, Operand, PEProgram, Task, Trigger

SYMBOLIC_BASE = 1_000_000

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
    """One kernel's end of one lane of a tensor.

    As an output: `pes` is the single PE that sends the lane. As an input: every PE that
    receives the whole lane (multicast)."""

    tensor: str
    lane: int
    pes: tuple[LocalPE, ...]
    stream: int  # symbolic id used in this kernel's FabIn/FabOut operands


@dataclass(frozen=True)
class LocalStream:
    """A stream inside one kernel, from one PE to one or more PEs of the same kernel."""

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
            prog = self.programs[pe] = PEProgram(
                sram_words=0, tasks=[Task(id=0, trigger=Trigger.RESET, instrs=[])]
            )
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

    def emit(self, pe: LocalPE, *instrs: Instr) -> None:
        """Append instructions to the reset task of `pe`."""
        self._program(pe).tasks[0].instrs.extend(instrs)

    def add_task(self, pe: LocalPE, *instrs: Instr) -> None:
        """Another task started at reset on `pe`, run concurrently with the main one on its
        own microthread (for reading several input streams at once)."""
        tasks = self._program(pe).tasks
        tasks.append(Task(id=len(tasks), trigger=Trigger.RESET, instrs=list(instrs)))

    def load(self, pe: LocalPE, offset: int, data) -> None:
        """Initial SRAM contents (weights, constants) at `offset` of `pe`."""
        self._program(pe).load(offset, data)

    def sram_words(self, pe: LocalPE) -> int:
        return self._program(pe).sram_words


def symbolic_streams(instr: Instr) -> list[int]:
    """The symbolic stream ids an instruction's fabric operands name."""
    return [o.color for o in (instr.dst, instr.a, instr.b, instr.c)
            if o.kind in (Kind.FABIN, Kind.FABOUT) and o.color >= SYMBOLIC_BASE]


def _bind(operand: Operand, colors: dict[int, int]) -> Operand:
    if operand.kind in (Kind.FABIN, Kind.FABOUT) and operand.color >= SYMBOLIC_BASE:
        return replace(operand, color=colors[operand.color])
    return operand


def bind_colors(instrs: list[Instr], colors: dict[int, int]) -> list[Instr]:
    """Rewrite symbolic stream ids in fabric operands to the colors routing chose; an
    instruction that names no stream is kept as it is (most of a model's are not on the
    fabric, and rebuilding them dominated linking)."""
    return [
        replace(i, dst=_bind(i.dst, colors), a=_bind(i.a, colors), b=_bind(i.b, colors),
                c=_bind(i.c, colors)) if symbolic_streams(i) else i
        for i in instrs
    ]
