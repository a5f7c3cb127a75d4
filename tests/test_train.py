"""Training on the wafer: the per-step batch code is exactly the code compiled for that
batch, the state carried between steps is what the next step needs (AdamW's moments and
step count included: the check of every later step depends on them), and a run interrupted
with Ctrl-C and resumed ends bit for bit where the uninterrupted run does."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from compiler.batch import BatchCode
from compiler.check import read_results, results_digest
from compiler.checkpoint import load_checkpoint
from compiler.compile import compile_step
from compiler.config import RunConfig, load_config
from compiler.inputs import Batch
from compiler.state import initial_state, step_pes, training_state
from wse_sim.engine import Loaded, simulate
from wse_sim.train import Training

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "models" / "gpt_tiny.yaml"


def one_layer(folder: Path, compile_: dict | None = None, **training: object) -> Path:
    """gpt_tiny with one block (half the simulation) and `training` (and `compile_`)
    changes, as a file."""
    data = yaml.safe_load(TINY.read_text())
    data["model"]["n_layers"] = 1
    data["training"].update(training)
    data["compile"].update(compile_ or {})
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def batch_of(cfg: RunConfig, seed: int) -> Batch:
    rng = np.random.default_rng(seed)
    shape = (cfg.training.batch_size, cfg.training.seq_len + 1)
    return Batch.from_windows(rng.integers(0, cfg.model.vocab_size, shape))


def test_the_batch_code_is_the_code_compiled_for_that_batch(tmp_path):
    cfg = load_config(one_layer(tmp_path))
    compiled = compile_step(cfg)
    code = BatchCode(compiled)
    assert code.pe_tasks(compiled.batch).tasks == {}  # the compiled batch changes nothing
    other = batch_of(cfg, 7)
    rewritten = code.pe_tasks(other)
    assert rewritten.tasks and rewritten.instructions > 0
    program = compiled.linked.program
    state = initial_state(program, training_state(program, compiled.graph.parameters))
    result = Loaded(program, cfg.wafer).run(step_pes(program, state, rewritten.tasks))
    fresh = compile_step(cfg, batch=other)
    expected = simulate(fresh.linked.program, cfg.wafer)
    assert result.cycles == expected.cycles
    params = compiled.graph.parameters
    assert (results_digest(read_results(compiled.linked, result, params))
            == results_digest(read_results(fresh.linked, expected, params)))


def test_adamw_steps_carry_moments_and_step_count(tmp_path):
    cfg = load_config(one_layer(tmp_path, optimizer="adamw", lr=1e-3))
    training = Training(cfg, "cfg", tmp_path / "out", val_windows=4)
    results = [training.train_step() for _ in range(3)]
    assert [r.check_passed for r in results] == [True] * 3, [r.failures for r in results]
    state = training.run.wafer
    assert int(state.tensors["updated:optimizer.step"][0, 0]) == state.step == 3
    assert state.optimizer(training.compiled.graph).m["wte.weight"].any()
    assert results[2].loss < results[0].loss


def test_mixed_precision_steps_carry_only_the_fp32_master(tmp_path):
    # The fp16 weight copies are made from the master each pass: every step passes its
    # check at the mixed tolerance, with the master the previous step left.
    cfg = load_config(one_layer(tmp_path, {"precision": "mixed"}))
    training = Training(cfg, "cfg", tmp_path / "out", val_windows=4)
    results = [training.train_step() for _ in range(3)]
    assert [r.check_passed for r in results] == [True] * 3, [r.failures for r in results]
    assert results[2].loss < results[0].loss


def _train(config: Path, out: Path, *options: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "wse_sim", "train", str(config), "--steps", "3", "--out",
         str(out), "--val-every", "1", "--val-windows", "8", *options],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(tmp_path):
    config = one_layer(tmp_path)
    interrupted = _train(config, tmp_path / "a")
    for line in interrupted.stdout:  # the first step done: interrupt the second
        if line.startswith("step 0/3"):
            interrupted.send_signal(signal.SIGINT)
            break
    out, err = interrupted.communicate(timeout=300)
    assert interrupted.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("stopped at step")
    partial = load_checkpoint(tmp_path / "a" / "checkpoint.npz")
    assert 1 <= partial.step < 3
    resumed = _train(config, tmp_path / "a", "--resume")
    straight = _train(config, tmp_path / "b")
    for process in (resumed, straight):
        process.communicate(timeout=300)
        assert process.returncode == 0
    a, b = (load_checkpoint(tmp_path / name / "checkpoint.npz") for name in "ab")
    assert a.step == b.step == 3
    for name in b.wafer.tensors:
        assert np.array_equal(a.wafer.tensors[name], b.wafer.tensors[name]), name
    for name in b.float64_params:
        assert np.array_equal(a.float64_params[name], b.float64_params[name]), name
    for name in b.history:
        if name != "host_seconds":
            assert np.array_equal(a.history[name], b.history[name]), name


@pytest.mark.parametrize("change, message", [
    ({"lr": 0.05}, "training.lr is 0.1 there, 0.05 here"),
    ({"seed": 1}, "training.seed is 0 there, 1 here"),
])
def test_resume_refuses_another_run(tmp_path, change, message, capsys):
    from wse_sim.cli import main

    config = one_layer(tmp_path)
    training = Training(load_config(config), str(config), tmp_path / "out", val_windows=4)
    (tmp_path / "out").mkdir()
    with open(tmp_path / "out" / "checkpoint.npz", "wb") as fh:
        training.checkpoint().write(fh)
    other = one_layer(tmp_path / "out", **change)
    assert main(["train", str(other), "--steps", "2", "--resume", "--out",
                 str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
