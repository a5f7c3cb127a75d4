"""PE semantics and whole programs, with cycle counts derived by hand in each test."""

import copy
import logging
import re
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from programs import (
    assert_same_run,
    deadlock_pair,
    outer_product_matmul,
    send_east,
    slow_consumer,
    systolic_dot,
)

from wse_sim.engine import Loaded, prepare_engine, simulate
from wse_sim.errors import DeadlockError, ProgramError, SimulationStopped, UserError
from wse_sim.hardware import WaferConfig
from wse_sim.pipeline import simulate_program
from wse_sim.program import (
    HALF_OPS,
    SOURCES_OF,
    FabIn,
    FabOut,
    Imm,
    Instr,
    Mem,
    Op,
    PEProgram,
    Port,
    Program,
    Reg,
    Task,
    Trigger,
    port_mask,
    repeat,
    vec,
)
from wse_sim.report import format_report


def wafer(**kw) -> WaferConfig:
    return WaferConfig(width=16, height=16, **kw)


def one_pe(*tasks: Task, words: int = 64) -> Program:
    p = Program(1, 1)
    pe = p.pe(0, 0, words)
    pe.load(0, np.arange(words, dtype=np.float32))
    pe.tasks.extend(tasks)
    return p


def test_systolic_dot_product():
    pes, k = 6, 16
    rng = np.random.default_rng(1)
    a = rng.standard_normal(pes * k).astype(np.float32)
    b = rng.standard_normal(pes * k).astype(np.float32)
    r = simulate(systolic_dot(a, b, pes), wafer())
    # Every PE: k FMA elements in cycles 0..k-1. PE 0 sends its sum at cycle k; each next
    # PE consumes it h*L + 2 = 3 cycles later and sends its own sum in the same element, so
    # the last PE stores at k + 3 * (pes - 1) and the run ends one cycle later.
    assert r.cycles == k + 3 * (pes - 1) + 1
    got = r.sram(pes - 1, 0)[2 * k]
    assert got == pytest.approx(float(np.dot(a.astype(np.float64), b)), rel=1e-5, abs=1e-5)
    assert r.stats.flops.sum() == 2 * pes * k + (pes - 1)  # FMAs + the chain's ADDs
    assert r.stats.sram_read.sum() == 2 * pes * k


def test_outer_product_matmul_2x2_matches_numpy():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((8, 6)).astype(np.float32)
    b = rng.standard_normal((6, 8)).astype(np.float32)
    r = simulate(outer_product_matmul(a, b, 2), wafer())
    c = np.block([[r.sram(x, y)[:16].reshape(4, 4) for x in range(2)] for y in range(2)])
    np.testing.assert_allclose(c, a.astype(np.float64) @ b, rtol=1e-5, atol=1e-5)
    assert r.stats.flops.sum() == 2 * 8 * 8 * 6
    # Lower bound: per k step a PE receives 4 + 4 wavelets (8 cycles) and runs 4 FMA rows
    # of 4 elements, each row 5 cycles (element 0 also loads the stride-0 a[i]: 3 reads).
    assert r.cycles >= 6 * (8 + 4 * 5)


def test_same_program_same_counters():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((12, 9)).astype(np.float32)
    b = rng.standard_normal((9, 6)).astype(np.float32)
    r1 = simulate(outer_product_matmul(a, b, 3), wafer())
    r2 = simulate(outer_product_matmul(a, b, 3), wafer())
    assert r1.cycles == r2.cycles
    for name, value in vars(r1.stats).items():
        np.testing.assert_array_equal(value, getattr(r2.stats, name), err_msg=name)


def test_repeat_with_loop_stride():
    # REPEAT takes one cycle, then 3 iterations of a 2-element ADD: cycles 1..6.
    body = [vec(Op.ADD, 2, Mem(40, 1, 2), Mem(0, 1, 2), Imm(100.0))]
    r = simulate(one_pe(Task(0, Trigger.RESET, repeat(3, body))), wafer())
    assert r.cycles == 7
    np.testing.assert_array_equal(r.sram(0, 0)[40:46], np.arange(6) + 100.0)
    assert r.stats.move[0, 0] == 1 and r.stats.compute[0, 0] == 6


