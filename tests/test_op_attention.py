"""Attention kernels on the simulator against their numpy oracles (float64, fp32
tolerances), and their cycle and SRAM formulas.

Shapes keep B >= 2 (batch boundaries), H >= 2 and T >= 2 lanes; row_groups values that do
not divide B*T exercise uneven round-robin groups."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_bench import run_kernel

from compiler.lowering.kernel import Kernel, StreamEnd, StreamIds
from compiler.ops.attention import (
    attn_layout,
    attn_scores_backward,
    attn_scores_forward,
    attn_sram_words,
    attn_values_backward,
    attn_values_forward,
    build_attn_scores,
    build_attn_values,
    causal_mask_backward,
    causal_mask_forward,
    cycles,
    fit_row_groups,
)
from compiler.ops.softmax import softmax_forward
from wse_sim.errors import UserError
from wse_sim.hardware import WaferConfig

RTOL = ATOL = 2e-5
TOLERANCE = 0.002  # of the cycle formula


def _lanes_as_tensor(kernel: Kernel, tensor: str, lanes: range, width: int, name: str) -> None:
    """Rename output lanes `lanes` of `tensor` (lane width `width`) to lanes 0.. of a tensor
    `name` holding just their columns: the harness assembles an output only when every lane
    of it is produced, and these kernels produce some lanes of d(qkv) each."""
    declared = sorted(end.lane for end in kernel.outputs if end.tensor == tensor)
    assert declared == list(lanes)
    kernel.outputs = [StreamEnd(name, end.lane - lanes.start, end.pes, end.stream)
                      if end.tensor == tensor else end for end in kernel.outputs]
    kernel.shapes[name] = (kernel.shapes.pop(tensor)[0], len(lanes) * width)


def _check(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL * max(1.0, np.abs(want).max()))


def _run_scores(batch: int, seq: int, heads: int, dh: int, groups: int, seed: int):
    rng = np.random.default_rng(seed)
    rows, d = batch * seq, heads * dh
    qkv = rng.standard_normal((rows, 3 * d)).astype(np.float32)
    # masked entries carry garbage: the kernel must ignore them
    d_scores = rng.standard_normal((rows, heads * seq)).astype(np.float32)
    kernel = build_attn_scores("attn.scores", ["attn.scores"], StreamIds(), batch=batch,
                               seq=seq, heads=heads, d_head=dh, lane_width=dh, qkv="qkv",
                               scores="S", d_scores="dS", d_qkv="dqkv", row_groups=groups)
    _lanes_as_tensor(kernel, "dqkv", range(2 * heads), dh, "dqk")
    run = run_kernel(kernel, {"qkv": qkv, "dS": d_scores})
    return run, qkv.astype(np.float64), d_scores.astype(np.float64)


def _scores_reference(qkv, d_scores, batch, seq, heads, dh):
    """The oracles of the fused scores + causal mask: S, dq, dk."""
    d = heads * dh
    q, k = qkv[:, :d], qkv[:, d:2 * d]
    scale = 1.0 / math.sqrt(dh)
    s = causal_mask_forward(attn_scores_forward(q, k, batch, heads, scale), batch, heads)
    dq, dk = attn_scores_backward(causal_mask_backward(d_scores, batch, heads), q, k, batch,
                                  heads, scale)
    return s, dq, dk


@settings(max_examples=6, deadline=None)
@given(batch=st.integers(2, 3), heads=st.integers(2, 3), dh=st.sampled_from([1, 2, 3, 4]),
       blocks=st.integers(2, 3), groups=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_scores_forward_and_backward(batch, heads, dh, blocks, groups, seed):
    seq = blocks * dh
    run, qkv, d_scores = _run_scores(batch, seq, heads, dh, groups, seed)
    s, dq, dk = _scores_reference(qkv, d_scores, batch, seq, heads, dh)
    got_s = run.outputs["S"]
    assert np.array_equal(np.isneginf(got_s), np.isneginf(s)), "causal mask must be exact -inf"
    finite = np.isfinite(s)
    _check(got_s[finite], s[finite])
    d = heads * dh
    _check(run.outputs["dqk"][:, :d], dq)
    _check(run.outputs["dqk"][:, d:], dk)


def _run_values(batch: int, seq: int, heads: int, dh: int, groups: int, seed: int):
    rng = np.random.default_rng(seed)
    rows, d = batch * seq, heads * dh
    qkv = rng.standard_normal((rows, 3 * d)).astype(np.float32)
    logits = causal_mask_forward(rng.standard_normal((rows, heads * seq)), batch, heads)
    probs = softmax_forward(logits, heads).astype(np.float32)
    d_out = rng.standard_normal((rows, d)).astype(np.float32)
    kernel = build_attn_values("attn.values", ["attn.values"], StreamIds(), batch=batch,
                               seq=seq, heads=heads, d_head=dh, lane_width=dh, qkv="qkv",
                               probs="P", out="O", d_out="dO", d_probs="dP", d_qkv="dqkv",
                               row_groups=groups)
    _lanes_as_tensor(kernel, "dqkv", range(2 * heads, 3 * heads), dh, "dv")
    run = run_kernel(kernel, {"qkv": qkv, "P": probs, "dO": d_out})
    return run, qkv.astype(np.float64), probs.astype(np.float64), d_out.astype(np.float64)


@settings(max_examples=6, deadline=None)
@given(batch=st.integers(2, 3), heads=st.integers(2, 3), dh=st.sampled_from([1, 2, 3, 4]),
       blocks=st.integers(2, 3), groups=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_values_forward_and_backward(batch, heads, dh, blocks, groups, seed):
    seq = blocks * dh
    run, qkv, probs, d_out = _run_values(batch, seq, heads, dh, groups, seed)
    v = qkv[:, 2 * heads * dh:]
    dp, dv = attn_values_backward(d_out, probs, v, batch, heads)
    _check(run.outputs["O"], attn_values_forward(probs, v, batch, heads))
    # dP is do . v where P can be nonzero and exactly 0 where the mask makes P == 0 (softmax's
    # backward multiplies the rest by P = 0)
    _check(run.outputs["dP"], causal_mask_backward(dp, batch, heads))
    _check(run.outputs["dv"], dv)


@pytest.mark.parametrize("groups", [1, 4])
def test_gpt_tiny_shapes(groups):
    """gpt_tiny's attention (d_head 16, seq 16, batch 2, 2 heads) with lane width 16: one
    key block per head, so the 2 lanes per head of the brief need seq 32 here."""
    batch, seq, heads, dh = 2, 32, 2, 16
    run, qkv, d_scores = _run_scores(batch, seq, heads, dh, groups, seed=7)
    s, dq, dk = _scores_reference(qkv, d_scores, batch, seq, heads, dh)
    finite = np.isfinite(s)
    _check(run.outputs["S"][finite], s[finite])
    assert np.isneginf(run.outputs["S"][~finite]).all()
    _check(run.outputs["dqk"][:, :heads * dh], dq)
    _check(run.outputs["dqk"][:, heads * dh:], dk)


def test_rejects_unsupported_lane_width():
    with pytest.raises(UserError, match="lane_width 8 must equal d_head 16"):
        build_attn_scores("h0.attn.scores", [], StreamIds(), batch=2, seq=16, heads=2,
                          d_head=16, lane_width=8, qkv="qkv", scores="S", d_scores="dS",
                          d_qkv="dqkv")
    with pytest.raises(UserError, match="must divide seq_len 12"):
        build_attn_values("h0.attn.values", [], StreamIds(), batch=2, seq=12, heads=2,
                          d_head=8, lane_width=8, qkv="qkv", probs="P", out="O", d_out="dO",
                          d_probs="dP", d_qkv="dqkv")


def test_cycles_match_closed_form():
    """The closed form leaves out the fill (fabric latency from the sources through the
    key-block chain to the sinks, a few dozen cycles)."""
    batch, seq, heads, dh = 2, 32, 2, 16
    scores = _run_scores(batch, seq, heads, dh, 1, seed=1)[0]
    want = cycles("scores", batch, seq, dh)
    assert abs(scores.cycles - want) <= TOLERANCE * want, (scores.cycles, want)
    values = _run_values(batch, seq, heads, dh, 1, seed=1)[0]
    want = cycles("values", batch, seq, dh)
    assert abs(values.cycles - want) <= TOLERANCE * want, (values.cycles, want)


def test_sram_overflow_is_a_user_error():
    kernel = build_attn_scores("h0.attn.scores", [], StreamIds(), batch=2, seq=8, heads=2,
                               d_head=4, lane_width=4, qkv="qkv", scores="S", d_scores="dS",
                               d_qkv="dqkv")
    inputs = {"qkv": np.zeros((16, 24), np.float32), "dS": np.zeros((16, 16), np.float32)}
    # PE (0, 0) holds 16 q rows (64 words), its k block (32) and 16 dS rows (64), + 1
    with pytest.raises(UserError, match=r"h0\.attn\.scores.*needs 644 bytes of SRAM, has 512"):
        run_kernel(kernel, inputs, WaferConfig(sram_bytes_per_pe=512))


@pytest.mark.parametrize("batch,seq,heads,dh,sram", [(2, 8, 2, 4, 120), (3, 12, 2, 4, 200),
                                                     (2, 8, 1, 2, 40)])
def test_fit_row_groups_matches_the_built_kernels(batch, seq, heads, dh, sram):
    lay = attn_layout("a", batch=batch, seq=seq, heads=heads, d_head=dh, lane_width=dh)
    groups = fit_row_groups("a", lay, sram)

    def most_words(r: int) -> int:
        shape = {"batch": batch, "seq": seq, "heads": heads, "d_head": dh, "lane_width": dh,
                 "row_groups": r, "qkv": "qkv", "d_qkv": "dqkv"}
        kernels = [build_attn_scores("s", [], StreamIds(), scores="S", d_scores="dS", **shape),
                   build_attn_values("v", [], StreamIds(), probs="P", out="O", d_out="dO",
                                     d_probs="dP", **shape)]
        return max(k.sram_words(pe) for k in kernels for pe in k.programs)

    assert most_words(groups) == attn_sram_words(replace(lay, row_groups=groups)) <= sram
    if groups > 1:
        assert most_words(groups - 1) > sram
    with pytest.raises(UserError, match="op a: PE .* needs .* bytes of SRAM"):
        fit_row_groups("a", lay, batch * dh * dh)
