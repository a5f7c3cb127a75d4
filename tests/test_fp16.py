"""fp16 in the IR and the engine: packing (two halves a word, two a wavelet), SIMD steps
bounded by the SRAM ports and the fabric, rounding to nearest even as numpy's float16,
validation, save/load."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from programs import route_east

from wse_sim.engine import _from_half, _to_half, simulate
from wse_sim.errors import ProgramError
from wse_sim.hardware import WaferConfig
from wse_sim.program import (
    FabIn,
    FabOut,
    Imm,
    Mem,
    Op,
    Precision,
    Program,
    Reg,
    Task,
    Trigger,
    load_program,
    precision_of,
    save_program,
    simd_width,
    validate,
    vec,
)


def wafer(**kw) -> WaferConfig:
    return WaferConfig(width=8, height=8, **kw)


def halves(values) -> np.ndarray:
    """fp16 values packed two to a float32 word (an even count)."""
    return np.asarray(values, np.float16).view(np.float32)


def one_pe(*instrs, words: int = 64) -> Program:
    p = Program(2, 1)
    p.pe(0, 0, words).tasks.append(Task(0, Trigger.RESET, list(instrs)))
    return p


@numba.njit
def _encode_all(x):
    out = np.empty(len(x), np.uint16)
    for k in range(len(x)):
        out[k] = _to_half(x[k])
    return out


@numba.njit
def _decode_all(h):
    out = np.empty(len(h), np.float32)
    for k in range(len(h)):
        out[k] = _from_half(np.int64(h[k]))
    return out


def test_conversions_are_numpys_float16():
    every = np.arange(1 << 16, dtype=np.uint16)
    np.testing.assert_array_equal(_decode_all(every).view(np.uint32),
                                  every.view(np.float16).astype(np.float32).view(np.uint32))
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 1 << 32, 400_000, dtype=np.uint64).astype(np.uint32)
    # and every float32 near the fp16 rounding boundaries: ties, subnormals, overflow
    edges = every.view(np.float16).astype(np.float32)
    edges = edges[np.isfinite(edges)]
    near = np.concatenate([np.nextafter(edges, np.float32(np.inf)),
                           np.nextafter(edges, np.float32(-np.inf)), edges,
                           (edges[:-1] / 2 + edges[1:] / 2).astype(np.float32),
                           np.float32([65504, 65519.99, 65520, 2.0 ** -25, 2.0 ** -26,
                                       3 * 2.0 ** -26, np.inf, -np.inf])])
    x = np.concatenate([bits.view(np.float32), near.astype(np.float32)])
    x = x[~np.isnan(x)]
    with np.errstate(over="ignore"):
        expect = x.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(_encode_all(x), expect)


def test_fp16_values_are_packed_two_to_a_word():
    # MOV of 8 halves: 4 words read, 4 written; the results sit in 4 words of SRAM.
    x = np.linspace(-3, 3, 8)
    p = one_pe(vec(Op.MOV, 8, Mem(32, half=True), Mem(0, half=True)))
    p.pes[(0, 0)].load(0, halves(x))
    r = simulate(p, wafer())
    np.testing.assert_array_equal(r.sram(0, 0)[16:20].view(np.float16), np.float16(x))
    assert int(r.stats.sram_read.sum()) == 4 and int(r.stats.sram_write.sum()) == 4


def test_a_step_is_the_simd_width_bounded_by_the_sram_ports():
    # An all-fp16 op: 4 a cycle on WSE-2 needs 2 words written a cycle; with the preset's
    # single 32-bit write port it is 2 a cycle.
    n = 64
    mul = vec(Op.MUL, n, Mem(64, half=True), Mem(0, half=True), Imm(3.0))
    two_writes = wafer(sram_writes_per_cycle=2)
    assert simd_width(mul, wafer()) == 2 and simd_width(mul, two_writes) == 4
    for w, cycles in ((wafer(), n // 2), (two_writes, n // 4),
                      (wafer(preset="wse3", sram_reads_per_cycle=4, sram_writes_per_cycle=4),
                       n // 8)):
        p = one_pe(mul)
        p.pes[(0, 0)].load(0, halves(np.arange(n) / 8))
        r = simulate(p, w)
        assert r.cycles == cycles
        np.testing.assert_array_equal(r.sram(0, 0)[32:64].view(np.float16),
                                      np.float16(np.arange(n) / 8 * 3))
        assert int(r.stats.ops.sum()) == n and int(r.stats.flops.sum()) == n


def test_mixed_dot_runs_at_the_mixed_width():
    # fp16 x fp16 accumulated in an fp32 register (fmachs): 2 a cycle on WSE-2, 4 on WSE-3
    # with ports for it (two unit-stride half sources read a word each per pair).
    n = 96
    rng = np.random.default_rng(1)
    a, b = np.float16(rng.normal(size=n)), np.float16(rng.normal(size=n))
    fma = vec(Op.FMA, n, Reg(0), Mem(0, half=True), Mem(n, half=True), Reg(0))
    assert precision_of(fma) == Precision.MIXED
    expect = np.float32(0)
    for u, v in zip(a.astype(np.float32), b.astype(np.float32), strict=True):
        expect = np.float32(u * v + expect)  # the product of two halves is exact in fp32
    for w, cycles in ((wafer(), n // 2), (wafer(preset="wse3", sram_reads_per_cycle=4), n // 4),
                      (wafer(preset="wse3"), n // 2)):
        p = one_pe(fma, words=n)
        p.pes[(0, 0)].load(0, halves(np.concatenate([a, b])))
        r = simulate(p, w)
        assert r.cycles == cycles
        assert r.registers(0, 0)[0] == expect
        assert int(r.stats.flops.sum()) == 2 * n


def test_results_round_to_nearest_even_at_an_fp16_destination():
    # fp32 -> fp16 (a conversion) of ties and near-ties, then an fp16 ADD rounding its
    # float32 sum once, as numpy's float16 does.
    x = np.float32([1 + 2 ** -11, 1 + 3 * 2 ** -11, 2049.0, 65519.0, 1e-7, -2.5e-8, 0.1,
                    1 / 3])
    p = one_pe(vec(Op.MOV, 8, Mem(16, half=True), Mem(0)),
               vec(Op.ADD, 8, Mem(24, half=True), Mem(16, half=True), Imm(2 ** -12)))
    p.pes[(0, 0)].load(0, x)
    r = simulate(p, wafer())
    h = r.sram(0, 0)[8:12].view(np.float16)
    np.testing.assert_array_equal(h.view(np.uint16), x.astype(np.float16).view(np.uint16))
    added = (h.astype(np.float32) + np.float32(2 ** -12)).astype(np.float16)
    np.testing.assert_array_equal(r.sram(0, 0)[12:16].view(np.float16).view(np.uint16),
                                  added.view(np.uint16))


@pytest.mark.parametrize("n", [8, 7])
def test_a_wavelet_carries_two_halves(n):
    # 8 halves east in 4 wavelets (2 elements a cycle), 7 in 4 (the last one half full).
    x = np.float16(np.arange(8) - 2.5)
    p = Program(3, 1)
    src = p.pe(0, 0, 8)
    src.load(0, x.view(np.float32))
    src.tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, n, FabOut(1, half=True),
                                                 Mem(0, half=True))]))
    p.pe(2, 0, 8).tasks.append(Task(0, Trigger.RESET, [
        vec(Op.MUL, n, Mem(0, half=True), FabIn(1, half=True), Imm(2.0))]))
    route_east(p, 1, 0, 2, 0)
    r = simulate(p, wafer())
    assert int(r.stats.injected) == 4
    np.testing.assert_array_equal(r.sram(2, 0)[:4].view(np.float16)[:n], 2 * x[:n])
    # 4 sends at 2 halves a cycle, 2 hops (+2), the last pair consumed in one cycle
    assert r.cycles == 4 + 2 + 2


def test_fp32_fabric_bounds_a_mixed_step_to_one_element():
    # A mixed FMA seeded from the fabric in fp32 takes one wavelet (one element) a cycle.
    fma = vec(Op.FMA, 8, FabOut(2), Mem(0, half=True), Mem(8, half=True), FabIn(1))
    assert simd_width(fma, wafer()) == 1


@pytest.mark.parametrize("instr, message", [
    (vec(Op.ADD, 2, Reg(0, ), Mem(0), Mem(2)), None),
    (vec(Op.EXP, 2, Mem(0, half=True), Mem(2, half=True)), "EXP has no fp16 form"),
    (vec(Op.ADD, 2, Mem(0, half=True), Mem(2, half=True), Reg(1)),
     "an fp16 destination of ADD needs fp16 sources"),
    (vec(Op.MOV, 4, Mem(1, half=True), Mem(8)), "must start at an even half"),
    (vec(Op.MOV, 4, Mem(0, half=True), Mem(0, 1, 3, half=True)), "must start at an even half"),
    (vec(Op.MOV, 4, Mem(126, half=True), Mem(0, half=True)), "reaches halves 126..129"),
    (vec(Op.MOV, 1, Reg(0), Mem(127, half=True)), None),
])
def test_misuse_of_fp16_is_a_one_line_error(instr, message):
    p = one_pe(instr)
    if message is None:
        validate(p, wafer())
        return
    with pytest.raises(ProgramError, match=message) as info:
        validate(p, wafer())
    assert "\n" not in str(info.value) and "PE (0, 0) task 0 instr 0" in str(info.value)


def test_an_fp16_program_saves_and_loads_equal(tmp_path):
    p = one_pe(vec(Op.FMA, 4, Reg(0), Mem(0, half=True), Mem(4, 2, 8, half=True), Reg(0)),
               vec(Op.MOV, 4, Mem(8), Mem(2, half=True)))
    save_program(p, tmp_path / "p.npz")
    assert load_program(tmp_path / "p.npz") == p