def test_scalar_operand_costs_one_extra_read():
    # FMA with a stride-0 source: element 0 reads 3 words (budget 2), owing one read, so
    # element 1 waits a cycle: n elements take n + 1 cycles.
    n = 4
    instr = vec(Op.FMA, n, Mem(20), Mem(5, 0), Mem(0), Mem(10))
    r = simulate(one_pe(Task(0, Trigger.RESET, [instr])), wafer())
    assert r.cycles == n + 1
    mem = r.sram(0, 0)
    np.testing.assert_array_equal(mem[20:24], np.float32(5) * np.arange(4) + np.arange(10, 14))
    assert r.stats.sram_read[0, 0] == 2 * n + 1
    assert r.stats.flops[0, 0] == 2 * n and r.stats.ops[0, 0] == n


def test_half_rate_fpu():
    # fp32 credit 0.5 per cycle, starting full: elements at cycles 0, 2, 4, 6.
    instr = vec(Op.MUL, 4, Mem(20), Mem(0), Imm(3.0))
    r = simulate(one_pe(Task(0, Trigger.RESET, [instr])), wafer(fp32_ops_per_cycle=0.5))
    assert r.cycles == 7
    assert r.stats.compute[0, 0] == 7  # waiting only for the FPU counts as compute


def test_local_task_activate_block_unblock():
    # Task 0: BLOCK 1 (0), ACTIVATE 1 (1), MOV 3 elements (2..4), UNBLOCK 1 (5); task 1
    # starts at 6 (the next cycle's scan) and runs 2 elements (6, 7).
    t0 = Task(0, Trigger.RESET, [Instr(Op.BLOCK, task=1), Instr(Op.ACTIVATE, task=1),
                                 vec(Op.MOV, 3, Mem(30), Mem(0)),
                                 Instr(Op.UNBLOCK, task=1)])
    t1 = Task(1, Trigger.LOCAL, [vec(Op.ADD, 2, Mem(40), Mem(30), Imm(1.0))])
    r = simulate(one_pe(t0, t1), wafer())
    assert r.cycles == 8
    np.testing.assert_array_equal(r.sram(0, 0)[40:42], [1.0, 2.0])


def test_halt_stops_new_tasks():
    t0 = Task(0, Trigger.RESET, [Instr(Op.HALT), Instr(Op.ACTIVATE, task=1)])
    t1 = Task(1, Trigger.LOCAL, [vec(Op.MOV, 1, Mem(0), Imm(7.0))])
    r = simulate(one_pe(t0, t1), wafer())
    assert r.cycles == 2
    assert r.sram(0, 0)[0] == 0.0


@pytest.mark.parametrize("threads, cycles", [(1, 6), (2, 3)])
def test_microthreads_run_tasks_concurrently(threads, cycles):
    tasks = [Task(k, Trigger.RESET, [vec(Op.MOV, 3, Reg(k), Imm(1.0))]) for k in range(2)]
    r = simulate(one_pe(*tasks), wafer(microthreads=threads))
    assert r.cycles == cycles


def test_microthreads_up_to_63():
    # A PE's running threads are bits of one int64 (`SLOT.running`): the 63rd runs, a 64th
    # is refused by name.
    tasks = [Task(k, Trigger.RESET, [vec(Op.MOV, 1, Reg(k % 16), Imm(1.0))]) for k in range(63)]
    assert simulate(one_pe(*tasks), wafer(microthreads=63, max_tasks=64)).cycles == 1
    with pytest.raises(UserError, match="microthreads must be at most 63"):
        simulate(one_pe(*tasks), wafer(microthreads=64, max_tasks=64))


def test_color_task_runs_once_per_wavelet():
    # PE (0, 0) sends 3 wavelets in cycles 0..2; they are ready at PE (1, 0) in cycles
    # 3..5. The color task adds one to Reg 0 per run: runs at 3, 4, 5; done at 6.
    p = send_east(3, 1)
    p.pes[(1, 0)].tasks = [Task(5, Trigger.COLOR, [vec(Op.ADD, 1, Reg(0), FabIn(1), Reg(0))],
                                color=1)]
    r = simulate(p, wafer())
    assert r.cycles == 6
    assert r.registers(1, 0)[0] == 0.0 + 1.0 + 2.0
    assert r.stats.receive[0, 1] == 0 and r.stats.compute[0, 1] == 3


