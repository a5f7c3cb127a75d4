"""The Program IR: everything one run of the fabric needs, and nothing about where it came from.

This is the single interface between the compiler and the simulator. The compiler builds a
`Program` out of the plain dataclasses below; the simulator validates it, flattens it into
numpy structure-of-arrays form, and runs it.

Coordinates: `x` grows east (0 .. width-1), `y` grows south (0 .. height-1). PE index
`y * width + x`. North is `y - 1`.

Router model (per PE, per color): a `Route` says which input ports accept wavelets of that
color (`rx`) and which output ports a wavelet is copied to (`tx`, multicast). Port `RAMP` is
the link to the PE itself: `RAMP in rx` means the PE may send on this color, `RAMP in tx`
means wavelets of this color are delivered to the PE.

Switch positions (runtime route changes). A route may hold up to `wafer.switch_positions - 1`
more *switch positions* besides its base (rx, tx) (`Route.positions`, position k >= 1 is
`positions[k - 1]`, a full (rx, tx) pair), start at position `start` and, with `ring`, wrap
from its last position back to the base. The router uses the current position's rx and tx;
a *control wavelet* (`advance(color)`: the PE sends one through its RAMP) advances the
position of every router it leaves (`wse_sim.router`). This is the hardware's fabric switch:
the CSL language guide's `@set_local_color_config` (`.switches = .{ .pos1, .pos2, .pos3,
.current_switch_pos, .ring_mode }`, positions `.invalid` by default) and the SDK tutorial
"Switches" (sdk.cerebras.net/csl/code-examples/tutorial-topic-06-switches): a control wavelet
(opcode SWITCH_ADV) moves the switch to the next valid position; past the last one it
returns to position 0 in ring mode, else stays. On WSE-2 a position replaces exactly one
side of the base route (`.rx = ...` or `.tx = ...`, never both): `validate` enforces that
unless `wafer.switch_both_sides`. A PE re-sending what it receives on another color (a MOV
with a FABIN source and a FABOUT destination) is a *relay*; it costs what any MOV costs.

Edge ports (weight streaming). `Program.ports` lists `EdgePort`s, links between an external
memory service and the fabric at a border PE's port that faces off the wafer (`side` N, E,
S or W, for one `color`). An *inbound* port sends its `data` (1-D float32) into the fabric:
the route of `color` at (x, y) must accept from `side` (in some switch position) and moves
the words on per its tx, like wavelets that crossed a link from a neighbour. An *outbound*
port receives what the route of `color` at (x, y) sends to `side` (its tx holds `side`);
the memory service must receive exactly `expected` words (more, or fewer at the end, is an
error naming the port). The run records the cycle at which each of a port's `marks` (word
indices) moved: a timeline of its stream. A route may accept from or send to a side off
the wafer only where a port is declared (sending off it without one is an error; accepting
from it is harmless, nothing arrives). Names are unique, and one (PE, side, color) has at
most one port. The bandwidth the ports share and their latency are wafer fields
(`edge_bytes_per_s`, `edge_latency_cycles`); the timing is `wse_sim.engine`'s ("Edge
ports").

PE model: SRAM of `sram_words` 32-bit words (fp32), a small scalar register file, and
tasks. A task is a list of instructions run on one microthread, in order, to completion.
Each vector instruction processes `n` elements, element `i` computing

    dst[i] = OP(a[i], b[i], c[i])

over operands that are memory vectors (offset + i * stride), fabric input (one wavelet
consumed per element), fabric output (one wavelet produced per element), a scalar
register, or an immediate. A register as `dst` of a vector instruction is a scalar
accumulator: `ADD dst=Reg(0), a=Mem(...), b=Reg(0)` is a sum-reduction to a scalar.
A memory operand of stride 0 is a scalar loaded once, at the instruction's first element.

fp16. A MEM, FABIN or FABOUT operand built with `half=True` holds IEEE binary16 values:
a half memory operand's offset, stride and loop_stride count halves (16 bits; half h is
the low (h even) or high (h odd) half of word h // 2), a half fabric operand carries two
elements per wavelet (element e is the low half of wavelet e // 2 if e is even, the high
half if odd). Registers and immediates are fp32. An instruction with a half operand is an
fp16 instruction of one of three classes (`precision_of`): `fp16` (every typed operand
half: the SDK's fmach, faddh, fmulh, fmovh ...), `mixed` (half sources, an fp32
destination: fmachs, faddhs: fp16 multiply, fp32 accumulate) or `convert` (a MOV between
fp32 and fp16: fs2h, fh2s). Values are computed in fp32 (a product of two halves is exact
there) and rounded to fp16 (round to nearest even) where they are written to a half
destination; an fp16 destination needs fp16 sources (convert first). Ops on halves: MOV,
NEG, ADD, SUB, MUL, FMA.

`REPEAT(count, body)` runs the next `body` instructions `count` times; in iteration `k` a
memory operand's offset is `offset + k * loop_stride`. One level (no nesting) so the
engine's thread state stays flat.

Besides code and routes a Program may carry, for whoever reads its results:

* `tensors`: a symbol table, named 2-D tensors and the blocks of them each PE's SRAM holds
  after the run (`TensorSlot`); `read_tensor` assembles one from a run's final SRAM,
  `write_tensor` writes one into SRAM words (e.g. the image of the next run);
* `regions`: named rectangles of PEs with a label (a compiler's kernels and their op
  families), which reports break figures down by;
* `meta`: free-form JSON-ready facts from whoever built it (the compiler's FLOP counts,
  tokens per step, placement), passed through to reports untouched.

`validate(program, wafer)` checks everything the engine relies on and raises a one-line
ProgramError naming PE, task, instruction and field. It reads the instructions as arrays
(`read_code`, which the engine's assembler flattens too), checks the rules of vector
instructions on them and looks one by one only at those that may break one (and at
control instructions), so a message is the same as checking all one by one.
`save_program` / `load_program` write and read a program (and the wafer it was built for)
as one .npz of flat arrays plus a JSON header (no pickle): the file is the seam between a
compiler and the simulator.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from functools import reduce
from operator import attrgetter, or_
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import ValidationError

from wse_sim.errors import ProgramError, UserError
from wse_sim.hardware import BYTES_PER_WORD as BYTES_PER_WORD  # the one word size, here too
from wse_sim.hardware import WaferConfig
from wse_sim.outputs import strict_json, write_file


class Port(IntEnum):
    """Router ports. Directions are also bit positions in a Route's rx/tx masks."""

    N = 0
    E = 1
    S = 2
    W = 3
    RAMP = 4


# (dx, dy) of the neighbour reached through each mesh port.
PORT_OFFSET: dict[Port, tuple[int, int]] = {
    Port.N: (0, -1),
    Port.E: (1, 0),
    Port.S: (0, 1),
    Port.W: (-1, 0),
}
OPPOSITE: dict[Port, Port] = {Port.N: Port.S, Port.S: Port.N, Port.E: Port.W, Port.W: Port.E}


def port_mask(*ports: Port) -> int:
    mask = 0
    for port in ports:
        mask |= 1 << int(port)
    return mask


class Op(IntEnum):
    """Instruction opcodes. Vector ops compute dst[i] = OP(a[i], b[i], c[i])."""

    # vector, one source
    MOV = 0  # a
    NEG = 1  # -a
    EXP = 2  # exp(a)
    RSQRT = 3  # 1 / sqrt(a)
    RECIP = 4  # 1 / a
    TANH = 5  # tanh(a)
    ERF = 6  # erf(a)
    SQRT = 7  # sqrt(a)
    # vector, two sources
    ADD = 10  # a + b
    SUB = 11  # a - b
    MUL = 12  # a * b
    DIV = 13  # a / b
    MAX = 14  # max(a, b)
    MIN = 15  # min(a, b)
    # vector, three sources
    FMA = 20  # a * b + c
    # control
    REPEAT = 30  # run the next `body` instructions `count` times
    ACTIVATE = 31  # make local task `task` ready
    BLOCK = 32  # task `task` may not start
    UNBLOCK = 33  # task `task` may start again
    HALT = 34  # stop this PE: no task starts again
    SWITCH_ADV = 35  # send one control wavelet on dst's color (FabOut): advance its switches


