"""Fuzzing the engine: random valid Programs (tests/fuzz_programs.py) must each end in a
result, a named deadlock or the max-cycles stop, never in another exception, and a second
run of the same load, and a run without bulk execution on one stripe of rows where the
first has up to three, must end the same way. WSE_FUZZ_EXAMPLES sets how many programs
the test draws (300 by default, about 30 s); tests/fuzz_campaign.py runs thousands in
child processes, so that a segfault or a hang is seen too.

Below it, one reproducer per engine bug the fuzzer found, all fixed. A new one is
xfail(strict=True) while its entry is in fuzz_programs.KNOWN_BUGS: when the engine is
fixed it XPASSes, and the marker and the entry go together.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fuzz_programs import Case, cases, is_cycle_limit, run_case
from hypothesis import HealthCheck, event, given, settings
from programs import assert_same_run

from wse_sim.engine import simulate
from wse_sim.errors import DeadlockError, ProgramError, UserError
from wse_sim.hardware import WaferConfig
from wse_sim.program import (
    EdgePort,
    FabIn,
    FabOut,
    Mem,
    Op,
    Port,
    Program,
    Reg,
    Task,
    Trigger,
    port_mask,
    vec,
)

EXAMPLES = int(os.environ.get("WSE_FUZZ_EXAMPLES", "300"))


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases())
def test_random_programs_end_in_a_result_a_deadlock_or_the_limit(case):
    event(run_case(case, twin=True))


def test_the_generator_draws_every_ending():
    """The strategy is not so tame that the fuzz test only sees one kind of ending."""
    seen = set()

    @settings(max_examples=100, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(cases())
    def collect(case):
        seen.add(run_case(case))

    collect()
    assert {"done", "deadlock", "max_cycles"} <= seen


# -- reproducers of the engine bugs found (all fixed) -----------------------------------------


def _wafer(width: int, height: int = 1, **fields) -> WaferConfig:
    return WaferConfig(width=width, height=height, **fields)


def _route_without_outputs() -> Case:
    """PE (0, 0) sends 3 wavelets on color 0, whose route accepts them from RAMP and has no
    output at all."""
    p = Program(1, 1)
    p.pe(0, 0, 4).tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, 3, FabOut(0), Mem(0))]))
    p.add_route(0, 0, 0, port_mask(Port.RAMP), 0)
    return Case(p, _wafer(1), 1000)


def test_a_route_without_outputs_drops_nothing():
    # Nothing is ever dropped (README, flow control): the engine used to pop such a
    # route's wavelets with -1 copies, so the run ended as if they had been delivered.
    case = _route_without_outputs()
    with pytest.raises(ProgramError, match=r"^route at PE \(0, 0\) color 0: accepts wavelets "
                       r"\(rx\) but has no outputs \(tx is empty\)$"):
        simulate(case.program, case.wafer, max_cycles=case.max_cycles)


def test_max_cycles_bounds_a_bulk_run():
    p = Program(1, 1)
    p.pe(0, 0, 0).tasks.append(Task(0, Trigger.RESET, [vec(Op.NEG, 1000, Reg(0), Reg(0))]))
    with pytest.raises(UserError) as info:  # cycle by cycle it stops at 10
        simulate(p, _wafer(1), max_cycles=10)
    assert is_cycle_limit(info.value)


def test_no_deadlock_while_a_bulk_run_computes():
    # PE (0, 0) computes 50 elements; PE (1, 0) waits for a color nobody sends. The PE
    # whose last task ends in a bulk run leaves the active list when the run starts: the
    # frozen-fabric rule used to fire at cycle 1, not at cycle 50 as cycle by cycle.
    p = Program(2, 1)
    p.pe(0, 0, 0).tasks.append(Task(0, Trigger.RESET, [vec(Op.NEG, 50, Reg(0), Reg(0))]))
    p.pe(1, 0, 0).tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, 1, Reg(0), FabIn(0))]))
    p.add_route(1, 0, 0, 0, port_mask(Port.RAMP))
    for bulk_runs in (True, False):
        with pytest.raises(DeadlockError, match=r"^deadlock at cycle 50 \(the fabric is stuck\)"
                           r" \| waiting: PE \(1, 0\) task 0 pc 0 MOV waits: FABIN color 0 "
                           r"empty$"):
            simulate(p, _wafer(2), max_cycles=10_000, bulk_runs=bulk_runs)
        with pytest.raises(UserError) as info:  # the limit comes first
            simulate(p, _wafer(2), max_cycles=49, bulk_runs=bulk_runs)
        assert is_cycle_limit(info.value) and info.value.cycle == 49


def test_a_slow_element_is_not_a_deadlock():
    # Cycle by cycle, waiting for the PE's own fp32 credit was no progress, so at fp32 rate
    # 0.25 and deadlock_cycles 3 a computing PE was declared deadlocked (not in bulk).
    p = Program(1, 1)
    p.pe(0, 0, 0).tasks.append(Task(0, Trigger.RESET, [vec(Op.NEG, 2, Reg(0), Reg(0))]))
    w = _wafer(1, fp32_ops_per_cycle=0.25, deadlock_cycles=3)
    bulk = simulate(p, w)
    assert bulk.cycles == 5  # elements at cycles 0 and 4
    assert simulate(p, w, bulk_runs=False).cycles == bulk.cycles


def test_nothing_left_is_no_deadlock():
    # A COLOR task whose color nobody sends: the program has nothing to do. The no-progress
    # rule used to come before the end-of-run test: "deadlock at cycle 1", naming nothing.
    p = Program(1, 1)
    p.pe(0, 0, 0).tasks.append(Task(0, Trigger.COLOR, [vec(Op.MOV, 1, Reg(0), FabIn(0))],
                                    color=0))
    p.add_route(0, 0, 0, 0, port_mask(Port.RAMP))
    assert simulate(p, _wafer(1, deadlock_cycles=1)).cycles == 1  # after the scan at cycle 0


def test_a_wavelet_crossing_a_link_is_progress():
    # PE (0, 0) sends one wavelet over 2 hops of latency 3 to a COLOR task at PE (2, 0):
    # found once run_case required a deadlock to name what waits. A wavelet on a link was
    # no progress, so with deadlock_cycles 1 the run was "deadlock at cycle 3", naming
    # nothing (queue_depth 2: the FIFO it crosses into is not full).
    p = Program(3, 1)
    p.pe(0, 0, 0).tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, 1, FabOut(0), Reg(0))]))
    p.pe(2, 0, 0).tasks.append(Task(0, Trigger.COLOR, [vec(Op.MOV, 1, Reg(0), FabIn(0))],
                                    color=0))
    p.add_route(0, 0, 0, port_mask(Port.RAMP), port_mask(Port.E))
    p.add_route(1, 0, 0, port_mask(Port.W), port_mask(Port.E))
    p.add_route(2, 0, 0, port_mask(Port.W), port_mask(Port.RAMP))
    wafer = _wafer(3, hop_latency=3, queue_depth=2, deadlock_cycles=1)
    assert simulate(p, wafer).cycles == 9  # consumed at cycle 0 + 2 * 3 + 2


def test_a_word_for_an_outbound_port_is_taken_while_every_pe_runs_in_bulk():
    # PE (0, 0) sends one word over 3 hops to the outbound port at (2, 0)'s east side while
    # PE (1, 0) runs a long MOV in bulk (with an instruction after it, so it stays on the
    # loop's timer). The router at (2, 0) puts the word into the port's FIFO at cycle 3,
    # when nothing is listed to run and the port phase has not seen it yet: the loop used
    # to skip to the MOV's end, and the port took the word at 300, not at 4 (found as an
    # edge-count error one by one and a max-cycles stop in bulk).
    lat, value = 10, 7.5
    p = Program(3, 1)
    sender = p.pe(0, 0, 1)
    sender.load(0, np.array([value], np.float32))
    sender.tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, 1, FabOut(0), Mem(0))]))
    p.add_route(0, 0, 0, port_mask(Port.RAMP), port_mask(Port.E))
    p.add_route(1, 0, 0, port_mask(Port.W), port_mask(Port.E))
    p.add_route(2, 0, 0, port_mask(Port.W), port_mask(Port.E))
    p.ports.append(EdgePort("g", 2, 0, Port.E, 0, False, np.zeros(0, np.float32), 1))
    p.pe(1, 0, 0).tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, 300, Reg(0), Reg(0)),
                                                      vec(Op.MOV, 1, Reg(0), Reg(0))]))
    wafer = _wafer(3, edge_latency_cycles=lat)
    bulk = simulate(p, wafer)
    assert bulk.port_last_cycle == {"g": 4 + lat}  # taken at 3 + hop_latency
    np.testing.assert_array_equal(bulk.port_words["g"], [value])
    assert bulk.cycles == 301
    assert_same_run(bulk, simulate(p, wafer, bulk_runs=False))


def test_the_campaign_runs_batches_in_child_processes(tmp_path):
    """tests/fuzz_campaign.py, the long run, on 5 programs: it counts them and their
    endings, and keeps no program file of a batch that was ok."""
    script = Path(__file__).with_name("fuzz_campaign.py")
    run = subprocess.run([sys.executable, str(script), "--programs", "5", "--batch", "5",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["programs"] == 5 and summary["batches_not_ok"] == 0
    assert sum(summary["endings"].values()) == 5
    assert summary["batches"][0]["outcome"] == "ok"
    assert not list(tmp_path.glob("*.npz"))


def test_a_thread_short_of_fp_credit_and_of_input_waits_for_the_input():
    # PE (0, 0) adds 2 wavelets from PE (1, 0) on one thread, at a quarter of an fp32 op a
    # cycle, while a second thread runs a 20-element MOV. After the first ADD element the
    # ADD thread lacks both its fp32 credit and a wavelet: a wait for the fabric, so those
    # cycles are the MOV's (move), and the MOV may run in bulk meanwhile. One by one, the
    # budget was checked first and they counted as compute (3 cycles more than in bulk).
    p = Program(2, 1)
    adder = p.pe(0, 0, 0)
    adder.tasks.append(Task(0, Trigger.RESET, [vec(Op.ADD, 2, Reg(0), FabIn(0), Reg(0))]))
    adder.tasks.append(Task(1, Trigger.RESET, [vec(Op.MOV, 20, Reg(0), Reg(0))]))
    p.pe(1, 0, 0).tasks.append(Task(0, Trigger.RESET, [vec(Op.NEG, 2, FabOut(0), Reg(0))]))
    p.add_route(1, 0, 0, port_mask(Port.RAMP), port_mask(Port.W))
    p.add_route(0, 0, 0, port_mask(Port.E), port_mask(Port.RAMP))
    wafer = _wafer(2, sram_reads_per_cycle=1, fp32_ops_per_cycle=0.25, queue_depth=1,
                   microthreads=2, registers=1)
    bulk = simulate(p, wafer)
    one_by_one = simulate(p, wafer, bulk_runs=False)
    assert_same_run(bulk, one_by_one)
    assert one_by_one.stats.compute[0, 0] == 2  # the two ADD elements, nothing else