def test_stats_classes_and_idle():
    r = simulate(send_east(10, 3, width=5), wafer())
    s = r.stats
    total = s.compute + s.send + s.receive + s.move + s.stalled + s.idle
    assert (total == r.cycles).all()
    assert s.idle[0, 4] == r.cycles  # no program
    assert s.send[0, 0] == 10 and s.compute[0, 3] == 10 and s.stalled[0, 3] == 5
    assert s.ramp_out[0, 0] == 10 and s.ramp_in[0, 3] == 10
    assert s.totals()["link"] == 30
    assert 0 < s.utilization()[0, 3] < 1


@pytest.mark.parametrize("threads", [1, 2])
def test_stalls_split_into_waiting_for_input_and_for_output_room(threads):
    # The sender's wavelet 0, sent in cycle 0, is consumed in cycle 0 + 1 + 2 = 3: until
    # then the receiver waits for input (cycles 0..2; asleep from 1). It computes in cycles
    # 4..103 and takes the other 19 in 104..122. The 3 FIFOs on the way (the sender's RAMP
    # FIFO, the receiver's router's W FIFO, its receive queue) hold 4 wavelets each, so with
    # wavelet 0 consumed the sender fills them by sending wavelets 0..12 in cycles 0..12.
    # It then waits for output room: the receiver's pop in cycle 104 frees a slot that
    # reaches back one FIFO per cycle (receive queue refilled in 105, W FIFO in 106), so it
    # sends wavelet 13 in cycle 107 and the rest up to 113: cycles 13..106 wait for output.
    r = simulate(slow_consumer(20, 100), wafer(), threads=threads)
    s = r.stats
    assert r.cycles == 123
    sender = {name: int(getattr(s, name)[0, 0]) for name in ("send", "wait_output",
                                                              "wait_input", "idle")}
    assert sender == {"send": 20, "wait_output": 94, "wait_input": 0, "idle": 123 - 114}
    receiver = {name: int(getattr(s, name)[0, 1]) for name in ("receive", "compute",
                                                                "wait_output", "wait_input")}
    assert receiver == {"receive": 20, "compute": 100, "wait_output": 0, "wait_input": 3}
    assert (s.stalled == s.wait_output + s.wait_input).all()
    classes = s.compute + s.send + s.receive + s.move + s.wait_output + s.wait_input + s.idle
    assert (classes == r.cycles).all()
    # The last wavelet left the sender's router in 116 and was consumed in 122.
    assert sorted(s.last_ramp.tolist()) == [(0, 0, 1, True, 116), (1, 0, 1, False, 122)]
    # Stopped at cycle 50, the sender has waited for output room in 13..49 (asleep from 14).
    with pytest.raises(SimulationStopped) as info:
        simulate(slow_consumer(20, 100), wafer(), threads=threads, max_cycles=50)
    s = info.value.result.stats
    assert (s.wait_output[0, 0], s.wait_input[0, 1], s.compute[0, 1]) == (37, 3, 46)


def test_planted_deadlock_is_named():
    with pytest.raises(DeadlockError) as info:
        simulate(deadlock_pair(), wafer(deadlock_cycles=50))
    msg = str(info.value)
    assert "\n" not in msg
    # Both tasks start at cycle 0 and wait on empty receive queues with nothing in flight:
    # from cycle 1 nothing can ever happen, so deadlock_cycles need not pass.
    assert msg.startswith("deadlock at cycle 1 (the fabric is stuck)")
    assert "PE (0, 0) task 0 pc 0 MOV waits: FABIN color 3 empty" in msg
    assert "PE (1, 0) task 0 pc 0 MOV waits: FABIN color 4 empty" in msg