SOURCES_OF: dict[Op, int] = {
    **{op: 1 for op in (Op.MOV, Op.NEG, Op.EXP, Op.RSQRT, Op.RECIP, Op.TANH, Op.ERF, Op.SQRT)},
    **{op: 2 for op in (Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.MAX, Op.MIN)},
    Op.FMA: 3,
}
# Ops that cost an fp32 arithmetic slot (MOV is a move: SRAM/fabric bandwidth only).
ARITHMETIC_OPS = frozenset(op for op in SOURCES_OF if op is not Op.MOV)
# Ops that may have fp16 operands (those of the SDK's SIMD table: fmovh, fnegh, faddh,
# fsubh, fmulh, fmach and their mixed forms).
HALF_OPS = frozenset({Op.MOV, Op.NEG, Op.ADD, Op.SUB, Op.MUL, Op.FMA})


class Precision(IntEnum):
    """The class of a vector instruction, which sets its SIMD width (`simd_width`)."""

    FP32 = 0  # no fp16 operand: one element per cycle (`fp32_ops_per_cycle`)
    FP16 = 1  # every typed operand fp16: `fp16_simd_width`
    MIXED = 2  # fp16 sources, fp32 destination: `mixed_simd_width`
    CONVERT = 3  # a MOV between fp32 and fp16: `fp16_convert_simd_width`


class Kind(IntEnum):
    NONE = 0
    MEM = 1
    FABIN = 2
    FABOUT = 3
    REG = 4
    IMM = 5


@dataclass(frozen=True)
class Operand:
    """One operand of a vector instruction. Build with Mem/FabIn/FabOut/Reg/Imm."""

    kind: Kind
    offset: int = 0  # MEM: word offset in the PE's SRAM
    stride: int = 1  # MEM: words between consecutive elements (0: scalar)
    loop_stride: int = 0  # MEM: words added per REPEAT iteration
    color: int = -1  # FABIN / FABOUT
    reg: int = -1  # REG
    value: float = 0.0  # IMM
    half: bool = False  # MEM / FABIN / FABOUT: fp16 values (module docstring)


def Mem(offset: int, stride: int = 1, loop_stride: int = 0, half: bool = False  # noqa: N802
        ) -> Operand:
    return Operand(Kind.MEM, offset=offset, stride=stride, loop_stride=loop_stride,
                   half=half)


def FabIn(color: int, half: bool = False) -> Operand:  # noqa: N802
    return Operand(Kind.FABIN, color=color, half=half)


def FabOut(color: int, half: bool = False) -> Operand:  # noqa: N802
    return Operand(Kind.FABOUT, color=color, half=half)


def Reg(index: int) -> Operand:  # noqa: N802
    return Operand(Kind.REG, reg=index)


def Imm(value: float) -> Operand:  # noqa: N802
    return Operand(Kind.IMM, value=float(value))


NO_OPERAND = Operand(Kind.NONE)


@dataclass(frozen=True)
class Instr:
    """One instruction. Vector ops use n/dst/a/b/c; control ops use count/body/task."""

    op: Op
    n: int = 0
    dst: Operand = NO_OPERAND
    a: Operand = NO_OPERAND
    b: Operand = NO_OPERAND
    c: Operand = NO_OPERAND
    count: int = 0  # REPEAT
    body: int = 0  # REPEAT
    task: int = -1  # ACTIVATE / BLOCK / UNBLOCK


def vec(op: Op, n: int, dst: Operand, a: Operand, b: Operand = NO_OPERAND,
        c: Operand = NO_OPERAND) -> Instr:
    return Instr(op, n=n, dst=dst, a=a, b=b, c=c)


def advance(color: int) -> Instr:
    """Send one control wavelet on `color` through the PE's RAMP: every router it leaves
    advances that color's switch position. One cycle and one ramp slot; waits for room in
    the RAMP FIFO like a FABOUT element."""
    return Instr(Op.SWITCH_ADV, dst=FabOut(color))


def repeat(count: int, body: list[Instr]) -> list[Instr]:
    """`body` run `count` times (memory operands advance by their loop_stride)."""
    return [Instr(Op.REPEAT, count=count, body=len(body)), *body]


_TYPED = (Kind.MEM, Kind.FABIN, Kind.FABOUT, Kind.REG)  # operands with a float type


def precision_of(instr: Instr) -> Precision:
    """The precision class of vector instruction `instr` (module docstring)."""
    typed = [o for o in (instr.dst, instr.a, instr.b, instr.c) if o.kind in _TYPED]
    if not any(o.half for o in typed):
        return Precision.FP32
    if all(o.half for o in typed):
        return Precision.FP16
    return Precision.CONVERT if instr.op == Op.MOV else Precision.MIXED


def simd_width(instr: Instr, wafer: WaferConfig) -> int:
    """Elements an fp16 instruction may advance per cycle (a step): its class's SIMD width,
    bounded by the fabric (a wavelet per cycle per fabric operand: two halves, one fp32),
    by the SRAM ports (`sram_reads_per_cycle` / `sram_writes_per_cycle` 32-bit words; a
    unit-stride half operand touches one word per two elements, any other strided one a
    word per element) and made even (a step then starts at an even element, so a
    unit-stride pair is one word); 0 for an fp32 instruction (one element per cycle)."""
    precision = precision_of(instr)
    if precision == Precision.FP32:
        return 0
    width = {Precision.FP16: wafer.fp16_simd_width, Precision.MIXED: wafer.mixed_simd_width,
             Precision.CONVERT: wafer.fp16_convert_simd_width}[precision]
    per_elem, per_pair = half_words(instr)
    dst = instr.dst
    for opnd in (dst, instr.a, instr.b, instr.c):
        if opnd.kind in (Kind.FABIN, Kind.FABOUT):
            width = min(width, 2 if opnd.half else 1)
    g = max(width, 1)
    while g > 1 and (per_elem * g + per_pair * ((g + 1) // 2) > wafer.sram_reads_per_cycle
                     or _dst_words(dst, g) > wafer.sram_writes_per_cycle):
        g -= 1
    return g if g == 1 else g - g % 2


def half_words(instr: Instr) -> tuple[int, int]:
    """(sources costing a word per element, unit-stride half sources costing a word per
    pair of elements) of an instruction's strided memory sources."""
    per_elem = per_pair = 0
    for opnd in (instr.a, instr.b, instr.c):
        if opnd.kind == Kind.MEM and opnd.stride != 0:
            if opnd.half and opnd.stride == 1:
                per_pair += 1
            else:
                per_elem += 1
    return per_elem, per_pair


def _dst_words(dst: Operand, g: int) -> int:
    if dst.kind != Kind.MEM:
        return 0
    return (g + 1) // 2 if dst.half and dst.stride == 1 else g


class Trigger(IntEnum):
    RESET = 0  # ready at cycle 0
    COLOR = 1  # ready whenever a wavelet of `color` waits at this PE
    LOCAL = 2  # ready when another task ACTIVATEs it


@dataclass
class Task:
    id: int
    trigger: Trigger
    instrs: list[Instr]
    color: int = -1  # Trigger.COLOR only


@dataclass(frozen=True)
class Route:
    """The route of one color at one PE: its base position (rx, tx) and, optionally, more
    switch positions (module docstring). `Route(rx, tx)` is a static route."""

    rx: int  # port_mask of accepted input ports
    tx: int  # port_mask of output ports (multicast)
    positions: tuple[tuple[int, int], ...] = ()  # switch positions 1.., each (rx, tx)
    start: int = 0  # the position at cycle 0 (0: the base)
    ring: bool = False  # past the last position back to the base (else stay)

    def position(self, k: int) -> tuple[int, int]:
        """(rx, tx) of switch position k (0: the base)."""
        return (self.rx, self.tx) if k == 0 else self.positions[k - 1]

    @property
    def count(self) -> int:
        """Switch positions, the base included."""
        return 1 + len(self.positions)

    def next_position(self, k: int) -> int:
        """The position after k when a control wavelet leaves the router."""
        if k + 1 < self.count:
            return k + 1
        return 0 if self.ring else k

    @property
    def live(self) -> list[tuple[int, int]]:
        """(rx, tx) of every position the route can be in: from `start` on, and those
        before it too in ring mode (a base that only anchors the positions is not one)."""
        ks = range(self.count) if self.ring else range(self.start, self.count)
        return [self.position(k) for k in ks]

    @property
    def rx_any(self) -> int:
        """The input ports some position accepts (they have FIFOs)."""
        return reduce(or_, (rx for rx, _ in self.positions), self.rx)

    @property
    def tx_any(self) -> int:
        """The output ports some position sends to."""
        return reduce(or_, (tx for _, tx in self.positions), self.tx)


@dataclass
class PEProgram:
    sram_words: int
    tasks: list[Task] = field(default_factory=list)
    # Initial SRAM contents: word offset -> float32 data placed there (rest is zero).
    image: dict[int, np.ndarray] = field(default_factory=dict)

    def load(self, offset: int, data: np.ndarray) -> None:
        self.image[offset] = np.ascontiguousarray(data, dtype=np.float32).ravel()


@dataclass(frozen=True)
class TensorSlot:
    """Where a block of a named tensor sits in the SRAM of PE (x, y) after the run: element
    (r, c) of `tensor[rows[0]:rows[1], cols[0]:cols[1]]` is at word
    `offset + (r - rows[0]) * row_stride + (c - cols[0]) * col_stride`."""

    x: int
    y: int
    offset: int
    rows: tuple[int, int]
    cols: tuple[int, int]
    row_stride: int
    col_stride: int = 1


@dataclass
class TensorLayout:
    """A named [rows, cols] tensor and the slots that together hold every element."""

    shape: tuple[int, int]
    slots: list[TensorSlot] = field(default_factory=list)


@dataclass(frozen=True)
class Region:
    """A named rectangle of PEs with a label (e.g. a compiled kernel and its op family)."""

    name: str
    label: str
    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True, eq=False)
