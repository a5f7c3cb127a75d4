"""The GPT training step in weight-streaming mode (`compiler.streaming.gpt`, run by
`wse_sim.pipeline.run_weight_streaming`): every result against float64, the passes'
timeline, the memory service's updates, and the mode's configuration errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from compiler.config import RunConfig
from compiler.graph import grad_name, updated_name
from compiler.streaming.service import update_queue
from wse_sim.errors import UserError
from wse_sim.hardware import WaferConfig
from wse_sim.pipeline import run_parsed


def fields(compile_fields: dict | None = None, **training) -> dict:
    """Two blocks of three heads of six features on five PE columns (heads straddle
    columns), 61 tokens of vocabulary (columns own 12 or 13), three sequences of five
    tokens, the edge at a quarter word a cycle."""
    words_per_cycle = 0.25
    return {
        "model": {"vocab_size": 61, "n_ctx": 8, "d_model": 18, "n_layers": 2, "n_heads": 3,
                  "d_ffn": 40},
        "training": {"batch_size": 3, "seq_len": 5, "lr": 0.1, **training},
        "wafer": {"preset": "wse2", "width": 5, "height": 4,
                  "edge_bytes_per_s": words_per_cycle * 4 * WaferConfig().clock_hz},
        "compile": {"mode": "weight_streaming", **(compile_fields or {})}}


def config(**training) -> RunConfig:
    return RunConfig.model_validate(fields(**training))


@pytest.fixture(scope="module")
def sgd_report():
    return run_parsed(config(), "small")


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_every_result_matches_float64(optimizer, sgd_report):
    """The loss, the logits, both blocks' outputs, every parameter's gradient (as the
    memory service assembled it) and its update (and AdamW's moments) pass the check."""
    cfg = config(optimizer=optimizer)
    report = sgd_report if optimizer == "sgd" else run_parsed(cfg, "small")
    check = report["check"]
    assert check["passed"], check["failures"]
    params = ["wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"] + [
        f"h{i}.{p}" for i in range(2) for p in (
            "ln1.weight", "ln1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
            "attn.proj.bias", "ln2.weight", "ln2.bias", "mlp.fc.weight", "mlp.fc.bias",
            "mlp.proj.weight", "mlp.proj.bias")]
    checked = set(check["tensors"])
    assert {"loss", "logits", "h0.mlp.res.out", "h1.mlp.res.out"} <= checked
    assert {grad_name(p) for p in params} | {updated_name(p) for p in params} <= checked
    if optimizer == "adamw":
        assert {updated_name(f"adam.m:{p}") for p in params} <= checked
    # float32 rounding, far below the tolerance (an update's own check is relative to
    # the step, which is small beside the weight: its tolerance is derived, check.py)
    assert max(e for name, e in check["tensors"].items() if not name.startswith("update:")) < 1e-5


def test_timeline_runs_the_passes_in_order(sgd_report):
    """Weights enter pass by pass, forward from the embedding up and backward down; every
    backward pass's gradients reach the service after its weights entered."""
    timeline = sgd_report["weight_streaming"]["timeline"]
    weights = [(e["layer"], e["pass"]) for e in timeline if e["stream"] == "weights in"]
    assert weights == [("embedding", "forward"), ("h0", "forward"), ("h1", "forward"),
                       ("head", "forward"), ("head", "backward"), ("h1", "backward"),
                       ("h0", "backward")]
    starts = [e["start"] for e in timeline if e["stream"] == "weights in"]
    assert starts == sorted(starts)
    entered = {(e["layer"], e["pass"]): e["start"] for e in timeline
               if e["stream"] == "weights in"}
    for e in timeline:
        if e["stream"] == "gradients out" and e["pass"] == "backward":
            assert e["end"] > entered.get((e["layer"], "backward"), 0)


def test_the_report_states_throughput_bounds_and_energy(sgd_report):
    ws = sgd_report["weight_streaming"]
    assert sgd_report["tokens_per_second"] == pytest.approx(15 / ws["step_seconds"])
    assert ws["step_seconds"] >= ws["wafer_seconds"]
    assert {phase["bound"] for phase in ws["phases"]} <= {"weight I/O", "compute", "fabric"}
    # Two blocks of six linear layers and the head, each forward and backward.
    assert len(ws["phases"]) == 2 * (2 * 6 + 1)
    assert sgd_report["energy_joules"] > 0 and sgd_report["average_power_watts"] > 0
    assert "projected, not simulated" in ws["projection"]["what"]


def test_the_service_updates_one_layer_after_another():
    wafer = WaferConfig(optimizer_params_per_s=1000.0)
    updates = update_queue([("a", 1.0, 500), ("b", 1.2, 1000), ("c", 5.0, 100)], wafer)
    assert [(u["start_seconds"], u["end_seconds"]) for u in updates] == [
        (1.0, 1.5), (1.5, 2.5), (5.0, 5.1)]


@pytest.mark.parametrize("compile_fields, field", [
    ({"lane_width": 8}, "compile.lane_width"), ({"pes": 100}, "compile.pes"),
    ({"placement": "greedy"}, "compile.placement"), ({"precision": "mixed"},
                                                     "compile.precision")])
def test_fields_the_mode_does_not_use_are_refused(compile_fields, field, tmp_path):
    path = tmp_path / "ws.yaml"
    path.write_text(json.dumps(fields(compile_fields)))  # (JSON is YAML)
    run = subprocess.run([sys.executable, "-m", "wse_sim", "run", str(path)],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1 and field in run.stderr


def test_a_vocabulary_narrower_than_the_wafer_takes_one_column_a_token():
    """Columns are at most the narrowest sliced activation's features, so that each owns
    some logits: 4 tokens of vocabulary on a 5-column wafer (before, the fifth column
    owned none and the lowering emitted an empty vector op, a ProgramError)."""
    raw = fields()
    raw["model"]["vocab_size"] = 4
    report = run_parsed(RunConfig.model_validate(raw), "narrow vocabulary")
    assert report["check"]["passed"]
    assert report["fabric"]["width"] == 4


def test_a_sequence_too_long_for_the_sram_is_refused():
    cfg = config().model_copy(update={"wafer": config().wafer.model_copy(
        update={"sram_bytes_per_pe": 4096})})
    with pytest.raises(UserError, match="SRAM"):
        run_parsed(cfg, "small")


@pytest.mark.parametrize("command, field", [(["compile", "-o", "x.npz"], "compile.mode"),
                                            (["run", "--placement", "greedy"], "--placement")])
def test_commands_that_do_not_take_the_mode_say_so(command, field, tmp_path):
    path = tmp_path / "ws.yaml"
    path.write_text(json.dumps(fields()))
    run = subprocess.run([sys.executable, "-m", "wse_sim", command[0], str(path),
                          *command[1:]], capture_output=True, text=True)
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1 and field in run.stderr