def test_full_buffers_and_ramp_named():
    # PE (1, 0) waits for color 2, which nobody sends, so color 1 backs up to the sender.
    p = send_east(20, 1)
    p.pes[(1, 0)].tasks[0].instrs.insert(0, vec(Op.MOV, 1, Mem(0), FabIn(2)))
    p.add_route(1, 0, 2, port_mask(Port.E), port_mask(Port.RAMP))
    p.add_route(2, 0, 2, 0, port_mask(Port.W))
    p.width = 3
    with pytest.raises(DeadlockError) as info:
        simulate(p, wafer(deadlock_cycles=30))
    msg = str(info.value)
    assert "(no progress)" in msg  # the sender keeps trying: deadlock_cycles decides
    assert "PE (0, 0) task 0 pc 0 MOV waits: FABOUT color 1: ramp buffer full" in msg
    assert "PE (1, 0) W color 1" in msg and "PE (0, 0) RAMP color 1" in msg


def test_wavelets_stranded_at_halted_pe():
    p = send_east(1, 1)
    p.pes[(1, 0)].tasks = [Task(0, Trigger.RESET, [Instr(Op.HALT)])]
    with pytest.raises(DeadlockError, match=r"stranded: PE \(1, 0\) color 1: 1 wavelets at a ha"):
        simulate(p, wafer())


def test_out_of_bounds_program_rejected_before_running():
    p = send_east(10, 2)
    p.pes[(2, 0)].sram_words = 9  # the receiver writes words 0..9
    with pytest.raises(ProgramError, match=r"PE \(2, 0\) task 0 instr 0: field dst"):
        simulate(p, wafer())


def test_max_cycles_exceeded():
    with pytest.raises(UserError, match="max_cycles=10"):
        simulate(send_east(100, 2), wafer(), max_cycles=10)


def test_a_stopped_run_counts_the_cycles_before_the_stop():
    # PE (0, 0) runs a 200-element FMA (one bulk-run instruction, cycles 0..199), then sends
    # 4 words east; PE (1, 0) waits for them from cycle 0 (asleep on an empty queue).
    p = Program(2, 1)
    src = p.pe(0, 0, 200)
    src.tasks.append(Task(0, Trigger.RESET, [vec(Op.FMA, 200, Mem(0), Mem(0), Imm(2.0), Reg(0)),
                                             vec(Op.MOV, 4, FabOut(1), Mem(0))]))
    p.pe(1, 0, 4).tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, 4, Mem(0), FabIn(1))]))
    p.add_route(0, 0, 1, port_mask(Port.RAMP), port_mask(Port.E))
    p.add_route(1, 0, 1, port_mask(Port.W), port_mask(Port.RAMP))
    with pytest.raises(SimulationStopped) as info:
        simulate(p, wafer(), max_cycles=100)
    assert str(info.value).startswith("stopped at cycle 100: reached max_cycles=100; 2 PEs "
                                      "still running a task, 0 wavelets in flight")
    stopped = info.value.result
    assert (info.value.cycle, info.value.reason, stopped.cycles) == (100, "max_cycles", 100)
    s = stopped.stats
    # The sender computed in cycles 0..99 only: 100 elements of its 200, one read each.
    assert (s.compute[0, 0], s.ops[0, 0], s.flops[0, 0]) == (100, 100, 200)
    assert (s.sram_read[0, 0], s.sram_write[0, 0]) == (100, 100)
    assert (s.first_cycle[0, 0], s.last_cycle[0, 0]) == (0, 99)
    # The receiver stalled in every one of them.
    assert (s.stalled[0, 1], s.first_cycle[0, 1]) == (100, -1)
    assert (s.idle[0, :2] == 0).all()
    assert stopped.running()[0, :2].all()


def test_progress_callback_and_result_views():
    seen: list[int] = []
    r = simulate(send_east(5, 1), wafer(), progress=seen.append)
    assert seen[-1] == r.cycles
    assert r.sram(0, 0).dtype == np.float32 and len(r.registers(0, 0)) == 16
    with pytest.raises(UserError):
        r.sram(5, 5)


def test_sends_to_itself():
    # A route RAMP -> RAMP: sent at t, consumed at t + 2 (h = 0): sends 0..3, receives 2..5.
    p = Program(1, 1)
    pe = p.pe(0, 0, 8)
    pe.load(0, np.arange(4, dtype=np.float32))
    pe.tasks = [Task(0, Trigger.RESET, [vec(Op.MOV, 4, FabOut(0), Mem(0))]),
                Task(1, Trigger.RESET, [vec(Op.MOV, 4, Mem(4), FabIn(0))])]
    p.add_route(0, 0, 0, port_mask(Port.RAMP), port_mask(Port.RAMP))
    r = simulate(p, wafer())
    assert r.cycles == 3 + 2 + 1
    np.testing.assert_array_equal(r.sram(0, 0)[4:], np.arange(4))