class EdgePort:
    """One link between the memory service and the fabric, at a border PE's outward-facing
    port (module docstring, "Edge ports")."""

    name: str  # unique in the program; results are keyed by it
    x: int
    y: int
    side: Port  # N, E, S or W; must face off the wafer at (x, y)
    color: int
    inbound: bool  # True: memory service -> fabric; False: fabric -> memory service
    data: np.ndarray  # inbound: float32 words sent in this order; outbound: ignored
    expected: int = 0  # outbound: words the memory service must receive; inbound: len(data)
    # word indices (increasing) whose cycle the run records (`SimResult.port_marks`): a
    # stream's boundaries, e.g. where one layer's weights end and the next layer's begin
    marks: tuple[int, ...] = ()


@dataclass
class Program:
    """A whole fabric's program. PEs absent from `pes` run nothing (their routers may still
    forward wavelets if they have routes)."""

    width: int
    height: int
    pes: dict[tuple[int, int], PEProgram] = field(default_factory=dict)
    routes: dict[tuple[int, int, int], Route] = field(default_factory=dict)  # (x, y, color)
    tensors: dict[str, TensorLayout] = field(default_factory=dict)
    regions: list[Region] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    ports: list[EdgePort] = field(default_factory=list)  # memory-service edge ports

    def pe(self, x: int, y: int, sram_words: int = 0) -> PEProgram:
        """The program of PE (x, y), created on first use; grows its SRAM to `sram_words`."""
        prog = self.pes.get((x, y))
        if prog is None:
            prog = self.pes[(x, y)] = PEProgram(sram_words=sram_words)
        prog.sram_words = max(prog.sram_words, sram_words)
        return prog

    def add_route(self, x: int, y: int, color: int, rx: int, tx: int) -> None:
        """Add ports to the static route of `color` at (x, y) (routes of one color merge)."""
        old = self.routes.get((x, y, color), Route(0, 0))
        if old.positions:
            raise ValueError(f"route at PE ({x}, {y}) color {color} has switch positions: "
                             "set it whole with set_route")
        self.routes[(x, y, color)] = Route(old.rx | rx, old.tx | tx)

    def set_route(self, x: int, y: int, color: int, route: Route) -> None:
        """Give `color` at (x, y) the route `route` (e.g. one with switch positions); a route
        already there must be the same one (switch positions do not merge)."""
        old = self.routes.get((x, y, color))
        if old is not None and old != route:
            raise ValueError(f"route at PE ({x}, {y}) color {color} is already {old}, not "
                             f"{route}")
        self.routes[(x, y, color)] = route


def read_tensor(layout: TensorLayout, sram: Callable[[int, int], np.ndarray],
                name: str = "tensor") -> np.ndarray:
    """Assemble a tensor from its slots in the final SRAM (`sram(x, y)`, float32 words of
    PE (x, y)); every element must be covered by a slot."""
    out = np.zeros(layout.shape, dtype=np.float32)
    covered = np.zeros(layout.shape, dtype=bool)
    for slot in layout.slots:
        words = np.asarray(sram(slot.x, slot.y))
        r = np.arange(slot.rows[1] - slot.rows[0])[:, None]
        c = np.arange(slot.cols[1] - slot.cols[0])[None, :]
        block = np.s_[slot.rows[0]:slot.rows[1], slot.cols[0]:slot.cols[1]]
        out[block] = words[slot.offset + r * slot.row_stride + c * slot.col_stride]
        covered[block] = True
    if not covered.all():
        raise ValueError(f"the slots of {name!r} cover {covered.sum()} of {covered.size} "
                         f"elements")
    return out


def write_tensor(layout: TensorLayout, value: np.ndarray,
                 sram: Callable[[int, int], np.ndarray]) -> None:
    """Write `value` (of `layout.shape`) into every slot of `layout`, the inverse of
    `read_tensor`: `sram(x, y)` is the writable float32 word array of PE (x, y)."""
    value = np.asarray(value, np.float32).reshape(layout.shape)
    for slot in layout.slots:
        words = sram(slot.x, slot.y)
        r = np.arange(slot.rows[1] - slot.rows[0])[:, None]
        c = np.arange(slot.cols[1] - slot.cols[0])[None, :]
        words[slot.offset + r * slot.row_stride + c * slot.col_stride] = value[
            slot.rows[0]:slot.rows[1], slot.cols[0]:slot.cols[1]]


def initial_sram(pe: PEProgram) -> np.ndarray:
    """The PE's SRAM at cycle 0: its image, zeros elsewhere (float32, `sram_words` long)."""
    words = np.zeros(pe.sram_words, np.float32)
    for offset, data in pe.image.items():
        words[offset:offset + len(data)] = data
    return words


# --------------------------------------------------------------------------------------------
# Validation: every check the engine relies on, before anything runs.

CONTROL_OPS = frozenset({Op.REPEAT, Op.ACTIVATE, Op.BLOCK, Op.UNBLOCK, Op.HALT,
                         Op.SWITCH_ADV})
SOURCE_FIELDS = ("a", "b", "c")
_OPS = frozenset(int(op) for op in Op)
_FIELDS = ("dst", *SOURCE_FIELDS)
_NONE, _MEM, _FABIN, _FABOUT, _REG = (int(k) for k in (Kind.NONE, Kind.MEM, Kind.FABIN,
                                                      Kind.FABOUT, Kind.REG))
_NOT_DESTINATIONS = (Kind.NONE, Kind.IMM, Kind.FABIN)


# -- a PE's code as arrays ---------------------------------------------------------------------
# Validation and the engine's flattening (`wse_sim.assemble`) read the instructions as
# arrays: gpt_small has 352k of them, too many to check and flatten one object at a time.

K = TypeVar("K")
CODE_INSTR = np.dtype([(name, np.int64) for name in ("op", "n", "count", "body", "task")])
CODE_OPERAND = np.dtype([*((name, np.int64) for name in ("kind", "offset", "stride",
                                                           "loop_stride", "color", "reg")),
                         ("value", np.float64), ("half", np.bool_)])
