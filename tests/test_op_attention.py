"""The fused attention kernel (scores, causal mask, softmax, values and their backward
passes) against the numpy oracles of those four families, its cycle and SRAM formulas, and
its sizing rules.

Lane widths differ from d_head every way: a head split over two lanes, two heads in one
lane, q/k/v lanes grouped differently from the o lanes; G runs from 1 to one key per PE,
with uneven last blocks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from kernel_bench import run_kernel

from compiler.lowering.kernel import StreamIds, lane_cols
from compiler.ops.attention import (
    AttnShape,
    attn_scores_backward,
    attn_scores_forward,
    attn_values_backward,
    attn_values_forward,
    balanced_key_pes,
    build_attention,
    causal_mask_backward,
    causal_mask_forward,
    cycles,
    fit_key_pes,
    head_groups,
    key_pe_counts,
    slowest_row,
    sram_words,
)
from compiler.ops.softmax import softmax_backward, softmax_forward
from wse_sim.errors import UserError
from wse_sim.hardware import WaferConfig

RTOL = 2e-5  # fp32: sums over <= T keys and dh columns, an exp and a division


def shape_of(batch, seq, heads, dh, wq, wo, key_pes):
    """q, k and v are each cut into lanes of wq columns (as `compiler.plan` cuts the fused
    QKV output per section), o into lanes of wo."""
    d = heads * dh
    qkv = [(s * d + c0, s * d + c1) for s in range(3) for c0, c1 in lane_cols(d, wq)]
    return AttnShape(batch, seq, heads, dh, qkv, lane_cols(d, wo), key_pes)


def reference(qkv, d_out, batch, heads, dh):
    """o and d(qkv) by the four families' oracles, in float64."""
    d = heads * dh
    q, k, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
    scale = 1.0 / math.sqrt(dh)
    s = causal_mask_forward(attn_scores_forward(q, k, batch, heads, scale), batch, heads)
    p = softmax_forward(s, heads)
    dp, dv = attn_values_backward(d_out, p, v, batch, heads)
    ds = causal_mask_backward(softmax_backward(dp, p, heads), batch, heads)
    dq, dk = attn_scores_backward(ds, q, k, batch, heads, scale)
    return attn_values_forward(p, v, batch, heads), np.concatenate([dq, dk, dv], axis=1)


def run_attention(shape, seed=0):
    rng = np.random.default_rng(seed)
    rows, d = shape.rows, shape.d_model
    qkv = rng.standard_normal((rows, 3 * d)).astype(np.float32)
    d_out = rng.standard_normal((rows, d)).astype(np.float32)
    kernel = build_attention("attn", ["attn"], StreamIds(), shape=shape, qkv="qkv", out="o",
                             d_out="do", d_qkv="dqkv", queue_depth=WaferConfig().queue_depth)
    run = run_kernel(kernel, {"qkv": qkv, "do": d_out})
    return kernel, run, qkv.astype(np.float64), d_out.astype(np.float64)


def check(run, qkv, d_out, shape):
    o, dqkv = reference(qkv, d_out, shape.batch, shape.heads, shape.d_head)
    for got, want in ((run.outputs["o"], o), (run.outputs["dqkv"], dqkv)):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(want).max())


@pytest.mark.parametrize("dims", [
    (2, 8, 2, 4, 2, 2, 2),  # a head split over two lanes
    (2, 8, 2, 4, 8, 8, 3),  # two heads a lane; blocks of 3, 3, 2 keys
    (2, 6, 4, 2, 4, 2, 2),  # q/k/v lanes of two heads, o lanes of one: groups of two
    (3, 5, 2, 3, 3, 6, 5),  # one key per PE, o lanes of both heads
    (2, 16, 2, 8, 4, 8, 4),  # more rows; q/k/v split, o whole
    (1, 7, 1, 5, 5, 5, 1),  # one PE per group: every row on the diagonal
])
def test_attention_matches_numpy(dims):
    shape = shape_of(*dims)
    _, run, qkv, d_out = run_attention(shape)
    check(run, qkv, d_out, shape)


