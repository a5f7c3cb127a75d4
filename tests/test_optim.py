"""The optimizer references: AdamW by hand and in closed form, SGD against the golden step,
the weight-decay rule against the graph, float32 against float64."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler.config import RunConfig, load_config
from compiler.gpt import build_graph
from compiler.inputs import init_params, make_batch
from compiler.optim import (
    OptimizerState,
    adamw_update,
    decays,
    init_state,
    optimizer_step,
    sgd_update,
)
from compiler.reference import reference_step

ROOT = Path(__file__).resolve().parents[1]


def _tiny(**changes: dict) -> RunConfig:
    data = load_config(ROOT / "models" / "gpt_tiny.yaml").model_dump()
    for section, fields in changes.items():
        data[section].update(fields)
    return RunConfig.model_validate(data)


def test_adamw_two_steps_by_hand() -> None:
    # lr 0.1, beta1 = beta2 = 0.5, eps 0.5, weight decay 0.5: every number below is exact.
    # Step 1, g = 2: decay 1 -> 0.95; m = 1, v = 2; step size 0.1 / (1 - 0.5) = 0.2;
    #   denominator sqrt(2) / sqrt(0.5) + 0.5 = 2.5; p = 0.95 - 0.2 * 1 / 2.5 = 0.87.
    # Step 2, g = -2: decay 0.87 -> 0.8265; m = 0.5 - 1 = -0.5, v = 1 + 2 = 3;
    #   step size 0.1 / 0.75; denominator sqrt(3) / sqrt(0.75) + 0.5 = 2.5;
    #   p = 0.8265 + (0.1 / 0.75) * 0.5 / 2.5 = 0.8265 + 0.02666...
    # The bias gets the same steps without the decay; a zero gradient moves only by decay.
    hyper = {"lr": 0.1, "beta1": 0.5, "beta2": 0.5, "eps": 0.5, "weight_decay": 0.5}
    params = {"h0.mlp.fc.weight": np.array([1.0, 1.0]), "h0.mlp.fc.bias": np.array([1.0])}
    state = init_state("adamw", params)
    for g in (2.0, -2.0):
        grads = {"h0.mlp.fc.weight": np.array([g, 0.0]), "h0.mlp.fc.bias": np.array([g])}
        params, state = adamw_update(params, grads, state, **hyper)
    second_step = (0.1 / 0.75) * 0.5 / 2.5
    np.testing.assert_allclose(
        params["h0.mlp.fc.weight"], [0.87 * 0.95 + second_step, 0.95**2], rtol=1e-15
    )
    np.testing.assert_allclose(params["h0.mlp.fc.bias"], [0.92 + second_step], rtol=1e-15)
    assert state.step == 2
    np.testing.assert_allclose(state.m["h0.mlp.fc.weight"], [-0.5, 0.0], rtol=1e-15)
    np.testing.assert_allclose(state.v["h0.mlp.fc.weight"], [3.0, 0.0], rtol=1e-15)


@settings(max_examples=60, deadline=None)
@given(
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.0, 0.999),
    lr=st.floats(1e-4, 0.5),
    weight_decay=st.floats(0.0, 1.0),
    grad=st.floats(1e-3, 10.0) | st.floats(-10.0, -1e-3),
    start=st.floats(-2.0, 2.0),
    steps=st.integers(1, 30),
)
def test_adamw_constant_gradient_closed_form(
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    grad: float,
    start: float,
    steps: int,
) -> None:
    # A constant g gives m_t = (1 - beta1^t) g and v_t = (1 - beta2^t) g^2, so m_hat = g and
    # sqrt(v_hat) = |g|: each step decays p by a = 1 - lr wd and moves it by lr u, with
    # u = g / (|g| + eps). After t steps p = p0 a^t - lr u (1 + a + ... + a^(t-1)).
    eps = 1e-8
    params = {"h0.mlp.fc.weight": np.array([start])}
    grads = {"h0.mlp.fc.weight": np.array([grad])}
    state = init_state("adamw", params)
    for _ in range(steps):
        params, state = adamw_update(
            params,
            grads,
            state,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
        )
    a = 1 - lr * weight_decay
    u = grad / (abs(grad) + eps)
    geometric = sum(a**k for k in range(steps))
    expected = start * a**steps - lr * u * geometric
    assert params["h0.mlp.fc.weight"][0] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert state.m["h0.mlp.fc.weight"][0] == pytest.approx((1 - beta1**steps) * grad, rel=1e-9)
    assert state.v["h0.mlp.fc.weight"][0] == pytest.approx((1 - beta2**steps) * grad**2, rel=1e-9)


def test_adamw_moments_are_weighted_sums_of_gradients() -> None:
    # Unrolled: m_t = (1 - beta1) sum_k beta1^(t-k) g_k (v likewise with g^2), and without
    # weight decay p_t = p_0 - sum_k lr m_hat_k / (sqrt(v_hat_k) + eps).
    rng = np.random.default_rng(5)
    beta1, beta2, eps, lr = 0.9, 0.95, 1e-8, 0.01
    history = rng.normal(size=(6, 3, 4))
    start = rng.normal(size=(3, 4))
    params, state = {"wpe.weight": start}, init_state("adamw", {"wpe.weight": start})
    total_move = np.zeros_like(start)
    for t, g in enumerate(history, start=1):
        params, state = adamw_update(
            params,
            {"wpe.weight": g},
            state,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=0.0,
        )
        weights1 = (1 - beta1) * beta1 ** np.arange(t - 1, -1, -1)
        weights2 = (1 - beta2) * beta2 ** np.arange(t - 1, -1, -1)
        m = np.tensordot(weights1, history[:t], axes=1)
        v = np.tensordot(weights2, history[:t] ** 2, axes=1)
        np.testing.assert_allclose(state.m["wpe.weight"], m, rtol=1e-12)
        np.testing.assert_allclose(state.v["wpe.weight"], v, rtol=1e-12)
        m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
        total_move += lr * m_hat / (np.sqrt(v_hat) + eps)
        np.testing.assert_allclose(params["wpe.weight"], start - total_move, rtol=1e-12)


def test_sgd_is_the_reference_steps_update() -> None:
    cfg = _tiny()
    params = init_params(cfg)
    result = reference_step(cfg, params, make_batch(cfg))
    updated = sgd_update(params, result.grads, cfg.training.lr)
    for name, value in result.updated.items():
        assert np.array_equal(updated[name], value), name
    stepped, state = optimizer_step(cfg.training, params, result.grads, init_state("sgd", params))
    assert all(np.array_equal(stepped[n], result.updated[n]) for n in params)
    assert state == OptimizerState(step=1)


def test_optimizer_step_uses_the_configs_adamw_and_leaves_inputs_alone() -> None:
    training = _tiny(training={"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.2}).training
    rng = np.random.default_rng(0)
    params = {"wte.weight": rng.normal(size=(4, 3)), "ln_f.weight": np.ones(3)}
    grads = {name: rng.normal(size=p.shape) for name, p in params.items()}
    before = {name: p.copy() for name, p in params.items()}
    state = init_state("adamw", params)
    new_params, new_state = optimizer_step(training, params, grads, state)
    expected, _ = adamw_update(
        params, grads, state, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.2
    )
    assert all(np.array_equal(new_params[n], expected[n]) for n in params)
    assert new_state.step == 1
    assert all(np.array_equal(params[n], before[n]) for n in params)
    assert all(not state.m[n].any() and not state.v[n].any() for n in params)


@pytest.mark.parametrize("tied", [True, False])
def test_weight_decay_skips_exactly_biases_and_layernorms(tied: bool) -> None:
    # In the graph, biases and LayerNorm parameters are exactly those initialised to a
    # constant; every weight matrix and embedding is drawn from a normal.
    graph = build_graph(_tiny(model={"tie_embeddings": tied}))
    for name in graph.parameters:
        drawn = graph.tensors[name].init in ("normal", "normal_residual")
        assert decays(name) == drawn, name
    assert decays("lm_head.weight") and decays("h11.attn.proj.weight")
    assert not decays("h11.ln2.weight") and not decays("ln_f.bias")


def test_float32_variant_tracks_float64() -> None:
    rng = np.random.default_rng(2)
    params64 = {"wte.weight": rng.normal(size=(8, 4)), "h0.ln1.bias": rng.normal(size=4)}
    params32 = dict(params64)
    state64, state32 = init_state("adamw", params64), init_state("adamw", params64, np.float32)
    hyper = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}
    for _ in range(3):
        grads = {name: rng.normal(size=p.shape) for name, p in params64.items()}
        params64, state64 = adamw_update(params64, grads, state64, **hyper)
        params32, state32 = adamw_update(params32, grads, state32, **hyper, dtype=np.float32)
    for name in params64:
        for low, high in ((params32, params64), (state32.m, state64.m), (state32.v, state64.v)):
            assert low[name].dtype == np.float32, name
            np.testing.assert_allclose(low[name], high[name], rtol=2e-6, atol=1e-7)
    sgd32 = sgd_update(params64, grads, 0.1, np.float32)
    assert all(p.dtype == np.float32 for p in sgd32.values())


def test_unknown_optimizer_is_a_bug() -> None:
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        init_state("adam", {})
