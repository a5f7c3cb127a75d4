"""The LayerNorm kernel against its numpy oracle (forward, backward, gradients, SGD update),
its cycle and SRAM formulas, and the SRAM fit check."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_bench import run_kernel

from compiler.lowering.kernel import StreamIds, lane_cols
from compiler.ops.layernorm import (
    build_layernorm,
    cycles,
    layernorm_backward,
    layernorm_forward,
    sram_words,
)
from compiler.ops.update import UpdateRule
from compiler.optim import sgd_tensor
from wse_sim.errors import UserError
from wse_sim.hardware import WaferConfig

EPS, LR = 1e-5, 0.1
SGD = UpdateRule("sgd", LR)
RTOL = 1e-5  # fp32: a few dozen roundings, sums over <= 13 columns or rows


def layernorm(rows: int, cols: int, lw: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 2 + 1).astype(np.float32)
    dy = rng.standard_normal((rows, cols)).astype(np.float32)
    gamma = rng.standard_normal(cols).astype(np.float32)
    beta = rng.standard_normal(cols).astype(np.float32)
    kernel = build_layernorm(
        "ln", ["ln", "ln.bwd", "ln.weight.sgd", "ln.bias.sgd"], StreamIds(), rows=rows,
        lanes=lane_cols(cols, lw), gamma=gamma, beta=beta, eps=EPS, update=SGD, x_tensor="x",
        y_tensor="y", dy_tensor="dy", dx_tensor="dx", gamma_name="ln.weight",
        beta_name="ln.bias", queue_depth=WaferConfig().queue_depth)
    return kernel, x, dy, gamma, beta


def reference(x, dy, gamma, beta):
    """The oracle's forward and backward in float64, and the scale of each result's terms."""
    x, dy, gamma, beta = (a.astype(np.float64) for a in (x, dy, gamma, beta))
    y, mean, rstd = layernorm_forward(x, gamma, beta, EPS)
    dx, dgamma, dbeta = layernorm_backward(dy, x, gamma, mean, rstd)
    # x - mean cancels: fp32 rounds it to about eps * (|x| + |mean|), not eps * |x - mean|,
    # so that (times rstd) is the scale of xhat's error wherever xhat enters a result
    xhat_size = (np.abs(x) + np.abs(mean)) * rstd
    g = dy * gamma
    dx_size = rstd * (np.abs(g) + np.abs(g).mean(axis=1, keepdims=True)
                      + xhat_size * (np.abs(g) * xhat_size).mean(axis=1, keepdims=True))
    return {
        "y": (y, xhat_size * np.abs(gamma) + np.abs(beta)),
        "dx": (dx, dx_size),
        "grad:ln.weight": (dgamma, (np.abs(dy) * xhat_size).sum(axis=0)),
        "grad:ln.bias": (dbeta, np.abs(dy).sum(axis=0)),
    }


def assert_close(got, want, size):
    assert np.all(np.abs(got - want) <= RTOL * (np.asarray(size) + 1e-30)), (got, want)


@settings(max_examples=10, deadline=None)
@given(rows=st.integers(1, 20), cols=st.integers(1, 13), lw=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_layernorm_matches_numpy(rows, cols, lw, seed):
    """Odd and even row counts: the dy ring's REPEAT covers pairs of rows, then a tail."""
    kernel, x, dy, gamma, beta = layernorm(rows, cols, lw, seed)
    run = run_kernel(kernel, {"x": x, "dy": dy})
    ref = reference(x, dy, gamma, beta)
    for tensor in ("y", "dx"):
        assert_close(run.outputs[tensor], *ref[tensor])
    for param, value in (("ln.weight", gamma), ("ln.bias", beta)):
        grad, size = ref[f"grad:{param}"]
        assert_close(run.results[f"grad:{param}"], grad[None, :], size[None, :])
        assert_close(run.results[f"updated:{param}"], sgd_tensor(value, grad, LR)[None, :],
                     np.abs(value) + LR * size)


@pytest.mark.parametrize("rows", [32, 63])
def test_layernorm_cycles_and_sram_match_formula(rows):
    """The formula is the compute thread's; the receiving threads share the PE's SRAM write
    port and ramp with it, so each received element may delay it by up to a cycle."""
    cols, lw = 64, 16
    kernel, x, dy, _, _ = layernorm(rows, cols, lw)
    run = run_kernel(kernel, {"x": x, "dy": dy})
    received = 2 * rows * lw  # x and dy
    assert cycles(rows, cols, lw) <= run.cycles <= cycles(rows, cols, lw) + received
    assert max(kernel.sram_words(pe) for pe in kernel.programs) == sram_words(rows, lw)


def test_layernorm_too_big_for_sram_names_op_and_pe():
    rows, cols = 400, 32  # xhat alone: 400 x 32 words > 12288 words of a WSE-2 PE
    kernel, x, dy, _, _ = layernorm(rows, cols, 32)
    with pytest.raises(UserError, match=r"op ln \(layernorm\): PE \(\d+, \d+\) needs \d+ bytes"):
        run_kernel(kernel, {"x": x, "dy": dy})
