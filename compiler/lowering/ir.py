"""The IR's operand and instruction constructors (`wse_sim.program`), cached.

Operands and instructions are frozen values, and a model's kernels repeat the same ones
on every PE of a grid (the same offsets, the same vector ops), so each distinct one is
built once: lowering gpt_small builds about 450k instructions from about 1.5M operands,
and constructing frozen dataclasses was most of its time. The caches hold values only,
no state: a cached instruction is indistinguishable from a fresh one.
"""

from __future__ import annotations

from functools import lru_cache

import wse_sim.program as program
from wse_sim.program import Instr, Kind, Op, Operand, repeat

Mem = lru_cache(maxsize=None)(program.Mem)
FabIn = lru_cache(maxsize=None)(program.FabIn)
FabOut = lru_cache(maxsize=None)(program.FabOut)
Reg = lru_cache(maxsize=None)(program.Reg)
Imm = lru_cache(maxsize=None)(program.Imm)
vec = lru_cache(maxsize=None)(program.vec)

__all__ = ["FabIn", "FabOut", "Imm", "Instr", "Kind", "Mem", "Op", "Operand", "Reg", "repeat",
           "vec"]
