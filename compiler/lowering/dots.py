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

    def column(self, k: int, outputs: int, n: int = 1) -> list[Operand]:
        """The operands of `n` elements starting at term k of outputs 0, 1, ... (in the
        REPEAT's first iteration)."""
        start, stride = self.offset + k * self.stride, self.stride if n > 1 else 1
        return [Mem(start + i * self.step, stride, self.loop, half=self.half)
                for i in range(outputs)]


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
    k0 = 0 if terms == 1 else head
    reg = Reg(acc)
    # each walk's operands for all outputs at once: this loop builds most of a model's
    # instructions, and a call per operand was most of its time
    a0, b0 = a.column(k0, outputs), b.column(k0, outputs)
    if seed is None:
        firsts = [vec(Op.MUL, 1, reg, a0[i], b0[i]) for i in range(outputs)]
    else:
        firsts = [vec(Op.FMA, 1, reg, a0[i], b0[i], seed[i]) for i in range(outputs)]
    if terms == 1:
        return [_retarget(first, out[i]) for i, first in enumerate(firsts)]
    if terms > 2:
        a_mid, b_mid = a.column(body, outputs, terms - 2), b.column(body, outputs, terms - 2)
    a_tail, b_tail = a.column(tail, outputs), b.column(tail, outputs)
    instrs: list[Instr] = []
    for i in range(outputs):
        instrs.append(firsts[i])
        if terms > 2:
            instrs.append(vec(Op.FMA, terms - 2, reg, a_mid[i], b_mid[i], reg))
        instrs.append(vec(Op.FMA, 1, out[i], a_tail[i], b_tail[i], reg))
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
