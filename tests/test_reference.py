"""The numpy golden model: gradients against finite differences, float32 against float64."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compiler.config import RunConfig, load_config
from compiler.gpt import build_graph
from compiler.inputs import Batch, init_params, make_batch
from compiler.reference import ReferenceResult, forward, reference_step

ROOT = Path(__file__).resolve().parents[1]


def _variant(**model: object) -> RunConfig:
    data = load_config(ROOT / "models" / "gpt_tiny.yaml").model_dump()
    data["model"].update(model)
    return RunConfig.model_validate(data)


VARIANTS = {
    "tiny": {},
    # The other LM head and activation paths.
    "untied_tanh": {"tie_embeddings": False, "activation": "gelu_tanh"},
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def cfg(request: pytest.FixtureRequest) -> RunConfig:
    return _variant(**VARIANTS[request.param])


@pytest.fixture(scope="module")
def step64(cfg: RunConfig) -> ReferenceResult:
    return reference_step(cfg, init_params(cfg), make_batch(cfg), np.float64)


def test_gradients_match_finite_differences(cfg: RunConfig, step64: ReferenceResult) -> None:
    params, tokens = init_params(cfg), make_batch(cfg)
    rng = np.random.default_rng(1)
    h = 1e-5
    for name, grad in step64.grads.items():
        # The largest entry keeps the norm meaningful; random ones cover the rest.
        flat = [int(np.argmax(np.abs(grad)))] + list(rng.integers(0, grad.size, size=3))
        numeric, analytic = [], []
        for index in flat:
            idx = np.unravel_index(index, grad.shape)
            losses = []
            for sign in (1, -1):
                shifted = dict(params)
                shifted[name] = params[name].copy()
                shifted[name][idx] += sign * h
                losses.append(forward(cfg, shifted, tokens)["loss.out"][0, 0])
            numeric.append((losses[0] - losses[1]) / (2 * h))
            analytic.append(grad[idx])
        numeric, analytic = np.array(numeric), np.array(analytic)
        rel = np.linalg.norm(numeric - analytic) / np.linalg.norm(analytic)
        assert rel < 1e-6, f"{name}: relative error {rel:.2e}"


def test_float32_agrees_with_float64(cfg: RunConfig, step64: ReferenceResult) -> None:
    step32 = reference_step(cfg, init_params(cfg), make_batch(cfg), np.float32)
    assert step32.loss == pytest.approx(step64.loss, rel=1e-5)
    pairs = [("logits", step32.logits, step64.logits)]
    pairs += [(f"grad {n}", step32.grads[n], step64.grads[n]) for n in step64.grads]
    pairs += [(f"updated {n}", step32.updated[n], step64.updated[n]) for n in step64.updated]
    for label, low, high in pairs:
        assert low.dtype == np.float32, label
        scale = np.abs(high).max()
        assert np.abs(low - high).max() <= 1e-4 * scale + 1e-12, label


def test_every_graph_tensor_has_a_reference_value(cfg: RunConfig, step64: ReferenceResult) -> None:
    graph = build_graph(cfg)
    assert set(step64.tensors) == set(graph.tensors)
    for name, spec in graph.tensors.items():
        assert step64.tensors[name].shape == spec.shape, name


def test_accumulated_gradients_are_sums_of_shares(cfg: RunConfig, step64: ReferenceResult) -> None:
    graph = build_graph(cfg)
    for op in graph.ops.values():
        if op.kind == "grad_acc":
            total = sum(step64.tensors[t] for t in op.inputs)
            np.testing.assert_allclose(step64.tensors[op.outputs[0]], total, rtol=1e-12)


def test_sgd_update(cfg: RunConfig, step64: ReferenceResult) -> None:
    params = init_params(cfg)
    for name, value in params.items():
        expected = value - cfg.training.lr * step64.grads[name]
        np.testing.assert_allclose(step64.updated[name], expected, rtol=1e-12, atol=0)


def test_initial_loss_is_near_uniform(cfg: RunConfig, step64: ReferenceResult) -> None:
    assert step64.loss == pytest.approx(np.log(cfg.model.vocab_size), rel=0.05)


def test_attention_is_causal(cfg: RunConfig) -> None:
    params, batch = init_params(cfg), make_batch(cfg)
    tokens = batch.tokens.copy()
    tokens[:, -1] = (tokens[:, -1] + 1) % cfg.model.vocab_size
    changed = Batch(tokens, batch.targets)
    seq = cfg.training.seq_len
    before = forward(cfg, params, batch)["lm_head.out"].reshape(-1, seq, cfg.model.vocab_size)
    after = forward(cfg, params, changed)["lm_head.out"].reshape(-1, seq, cfg.model.vocab_size)
    np.testing.assert_allclose(before[:, :-1], after[:, :-1], rtol=1e-12, atol=1e-15)
    assert not np.allclose(before[:, -1], after[:, -1])


def test_init_and_batch_are_deterministic(cfg: RunConfig) -> None:
    a, b = init_params(cfg), init_params(cfg)
    assert all(np.array_equal(a[n], b[n]) for n in a)
    batch = make_batch(cfg)
    assert np.array_equal(batch.tokens, make_batch(cfg).tokens)
    assert np.array_equal(batch.targets, make_batch(cfg).targets)
    for ids in (batch.tokens, batch.targets):
        assert ids.shape == (cfg.training.batch_size, cfg.training.seq_len)
        assert ids.min() >= 0 and ids.max() < cfg.model.vocab_size
    # each target is the token that follows its input in one window of seq_len + 1
    assert np.array_equal(batch.targets[:, :-1], batch.tokens[:, 1:])
    assert np.all(a["h0.ln1.weight"] == 1) and np.all(a["h0.attn.qkv.bias"] == 0)
    std = cfg.training.init_std
    assert np.std(a["h0.mlp.fc.weight"]) == pytest.approx(std, rel=0.1)
    residual = std / np.sqrt(2 * cfg.model.n_layers)
    assert np.std(a["h0.mlp.proj.weight"]) == pytest.approx(residual, rel=0.1)