# Bulk execution (a lone thread's memory-only vector op run in one go) must be invisible:
# the same program with a never-triggered COLOR task on the PE (which disables it) must
# give identical cycles, counters, memory and registers.

VECTOR_OPS = [Op.MOV, Op.NEG, Op.EXP, Op.RECIP, Op.TANH, Op.ADD, Op.SUB, Op.MUL, Op.MAX, Op.FMA]


@st.composite
def operands(draw, dst: bool = False):
    kind = draw(st.sampled_from(["mem", "reg"] if dst else ["mem", "mem", "reg", "imm"]))
    if kind == "mem":
        return Mem(draw(st.integers(0, 40)), draw(st.sampled_from([0, 1, 1, 2])),
                   draw(st.sampled_from([0, 8])))
    if kind == "reg":
        return Reg(draw(st.integers(0, 3)))
    return Imm(draw(st.floats(-2, 2, width=32)))


@st.composite
def half_operands(draw, dst: bool = False):
    """A half memory operand (a unit-stride one 32-bit aligned), or a register or an
    immediate source."""
    kind = draw(st.sampled_from(["mem"] if dst else ["mem", "mem", "imm"]))
    if kind == "imm":
        return Imm(draw(st.floats(-2, 2, width=16)))
    stride = draw(st.sampled_from([0, 1, 1, 2, 3]))
    offset = draw(st.integers(0, 80))
    return Mem(offset - offset % 2 if stride == 1 else offset, stride,
               draw(st.sampled_from([0, 8])), half=True)


@st.composite
def half_instructions(draw):
    """An fp16 instruction of each class: all fp16, mixed (an fp32 destination), or a
    conversion (a MOV between the two)."""
    op = draw(st.sampled_from(sorted(HALF_OPS)))
    n = draw(st.integers(1, 9))
    kind = draw(st.sampled_from(["fp16", "mixed", "convert"]))
    srcs = [draw(half_operands()) for _ in range(SOURCES_OF[op])]
    if kind == "fp16":
        return vec(op, n, draw(half_operands(dst=True)), *srcs)
    if kind == "convert":
        if draw(st.booleans()):  # fp32 -> fp16
            return vec(Op.MOV, n, draw(half_operands(dst=True)), draw(operands()))
        return vec(Op.MOV, n, draw(operands(dst=True)), srcs[0])
    if draw(st.booleans()):  # an fp32 accumulator as the last source
        srcs[-1] = draw(operands())
    return vec(op, n, draw(operands(dst=True)), *srcs)


@st.composite
def instructions(draw):
    if draw(st.integers(0, 3)) == 0:
        return draw(half_instructions())
    op = draw(st.sampled_from(VECTOR_OPS))
    srcs = [draw(operands()) for _ in range(SOURCES_OF[op])]
    return vec(op, draw(st.integers(1, 8)), draw(operands(dst=True)), *srcs)


@st.composite
def bulk_programs(draw):
    tasks = []
    for tid in range(draw(st.integers(1, 3))):
        body = draw(st.lists(instructions(), min_size=1, max_size=3))
        if draw(st.booleans()):
            body = repeat(draw(st.integers(0, 3)), body)
        trigger = Trigger.RESET if tid == 0 or draw(st.booleans()) else Trigger.LOCAL
        tasks.append(Task(tid, trigger, body))
    if any(t.trigger == Trigger.LOCAL for t in tasks):
        tasks[0].instrs.append(Instr(Op.ACTIVATE, task=len(tasks) - 1))
    wafer_kw = {"fp32_ops_per_cycle": draw(st.sampled_from([0.25, 0.5, 1.0, 2.0])),
                "sram_reads_per_cycle": draw(st.integers(1, 3)),
                "sram_writes_per_cycle": draw(st.integers(1, 2)),
                "microthreads": draw(st.integers(1, 2)),
                "fp16_simd_width": draw(st.sampled_from([1, 2, 4, 8])),
                "mixed_simd_width": draw(st.sampled_from([1, 2, 4])),
                "fp16_convert_simd_width": draw(st.sampled_from([1, 4]))}
    return tasks, wafer_kw


