"""The tied embedding + LM head kernel against its numpy oracles: h0, logits, dX, grads,
updates; and its embedding cycle formula."""

from __future__ import annotations

import numpy as np
import pytest
from bounds import assert_sums_close
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_bench import run_kernel

from compiler.lowering.kernel import StreamIds, lane_cols
from compiler.ops.embedding import (
    build_embedding,
    embedding_backward,
    embedding_cycles,
    embedding_forward,
    lm_head_backward,
    lm_head_forward,
    sram_words,
)
from compiler.ops.update import UpdateRule
from compiler.optim import sgd_tensor
from wse_sim.hardware import WaferConfig

LR = 0.1
SGD = UpdateRule("sgd", LR)


def embedding(batch, seq, vocab, d, n_ctx, lw, *, backward=True, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq))
    tokens[0, -1] = tokens[0, 0]  # a token used twice gets both rows' gradients
    wte = rng.standard_normal((vocab, d)).astype(np.float32)
    wpe = rng.standard_normal((n_ctx, d)).astype(np.float32)
    rows = batch * seq
    arrays = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in
              (("x", (rows, d)), ("dlogits", (rows, vocab)), ("dh0", (rows, d)))}
    kernel = build_embedding(
        "embed", ["embed", "lm_head"], StreamIds(), tokens=tokens, d_lanes=lane_cols(d, lw),
        v_lanes=lane_cols(vocab, lw), wte=wte, wpe=wpe, update=SGD, h0_tensor="h0", x_tensor="x",
        logits_tensor="logits", dlogits_tensor="dlogits" if backward else None,
        dx_tensor="dx" if backward else None, dh0_tensor="dh0" if backward else None,
        queue_depth=WaferConfig().queue_depth)
    return kernel, tokens, wte.astype(np.float64), wpe.astype(np.float64), arrays


@settings(max_examples=8, deadline=None)
@given(batch=st.integers(1, 3), seq=st.integers(1, 9), vocab=st.integers(2, 21),
       d=st.integers(1, 13), extra_ctx=st.integers(0, 3), lw=st.integers(3, 8))
def test_embedding_and_lm_head_match_numpy(batch, seq, vocab, d, extra_ctx, lw):
    kernel, tokens, wte, wpe, arrays = embedding(batch, seq, vocab, d, seq + extra_ctx, lw)
    run = run_kernel(kernel, arrays)
    x, dlogits, dh0 = (arrays[name].astype(np.float64) for name in ("x", "dlogits", "dh0"))
    rows = batch * seq

    # The oracles on absolute values give the sums of absolute terms (the error scale).
    h0 = embedding_forward(tokens, wte, wpe)
    assert_sums_close(run.outputs["h0"], h0, np.abs(h0), 1)
    assert_sums_close(run.outputs["logits"], lm_head_forward(x, wte),
                      lm_head_forward(np.abs(x), np.abs(wte)), d)
    dx, head_grad = lm_head_backward(dlogits, x, wte)
    dx_abs, head_grad_abs = lm_head_backward(np.abs(dlogits), np.abs(x), np.abs(wte))
    assert_sums_close(run.outputs["dx"], dx, dx_abs, vocab)

    # the tied gradient sums the LM head's dlogits^T x and the embedding's scatter-add
    dwte, dwpe = embedding_backward(dh0, tokens, vocab, wpe.shape[0])
    dwte_abs, dwpe_abs = embedding_backward(np.abs(dh0), tokens, vocab, wpe.shape[0])
    grad, grad_abs = head_grad + dwte, head_grad_abs + dwte_abs
    assert_sums_close(run.results["grad:wte.weight"], grad, grad_abs, rows + 1)
    assert_sums_close(run.results["updated:wte.weight"], sgd_tensor(wte, grad, LR),
                      np.abs(wte) + LR * grad_abs, rows + 3)
    assert_sums_close(run.results["grad:wpe.weight"], dwpe, dwpe_abs, batch)
    assert_sums_close(run.results["updated:wpe.weight"], sgd_tensor(wpe, dwpe, LR),
                      np.abs(wpe) + LR * dwpe_abs, batch + 2)

    d_lanes, v_lanes = lane_cols(d, lw), lane_cols(vocab, lw)
    for c, r in kernel.programs:
        position = c == len(v_lanes)
        kb, nb = d_lanes[r][1] - d_lanes[r][0], 0 if position else v_lanes[c][1] - v_lanes[c][0]
        assert kernel.sram_words((c, r)) == sram_words(rows, kb, nb, wpe.shape[0],
                                                       position_column=position)


def test_forward_only_embeds_and_projects():
    kernel, tokens, wte, wpe, arrays = embedding(2, 4, 9, 6, 5, 4, backward=False)
    assert kernel.results == []
    assert {end.tensor for end in kernel.inputs} == {"x"}
    run = run_kernel(kernel, {"x": arrays["x"]})
    h0 = embedding_forward(tokens, wte, wpe)
    assert_sums_close(run.outputs["h0"], h0, np.abs(h0), 1)
    x = arrays["x"].astype(np.float64)
    assert_sums_close(run.outputs["logits"], lm_head_forward(x, wte),
                      lm_head_forward(np.abs(x), np.abs(wte)), 6)


@pytest.mark.parametrize("batch,seq,vocab,d,lw", [(2, 16, 64, 32, 16), (2, 8, 40, 24, 8)])
def test_embedding_cycles_match_formula(batch, seq, vocab, d, lw):
    """The position column (the last column of the kernel) ends when it has emitted h0. The
    LM head's x comes later (as in a model, where it needs the whole forward pass): its dot
    products would take the SRAM reads the relay needs."""
    kernel, _, _, _, arrays = embedding(batch, seq, vocab, d, seq, lw, backward=False)
    kb = max(k1 - k0 for k0, k1 in lane_cols(d, lw))
    first_row_latency = 3 * (kernel.width - 1)  # at most: the owner's hops to the column
    late = embedding_cycles(batch * seq, kb) + first_row_latency
    run = run_kernel(kernel, {"x": arrays["x"]}, start={"x": late})
    position = kernel.width - 1
    ends = [run.stats.last_cycle[y, x] for x, y in
            (run.linked.kernel_pe("embed", (position, r)) for r in range(kernel.height))]
    assert 0 <= max(ends) + 1 - embedding_cycles(batch * seq, kb) <= first_row_latency


def test_bad_tokens_and_shapes_are_rejected():
    wte, wpe = np.zeros((8, 4), np.float32), np.zeros((3, 4), np.float32)
    common = dict(d_lanes=lane_cols(4, 4), v_lanes=lane_cols(8, 4), wte=wte, wpe=wpe, update=SGD,
                  h0_tensor="h0", x_tensor="x", logits_tensor="logits",
                  queue_depth=WaferConfig().queue_depth)
    with pytest.raises(ValueError, match="tokens outside"):
        build_embedding("e", [], StreamIds(), tokens=np.array([[8]]), **common)
    with pytest.raises(ValueError, match="does not fit"):
        build_embedding("e", [], StreamIds(), tokens=np.zeros((1, 4), int), **common)
