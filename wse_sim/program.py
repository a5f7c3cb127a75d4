"""The Program IR: everything one run of the fabric needs, and nothing about where it came from.

This is the single interface between the compiler and the simulator. The compiler builds a
`Program` out of the plain dataclasses below; the simulator validates it, flattens it into
numpy structure-of-arrays form, and runs it.

Coordinates: `x` grows east (0 .. width-1), `y` grows south (0 .. height-1). PE index
`y * width + x`. North is `y - 1`.

Router model (per PE, per color): a static `Route` says which input ports accept wavelets
of that color (`rx`) and which output ports a wavelet is copied to (`tx`, multicast). Port
`RAMP` is the link to the PE itself: `RAMP in rx` means the PE may send on this color,
`RAMP in tx` means wavelets of this color are delivered to the PE.

PE model: SRAM of `sram_words` 32-bit words (fp32), a small scalar register file, and
tasks. A task is a list of instructions run on one microthread, in order, to completion.
Each vector instruction processes `n` elements, element `i` computing

    dst[i] = OP(a[i], b[i], c[i])

over operands that are memory vectors (offset + i * stride), fabric input (one wavelet
consumed per element), fabric output (one wavelet produced per element), a scalar
register, or an immediate. A register as `dst` of a vector instruction is a scalar
accumulator: `ADD dst=Reg(0), a=Mem(...), b=Reg(0)` is a sum-reduction to a scalar.
A memory operand of stride 0 is a scalar loaded once, at the instruction's first element.

`REPEAT(count, body)` runs the next `body` instructions `count` times; in iteration `k` a
memory operand's offset is `offset + k * loop_stride`. One level (no nesting) so the
engine's thread state stays flat.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np


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


SOURCES_OF: dict[Op, int] = {
    **{op: 1 for op in (Op.MOV, Op.NEG, Op.EXP, Op.RSQRT, Op.RECIP, Op.TANH, Op.ERF, Op.SQRT)},
    **{op: 2 for op in (Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.MAX, Op.MIN)},
    Op.FMA: 3,
}
# Ops that cost an fp32 arithmetic slot (MOV is a move: SRAM/fabric bandwidth only).
ARITHMETIC_OPS = frozenset(op for op in SOURCES_OF if op is not Op.MOV)


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


def Mem(offset: int, stride: int = 1, loop_stride: int = 0) -> Operand:  # noqa: N802
    return Operand(Kind.MEM, offset=offset, stride=stride, loop_stride=loop_stride)


def FabIn(color: int) -> Operand:  # noqa: N802
    return Operand(Kind.FABIN, color=color)


def FabOut(color: int) -> Operand:  # noqa: N802
    return Operand(Kind.FABOUT, color=color)


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


def repeat(count: int, body: list[Instr]) -> list[Instr]:
    """`body` run `count` times (memory operands advance by their loop_stride)."""
    return [Instr(Op.REPEAT, count=count, body=len(body)), *body]


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
    rx: int  # port_mask of accepted input ports
    tx: int  # port_mask of output ports (multicast)


@dataclass
class PEProgram:
    sram_words: int
    tasks: list[Task] = field(default_factory=list)
    # Initial SRAM contents: word offset -> float32 data placed there (rest is zero).
    image: dict[int, np.ndarray] = field(default_factory=dict)

    def load(self, offset: int, data: np.ndarray) -> None:
        self.image[offset] = np.ascontiguousarray(data, dtype=np.float32).ravel()


@dataclass
class Program:
    """A whole fabric's program. PEs absent from `pes` run nothing (their routers may still
    forward wavelets if they have routes)."""

    width: int
    height: int
    pes: dict[tuple[int, int], PEProgram] = field(default_factory=dict)
    routes: dict[tuple[int, int, int], Route] = field(default_factory=dict)  # (x, y, color)

    def pe(self, x: int, y: int, sram_words: int = 0) -> PEProgram:
        """The program of PE (x, y), created on first use; grows its SRAM to `sram_words`."""
        prog = self.pes.get((x, y))
        if prog is None:
            prog = self.pes[(x, y)] = PEProgram(sram_words=sram_words)
        prog.sram_words = max(prog.sram_words, sram_words)
        return prog

    def add_route(self, x: int, y: int, color: int, rx: int, tx: int) -> None:
        """Add ports to the route of `color` at (x, y) (routes of one color merge)."""
        old = self.routes.get((x, y, color), Route(0, 0))
        self.routes[(x, y, color)] = Route(old.rx | rx, old.tx | tx)