@settings(max_examples=6, deadline=None)
@given(batch=st.integers(1, 3), seq=st.integers(2, 9), heads=st.integers(1, 3),
       dh=st.integers(1, 4), lanes=st.sampled_from(["split", "whole", "pair"]),
       data=st.data())
def test_attention_matches_numpy_on_random_shapes(batch, seq, heads, dh, lanes, data):
    # a head over two lanes at most: with more, the one PE of G = 1 would be an end of more
    # streams than the wafer has colors (a UserError from routing). An odd head split in
    # two would make a lane straddle two heads, grouping both over three lanes.
    assume(lanes != "split" or dh % 2 == 0)
    width = {"split": dh // 2, "whole": dh, "pair": 2 * dh}[lanes]
    key_pes = data.draw(st.sampled_from(key_pe_counts(seq)))
    shape = shape_of(batch, seq, heads, dh, width, width, key_pes)
    _, run, qkv, d_out = run_attention(shape, seed=batch * seq)
    check(run, qkv, d_out, shape)


@pytest.mark.parametrize("dims", [(2, 16, 2, 16, 16, 16, 4), (2, 16, 2, 8, 8, 8, 3),
                                  (1, 64, 1, 32, 32, 32, 8)])
def test_attention_cycles_and_sram_match_formulas(dims):
    """Each row takes its slowest PE's time (`cycles`); the model leaves out how far a PE
    runs ahead of the next within the FIFOs and the fill: within 5% on these shapes."""
    shape = shape_of(*dims)
    kernel, run, _, _ = run_attention(shape)
    assert run.cycles == pytest.approx(cycles(shape), rel=0.05)
    for (col, c) in kernel.programs:
        heads = head_groups("attn", shape)[col][1]
        last = c == shape.key_pes - 1
        assert kernel.sram_words((col, c)) == sram_words(shape, heads, last=last)


def test_every_pe_owns_a_key():
    for seq in range(1, 40):
        for g in key_pe_counts(seq):
            shape = shape_of(1, seq, 1, 1, 1, 1, g)
            assert all(shape.keys(c)[1] > shape.keys(c)[0] for c in range(g))
    with pytest.raises(ValueError, match="owns no key"):
        build_attention("attn", [], StreamIds(), shape=shape_of(1, 10, 1, 2, 2, 2, 8),
                        qkv="qkv", out="o", d_out="do", d_qkv="dqkv", queue_depth=4)


def test_a_lane_across_q_and_k_is_a_user_error():
    shape = AttnShape(1, 4, 2, 2, lane_cols(12, 3), lane_cols(4, 2), 1)  # lane 1: cols 3..5
    with pytest.raises(UserError, match="op attn: a lane of the QKV output"):
        head_groups("attn", shape)


def test_sizing_balances_the_pace_and_fits_sram():
    shape = shape_of(2, 64, 4, 32, 32, 32, 1)
    pace = (1000, 2000)
    g = balanced_key_pes("attn", shape, pace)
    chosen = AttnShape(**{**shape.__dict__, "key_pes": g})
    assert all(row <= limit for row, limit in zip(slowest_row(chosen), pace, strict=True))
    fewer = max(k for k in key_pe_counts(64) if k < g)
    slower = slowest_row(AttnShape(**{**shape.__dict__, "key_pes": fewer}))
    assert any(row > limit for row, limit in zip(slower, pace, strict=True))
    words = sram_words(chosen, 1, last=True)
    assert fit_key_pes("attn", shape, words, at_least=g) == g
    assert fit_key_pes("attn", shape, words - 1, at_least=g) > g
    with pytest.raises(UserError, match=r"op attn: PE \(0, 63\) needs"):
        fit_key_pes("attn", shape, 1000)