@settings(max_examples=60, deadline=None)
@given(bulk_programs())
def test_bulk_execution_is_invisible(case):
    tasks, wafer_kw = case
    plain = one_pe(*copy.deepcopy(tasks))
    w = wafer(**wafer_kw)
    try:
        fast = simulate(plain, w)
    except ProgramError:
        assume(False)
    slow = simulate(plain, w, bulk_runs=False)
    assert fast.cycles == slow.cycles
    for name, value in vars(fast.stats).items():
        np.testing.assert_array_equal(value, getattr(slow.stats, name), err_msg=name)
    np.testing.assert_array_equal(fast.sram(0, 0), slow.sram(0, 0))
    np.testing.assert_array_equal(fast.registers(0, 0), slow.registers(0, 0))


@settings(max_examples=60, deadline=None)
@given(bulk_programs(), st.floats(0.0, 1.0))
def test_a_stopped_bulk_run_counts_as_the_cycle_by_cycle_run(case, where):
    # Stopped inside or between bulk-run instructions, the counters are those the
    # cycle-by-cycle path kept up to the stop.
    tasks, wafer_kw = case
    plain = one_pe(*copy.deepcopy(tasks))
    w = wafer(**wafer_kw)
    try:
        full = simulate(plain, w)
    except ProgramError:
        assume(False)
    assume(full.cycles >= 2)
    stop = 1 + int(where * (full.cycles - 2))  # 1 .. cycles - 1
    runs = []
    for bulk_runs in (True, False):
        with pytest.raises(SimulationStopped) as info:
            simulate(plain, w, max_cycles=stop, bulk_runs=bulk_runs)
        runs.append(info.value.result)
    fast, slow = runs
    assert fast.cycles == slow.cycles == stop
    for name, value in vars(fast.stats).items():
        np.testing.assert_array_equal(value, getattr(slow.stats, name), err_msg=name)
    assert fast.stats.idle.min() >= 0


# What a computing thread repeats, adding words 0..11 into words 12..23: one instruction,
# or three in a row (one bulk run goes from each into the next, and loops back).
COMPUTING = {
    "one": [vec(Op.ADD, 12, Mem(12), Mem(0), Mem(12))],
    "three": [vec(Op.ADD, 1, Mem(12), Mem(0), Mem(12)),
              vec(Op.FMA, 10, Mem(13), Mem(1), Imm(0.5), Mem(13)),
              vec(Op.MUL, 1, Mem(23), Mem(11), Imm(1.5))],
}


def _receiver_beside_a_computing_thread(gap: int, computing: str) -> Program:
    """PE (0, 0) sends 12 words east, one every `gap` + 2 cycles; PE (1, 0) receives them
    on a COLOR task (one 12-element MOV, waiting between words) into the words that its
    RESET task keeps adding up (COMPUTING[computing]), so that the sums depend on the
    cycle of every element of both threads."""
    p = Program(2, 1)
    sender = p.pe(0, 0, 12)
    sender.load(0, np.arange(1, 13, dtype=np.float32))
    sender.tasks.append(Task(0, Trigger.RESET, repeat(12, [
        vec(Op.MOV, 1, FabOut(0), Mem(0, 0, 1)), vec(Op.NEG, gap, Reg(0), Reg(0))])))
    receiver = p.pe(1, 0, 24)
    receiver.tasks += [
        Task(0, Trigger.COLOR, [vec(Op.MOV, 12, Mem(0), FabIn(0))], color=0),
        Task(1, Trigger.RESET, repeat(30, COMPUTING[computing]))]
    _east(p)
    return p