_instr_fields = attrgetter(*CODE_INSTR.names, "dst", "a", "b", "c")
_operand_fields = attrgetter(*CODE_OPERAND.names)


@dataclass(frozen=True)
class Code:
    """A PE's instructions as arrays, task after task (`read_code`): `ins[j]` one
    instruction's own fields, `opnd[j]` its dst, a, b and c; task k's rows are
    `start[k]:start[k + 1]`."""

    ins: np.ndarray  # [rows] CODE_INSTR
    opnd: np.ndarray  # [rows, 4] CODE_OPERAND
    start: np.ndarray  # [tasks + 1]


def read_code(code_of: Mapping[K, Sequence[Sequence[Instr]]]) -> dict[K, Code]:
    """The `Code` of each PE's tasks, given as their instruction lists (`instructions`).
    Each distinct Instr and Operand object is read once (a compiled program shares them:
    gpt_small's 352k instructions are 135k objects with 11k operands); they stay
    referenced meanwhile, so their ids are not reused. Fields that are not numbers of the
    table's types raise TypeError, ValueError or OverflowError."""
    instr_at: dict[int, int] = {}
    operand_at: dict[int, int] = {}
    instrs: list[tuple] = []  # (op, n, count, body, task, dst, a, b, c rows of `operands`)
    operands: list[tuple] = []
    seen: list[object] = []  # every object read, alive until the end

    def operand(o: Operand) -> int:
        k = operand_at.get(id(o))
        if k is None:
            k = operand_at[id(o)] = len(operands)
            operands.append(_operand_fields(o))
            seen.append(o)
        return k

    def instr(i: Instr) -> int:
        k = instr_at.get(id(i))
        if k is None:
            *own, dst, a, b, c = _instr_fields(i)
            k = instr_at[id(i)] = len(instrs)
            instrs.append((*own, operand(dst), operand(a), operand(b), operand(c)))
            seen.append(i)
        return k

    rows = {key: [instr(i) for task in tasks for i in task] for key, tasks in code_of.items()}
    table = np.array(instrs, np.int64).reshape(-1, 9)
    own = np.empty(len(table), CODE_INSTR)
    for j, name in enumerate(CODE_INSTR.names):
        own[name] = table[:, j]
    operand_table = np.array(operands, CODE_OPERAND)
    code = {}
    for key, tasks in code_of.items():
        index = np.array(rows[key], np.int64)
        code[key] = Code(own[index], operand_table[table[index, 5:]],
                         np.cumsum([0] + [len(t) for t in tasks], dtype=np.int64))
    return code


def instructions(tasks: list[Task], kept: list[bool] | None = None) -> list[list[Instr]]:
    """The instruction lists of `tasks` for `read_code`, empty for those `kept` (a PE
    program's tasks it keeps from the one it replaces: `kept_tasks`)."""
    return [[] if kept and kept[k] else task.instrs for k, task in enumerate(tasks)]


def validate(program: Program, wafer: WaferConfig) -> dict[tuple[int, int], Code] | None:
    """Raise ProgramError (one line naming PE, task id, instruction index and field) if
    `program` cannot run on `wafer`. If it can, return its PEs' `Code` as read to check it
    (for `wse_sim.assemble`; None if a field was not a number of the table's type)."""
    w, h = program.width, program.height
    if not (0 < w <= wafer.width and 0 < h <= wafer.height):
        raise ProgramError(f"program fabric {w} x {h} does not fit the wafer "
                           f"{wafer.width} x {wafer.height}")
    routes = program.routes
    outward = _validate_ports(program, wafer)
    for (x, y, color), route in routes.items():
        where = f"route at PE ({x}, {y}) color {color}"
        if not (0 <= x < w and 0 <= y < h):
            raise ProgramError(f"{where}: PE outside the {w} x {h} fabric")
        if not 0 <= color < wafer.colors:
            raise ProgramError(f"{where}: color must be in 0..{wafer.colors - 1}")
        if route.positions:
            _validate_switches(where, route, wafer)
        for k in range(route.count):
            rx, tx = route.position(k)
            at = f"{where} position {k}" if k else where
            for name, mask in (("rx", rx), ("tx", tx)):
                if not 0 <= mask < 32:
                    raise ProgramError(f"{at}: {name} mask {mask} is not a set of 5 ports")
            if rx and not tx:  # its wavelets would have nowhere to go
                raise ProgramError(f"{at}: accepts wavelets (rx) but has no outputs (tx is "
                                   f"empty)")
            for port, (dx, dy) in PORT_OFFSET.items():
                if not tx >> port & 1:
                    continue
                nx, ny = x + dx, y + dy
                if not (0 <= nx < w and 0 <= ny < h):
                    if (x, y, port, color) in outward:
                        continue  # to an outbound edge port
                    raise ProgramError(f"{at}: tx {port.name} leads off the mesh edge")
                nbr = routes.get((nx, ny, color))
                if nbr is None or not nbr.rx_any >> OPPOSITE[port] & 1:
                    raise ProgramError(
                        f"{at}: tx {port.name} but the route of PE ({nx}, {ny}) color {color} "
                        f"does not accept from {OPPOSITE[port].name}"
                        + (" in any switch position" if nbr is not None and nbr.positions
                           else "")
                    )
    code = _read_code_or_none({key: instructions(pe.tasks) for key, pe in program.pes.items()})
    for (x, y), pe in program.pes.items():
        _validate_pe(x, y, pe, program, wafer, code and code[(x, y)])
    for name, layout in program.tensors.items():
        _validate_tensor(name, layout, program)
    for region in program.regions:
        if not (0 <= region.x and 0 <= region.y and region.width > 0 and region.height > 0
                and region.x + region.width <= w and region.y + region.height <= h):
            raise ProgramError(f"region {region.name}: rectangle {region.width} x "
                               f"{region.height} at ({region.x}, {region.y}) is outside the "
                               f"{w} x {h} fabric")
    return code


MESH_PORTS = (Port.N, Port.E, Port.S, Port.W)


def faces_off(x: int, y: int, side: Port, width: int, height: int) -> bool:
    """Port `side` of PE (x, y) faces off the width x height fabric."""
    dx, dy = PORT_OFFSET[side]
    return not (0 <= x + dx < width and 0 <= y + dy < height)


def _validate_ports(program: Program, wafer: WaferConfig) -> set[tuple[int, int, Port, int]]:
    """The checks of the edge ports (module docstring, "Edge ports"); returns the (x, y,
    side, color) of the outbound ones (routes may send off the edge there)."""
    w, h = program.width, program.height
    names: set[str] = set()
    seen: set[tuple[int, int, int, int]] = set()
    outward: set[tuple[int, int, Port, int]] = set()
    for k, port in enumerate(program.ports):
        if not isinstance(port, EdgePort):
            raise ProgramError(f"port {k}: not an EdgePort ({type(port).__name__})")
        name = port.name
        where = f"port {name!r}"
        if not isinstance(name, str) or not name:
            raise ProgramError(f"port {k}: field name must be a non-empty string")
        if name in names:
            raise ProgramError(f"{where}: name used by two ports")
        names.add(name)
        if not (0 <= port.x < w and 0 <= port.y < h):
            raise ProgramError(f"{where} at PE ({port.x}, {port.y}): PE outside the {w} x {h} "
                               f"fabric")
        if port.side not in MESH_PORTS:
            raise ProgramError(f"{where} at PE ({port.x}, {port.y}): field side must be N, E, "
                               f"S or W (got {port.side!r})")
        side = Port(port.side)
        where = (f"{where} at PE ({port.x}, {port.y}) side {side.name} color {port.color} "
                 f"({'inbound' if port.inbound else 'outbound'})")
        _check_color(port.color, wafer, where)
        if not faces_off(port.x, port.y, side, w, h):
            raise ProgramError(f"{where}: side {side.name} does not face off the {w} x {h} "
                               f"fabric")
        key = (port.x, port.y, int(side), port.color)
        if key in seen:
            raise ProgramError(f"{where}: a second port on the same PE, side and color")
        seen.add(key)
        route = program.routes.get((port.x, port.y, port.color))
        if port.inbound:
            data = port.data
            if not (isinstance(data, np.ndarray) and data.ndim == 1
                    and data.dtype == np.float32):
                got = (f"{data.dtype} of shape {data.shape}" if isinstance(data, np.ndarray)
                       else type(data).__name__)
                raise ProgramError(f"{where}: field data must be a 1-D float32 array (got "
                                   f"{got})")
            if port.expected not in (0, len(data)):
                raise ProgramError(f"{where}: field expected {port.expected}: an inbound port "
                                   f"sends len(data) = {len(data)} words (give 0 or that)")
        else:
            if not isinstance(port.expected, int | np.integer) or port.expected < 0:
                raise ProgramError(f"{where}: field expected must be an integer >= 0 (got "
                                   f"{port.expected!r})")
            outward.add((port.x, port.y, side, port.color))
        uses = 0 if route is None else route.rx_any if port.inbound else route.tx_any
        if route is None or not uses >> side & 1:
            how = "accept from" if port.inbound else "send to"
            raise ProgramError(f"{where}: the route of color {port.color} at that PE "
                               + ("is missing" if route is None
                                  else f"does not {how} {side.name}"))
        words = len(port.data) if port.inbound else port.expected
        marks = port.marks
        if not isinstance(marks, tuple) or not all(
                isinstance(m, int | np.integer) and 0 <= m < words for m in marks) or any(
                a >= b for a, b in zip(marks, marks[1:], strict=False)):
            raise ProgramError(f"{where}: field marks must be a tuple of increasing word "
                               f"indices in 0..{words - 1}")
    return outward


