"""Energy of a run (`wse_sim.energy`): a hand-built program whose FMA, other-op, SRAM and
hop counts are known by construction gets each class's joules from its own wafer field
only; the report carries the figures, and says why one is null."""

from __future__ import annotations

import math

import pytest
from programs import route_east

from wse_sim.energy import CLASSES, event_counts, run_energy
from wse_sim.engine import simulate
from wse_sim.errors import SimulationStopped
from wse_sim.hardware import WaferConfig
from wse_sim.pipeline import simulate_program
from wse_sim.program import FabIn, FabOut, Imm, Mem, Op, Program, Task, Trigger, vec
from wse_sim.report import format_report, run_report

K, N, HOPS = 12, 20, 3  # FMA elements, words sent, links crossed
FIELDS = {"fma": "energy_fma_pj", "fp_other": "energy_fp_op_pj",
          "sram_read": "energy_sram_read_pj", "sram_write": "energy_sram_write_pj",
          "hop": "energy_hop_pj", "edge_io": "energy_edge_byte_pj"}


def fma_then_send() -> Program:
    """PE (0, 0): K FMAs c[i] = a[i] * b[i] + 1 (2 words read, 1 written each), then sends
    N words east over HOPS links (N read); PE (HOPS, 0) stores 2 x each (N adds of a MUL:
    N other ops, N words written)."""
    p = Program(HOPS + 1, 1)
    src = p.pe(0, 0, 3 * K + N)
    src.tasks.append(Task(0, Trigger.RESET, [
        vec(Op.FMA, K, Mem(2 * K), Mem(0), Mem(K), Imm(1.0)),
        vec(Op.MOV, N, FabOut(1), Mem(3 * K))]))
    dst = p.pe(HOPS, 0, N)
    dst.tasks.append(Task(0, Trigger.RESET, [vec(Op.MUL, N, Mem(0), FabIn(1), Imm(2.0))]))
    route_east(p, 1, 0, HOPS, 0)
    return p


def wafer(**kw) -> WaferConfig:
    return WaferConfig(width=8, height=2, **kw)


@pytest.fixture(scope="module")
def stats():
    return simulate(fma_then_send(), wafer()).stats


def test_the_counted_events_are_the_programs_own(stats):
    assert event_counts(stats, 7) == {"fma": K, "fp_other": N, "sram_read": 2 * K + N,
                                      "sram_write": K + N, "hop": N * HOPS, "edge_io": 7}


def test_each_class_is_its_count_times_its_field(stats):
    w = wafer()
    energy = run_energy(stats, w, 100)
    counts = {"fma": K, "fp_other": N, "sram_read": 2 * K + N, "sram_write": K + N,
              "hop": N * HOPS, "edge_io": 100}
    for name in CLASSES:
        assert energy.joules_by_class[name] == pytest.approx(
            counts[name] * getattr(w, FIELDS[name]) * 1e-12), name
    assert energy.joules == pytest.approx(sum(energy.joules_by_class.values()))
    assert energy.joules > 0


@pytest.mark.parametrize("name", CLASSES)
def test_doubling_one_field_doubles_only_its_class(stats, name):
    base = run_energy(stats, wafer(), 100)
    field = FIELDS[name]
    doubled = run_energy(stats, wafer(**{field: 2 * getattr(wafer(), field)}), 100)
    for other in CLASSES:
        factor = 2 if other == name else 1
        assert doubled.joules_by_class[other] == pytest.approx(
            factor * base.joules_by_class[other]), (name, other)
    assert doubled.joules - base.joules == pytest.approx(base.joules_by_class[name])


def test_per_token_and_power_need_a_positive_count_and_time(stats):
    energy = run_energy(stats, wafer(), 0, seconds=2e-6, tokens=4)
    assert energy.joules_per_token == pytest.approx(energy.joules / 4)
    assert energy.average_power_watts == pytest.approx(energy.joules / 2e-6)
    for tokens in (0, None):
        assert run_energy(stats, wafer(), 0, seconds=2e-6, tokens=tokens).joules_per_token is None
    for seconds in (0.0, None):
        assert run_energy(stats, wafer(), 0, seconds=seconds).average_power_watts is None
    with pytest.raises(ValueError, match="edge_bytes"):
        run_energy(stats, wafer(), -1)


def test_the_report_carries_the_energy_and_compares_the_power(stats):
    w = wafer()
    program = fma_then_send()
    program.meta = {"throughput": {"unit": "tokens", "per_run": 5}}
    report = run_report(program, w, stats, 0.0)
    energy = run_energy(stats, w, 0, seconds=stats.cycles / w.clock_hz)
    assert report["energy_joules"] == pytest.approx(energy.joules)
    assert report["energy_per_token_joules"] == pytest.approx(energy.joules / 5)
    assert report["average_power_watts"] == pytest.approx(energy.average_power_watts)
    assert report["average_power_percent_of_system"] == pytest.approx(
        100 * energy.average_power_watts / w.system_power_w)
    assert report["energy_breakdown_joules"] == pytest.approx(energy.joules_by_class)
    assert set(report["energy_breakdown_joules"]) == set(CLASSES)
    assert report["energy_events"]["hop"] == N * HOPS
    text = format_report(report)
    assert "energy " in text and "% of the system's published 23 kW" in text
    assert "leaves out static/leakage power" in text


def test_zero_tokens_and_no_work_give_null_figures_with_their_reasons(stats):
    program = fma_then_send()
    program.meta = {"throughput": {"unit": "tokens", "per_run": 0}}
    report = run_report(program, wafer(), stats, 0.0)
    assert report["energy_per_token_joules"] is None
    assert "no token" in report["null_reasons"]["energy_per_token_joules"]
    assert "per token n/a" in format_report(report)
    idle = Program(1, 1)  # no PE program: no cycle, no energy, no power
    report = run_report(idle, wafer(), simulate(idle, wafer()).stats, 0.0)
    assert report["energy_joules"] == 0 and report["average_power_watts"] is None
    assert "no cycle" in report["null_reasons"]["average_power_watts"]
    assert "energy_per_token_joules" not in report  # the program counts no tokens
    format_report(report)


def test_a_stopped_run_has_energy_so_far_but_no_energy_per_token():
    program = fma_then_send()
    program.meta = {"throughput": {"unit": "tokens", "per_run": 5}}
    with pytest.raises(SimulationStopped) as stop:
        simulate_program(program, wafer(), max_cycles=10)
    report = stop.value.report
    assert report["energy_per_token_joules"] is None
    assert "whole run" in report["null_reasons"]["energy_per_token_joules"]
    assert math.isfinite(report["energy_joules"]) and report["energy_joules"] > 0
    assert report["average_power_watts"] > 0
