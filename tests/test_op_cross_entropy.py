"""The cross-entropy kernel against its numpy oracle (loss, dlogits, stored logits), its
software log, and its cycle and SRAM formulas."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_bench import run_kernel

from compiler.lowering.kernel import StreamIds, lane_cols
from compiler.ops.cross_entropy import (
    build_cross_entropy,
    cross_entropy_backward,
    cross_entropy_forward,
    cycles,
    log_plan,
    sram_words,
)
from wse_sim.hardware import WaferConfig

RTOL = 1e-5  # fp32: exp, sums over <= V terms, a Newton log


def ce_kernel(tokens, vocab, lw, block_rows=8):
    return build_cross_entropy("ce", ["loss", "loss.bwd"], StreamIds(), tokens=tokens,
                               lanes=lane_cols(vocab, lw), logits_tensor="z",
                               dlogits_tensor="dz", queue_depth=WaferConfig().queue_depth,
                               block_rows=block_rows)


def reference(z, tokens):
    """The oracle's mean loss and d loss / d z in float64, and the scale of the loss's
    terms. Each prediction's loss is log(sum) - (z_t - max) with sum >= 1: fp32 rounds the
    sum (and so its log) to about eps * 1 absolute, and the shifted target to eps *
    |z_t - max|, so the loss's error scales with 1 + lse + |z_t - max|, not with the loss,
    which is near 0 when the target is the largest logit."""
    batch, seq = tokens.shape
    z64 = z.astype(np.float64)
    z3 = z64.reshape(batch, seq, -1)[:, :-1]
    shifted = z3 - z3.max(axis=2, keepdims=True)
    lse = np.log(np.exp(shifted).sum(axis=2, keepdims=True))
    picked = np.take_along_axis(shifted, tokens[:, 1:, None], axis=2)
    size = (1 + lse + np.abs(picked)).sum() / (batch * (seq - 1))
    loss = cross_entropy_forward(z64, tokens)[0, 0]
    return loss, size, cross_entropy_backward(z64, tokens)


def check(run, z, tokens):
    loss, size, dz = reference(z, tokens)
    np.testing.assert_array_equal(run.results["logits"], z)
    assert run.results["loss"].shape == (1, 1)
    assert abs(run.results["loss"][0, 0] - loss) <= RTOL * size
    count = tokens.shape[0] * (tokens.shape[1] - 1)
    assert np.all(np.abs(run.outputs["dz"] - dz) <= RTOL / count)  # entries are (p - 1) / count


@settings(max_examples=10, deadline=None)
@given(batch=st.integers(1, 3), seq=st.integers(2, 5), vocab=st.integers(1, 20),
       lw=st.integers(1, 6), block_rows=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_cross_entropy_matches_numpy(batch, seq, vocab, lw, block_rows, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq))
    z = (3 * rng.standard_normal((batch * seq, vocab))).astype(np.float32)
    check(run_kernel(ce_kernel(tokens, vocab, lw, block_rows), {"z": z}), z, tokens)


def test_cross_entropy_large_logits_are_stable():
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 10, (2, 4))
    z = (100 * rng.standard_normal((8, 10))).astype(np.float32)  # exp(100) overflows fp32
    check(run_kernel(ce_kernel(tokens, 10, 4), {"z": z}), z, tokens)


@pytest.mark.parametrize("vocab", [1, 2, 64, 256, 50257])
def test_newton_log_plan_is_accurate_in_fp32(vocab):
    """The kernel's log: k square roots, y0 = 2^k (s^(1/2^k) - 1), then z <- z + 1 - s e^z
    with z = -y, every operation rounded to fp32 like the PE does."""
    k, steps = log_plan(float(vocab))
    s = np.geomspace(1.0, vocab, 2000).astype(np.float32)
    root = s
    for _ in range(k):
        root = np.sqrt(root)
    z = (root * np.float32(-(2.0**k)) + np.float32(2.0**k)).astype(np.float32)
    for _ in range(steps):
        t = (np.exp(z) * s - np.float32(1)).astype(np.float32)
        z = (z - t).astype(np.float32)
    exact = np.log(s.astype(np.float64))
    assert np.all(np.abs(-z - exact) <= 4 * np.spacing(np.float32(max(1.0, np.log(vocab)))))


def test_cross_entropy_rejects_tokens_outside_vocab():
    with pytest.raises(ValueError, match="tokens in 0..9"):
        ce_kernel(np.array([[1, 10]]), 10, 4)


@pytest.mark.parametrize("batch,seq", [(2, 16), (3, 20)])
def test_cross_entropy_cycles_and_sram_match_formula(batch, seq):
    """The formula is the compute thread's; the receiving thread may delay it by up to a
    cycle per received element, and the target gathers add two cycles a predicted row."""
    vocab, lw = 64, 16
    rows = batch * seq
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (batch, seq))
    z = rng.standard_normal((rows, vocab)).astype(np.float32)
    kernel = ce_kernel(tokens, vocab, lw)
    run = run_kernel(kernel, {"z": z})
    expected = cycles(rows, vocab, lw)
    assert expected <= run.cycles <= expected + rows * lw + 2 * rows
    assert max(kernel.sram_words(pe) for pe in kernel.programs) == sram_words(rows, lw,
                                                                              last=True)