def _validate_switches(where: str, route: Route, wafer: WaferConfig) -> None:
    """The switch fields of a route with positions: their number, the one-side rule, the
    start position (each position's masks and outputs are checked as the base's)."""
    if not isinstance(route.positions, tuple) or not all(
            isinstance(p, tuple) and len(p) == 2 for p in route.positions):
        raise ProgramError(f"{where}: field positions must be a tuple of (rx, tx) pairs")
    if route.count > wafer.switch_positions:
        raise ProgramError(f"{where}: field positions: {len(route.positions)} switch "
                           f"positions besides the base, the wafer has "
                           f"{wafer.switch_positions - 1} (switch_positions "
                           f"{wafer.switch_positions})")
    if not wafer.switch_both_sides:
        for k, (rx, tx) in enumerate(route.positions, 1):
            if rx != route.rx and tx != route.tx:
                raise ProgramError(f"{where}: field positions: position {k} changes both rx "
                                   f"and tx of the base route; a switch position replaces "
                                   f"one side on this wafer (switch_both_sides false)")
    if not 0 <= route.start < route.count:
        raise ProgramError(f"{where}: field start: position {route.start} not in "
                           f"0..{route.count - 1}")


def _validate_tensor(name: str, layout: TensorLayout, program: Program) -> None:
    rows, cols = layout.shape
    for slot in layout.slots:
        where = f"tensor {name} slot at PE ({slot.x}, {slot.y})"
        pe = program.pes.get((slot.x, slot.y))
        if pe is None:
            raise ProgramError(f"{where}: that PE has no program")
        if not (0 <= slot.rows[0] < slot.rows[1] <= rows and 0 <= slot.cols[0] < slot.cols[1]
                <= cols):
            raise ProgramError(f"{where}: rows {slot.rows} / cols {slot.cols} outside the "
                               f"{rows} x {cols} tensor")
        corners = [slot.offset + dr * slot.row_stride + dc * slot.col_stride
                   for dr in (0, slot.rows[1] - slot.rows[0] - 1)
                   for dc in (0, slot.cols[1] - slot.cols[0] - 1)]
        if min(corners) < 0 or max(corners) >= pe.sram_words:
            raise ProgramError(f"{where}: words {min(corners)}..{max(corners)} outside its "
                               f"{pe.sram_words} SRAM words")


_SOURCES = np.full(max(_OPS) + 1, -1, np.int64)  # sources of each vector op; -1: not one
for _op, _k in SOURCES_OF.items():
    _SOURCES[_op] = _k
_VECTOR_OP_LIST = [int(op) for op in SOURCES_OF]
_BIG = 1 << 31  # fields beyond are left to the exact checks (no int64 overflow here)
_RAMP_RX, _RAMP_TX = 1, 2  # `_ramp_bits`


def _ramp_bits(program: Program, x: int, y: int, colors: int) -> np.ndarray:
    """Per color of PE (x, y): _RAMP_RX if its route accepts from RAMP in some position,
    plus _RAMP_TX if it delivers to RAMP in some position."""
    bits = np.zeros(colors, np.int64)
    for color in range(colors):
        route = program.routes.get((x, y, color))
        if route is not None:
            bits[color] = (route.rx_any >> Port.RAMP & 1) * _RAMP_RX + (
                route.tx_any >> Port.RAMP & 1) * _RAMP_TX
    return bits


def _suspects(code: Code, x: int, y: int, words: int, program: Program, wafer: WaferConfig
              ) -> np.ndarray:
    """The vector instructions of `code` (PE (x, y)'s, `words` of SRAM) that
    `_validate_vector` must check one by one: those that may break one of its rules (the
    same rules, on arrays). The rest pass it."""
    ramp = _ramp_bits(program, x, y, wafer.colors)
    ins, opnd = code.ins, code.opnd
    op, n = ins["op"], ins["n"]
    kind, stride, color = opnd["kind"], opnd["stride"], opnd["color"]
    sources = _SOURCES[np.clip(op, 0, len(_SOURCES) - 1)]
    bad = n <= 0
    bad |= ((kind[:, 1:] != _NONE) != (np.arange(1, 4) <= sources[:, None])).any(axis=1)
    bad |= (kind[:, 1:] == _FABOUT).any(axis=1)
    bad |= np.isin(kind[:, 0], [int(k) for k in _NOT_DESTINATIONS])
    # memory operands within the SRAM over every element and REPEAT iteration
    loops = _loop_counts(code)
    offset, loop_stride = opnd["offset"], opnd["loop_stride"]
    bad |= ((np.abs(n) >= _BIG) | (np.abs(loops) >= _BIG))
    bad |= ((np.abs(offset) >= _BIG) | (np.abs(stride) >= _BIG)
            | (np.abs(loop_stride) >= _BIG)).any(axis=1)
    last_e = (n[:, None] - 1) * stride
    last_k = (loops[:, None] - 1) * loop_stride
    low = offset + np.minimum(0, last_e) + np.minimum(0, last_k)
    high = offset + np.maximum(0, last_e) + np.maximum(0, last_k)
    half = opnd["half"]
    bad |= ((kind == _MEM) & ((low < 0) | (high >= np.where(half, 2 * words, words)))).any(
        axis=1)
    # fp16 (`_validate_half`): on memory and fabric operands only, a unit-stride vector at
    # an even half, an op with an fp16 form, an fp16 destination with fp16 sources but MOV's
    typed = np.isin(kind, [int(k) for k in _TYPED])
    bad |= (half & ~np.isin(kind, [_MEM, _FABIN, _FABOUT])).any(axis=1)
    bad |= (half & (kind == _MEM) & (stride == 1) & (n[:, None] > 1)
            & ((offset % 2 != 0) | (loop_stride % 2 != 0))).any(axis=1)
    bad |= half.any(axis=1) & ~np.isin(op, [int(o) for o in HALF_OPS])
    bad |= half[:, 0] & (op != Op.MOV) & (typed[:, 1:] & ~half[:, 1:]).any(axis=1)
    reg = opnd["reg"]
    bad |= ((kind == _REG) & ((reg < 0) | (reg >= wafer.registers))).any(axis=1)
    # fabric operands: a color of the wafer whose route has RAMP on the right side, and no
    # two FABIN sources of one color
    fabin, fabout = kind == _FABIN, kind == _FABOUT
    bad |= ((fabin | fabout) & ((color < 0) | (color >= wafer.colors))).any(axis=1)
    bits = ramp[np.clip(color, 0, wafer.colors - 1)]
    bad |= (fabin & (bits & _RAMP_TX == 0)).any(axis=1)
    bad |= (fabout & (bits & _RAMP_RX == 0)).any(axis=1)
    for j, k in ((1, 2), (1, 3), (2, 3)):
        bad |= fabin[:, j] & fabin[:, k] & (color[:, j] == color[:, k])
    strided = ((kind[:, 1:] == _MEM) & (stride[:, 1:] != 0)).sum(axis=1)
    bad |= strided > wafer.sram_reads_per_cycle
    return bad & (sources >= 0)


