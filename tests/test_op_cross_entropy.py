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


def ce_kernel(targets, vocab, lw, block_rows=8):
    return build_cross_entropy("ce", ["loss", "loss.bwd"], StreamIds(), targets=targets,
                               lanes=lane_cols(vocab, lw), logits_tensor="z",
                               dlogits_tensor="dz", queue_depth=WaferConfig().queue_depth,
                               block_rows=block_rows)


def reference(z, targets):
    """The oracle's mean loss and d loss / d z in float64, and the scale of the loss's
    terms. Each prediction's loss is log(sum) - (z_t - max) with sum >= 1: fp32 rounds the
    sum (and so its log) to about eps * 1 absolute, and the shifted target to eps *
    |z_t - max|, so the loss's error scales with 1 + lse + |z_t - max|, not with the loss,
    which is near 0 when the target is the largest logit."""
    z64 = z.astype(np.float64)
    shifted = z64 - z64.max(axis=1, keepdims=True)
    lse = np.log(np.exp(shifted).sum(axis=1))
    picked = shifted[np.arange(len(z)), targets]
    size = (1 + lse + np.abs(picked)).sum() / len(z)
    loss = cross_entropy_forward(z64, targets)[0, 0]
    return loss, size, cross_entropy_backward(z64, targets)


def check(run, z, targets):
    loss, size, dz = reference(z, targets)
    np.testing.assert_array_equal(run.results["logits"], z)
    assert run.results["loss"].shape == (1, 1)
    assert abs(run.results["loss"][0, 0] - loss) <= RTOL * size
    assert np.all(np.abs(run.outputs["dz"] - dz) <= RTOL / len(z))  # entries are (p - 1) / M


@settings(max_examples=10, deadline=None)
@given(rows=st.integers(1, 15), vocab=st.integers(1, 20), lw=st.integers(1, 6),
       block_rows=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_cross_entropy_matches_numpy(rows, vocab, lw, block_rows, seed):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, vocab, rows)
    z = (3 * rng.standard_normal((rows, vocab))).astype(np.float32)
    check(run_kernel(ce_kernel(targets, vocab, lw, block_rows), {"z": z}), z, targets)


def test_cross_entropy_large_logits_are_stable():
    rng = np.random.default_rng(3)
    targets = rng.integers(0, 10, 8)
    z = (100 * rng.standard_normal((8, 10))).astype(np.float32)  # exp(100) overflows fp32
    check(run_kernel(ce_kernel(targets, 10, 4), {"z": z}), z, targets)


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


def test_cross_entropy_rejects_targets_outside_vocab():
    with pytest.raises(ValueError, match="targets outside 0..9"):
        ce_kernel(np.array([1, 10]), 10, 4)


@pytest.mark.parametrize("batch,seq", [(2, 16), (3, 20)])
def test_cross_entropy_cycles_and_sram_match_formula(batch, seq):
    """The formula is the compute thread's; the receiving thread may delay it by up to a
    cycle per received element, and the target gathers add two cycles a row."""
    vocab, lw = 64, 16
    rows = batch * seq
    rng = np.random.default_rng(0)
    targets = rng.integers(0, vocab, rows)
    z = rng.standard_normal((rows, vocab)).astype(np.float32)
    kernel = ce_kernel(targets, vocab, lw)
    run = run_kernel(kernel, {"z": z})
    expected = cycles(rows, vocab, lw)
    assert expected <= run.cycles <= expected + rows * lw + 2 * rows
    assert max(kernel.sram_words(pe) for pe in kernel.programs) == sram_words(rows, lw,
                                                                              last=True)
