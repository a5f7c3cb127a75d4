"""gpt_tiny end to end through the CLI: compile, simulate, check, report; and the one-line
errors of a model that does not fit."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from compiler.check import results_digest, tolerance_for
from compiler.compile import compile_step
from compiler.config import load_config
from compiler.gpt import build_graph
from wse_sim.cli import main
from wse_sim.hardware import WaferConfig
from wse_sim.program import Program, save_program

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "models" / "gpt_tiny.yaml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[int, dict]:
    out = tmp_path_factory.mktemp("run") / "out.json"
    code = main(["run", str(TINY), "--json", str(out), "--quiet"])
    return code, json.loads(out.read_text())


def test_tiny_step_passes_the_check(tiny_run):
    code, report = tiny_run
    assert code == 0
    check = report["check"]
    assert check["passed"]
    assert check["tensors"], "no tensor was compared"
    assert all(err <= check["tolerances"][name] for name, err in check["tensors"].items())
    assert all(check["tolerances"][name] == 1e-4 for name in check["tensors"]
               if not name.startswith("update:"))
    assert abs(check["loss_sim"] - check["loss_ref"]) <= 1e-4 * abs(check["loss_ref"])
    # every parameter's gradient and updated value was compared, plus the loss and logits
    params = [name.removeprefix("grad:") for name in check["tensors"] if name.startswith("grad:")]
    assert {f"updated:{p}" for p in params} <= set(check["tensors"])
    assert {f"update:{p}" for p in params} <= set(check["tensors"])
    assert {"loss", "logits", "grad:wte.weight", "grad:h1.mlp.fc.weight"} <= set(check["tensors"])


def test_tiny_step_in_mixed_precision_passes_at_its_derived_tolerance(tmp_path):
    cfg = yaml.safe_load(TINY.read_text())
    cfg["compile"]["precision"] = "mixed"
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out.json"
    assert main(["run", str(path), "--json", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    check = report["check"]
    assert check["passed"] and check["tolerance"] == tolerance_for("mixed")
    assert tolerance_for("mixed") == pytest.approx(1e-4 + 2.0**-10)
    assert all(check["tolerances"][name] == check["tolerance"] for name in check["tensors"]
               if not name.startswith("update:"))
    # % of peak is against the mixed peak: mixed_simd_width FMACs a cycle a PE
    wafer = WaferConfig()
    assert report["precision"] == "mixed"
    assert report["percent_of_used_peak"] == pytest.approx(
        100 * report["achieved_flops_per_second"]
        / (2 * wafer.mixed_simd_width * wafer.clock_hz * report["pes_used"]))
    # the linear layers' PEs ran fp16 steps: fewer compute cycles than FLOPs / 2
    fc = next(k for k in report["kernels"] if k["name"] == "h0.mlp.fc")
    assert fc["pe_cycles"]["compute"] < fc["flops"] / 2


def test_tiny_report_counters(tiny_run):
    _, report = tiny_run
    # every PE-cycle of every used PE is in exactly one class
    assert sum(report["pe_cycles"].values()) == report["pes_used"] * report["cycles"]
    assert report["pe_utilization"] == pytest.approx(
        report["pe_cycles"]["compute"] / (report["pes_used"] * report["cycles"]))
    # a PE does at most one arithmetic element (an FMA: 2 FLOPs) per compute cycle
    assert report["pe_cycles"]["compute"] >= report["flops_counted"] / 2 > 0
    # the kernels partition the used PEs, so their counted FLOPs add up to the total
    assert sum(k["flops"] for k in report["kernels"]) == report["flops_counted"]
    assert sum(k["pes"] for k in report["kernels"]) == report["pes_used"]
    assert report["model_flops"] == build_graph(load_config(TINY)).summary()["flops"]["total"]
    # the PEs skip most of the causally masked half of attention (all but the masked keys
    # of each PE's diagonal block), so they execute fewer FLOPs
    assert report["flops_counted"] < report["model_flops"]
    # SRAM: a FLOP reads at least one word; writes are at most one word per element
    assert report["sram_bytes_read"] >= 4 * report["flops_counted"] // 2
    assert 0 < report["sram_bytes_written"] <= report["sram_bytes_read"]
    assert report["simulated_seconds"] == pytest.approx(
        report["cycles"] / report["wafer"]["clock_hz"])
    tokens = 2 * 16  # gpt_tiny: batch 2 x seq_len 16
    assert report["tokens_per_second"] == pytest.approx(tokens / report["simulated_seconds"])
    # the compiler's per-link estimate counts every routed wavelet: the simulation agrees
    assert report["link_load_estimate"]["total"] == report["fabric_wavelet_hops"]
    assert report["link_load_estimate"]["max"] == report["max_link_load"]
    kernels = report["kernels"]
    assert {k["op"] for k in kernels} == {"embedding", "layernorm", "matmul", "attention",
                                          "gelu", "add", "cross_entropy"}
    for k in kernels:
        assert 0 <= k["start_cycle"] <= k["end_cycle"] < report["cycles"], k["name"]
        assert 0 < k["utilization"] <= 1, k["name"]
        assert k["pes"] == k["w"] * k["h"]
        # a kernel's PE-cycles by class add up to its PEs x the run; fill (before a PE's
        # first work: stalled or idle) and drain (after its last: idle) are some of them
        classes = k["pe_cycles"]
        assert sum(classes.values()) == k["pes"] * report["cycles"], k["name"]
        assert classes["compute"] == pytest.approx(k["utilization"] * k["pes"] * report["cycles"])
        assert k["pes"] * k["start_cycle"] <= k["fill_pe_cycles"], k["name"]
        assert k["drain_pe_cycles"] <= classes["idle"], k["name"]
        assert k["fill_pe_cycles"] + k["drain_pe_cycles"] <= classes["stalled"] + classes["idle"]
        # its stalls split exactly into waiting for output room and waiting for input
        assert sum(k["stalled_pe_cycles"].values()) == classes["stalled"], k["name"]
    for field in ("pe_cycles", "stalled_pe_cycles"):
        assert {name: sum(k[field][name] for k in kernels)
                for name in report[field]} == report[field]
    assert set(report["stalled_pe_cycles"]) == {"wait_output", "wait_input"}
    assert min(report["stalled_pe_cycles"].values()) > 0  # both happen in a step
    # the backward pass ends after the forward pass: the loss kernel before the embedding
    ends = {k["name"]: k["end_cycle"] for k in kernels}
    assert ends["loss"] < ends["embed"]


def test_tiny_report_energy(tiny_run):
    _, report = tiny_run
    # the energy figures of `wse_sim.energy` (tests/test_energy.py): finite and positive
    for key in ("energy_joules", "energy_per_token_joules", "average_power_watts",
                "average_power_percent_of_system"):
        assert math.isfinite(report[key]) and report[key] > 0, key
    breakdown = report["energy_breakdown_joules"]
    assert set(breakdown) == {"fma", "fp_other", "sram_read", "sram_write", "hop", "edge_io"}
    assert sum(breakdown.values()) == pytest.approx(report["energy_joules"])
    assert all(breakdown[name] > 0 for name in breakdown if name != "edge_io")
    assert breakdown["edge_io"] == 0  # a layer-pipelined step uses no memory-service port
    assert report["energy_per_token_joules"] == pytest.approx(report["energy_joules"] / (2 * 16))
    assert report["average_power_watts"] == pytest.approx(
        report["energy_joules"] / report["simulated_seconds"])
    assert report["energy_events"]["hop"] == report["fabric_wavelet_hops"]


def test_tiny_critical_path_runs_from_the_embedding_to_the_end(tiny_run):
    _, report = tiny_run
    path = report["critical_path"]
    names = [step["kernel"] for step in path]
    # the embedding's forward, through the loss and the backward, to the embedding's
    # gradient, the last work of the step
    assert names[0] == names[-1] == "embed" and "loss" in names
    assert path[0]["input_from"] is None and path[0]["input_cycle"] is None
    assert path[-1]["output_cycle"] == report["cycles"] - 1
    # each kernel feeds the next (the compiler's streams between kernels say so), and each
    # takes the last wavelet after it left the previous one and before its own output
    feeds = {(src, dst) for src, dst, _ in compile_step(load_config(TINY)).traffic}
    for before, step in itertools.pairwise(path):
        assert step["input_from"] == before["kernel"]
        assert (before["kernel"], step["kernel"]) in feeds
        assert before["output_cycle"] < step["input_cycle"] <= step["output_cycle"]
    assert set(names) <= {k["name"] for k in report["kernels"]}


def _write_config(tmp_path: Path, **wafer) -> Path:
    cfg = yaml.safe_load(TINY.read_text())
    cfg["wafer"] = {"preset": "wse2", **wafer}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wse_sim", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def test_model_too_large_for_sram_names_op_and_pe(tmp_path):
    result = _cli("run", str(_write_config(tmp_path, sram_bytes_per_pe=2048)))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "op embed" in lines[0] and "PE (" in lines[0] and "2,048" in lines[0]


def test_model_too_large_for_the_fabric_is_one_line(tmp_path):
    result = _cli("run", str(_write_config(tmp_path, width=8, height=8)))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "8 x 8" in result.stderr


def test_unroutable_placement_names_the_stream(tmp_path):
    result = _cli("run", str(_write_config(tmp_path, colors=4)))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "routing: stream " in lines[0] and "4 colors" in lines[0]


def test_compile_then_simulate_gives_the_run_counters(tiny_run, tmp_path):
    """The program file is the seam: `compile` + `simulate` report what `run` reports
    (less the check and the host times), and the tensors read back are the checked ones."""
    _, report = tiny_run
    program = tmp_path / "step.npz"
    assert main(["compile", str(TINY), "-o", str(program)]) == 0
    out, tensors = tmp_path / "sim.json", tmp_path / "tensors.npz"
    assert main(["simulate", str(program), "--json", str(out), "--tensors", str(tensors),
                 "--quiet"]) == 0
    simulated = json.loads(out.read_text())
    volatile = {"check", "host_simulation_seconds", "host_engine_seconds", "compile_seconds"}
    assert set(simulated) == set(report) - {"check"}
    for key in set(report) - volatile:
        assert simulated[key] == report[key], key
    with np.load(tensors) as arrays:
        checked = {name: arrays[name] for name in report["check"]["tensors"]
                   if not name.startswith("update:")}
    assert results_digest(checked) == report["check"]["results_sha256"]


def test_a_program_that_does_nothing_has_null_rates(tmp_path):
    """No cycle: tokens/s, FLOP/s and the average power cannot be computed; the JSON says
    null and why."""
    program = Program(2, 1)
    program.pe(0, 0, 4)
    program.meta = {"throughput": {"unit": "tokens", "per_run": 32}, "model_flops": 100}
    save_program(program, tmp_path / "idle.npz", WaferConfig())
    out = tmp_path / "idle.json"
    assert main(["simulate", str(tmp_path / "idle.npz"), "--json", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text(), parse_constant=pytest.fail)
    rates = ("tokens_per_second", "achieved_flops_per_second", "percent_of_wafer_peak",
             "percent_of_used_peak", "average_power_watts", "average_power_percent_of_system")
    assert report["cycles"] == 0 and all(report[key] is None for key in rates)
    assert report["energy_joules"] == report["energy_per_token_joules"] == 0
    assert report["null_reasons"] == dict.fromkeys(rates, "no cycle was simulated (no PE had "
                                                   "work)")