def _loop_counts(code: Code) -> np.ndarray:
    """max(1, count) of the REPEAT whose body holds each instruction, 1 outside bodies (as
    `_validate_tasks` counts; bodies that nest or overrun fail there at their REPEAT)."""
    ins = code.ins
    rows = np.arange(len(ins))
    task_first = np.repeat(code.start[:-1], np.diff(code.start))
    repeat = np.maximum.accumulate(np.where(ins["op"] == Op.REPEAT, rows, -1))
    before = np.concatenate(([-1], repeat))[:-1]  # the last REPEAT above each row
    at = np.maximum(before, 0)
    inside = (before >= task_first) & (rows <= before + ins["body"][at])
    return np.where(inside, np.maximum(ins["count"][at], 1), 1)


def _read_code_or_none(code_of: Mapping[K, Sequence[Sequence[Instr]]]
                        ) -> dict[K, Code] | None:
    """`read_code`, or None if a field is not a number of its type (the checks one by one
    then name it)."""
    try:
        return read_code(code_of)
    except (TypeError, ValueError, OverflowError):
        return None


def _validate_pe(x: int, y: int, pe: PEProgram, program: Program, wafer: WaferConfig,
                 code: Code | None) -> None:
    where = f"PE ({x}, {y})"
    if not (0 <= x < program.width and 0 <= y < program.height):
        raise ProgramError(f"{where}: outside the {program.width} x {program.height} fabric")
    words = pe.sram_words
    if not 0 <= words <= wafer.sram_words_per_pe:
        raise ProgramError(f"{where}: sram_words {words} not in 0..{wafer.sram_words_per_pe}")
    _validate_image(where, pe)
    _validate_tasks(where, x, y, pe, program, wafer, code)


def _validate_image(where: str, pe: PEProgram) -> None:
    for offset, data in pe.image.items():
        if offset < 0 or offset + len(data) > pe.sram_words:
            raise ProgramError(f"{where}: image at offset {offset} ({len(data)} words) outside "
                               f"its {pe.sram_words} SRAM words")


def _validate_tasks(where: str, x: int, y: int, pe: PEProgram, program: Program,
                    wafer: WaferConfig, code: Code | None,
                    valid: list[bool] | None = None) -> None:
    """The checks of a PE's tasks but those marked `valid` (`kept_tasks`); `code` the
    `Code` of `instructions(pe.tasks, valid)` (None: every instruction is checked one by
    one). With `code`, the instructions looked at one by one are the control ops (REPEAT
    bodies are tracked through them) and the vector ops `_suspects` names."""
    words = pe.sram_words
    ids = [task.id for task in pe.tasks]
    if code is not None:
        visit = np.nonzero(_suspects(code, x, y, words, program, wafer)
                           | ~np.isin(code.ins["op"], _VECTOR_OP_LIST))[0]
        bounds = np.searchsorted(visit, code.start)
    for k, task in enumerate(pe.tasks):
        if valid is not None and valid[k]:
            continue
        tw = f"{where} task {task.id}"
        if not 0 <= task.id < wafer.max_tasks:
            raise ProgramError(f"{tw}: id must be in 0..{wafer.max_tasks - 1}")
        if ids.count(task.id) > 1:
            raise ProgramError(f"{tw}: task id used twice on this PE")
        if task.trigger not in tuple(Trigger):
            raise ProgramError(f"{tw}: unknown trigger {task.trigger!r}")
        if not task.instrs:
            raise ProgramError(f"{tw}: field instrs: a task needs at least one instruction")
        if task.trigger == Trigger.COLOR:
            _check_color(task.color, wafer, f"{tw}: trigger color")
            if not _route_has(program, x, y, task.color, "tx"):
                raise ProgramError(f"{tw}: triggered by color {task.color} but that color's route "
                                   f"does not deliver to RAMP")
        loop_end = -1  # last instruction of the REPEAT body we are in
        loop_count = 1
        rows = (range(len(task.instrs)) if code is None
                else (visit[bounds[k]:bounds[k + 1]] - code.start[k]).tolist())
        for i in rows:
            instr = task.instrs[i]
            if i > loop_end:
                loop_count = 1
            op = instr.op
            if op not in _OPS:
                raise ProgramError(f"{tw} instr {i}: field op: unknown opcode {op!r}")
            if op == Op.REPEAT:
                iw = f"{tw} instr {i}"
                if i <= loop_end:
                    raise ProgramError(f"{iw}: field op: REPEAT inside a REPEAT body (no nesting)")
                if instr.count < 0 or instr.body < 1:
                    raise ProgramError(f"{iw}: REPEAT needs count >= 0 and body >= 1")
                if i + instr.body >= len(task.instrs):
                    raise ProgramError(f"{iw}: field body: REPEAT body of {instr.body} runs past "
                                       f"the task's end")
                loop_end, loop_count = i + instr.body, instr.count
            elif op in (Op.ACTIVATE, Op.BLOCK, Op.UNBLOCK):
                if instr.task not in ids:
                    raise ProgramError(f"{tw} instr {i}: field task: {Op(op).name} names task "
                                       f"{instr.task}, not a task of this PE")
            elif op == Op.SWITCH_ADV:
                iw = f"{tw} instr {i}"
                if instr.dst.kind != Kind.FABOUT or any(
                        getattr(instr, k).kind != Kind.NONE for k in SOURCE_FIELDS):
                    raise ProgramError(f"{iw}: field dst: SWITCH_ADV takes one FABOUT "
                                       f"destination (the color) and no sources")
                _validate_fabric(instr.dst, False, [], x, y, program, wafer,
                                 lambda iw=iw: f"{iw}: field dst")
            elif op != Op.HALT:
                _validate_vector(instr, Op(op), max(loop_count, 1), x, y, words, program, wafer,
                                 lambda tw=tw, i=i: f"{tw} instr {i}")


def _validate_vector(instr: Instr, op: Op, loop_count: int, x: int, y: int, words: int,
                     program: Program, wafer: WaferConfig, where: Callable[[], str]) -> None:
    """The checks of one vector instruction; `where()` names it in an error (built only
    then: validation runs before every simulation, over every instruction)."""
    if instr.n <= 0:
        raise ProgramError(f"{where()}: field n: a vector op needs n > 0 (got {instr.n})")
    nsrc = SOURCES_OF[op]
    operands = (instr.dst, instr.a, instr.b, instr.c)
    for k in range(1, 4):
        kind = operands[k].kind
        if (k <= nsrc) != (kind != _NONE):
            raise ProgramError(f"{where()}: field {_FIELDS[k]}: {op.name} takes {nsrc} "
                               f"source(s)")
        if kind == _FABOUT:
            raise ProgramError(f"{where()}: field {_FIELDS[k]}: FABOUT may only be a "
                               f"destination")
    if instr.dst.kind in _NOT_DESTINATIONS:
        raise ProgramError(f"{where()}: field dst: {instr.dst.kind.name} cannot be a "
                           f"destination")
    if instr.dst.half or instr.a.half or instr.b.half or instr.c.half:
        _validate_half(instr, op, operands, where)
    strided_reads = 0
    fabin_colors: list[int] = []
    for k, opnd in enumerate(operands):
        kind = opnd.kind
        if kind == _MEM:
            last_e = (instr.n - 1) * opnd.stride
            last_k = (loop_count - 1) * opnd.loop_stride
            low = opnd.offset + min(0, last_e) + min(0, last_k)
            high = opnd.offset + max(0, last_e) + max(0, last_k)
            unit, limit = ("halves", 2 * words) if opnd.half else ("words", words)
            if low < 0 or high >= limit:
                raise ProgramError(f"{where()}: field {_FIELDS[k]}: memory operand (offset "
                                   f"{opnd.offset}, stride {opnd.stride}, loop_stride "
                                   f"{opnd.loop_stride}) reaches {unit} {low}..{high} outside "
                                   f"0..{limit - 1}")
            if k and opnd.stride != 0:
                strided_reads += 1
        elif kind == _REG:
            if not 0 <= opnd.reg < wafer.registers:
                raise ProgramError(f"{where()}: field {_FIELDS[k]}: register {opnd.reg} not "
                                   f"in 0..{wafer.registers - 1}")
        elif kind == _FABIN or kind == _FABOUT:
            _validate_fabric(opnd, kind == _FABIN, fabin_colors, x, y, program, wafer,
                             lambda k=k: f"{where()}: field {_FIELDS[k]}")
    # (An element writes at most one word, its memory dst: within any write budget >= 1.)
    if strided_reads > wafer.sram_reads_per_cycle:
        raise ProgramError(f"{where()}: {strided_reads} strided memory sources per element "
                           f"but the PE reads {wafer.sram_reads_per_cycle} words per cycle")


