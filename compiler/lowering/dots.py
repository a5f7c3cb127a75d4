"""Batches of dot products, the inner loop of every product kernel (matmul, attention).

`dots(outputs, terms, a, b, ...)` computes `out[i] = seed[i] + sum_k a[k, i] * b[k, i]`
for i < outputs, each output accumulated in a register over `terms` products: a
one-element MUL (or an FMA adding the seed, e.g. a partial sum arriving from a neighbour),
one FMA over the middle terms, and a one-element FMA that writes the result to memory or
the fabric. Both factors are strided SRAM reads (two per cycle, the PE's read budget), so
an output of k terms costs exactly k cycles; a memory seed is a third read in the first
element's cycle, which costs one more.

With fp16 factors (`Walk.half`, unit strides: mixed precision) the products are fp16 x fp16
accumulated in fp32 (the SDK's fmachs): the middle FMA runs `half_dot_step` elements a
cycle, and the first instruction takes the last term so that the middle one starts at
term 0, 32-bit aligned (the sum's order differs; its terms do not).

The outputs are unrolled (three instructions each) so that a caller can put the whole
batch inside a REPEAT over rows: every `Walk` also advances by `loop` words per REPEAT
iteration.
"""

from __future__ import annotations

from dataclasses import dataclass

from compiler.lowering.ir import Instr, Kind, Mem, Op, Operand, Reg, vec
from wse_sim.hardware import WaferConfig
from wse_sim.program import simd_width


@dataclass(frozen=True)
class Walk:
    """Element k of output i, in REPEAT iteration it, is the word
    `offset + k * stride + i * step + it * loop`."""

    offset: int
    stride: int
    step: int = 0
    loop: int = 0
    half: bool = False  # fp16 elements: offset, stride, step and loop count halves

    def at(self, k: int, i: int, n: int = 1) -> Operand:
        """The operand of `n` elements starting at term k of output i."""
        return Mem(self.offset + k * self.stride + i * self.step, self.stride if n > 1 else 1,
                   self.loop, half=self.half)


def dots(outputs: int, terms: int, a: Walk, b: Walk, *, acc: int,
         out: list[Operand], seed: list[Operand] | None = None) -> list[Instr]:
    """The instructions of `outputs` dot products of `terms` terms (see the module
    docstring); `out[i]` and `seed[i]` are one-element operands (FabOut / Mem, FabIn /
    Mem), `acc` the register to accumulate in (one per thread)."""
    if terms < 1:
        raise ValueError(f"dots: need at least one term, got {terms}")
    # fp16 factors: the first instruction takes the last term and the middle one starts
    # at term 0, so that its unit-stride half vectors start 32-bit aligned.
    half = a.half or b.half
    head, body, tail = (terms - 1, 0, terms - 2) if half else (0, 1, terms - 1)
    instrs: list[Instr] = []
    for i in range(outputs):
        k0 = 0 if terms == 1 else head
        first = (vec(Op.MUL, 1, Reg(acc), a.at(k0, i), b.at(k0, i)) if seed is None
                 else vec(Op.FMA, 1, Reg(acc), a.at(k0, i), b.at(k0, i), seed[i]))
        if terms == 1:
            instrs.append(_retarget(first, out[i]))
            continue
        instrs.append(first)
        if terms > 2:
            instrs.append(vec(Op.FMA, terms - 2, Reg(acc), a.at(body, i, terms - 2),
                              b.at(body, i, terms - 2), Reg(acc)))
        instrs.append(vec(Op.FMA, 1, out[i], a.at(tail, i), b.at(tail, i), Reg(acc)))
    return instrs


def _retarget(instr: Instr, dst: Operand) -> Instr:
    """A one-term output: the seeding instruction writes the result itself."""
    if dst.kind is Kind.REG:
        raise ValueError("dots: an output must be memory or the fabric")
    return Instr(instr.op, n=1, dst=dst, a=instr.a, b=instr.b, c=instr.c)


def dot_cycles(outputs: int, terms: int, memory_seed: bool = False, step: int = 1) -> int:
    """Cycles of `dots`: `terms` per output, one more per output with a memory seed. With
    fp16 factors (`step` > 1 elements a cycle in the middle FMA, `half_dot_step`) the first
    and last terms take a cycle each and the middle ones `step` a cycle."""
    if step == 1 or terms == 1:
        return outputs * (terms + int(memory_seed))
    return outputs * (2 + -(-(terms - 2) // step) + int(memory_seed))


def half_dot_step(wafer: WaferConfig) -> int:
    """Elements a cycle of a dot's middle FMA with unit-stride fp16 factors accumulated in
    an fp32 register (`wse_sim.program.simd_width`: the mixed SIMD width, bounded by the
    two factors' words, one per pair each)."""
    return simd_width(vec(Op.FMA, 2, Reg(0), Mem(0, half=True), Mem(0, half=True), Reg(0)),
                      wafer)
