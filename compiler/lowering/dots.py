"""Batches of dot products, the inner loop of every product kernel (matmul, attention).

`dots(outputs, terms, a, b, ...)` computes `out[i] = seed[i] + sum_k a[k, i] * b[k, i]`
for i < outputs, each output accumulated in a register over `terms` products: a
one-element MUL (or an FMA adding the seed, e.g. a partial sum arriving from a neighbour),
one FMA over the middle terms, and a one-element FMA that writes the result to memory or
the fabric. Both factors are strided SRAM reads (two per cycle, the PE's read budget), so
an output of k terms costs exactly k cycles; a memory seed is a third read in the first
element's cycle, which costs one more.

The outputs are unrolled (three instructions each) so that a caller can put the whole
batch inside a REPEAT over rows: every `Walk` also advances by `loop` words per REPEAT
iteration.
"""

from __future__ import annotations

from dataclasses import dataclass

from compiler.lowering.ir import Instr, Kind, Mem, Op, Operand, Reg, vec


@dataclass(frozen=True)
class Walk:
    """Element k of output i, in REPEAT iteration it, is the word
    `offset + k * stride + i * step + it * loop`."""

    offset: int
    stride: int
    step: int = 0
    loop: int = 0

    def at(self, k: int, i: int, n: int = 1) -> Operand:
        """The operand of `n` elements starting at term k of output i."""
        return Mem(self.offset + k * self.stride + i * self.step, self.stride if n > 1 else 1,
                   self.loop)


def dots(outputs: int, terms: int, a: Walk, b: Walk, *, acc: int,
         out: list[Operand], seed: list[Operand] | None = None) -> list[Instr]:
    """The instructions of `outputs` dot products of `terms` terms (see the module
    docstring); `out[i]` and `seed[i]` are one-element operands (FabOut / Mem, FabIn /
    Mem), `acc` the register to accumulate in (one per thread)."""
    if terms < 1:
        raise ValueError(f"dots: need at least one term, got {terms}")
    instrs: list[Instr] = []
    for i in range(outputs):
        first = (vec(Op.MUL, 1, Reg(acc), a.at(0, i), b.at(0, i)) if seed is None
                 else vec(Op.FMA, 1, Reg(acc), a.at(0, i), b.at(0, i), seed[i]))
        if terms == 1:
            instrs.append(_retarget(first, out[i]))
            continue
        instrs.append(first)
        if terms > 2:
            instrs.append(vec(Op.FMA, terms - 2, Reg(acc), a.at(1, i, terms - 2),
                              b.at(1, i, terms - 2), Reg(acc)))
        instrs.append(vec(Op.FMA, 1, out[i], a.at(terms - 1, i), b.at(terms - 1, i),
                          Reg(acc)))
    return instrs


def _retarget(instr: Instr, dst: Operand) -> Instr:
    """A one-term output: the seeding instruction writes the result itself."""
    if dst.kind is Kind.REG:
        raise ValueError("dots: an output must be memory or the fabric")
    return Instr(instr.op, n=1, dst=dst, a=instr.a, b=instr.b, c=instr.c)


def dot_cycles(outputs: int, terms: int, memory_seed: bool = False) -> int:
    """Cycles of `dots`: `terms` per output, one more per output with a memory seed."""
    return outputs * (terms + int(memory_seed))