def _sender_beside_a_computing_thread(gap: int, computing: str) -> Program:
    """PE (0, 0) sends east, four times in 12-element MOVs, the words that its RESET task
    keeps adding up (COMPUTING[computing]); PE (1, 0) takes one every `gap` + 2 cycles, so
    the FIFOs on the way fill and the sending thread waits for room beside the computing
    one: the words sent depend on the cycle of every element of both threads."""
    p = Program(2, 1)
    sender = p.pe(0, 0, 24)
    sender.load(0, np.arange(1, 13, dtype=np.float32))
    sender.tasks += [Task(0, Trigger.RESET, repeat(4, [vec(Op.MOV, 12, FabOut(0), Mem(12))])),
                     Task(1, Trigger.RESET, repeat(30, COMPUTING[computing]))]
    receiver = p.pe(1, 0, 48)
    receiver.tasks.append(Task(0, Trigger.RESET, repeat(48, [
        vec(Op.MOV, 1, Mem(0, 0, 1), FabIn(0)), vec(Op.NEG, gap, Reg(0), Reg(0))])))
    _east(p)
    return p


def _east(p: Program) -> None:
    """Color 0 from PE (0, 0) to PE (1, 0)."""
    p.add_route(0, 0, 0, port_mask(Port.RAMP), port_mask(Port.E))
    p.add_route(1, 0, 0, port_mask(Port.W), port_mask(Port.RAMP))


BESIDE = {"receiving": _receiver_beside_a_computing_thread,
          "sending": _sender_beside_a_computing_thread}


def _same_memories(fast, slow) -> None:
    for x in range(2):
        np.testing.assert_array_equal(fast.sram(x, 0), slow.sram(x, 0))


@pytest.mark.parametrize("beside", sorted(BESIDE))
@pytest.mark.parametrize("computing", sorted(COMPUTING))
@pytest.mark.parametrize("gap", [3, 11, 40])
def test_bulk_runs_beside_a_waiting_thread_are_invisible(gap, computing, beside):
    # A computing thread runs in bulk while the other thread of its PE waits for a word
    # (receiving) or for room in its full RAMP FIFO (sending), and each delivery or pop
    # cuts the run short: the same cycles, counters and memory as cycle by cycle, finished
    # or stopped at any cycle.
    program = BESIDE[beside](gap, computing)
    w = wafer(microthreads=2)
    fast, slow = (simulate(program, w, bulk_runs=b) for b in (True, False))
    assert_same_run(fast, slow)
    _same_memories(fast, slow)
    for stop in range(1, fast.cycles, 7):
        runs = []
        for bulk_runs in (True, False):
            with pytest.raises(SimulationStopped) as info:
                simulate(program, w, max_cycles=stop, bulk_runs=bulk_runs)
            runs.append(info.value.result)
        assert_same_run(*runs)
        _same_memories(*runs)


def test_a_loaded_program_runs_again_with_some_pes_replaced():
    # Each run starts from fresh state, as if the program with those PEs' programs replaced
    # were simulated. `moved`: one task more on PE (1, 0), so the tasks and instructions of
    # every later PE move, and on PE (3, 0) a task between its own two, so the ACTIVATE of
    # its unchanged first task names another task index. `partial`: new SRAM words on PE
    # (0, 0), and PE (3, 0) keeps its first task but not its second.
    pes, k = 4, 8
    rng = np.random.default_rng(2)
    a, b = (rng.standard_normal(pes * k).astype(np.float32) for _ in range(2))
    program = systolic_dot(a, b, pes)
    last = program.pes[(3, 0)]
    last.tasks[0].instrs.append(Instr(Op.ACTIVATE, task=7))  # doubles the sum
    last.tasks.append(Task(7, Trigger.LOCAL, [vec(Op.MUL, 1, Mem(2 * k), Mem(2 * k), Imm(2))]))
    first, second = program.pes[(0, 0)], program.pes[(1, 0)]
    moved = {
        (1, 0): PEProgram(second.sram_words, [
            Task(0, Trigger.RESET, [*second.tasks[0].instrs, Instr(Op.ACTIVATE, task=5)]),
            Task(5, Trigger.LOCAL, [vec(Op.MOV, 1, Mem(2 * k), Reg(0))])], second.image),
        (3, 0): PEProgram(last.sram_words, [last.tasks[0], Task(9, Trigger.LOCAL, [
            vec(Op.NEG, 1, Mem(2 * k), Mem(2 * k))]), last.tasks[1]], last.image),
    }
    partial = {
        (0, 0): PEProgram(first.sram_words, first.tasks,
                          {0: rng.standard_normal(2 * k).astype(np.float32)}),
        (3, 0): PEProgram(last.sram_words, [last.tasks[0], Task(7, Trigger.LOCAL, [
            vec(Op.MUL, 1, Mem(2 * k), Mem(2 * k), Imm(3))])], last.image),
    }
    whole = simulate(program, wafer())
    loaded = Loaded(program, wafer())
    # twice in a row: the second run reuses the code the first validated and assembled
    for replaced in (moved, moved, None, partial, partial, moved):
        run = loaded.run(replaced)
        want = simulate(replace(program, pes={**program.pes, **(replaced or {})}), wafer())
        assert_same_run(run, want)
        for x in range(pes):
            np.testing.assert_array_equal(run.sram(x, 0), want.sram(x, 0))
        if replaced:  # ... and the replacement made a difference
            assert any(not np.array_equal(want.sram(x, 0), whole.sram(x, 0))
                       for x, _ in replaced)