def _validate_half(instr: Instr, op: Op, operands: tuple[Operand, ...],
                   where: Callable[[], str]) -> None:
    """The checks of an instruction with fp16 operands (module docstring)."""
    for k, opnd in enumerate(operands):
        if opnd.half and opnd.kind not in (Kind.MEM, Kind.FABIN, Kind.FABOUT):
            raise ProgramError(f"{where()}: field {_FIELDS[k]}: only memory and fabric "
                               f"operands can be fp16 (half), not {opnd.kind.name}")
        if (opnd.half and opnd.kind == Kind.MEM and opnd.stride == 1 and instr.n > 1
                and (opnd.offset % 2 or opnd.loop_stride % 2)):
            raise ProgramError(f"{where()}: field {_FIELDS[k]}: a unit-stride fp16 vector "
                               f"must start at an even half (32-bit aligned; offset "
                               f"{opnd.offset}, loop_stride {opnd.loop_stride})")
    if op not in HALF_OPS:
        raise ProgramError(f"{where()}: field op: {op.name} has no fp16 form (fp16 operands: "
                           f"{', '.join(o.name for o in sorted(HALF_OPS))})")
    dst = operands[0]
    if dst.half and op != Op.MOV and any(
            o.kind in _TYPED and not o.half for o in operands[1:]):
        raise ProgramError(f"{where()}: field dst: an fp16 destination of {op.name} needs fp16 "
                           f"sources (convert with a MOV first)")


def _validate_fabric(opnd: Operand, fabin: bool, fabin_colors: list[int], x: int, y: int,
                     program: Program, wafer: WaferConfig, where: Callable[[], str]) -> None:
    color = opnd.color
    if not 0 <= color < wafer.colors:
        raise ProgramError(f"{where()}: color {color} not in 0..{wafer.colors - 1}")
    if fabin:
        if color in fabin_colors:
            raise ProgramError(f"{where()}: two FABIN operands of color {color}")
        fabin_colors.append(color)
        if not _route_has(program, x, y, color, "tx"):
            raise ProgramError(f"{where()}: FABIN color {color} but that color's route does "
                               f"not deliver to RAMP")
    elif not _route_has(program, x, y, color, "rx"):
        raise ProgramError(f"{where()}: FABOUT color {color} but that color's route does not "
                           f"accept from RAMP")


def _check_color(color: int, wafer: WaferConfig, where: str) -> None:
    if not 0 <= color < wafer.colors:
        raise ProgramError(f"{where}: color {color} not in 0..{wafer.colors - 1}")


def _route_has(program: Program, x: int, y: int, color: int, side: str) -> bool:
    """The route of `color` at (x, y) has RAMP on `side` ("rx", "tx") in some position."""
    route = program.routes.get((x, y, color))
    return route is not None and bool(getattr(route, f"{side}_any") >> Port.RAMP & 1)


def kept_tasks(old: PEProgram, new: PEProgram) -> list[bool]:
    """Which tasks of `new`, replacing the PE program `old`, are `old`'s own: the same Task
    at the same place among the same task ids. Such a task is as valid as in `old` and
    runs as there."""
    if new.tasks is not old.tasks and [t.id for t in new.tasks] != [t.id for t in old.tasks]:
        return [False] * len(new.tasks)
    return [a is b for a, b in zip(new.tasks, old.tasks, strict=True)]


def validate_replacement(program: Program, wafer: WaferConfig,
                         pes: Mapping[tuple[int, int], PEProgram],
                         known: Mapping[tuple[int, int], list[Task]] | None = None
                         ) -> dict[tuple[int, int], Code]:
    """Raise ProgramError (one line, as `validate`) if the programs `pes` cannot replace
    those of their PEs in the valid `program`: each must be a PE of it and keep its SRAM
    size, its image must fit, and its tasks must be valid but those it keeps
    (`kept_tasks`) and a task list validated before for its PE (the same list in `known`).
    Returns the `Code` of the tasks it checked (`instructions(tasks, kept)`), by PE."""
    known = known or {}
    checked: dict[tuple[int, int], list[bool]] = {}
    for (x, y), pe in pes.items():
        where = f"PE ({x}, {y})"
        old = program.pes.get((x, y))
        if old is None:
            raise ProgramError(f"{where}: has no program to replace")
        if pe.sram_words != old.sram_words:
            raise ProgramError(f"{where}: sram_words {pe.sram_words}, the program's "
                               f"{old.sram_words}")
        _validate_image(where, pe)
        kept = kept_tasks(old, pe)
        if not all(kept) and known.get((x, y)) is not pe.tasks:
            checked[(x, y)] = kept
    code = _read_code_or_none({key: instructions(pes[key].tasks, kept)
                               for key, kept in checked.items()})
    for (x, y), kept in checked.items():
        _validate_tasks(f"PE ({x}, {y})", x, y, pes[(x, y)], program, wafer,
                        code and code[(x, y)], kept)
    return code or {}


# --------------------------------------------------------------------------------------------
# Serialization: one .npz of flat integer/float arrays plus a JSON header; no pickle.

FORMAT_VERSION = 5  # 3: switch positions of routes; 4: edge ports; 5: their marks
READABLE_VERSIONS = (3, 4, 5)  # 3: a program without edge ports; 4: ports without marks
_HALF_BIT = 8  # an fp16 operand's kind column holds Kind | 8 (files without fp16 unchanged)
_OPERAND_FIELDS = ("dst", "a", "b", "c")


T = TypeVar("T")


def _distinct(objects: Iterable[T]) -> tuple[list[T], list[int]]:
    """The distinct objects of `objects` (by identity) in first-seen order, and each one's
    index among them. (Each id belongs to one object throughout: every object seen is kept,
    in the list or as one already in it.)"""
    first: dict[int, int] = {}
    distinct: list[T] = []
    index: list[int] = []
    for obj in objects:
        k = first.get(id(obj))
        if k is None:
            k = first[id(obj)] = len(distinct)
            distinct.append(obj)
        index.append(k)
    return distinct, index


