"""Generation on the wafer: every run's logits (the prefill's, and each decode step's over
the KV cache) against the float64 reference's forward of the whole sequence so far, the
greedy tokens of the `generate` command on a trained checkpoint equal to the reference's,
sampling, and the limits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from compiler.check import relative_error
from compiler.config import load_config
from compiler.generate import choose, run_batch
from compiler.reference import forward
from wse_sim.cli import main
from wse_sim.generate import generate
from wse_sim.outputs import write_file
from wse_sim.train import Training

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "models" / "gpt_tiny.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Training]:
    """A one-block gpt_tiny trained for two steps, its config and checkpoint files."""
    folder = tmp_path_factory.mktemp("run")
    data = yaml.safe_load(TINY.read_text())
    data["model"]["n_layers"] = 1
    config = folder / "cfg.yaml"
    config.write_text(yaml.safe_dump(data))
    training = Training(load_config(config), str(config), folder, val_windows=4)
    for _ in range(2):
        training.train_step()
    write_file(folder / "checkpoint.npz", training.checkpoint().write)
    return config, folder / "checkpoint.npz", training


def test_every_runs_logits_match_the_reference_forward(trained):
    config, _, training = trained
    cfg = training.cfg
    params = training.run.wafer.params(training.compiled.graph)
    prompt = [80, 121, 116, 104]  # "Pyth"
    rows: list[np.ndarray] = []

    def record(logits: np.ndarray) -> int:
        rows.append(logits)
        return int(np.argmax(logits))

    out = generate(cfg, params, prompt, 3, record)
    assert len(out.decode_cycles) == 2 and out.prefill_cycles > 0
    sequence = prompt + out.tokens
    for i, row in enumerate(rows):  # row i predicts token len(prompt) + i
        prefix = sequence[:len(prompt) + i]
        window = cfg.model_copy(update={"training": cfg.training.model_copy(
            update={"batch_size": 1, "seq_len": len(prefix)})})
        expected = forward(window, params, run_batch(prefix, 0))["lm_head.out"][-1]
        assert relative_error(row, expected) < 1e-5, i


def test_generate_greedy_equals_the_reference(trained, capsys):
    config, checkpoint, _ = trained
    assert main(["generate", str(config), "--checkpoint", str(checkpoint), "--prompt",
                 "def f", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "greedy tokens equal the float64 reference's" in out
    assert "us to the first token" in out and "us per token" in out and "tokens/s" in out


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=50).astype(np.float32)
    draws = [choose(logits, 1.0, None, np.random.default_rng(3)) for _ in range(2)]
    assert draws[0] == draws[1]
    assert {choose(logits, 2.0, 1, rng) for _ in range(10)} == {int(np.argmax(logits))}
    top3 = set(np.argsort(logits)[-3:].tolist())
    assert {choose(logits, 5.0, 3, rng) for _ in range(50)} <= top3


@pytest.mark.parametrize("options, message", [
    (["--prompt", "x" * 14, "--max-new-tokens", "3"],
     "--max-new-tokens: the prompt's 14 tokens and 3 new ones exceed model.n_ctx (16"),
    (["--prompt", ""], "--prompt: the prompt has no token"),
    (["--prompt", "a", "--temperature", "-1"], "argument --temperature: must be a finite"),
])
def test_limits_are_one_line_and_exit_2(trained, options, message, capsys):
    config, checkpoint, _ = trained
    try:
        code = main(["generate", str(config), "--checkpoint", str(checkpoint), *options])
    except SystemExit as exit_:  # argparse
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) <= 2


def test_a_kv_cache_too_large_for_sram_is_one_line(trained, tmp_path, capsys):
    config, checkpoint, _ = trained
    data = yaml.safe_load(Path(config).read_text())
    data["wafer"] = {"preset": "wse2", "sram_bytes_per_pe": 2048}  # the weights fit
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump(data))
    code = main(["generate", str(small), "--checkpoint", str(checkpoint), "--prompt", "a"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "(kv_attention)" in err and "bytes of SRAM" in err