@pytest.mark.parametrize("pe, change, message", [
    ((5, 0), {}, r"^PE \(5, 0\): has no program to replace"),
    ((1, 0), {"sram_words": 3}, r"^PE \(1, 0\): sram_words 3, the program's 9$"),
    ((1, 0), {"image": {8: np.zeros(2, np.float32)}}, r"^PE \(1, 0\): image at offset 8"),
    ((1, 0), {"tasks": [Task(0, Trigger.RESET, [vec(Op.MOV, 1, Mem(0), Reg(99))])]},
     r"^PE \(1, 0\) task 0 instr 0: field a: register 99"),
])
def test_a_replaced_pe_program_is_validated(pe, change, message):
    program = systolic_dot(np.ones(8, np.float32), np.ones(8, np.float32), 2)
    old = program.pes[(1, 0)]
    new = PEProgram(**{"sram_words": old.sram_words, "tasks": old.tasks, "image": old.image,
                       **change})
    with pytest.raises(ProgramError, match=message):
        Loaded(program, wafer()).run({pe: new})


def test_stats_of_two_runs_one_after_another_add_up():
    """`Stats.then`: counts add, the later run's cycles shift by the earlier's."""
    first = simulate(send_east(16, 3), wafer()).stats
    second = simulate(send_east(5, 3), wafer()).stats
    both = first.then(second)
    assert both.cycles == first.cycles + second.cycles
    for name in ("compute", "send", "wait_input", "idle", "sram_read", "link", "flops"):
        assert np.array_equal(getattr(both, name),
                              getattr(first, name) + getattr(second, name)), name
    assert both.injected == first.injected + second.injected
    later = second.last_cycle >= 0
    assert np.array_equal(both.last_cycle[later], second.last_cycle[later] + first.cycles)
    earlier = first.first_cycle >= 0
    assert np.array_equal(both.first_cycle[earlier], first.first_cycle[earlier])
    # one record per (PE, color, direction), the later run's where both have one
    keys = {(r["x"], r["y"], r["color"], r["sent"]) for r in both.last_ramp}
    assert len(keys) == len(both.last_ramp)
    assert max(both.last_ramp["cycle"]) == max(second.last_ramp["cycle"]) + first.cycles


def test_the_engines_compile_is_timed_apart_from_the_simulation(caplog):
    wafer = WaferConfig(width=4, height=1)
    with caplog.at_level(logging.INFO, logger="wse_sim.engine"):
        assert prepare_engine(wafer) > 0
    assert "preparing the simulator engine" in caplog.text
    # its program fits the smallest wafer a config may describe
    assert prepare_engine(WaferConfig(width=1, height=1, colors=1, max_tasks=1,
                                      microthreads=1, queue_depth=1, sram_bytes_per_pe=4)) > 0
    result, report = simulate_program(send_east(4, 3), wafer)
    assert result.cycles > 0 and report["host_engine_seconds"] > 0
    host = next(line for line in format_report(report).splitlines() if line.startswith("host"))
    assert re.fullmatch(r"host +engine \d+\.\d s, simulate \d+\.\d s", host)
    first_run = format_report({**report, "host_engine_seconds": 45.0})
    assert "engine 45.0 s (numba compiled it: a first run; cached for the next), " in first_run
