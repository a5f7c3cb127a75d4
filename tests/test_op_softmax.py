"""The attention softmax kernel against its numpy oracle: causal -inf masks give exact
zeros, forward and backward, and its cycle and SRAM formulas."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_bench import run_kernel

from compiler.lowering.kernel import StreamIds
from compiler.ops.softmax import (
    build_softmax,
    cycles,
    softmax_backward,
    softmax_forward,
    sram_words,
)
from wse_sim.errors import UserError

RTOL = 1e-5  # fp32: exp, a sum over <= T terms, a division


def softmax_kernel(rows, heads, seq, lw, block_rows=8):
    return build_softmax("sm", ["sm", "sm.bwd"], StreamIds(), rows=rows, heads=heads,
                         seq_len=seq, lane_width=lw, s_tensor="s", p_tensor="p",
                         dp_tensor="dp", ds_tensor="ds", block_rows=block_rows)


def causal_scores(batch, seq, heads, rng, scale=3.0):
    """[B*T, H*T] scores with -inf where key j > query t (as the scores kernel emits)."""
    rows = batch * seq
    s = (scale * rng.standard_normal((rows, heads, seq))).astype(np.float32)
    query = np.arange(rows) % seq
    s[np.broadcast_to((np.arange(seq)[None, :] > query[:, None])[:, None, :], s.shape)] = -np.inf
    return s.reshape(rows, heads * seq)


def reference(s, dp, heads):
    """The oracle's P and dS in float64, and the scale of dS's terms."""
    rows = s.shape[0]
    p = softmax_forward(s.astype(np.float64), heads)
    ds = softmax_backward(dp.astype(np.float64), p, heads)
    p3, dp3 = p.reshape(rows, heads, -1), np.abs(dp.astype(np.float64)).reshape(rows, heads, -1)
    ds_size = p3 * (dp3 + (dp3 * p3).sum(axis=2, keepdims=True))
    return p, ds, ds_size.reshape(rows, -1)


@settings(max_examples=10, deadline=None)
@given(batch=st.integers(1, 3), lanes_per_head=st.integers(1, 3), heads=st.integers(1, 3),
       lw=st.integers(1, 4), block_rows=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_softmax_matches_numpy_with_causal_mask(batch, lanes_per_head, heads, lw, block_rows,
                                                seed):
    rng = np.random.default_rng(seed)
    seq = lanes_per_head * lw
    s = causal_scores(batch, seq, heads, rng)
    dp = rng.standard_normal(s.shape).astype(np.float32)
    run = run_kernel(softmax_kernel(batch * seq, heads, seq, lw, block_rows), {"s": s, "dp": dp})
    p, ds, ds_size = reference(s, dp, heads)
    masked = np.isneginf(s)
    assert np.all(run.outputs["p"][masked] == 0) and np.all(run.outputs["ds"][masked] == 0)
    np.testing.assert_allclose(run.outputs["p"], p, rtol=RTOL, atol=1e-30)
    assert np.all(np.abs(run.outputs["ds"] - ds) <= RTOL * ds_size + 1e-30)


def test_softmax_large_scores_do_not_overflow():
    rng = np.random.default_rng(1)
    s = causal_scores(2, 4, 2, rng, scale=200.0)  # exp(200) overflows fp32 without the max
    dp = rng.standard_normal(s.shape).astype(np.float32)
    run = run_kernel(softmax_kernel(8, 2, 4, 2), {"s": s, "dp": dp})
    p, _, _ = reference(s, dp, 2)
    assert np.all(np.isfinite(run.outputs["p"]))
    np.testing.assert_allclose(run.outputs["p"], p, rtol=RTOL, atol=1e-30)


def test_softmax_rejects_lane_width_not_dividing_seq():
    with pytest.raises(UserError, match="op sm: lane width 3 must divide seq_len 8"):
        softmax_kernel(8, 1, 8, 3)


def test_softmax_cycles_and_sram_match_formula():
    """One lane per head (G = 1): no reduction, and no two lanes share a link."""
    batch, seq, heads, lw = 2, 16, 2, 16
    rows = batch * seq
    s = causal_scores(batch, seq, heads, np.random.default_rng(0))
    kernel = softmax_kernel(rows, heads, seq, lw)
    run = run_kernel(kernel, {"s": s, "dp": np.ones_like(s)})
    # the formula leaves out the fill: the fabric latency from source to sink, ~15 cycles
    assert run.cycles == pytest.approx(cycles(rows, heads, seq, lw), rel=0.005)
    assert max(kernel.sram_words(pe) for pe in kernel.programs) == sram_words(rows, lw)
