"""The tied embedding + LM head kernel against numpy: h0, logits, dX, grads, updates."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_matmul_kernel import assert_sums_close

from compiler.lowering.embedding import build_embedding
from compiler.lowering.harness import run_kernel
from compiler.lowering.kernel import StreamIds

LR = 0.1


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
        "embed", ["embed", "lm_head"], StreamIds(), tokens=tokens, lane_width=lw, wte=wte,
        wpe=wpe, lr=LR, h0_tensor="h0", x_tensor="x", logits_tensor="logits",
        dlogits_tensor="dlogits" if backward else None, dx_tensor="dx" if backward else None,
        dh0_tensor="dh0" if backward else None)
    return kernel, tokens, wte.astype(np.float64), wpe.astype(np.float64), arrays


@settings(max_examples=8, deadline=None)
@given(batch=st.integers(1, 3), seq=st.integers(1, 6), vocab=st.integers(2, 21),
       d=st.integers(1, 13), extra_ctx=st.integers(0, 3), lw=st.integers(3, 8))
def test_embedding_and_lm_head_match_numpy(batch, seq, vocab, d, extra_ctx, lw):
    kernel, tokens, wte, wpe, arrays = embedding(batch, seq, vocab, d, seq + extra_ctx, lw)
    run = run_kernel(kernel, arrays)
    x, dlogits, dh0 = (arrays[name].astype(np.float64) for name in ("x", "dlogits", "dh0"))
    rows = batch * seq

    positions = np.tile(wpe[:seq], (batch, 1))
    h0 = wte[tokens.ravel()] + positions
    assert_sums_close(run.outputs["h0"], h0, np.abs(h0), 1)
    assert_sums_close(run.outputs["logits"], x @ wte.T, np.abs(x) @ np.abs(wte.T), d)
    assert_sums_close(run.outputs["dx"], dlogits @ wte, np.abs(dlogits) @ np.abs(wte), vocab)

    # the tied gradient sums the LM head's x^T dlogits and the embedding's scatter-add
    grad, grad_abs = dlogits.T @ x, np.abs(dlogits.T) @ np.abs(x)
    np.add.at(grad, tokens.ravel(), dh0)
    np.add.at(grad_abs, tokens.ravel(), np.abs(dh0))
    assert_sums_close(run.results["grad:wte.weight"], grad, grad_abs, rows + 1)
    assert_sums_close(run.results["updated:wte.weight"], wte - LR * grad,
                      np.abs(wte) + LR * grad_abs, rows + 3)

    grad_pos = np.zeros_like(wpe)
    grad_pos[:seq] = dh0.reshape(batch, seq, d).sum(axis=0)
    grad_pos_abs = np.zeros_like(wpe)
    grad_pos_abs[:seq] = np.abs(dh0).reshape(batch, seq, d).sum(axis=0)
    assert_sums_close(run.results["grad:wpe.weight"], grad_pos, grad_pos_abs, batch)
    assert_sums_close(run.results["updated:wpe.weight"], wpe - LR * grad_pos,
                      np.abs(wpe) + LR * grad_pos_abs, batch + 2)


def test_forward_only_embeds_and_projects():
    kernel, tokens, wte, wpe, arrays = embedding(2, 4, 9, 6, 5, 4, backward=False)
    assert kernel.results == []
    assert {end.tensor for end in kernel.inputs} == {"x"}
    run = run_kernel(kernel, {"x": arrays["x"]})
    h0 = wte[tokens.ravel()] + np.tile(wpe[:4], (2, 1))
    assert_sums_close(run.outputs["h0"], h0, np.abs(h0), 1)
    x = arrays["x"].astype(np.float64)
    assert_sums_close(run.outputs["logits"], x @ wte.T, np.abs(x) @ np.abs(wte.T), 6)


def test_bad_tokens_and_shapes_are_rejected():
    wte, wpe = np.zeros((8, 4), np.float32), np.zeros((3, 4), np.float32)
    common = dict(lane_width=4, wte=wte, wpe=wpe, lr=LR, h0_tensor="h0", x_tensor="x",
                  logits_tensor="logits")
    with pytest.raises(ValueError, match="tokens outside"):
        build_embedding("e", [], StreamIds(), tokens=np.array([[8]]), **common)
    with pytest.raises(ValueError, match="does not fit"):
        build_embedding("e", [], StreamIds(), tokens=np.zeros((1, 4), int), **common)