def save_program(program: Program, path: str | Path, wafer: WaferConfig | None = None) -> None:
    """Write `program` (and the wafer it was built for) to `path` (.npz), atomically
    (`wse_sim.outputs`); `load_program` reads it back equal."""
    pe_keys = list(program.pes)
    pe_rows: list[tuple] = []
    task_rows: list[tuple] = []
    image_rows: list[tuple] = []
    images: list[np.ndarray] = []
    instr_count = image_words = 0
    for p, (x, y) in enumerate(pe_keys):
        pe = program.pes[(x, y)]
        pe_rows.append((x, y, pe.sram_words))
        for task in pe.tasks:
            task_rows.append((p, task.id, int(task.trigger), task.color, instr_count,
                              len(task.instrs)))
            instr_count += len(task.instrs)
        for offset, data in pe.image.items():
            image_rows.append((p, offset, image_words, len(data)))
            images.append(np.asarray(data, np.float32).ravel())
            image_words += len(data)
    # Programs repeat instruction and operand objects (the compiler's are cached): each
    # distinct one is made a row once, and the tables gather its row for every use.
    instrs, instr_index = _distinct(ins for pe in program.pes.values() for task in pe.tasks
                                    for ins in task.instrs)
    operands, operand_index = _distinct(getattr(ins, name) for ins in instrs
                                        for name in _OPERAND_FIELDS)
    order = np.array(instr_index, np.int64)
    # [instruction, operand field] -> row in `operands`
    operand_rows = np.array(operand_index, np.int64).reshape(-1, 4)[order]
    route_rows = [(x, y, c, r.rx, r.tx, len(r.positions), r.start, int(r.ring))
                  for (x, y, c), r in program.routes.items()]
    position_rows = [pos for r in program.routes.values() for pos in r.positions]
    names = list(program.tensors)
    slot_rows = [(t, s.x, s.y, s.offset, *s.rows, *s.cols, s.row_stride, s.col_stride)
                 for t, name in enumerate(names) for s in program.tensors[name].slots]
    header = {"format": "wse_sim.Program", "version": FORMAT_VERSION,
              "width": program.width, "height": program.height,
              "tensors": [[name, list(program.tensors[name].shape)] for name in names],
              "regions": [[r.name, r.label, r.x, r.y, r.width, r.height]
                          for r in program.regions],
              "meta": program.meta,
              "wafer": None if wafer is None else wafer.model_dump(),
              # name, x, y, side, color, inbound, expected, words in port_data, marks
              "ports": [[p.name, p.x, p.y, int(p.side), p.color, bool(p.inbound),
                         int(p.expected), len(p.data) if p.inbound else 0,
                         [int(m) for m in p.marks]]
                        for p in program.ports]}

    def table(rows: list, cols: int) -> np.ndarray:
        return np.array(rows, np.int64).reshape(-1, cols)

    arrays = {
        "header": np.frombuffer(strict_json(header).encode(), np.uint8),
        "pes": table(pe_rows, 3),
        "tasks": table(task_rows, 6),
        "instrs": table([(int(ins.op), ins.n, ins.count, ins.body, ins.task)
                         for ins in instrs], 5)[order],
        "operands": table([(int(o.kind) | _HALF_BIT * o.half, o.offset, o.stride,
                            o.loop_stride, o.color, o.reg) for o in operands],
                          6)[operand_rows],
        "values": np.array([o.value for o in operands], np.float64)[operand_rows],
        "images": table(image_rows, 4),
        "image_data": np.concatenate(images) if images else np.zeros(0, np.float32),
        "routes": table(route_rows, 8),
        "route_positions": table(position_rows, 2),  # the routes' positions, in route order
        "tensor_slots": table(slot_rows, 10),
        "port_data": np.concatenate([np.asarray(p.data, np.float32).ravel()
                                     for p in program.ports if p.inbound]
                                    or [np.zeros(0, np.float32)]),
    }
    write_file(path, lambda fh: np.savez_compressed(fh, **arrays))


def load_program(path: str | Path) -> Program:
    """Read a program written by `save_program`."""
    return read_program_file(path)[0]


def read_program_file(path: str | Path) -> tuple[Program, WaferConfig | None]:
    """A program written by `save_program` and the wafer it was saved with (None if none).
    A file that is not one is a UserError naming it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
        header = json.loads(arrays["header"].tobytes().decode(), parse_constant=_no_constant)
        program = _program_from(header, arrays)
        wafer = None if header["wafer"] is None else WaferConfig.model_validate(header["wafer"])
    except (OSError, ValueError, KeyError, TypeError, IndexError, ValidationError,
            UnicodeDecodeError, zipfile.BadZipFile, EOFError, RecursionError) as err:
        detail = str(err).splitlines()[0] if str(err) else ""
        raise UserError(f"{path}: not a saved program of format version {FORMAT_VERSION} "
                        f"({type(err).__name__}: {detail})") from None
    return program, wafer


def _no_constant(name: str) -> None:
    raise ValueError(f"header holds {name}, not strict JSON")


def _program_from(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> Program:
    if (header.get("format") != "wse_sim.Program"
            or header.get("version") not in READABLE_VERSIONS):
        raise ValueError(f"format {header.get('format')!r} version {header.get('version')!r}")
    if not isinstance(header["meta"], dict):
        raise TypeError("header field meta must be an object")
    program = Program(width=header["width"], height=header["height"], meta=header["meta"])
    pe_keys = []
    for x, y, words in arrays["pes"].tolist():
        program.pes[(x, y)] = PEProgram(sram_words=words)
        pe_keys.append((x, y))
    # One Instr object per distinct row, used wherever the row is (a compiled program
    # shares its instructions: gpt_small's 352k are 10k distinct rows)
    rows = np.concatenate([arrays[name].reshape(len(arrays["instrs"]), width).view(np.int64)
                           for name, width in (("instrs", 5), ("operands", 24), ("values", 4))],
                          axis=1)
    _, first, use = np.unique(np.ascontiguousarray(rows).view(
        np.dtype((np.void, 8 * rows.shape[1]))).ravel(), return_index=True, return_inverse=True)
    operands, values = arrays["operands"][first].tolist(), arrays["values"][first].tolist()
    distinct = []
    for (op, vn, count, rep_body, target), opnd_rows, opnd_values in zip(
            arrays["instrs"][first].tolist(), operands, values, strict=True):
        opnds = [Operand(Kind(k & ~_HALF_BIT), offset=off, stride=st, loop_stride=ls,
                         color=c, reg=r, value=v, half=bool(k & _HALF_BIT))
                 for (k, off, st, ls, c, r), v in zip(opnd_rows, opnd_values, strict=True)]
        distinct.append(Instr(Op(op), n=vn, dst=opnds[0], a=opnds[1], b=opnds[2], c=opnds[3],
                              count=count, body=rep_body, task=target))
    use = use.ravel().tolist()
    for p, tid, trig, color, start, n in arrays["tasks"].tolist():
        if not 0 <= start <= start + n <= len(use):
            raise IndexError(f"task {tid} of PE {pe_keys[p]}: instructions {start}.."
                             f"{start + n - 1} of {len(use)}")
        body = [distinct[k] for k in use[start:start + n]]
        program.pes[pe_keys[p]].tasks.append(Task(tid, Trigger(trig), body, color=color))
    data = arrays["image_data"]
    for p, offset, start, n in arrays["images"].tolist():
        program.pes[pe_keys[p]].image[offset] = data[start:start + n].copy()
    positions = [tuple(p) for p in arrays["route_positions"].tolist()]
    at = 0
    for x, y, c, rx, tx, count, start, ring in arrays["routes"].tolist():
        if count < 0 or at + count > len(positions):
            raise ValueError(f"route at PE ({x}, {y}) color {c}: {count} positions")
        program.routes[(x, y, c)] = Route(rx, tx, tuple(positions[at:at + count]), start,
                                          bool(ring))
        at += count
    names = [name for name, _ in header["tensors"]]
    for name, (rows, cols) in header["tensors"]:
        program.tensors[name] = TensorLayout((rows, cols))
    for t, x, y, offset, r0, r1, c0, c1, rs, cs in arrays["tensor_slots"].tolist():
        program.tensors[names[t]].slots.append(TensorSlot(x, y, offset, (r0, r1), (c0, c1),
                                                          rs, cs))
    program.regions = [Region(*fields) for fields in header["regions"]]
    port_data = arrays.get("port_data", np.zeros(0, np.float32))
    at = 0
    for name, x, y, side, color, inbound, expected, n, *marks in header.get("ports", []):
        if n < 0 or at + n > len(port_data):
            raise ValueError(f"port {name!r}: {n} words of data")
        data = port_data[at:at + n].copy() if inbound else np.zeros(0, np.float32)
        program.ports.append(EdgePort(name, x, y, Port(side), color, bool(inbound), data,
                                      expected, tuple(marks[0]) if marks else ()))
        at += n
    return program
