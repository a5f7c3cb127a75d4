"""The weight-stationary linear kernel against its numpy oracle, and its cycle formulas."""

from __future__ import annotations

import numpy as np
import pytest
from bounds import assert_sums_close
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_bench import run_kernel

from compiler.lowering.dots import dot_cycles, half_dot_step
from compiler.lowering.kernel import StreamIds, lane_cols
from compiler.ops.matmul import (
    backward_cycles,
    backward_row_cycles,
    balanced_k_block,
    build_linear,
    forward_cycles,
    forward_row_cycles,
    grid_pes,
    half_convert_step,
    half_copy_cycles,
    linear_backward,
    linear_forward,
    sram_words,
    to_half,
)
from compiler.ops.update import UpdateRule
from compiler.optim import sgd_tensor
from compiler.routing import link
from wse_sim.errors import UserError
from wse_sim.hardware import WaferConfig

SGD = UpdateRule("sgd", 0.1)
LOSS_SCALE = 4096
QUEUE_DEPTH = WaferConfig().queue_depth


def linear(rows, k, n, wk, wn, *, bias=True, backward=True, dx=True, seed=0,
           precision="fp32", dy_scale=1.0, k_block=None):
    """A [rows, k] x [k, n] kernel, x in lanes of wk columns, Y in lanes of wn, W in blocks
    of `k_block` rows."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    dy = (dy_scale * rng.standard_normal((rows, n))).astype(np.float32)
    kernel = build_linear(
        "lin", ["lin"], StreamIds(), rows=rows, k_lanes=lane_cols(k, wk),
        n_lanes=lane_cols(n, wn), weight=w, bias=b, update=SGD, x_tensor="x", y_tensor="y",
        dy_tensor="dy" if backward else None, dx_tensor="dx" if backward and dx else None,
        weight_name="w", bias_name="b" if bias else None, precision=precision,
        loss_scale=LOSS_SCALE, k_block=k_block, queue_depth=QUEUE_DEPTH)
    return kernel, x, w, b, dy


def assert_linear_step(run, x, w, b, dy, *, dx, half=False, scale=1):
    """The kernel's Y, dX, gradients and SGD updates against the numpy oracle (its fp16
    twin if `half`), each within the fp32 sums' bound."""
    rows, k = x.shape
    n = w.shape[1]
    x64, w64, dy64 = x.astype(np.float64), w.astype(np.float64), dy.astype(np.float64)
    b64 = b.astype(np.float64) if b is not None else np.zeros(n)
    # The oracle on absolute values gives the sums of absolute terms (the error scale).
    y_abs = linear_forward(np.abs(x64), np.abs(w64), np.abs(b64), half=half)
    dx_abs, dw_abs, db_abs = linear_backward(np.abs(dy64), np.abs(x64), np.abs(w64),
                                             half=half, scale=scale)
    dx_ref, dw, db = linear_backward(dy64, x64, w64, half=half, scale=scale)
    assert_sums_close(run.outputs["y"], linear_forward(x64, w64, b64, half=half), y_abs, k + 1)
    if dx:
        assert_sums_close(run.outputs["dx"], dx_ref, dx_abs, n)
    else:
        assert "dx" not in run.outputs
    assert_sums_close(run.results["grad:w"], dw, dw_abs, rows)
    assert_sums_close(run.results["updated:w"], sgd_tensor(w64, dw, 0.1),
                      np.abs(w64) + 0.1 * dw_abs, rows + 2)
    if b is not None:
        assert_sums_close(run.results["grad:b"][0], db, db_abs, rows)
        assert_sums_close(run.results["updated:b"][0], sgd_tensor(b64, db, 0.1),
                          np.abs(b64) + 0.1 * db_abs, rows + 2)
    else:
        assert "grad:b" not in run.results


@settings(max_examples=8, deadline=None)
@given(rows=st.integers(1, 9), k=st.integers(1, 19), n=st.integers(1, 19),
       wk=st.integers(3, 8), wn=st.integers(3, 8), bias=st.booleans(), dx=st.booleans())
def test_linear_matches_numpy(rows, k, n, wk, wn, bias, dx):
    kernel, x, w, b, dy = linear(rows, k, n, wk, wn, bias=bias, dx=dx)
    assert_linear_step(run_kernel(kernel, {"x": x, "dy": dy}), x, w, b, dy, dx=dx)


@settings(max_examples=8, deadline=None)
@given(rows=st.integers(1, 9), k=st.integers(2, 19), n=st.integers(1, 19),
       wk=st.integers(3, 8), wn=st.integers(3, 8), data=st.data(), bias=st.booleans(),
       dx=st.booleans(), mixed=st.booleans())
def test_k_blocks_match_numpy(rows, k, n, wk, wn, data, bias, dx, mixed):
    """Lanes cut into blocks of fewer rows (several PE rows a lane, the dX columns passed
    up the east column) compute the same step, in fp32 and in mixed precision."""
    k_block = data.draw(st.sampled_from([2, 4, 6] if mixed else list(range(1, wk))))
    precision = "mixed" if mixed else "fp32"
    kernel, x, w, b, dy = linear(rows, k, n, wk, wn, bias=bias, dx=dx, precision=precision,
                                 dy_scale=1e-6 if mixed else 1.0, k_block=k_block)
    assert kernel.height == sum(-(-(k1 - k0) // k_block) for k0, k1 in lane_cols(k, wk))
    assert_linear_step(run_kernel(kernel, {"x": x, "dy": dy}), x, w, b, dy, dx=dx, half=mixed,
                       scale=LOSS_SCALE if mixed else 1)


# The shapes of attention's projections at lane width 11: QKV's lanes of 11 against whole
# heads of 32 columns, and the output projection's heads against lanes of 11. The top east
# PE of a lane waits for the first dX word from the PE below; the formula counts a hop, but
# the lag between a lane's rows depends on which end of the column dY enters, and the fill
# counts a whole dot a PE row where a lane's rows start together: within 1%.
@pytest.mark.parametrize("rows,k,n,wk,wn,k_block", [(64, 22, 64, 11, 32, 3),
                                                    (64, 64, 22, 32, 11, 9),
                                                    (64, 64, 22, 32, 11, 5)])
def test_k_block_cycles_and_sram_match_closed_form(rows, k, n, wk, wn, k_block):
    k_lanes, n_lanes = lane_cols(k, wk), lane_cols(n, wn)
    kernel, x, *_ = linear(rows, k, n, wk, wn, backward=False, k_block=k_block)
    assert run_kernel(kernel, {"x": x}).cycles == pytest.approx(
        forward_cycles(rows, k_lanes, n_lanes, k_block=k_block), rel=0.01)
    kernel, x, _, _, dy = linear(rows, k, n, wk, wn, k_block=k_block)
    run = run_kernel(kernel, {"x": x, "dy": dy})
    expected = (forward_cycles(rows, k_lanes, n_lanes, k_block=k_block)
                + backward_cycles(rows, k_lanes, n_lanes, k_block=k_block))
    assert run.cycles == pytest.approx(expected, rel=0.01)
    for p in grid_pes(k_lanes, n_lanes, k_block):
        assert kernel.sram_words((p.c, p.r)) == sram_words(
            rows, p.kb, p.nb, lane=p.lane, top_row_bias=p.r == 0,
            last_column=p.c == len(n_lanes) - 1, buffered=p.offset > 0)


def test_balanced_k_block_keeps_the_pace():
    """At lane width 11 a 11 x 32 block (QKV's, against whole heads) takes 2.8x the row of
    an 11 x 11 one; the widest block that keeps the 11 x 11 pace, and no wider."""
    pace = (forward_row_cycles(11, 11, top_row_bias=False),
            backward_row_cycles(11, 11, dx=True, top_row_bias=False))
    assert balanced_k_block(11, 11, pace) is None
    for lane, nb in ((11, 32), (32, 11)):
        kb = balanced_k_block(lane, nb, pace)
        rows = [forward_row_cycles(b, nb, top_row_bias=False, lane=lane) for b in (kb, kb + 1)]
        assert rows[0] <= pace[0] < rows[1] or backward_row_cycles(
            kb + 1, nb, dx=True, top_row_bias=False, last_column=True,
            below=lane - kb - 1) > pace[1]
    assert balanced_k_block(200, 11, pace) == 1  # receiving 200 columns alone is too slow


def test_forward_only_kernel_has_no_backward():
    kernel, x, w, b, _ = linear(5, 10, 7, 4, 3, backward=False)
    assert [end.tensor for end in kernel.inputs] == ["x"] * 3
    assert kernel.results == []
    run = run_kernel(kernel, {"x": x})
    assert_sums_close(run.outputs["y"], x.astype(np.float64) @ w + b,
                      np.abs(x) @ np.abs(w) + np.abs(b), 11)


# The formulas leave out the backward's fill, dX's first row crossing the C-wide row (about
# C (nb + 1) cycles): the shapes below are large enough for that to stay under 0.2%.
@pytest.mark.parametrize("rows,k,n,wk,wn", [(32, 32, 32, 16, 16), (24, 48, 24, 16, 12),
                                            (16, 64, 96, 32, 32)])
def test_forward_cycles_match_closed_form(rows, k, n, wk, wn):
    kernel, x, _, _, _ = linear(rows, k, n, wk, wn, backward=False)
    run = run_kernel(kernel, {"x": x})
    expected = forward_cycles(rows, lane_cols(k, wk), lane_cols(n, wn))
    assert run.cycles == pytest.approx(expected, rel=0.002)


@pytest.mark.parametrize("rows,k,n,wk,wn", [(32, 32, 32, 16, 16), (48, 40, 24, 16, 12),
                                            (16, 64, 96, 32, 32)])
def test_step_cycles_and_sram_match_closed_form(rows, k, n, wk, wn):
    kernel, x, _, _, dy = linear(rows, k, n, wk, wn)
    run = run_kernel(kernel, {"x": x, "dy": dy})
    k_lanes, n_lanes = lane_cols(k, wk), lane_cols(n, wn)
    expected = forward_cycles(rows, k_lanes, n_lanes) + backward_cycles(rows, k_lanes, n_lanes)
    assert run.cycles == pytest.approx(expected, rel=0.002)
    for c, r in kernel.programs:
        kb, nb = k_lanes[r][1] - k_lanes[r][0], n_lanes[c][1] - n_lanes[c][0]
        assert kernel.sram_words((c, r)) == sram_words(rows, kb, nb, top_row_bias=r == 0)


def test_sram_overflow_is_a_user_error():
    kernel, *_ = linear(800, 16, 16, 16, 16)  # 800 stored x rows of 16 words, and more
    with pytest.raises(UserError, match=r"op lin \(matmul\): PE \(0, 0\) needs \d+ bytes "
                                        r"of SRAM, has 49152"):
        link([kernel], {"lin": (0, 0)}, WaferConfig())


# Mixed precision: fp16 factors, fp32 sums. The numpy twin rounds the same factors, so the
# products are equal and only the fp32 sums' rounding (the bound above) is left.

@settings(max_examples=8, deadline=None)
@given(rows=st.integers(1, 9), k=st.integers(1, 19), n=st.integers(1, 19),
       wk=st.integers(3, 8), wn=st.integers(3, 8), bias=st.booleans(), dx=st.booleans())
def test_mixed_linear_matches_its_numpy_twin(rows, k, n, wk, wn, bias, dx):
    # dY of 1e-6: below fp16's normal range unless scaled (LOSS_SCALE) before rounding
    kernel, x, w, b, dy = linear(rows, k, n, wk, wn, bias=bias, dx=dx, precision="mixed",
                                 dy_scale=1e-6)
    assert_linear_step(run_kernel(kernel, {"x": x, "dy": dy}), x, w, b, dy, dx=dx, half=True,
                       scale=LOSS_SCALE)
    # without the scale, most of these dY would be fp16 subnormals: 10 bits lost and more
    assert np.median(np.abs(dy)) < 2.0**-14 <= np.median(np.abs(to_half(dy * LOSS_SCALE)))


@pytest.mark.parametrize("rows,k,n,wk,wn", [(32, 32, 32, 16, 16), (16, 64, 96, 32, 32)])
def test_mixed_cycles_and_sram_match_closed_form(rows, k, n, wk, wn):
    wafer = WaferConfig()
    step, convert = half_dot_step(wafer), half_convert_step(wafer)
    assert (step, convert) == (2, 1)  # WSE-2: fmachs SIMD 2 (and 2 words read a cycle)
    k_lanes, n_lanes = lane_cols(k, wk), lane_cols(n, wn)
    forward = {}
    for precision, s in (("fp32", 1), ("mixed", step)):
        kernel, x, *_ = linear(rows, k, n, wk, wn, backward=False, precision=precision)
        forward[precision] = run_kernel(kernel, {"x": x}).cycles
        c = convert if precision == "mixed" else 0
        assert forward[precision] == pytest.approx(
            forward_cycles(rows, k_lanes, n_lanes, step=s, convert_step=c), rel=0.002)
    kernel, x, _, _, dy = linear(rows, k, n, wk, wn, precision="mixed")
    run = run_kernel(kernel, {"x": x, "dy": dy})
    expected = (forward_cycles(rows, k_lanes, n_lanes, step=step, convert_step=convert)
                + backward_cycles(rows, k_lanes, n_lanes, step=step, convert_step=convert))
    assert run.cycles == pytest.approx(expected, rel=0.002)
    for c, r in kernel.programs:
        kb, nb = k_lanes[r][1] - k_lanes[r][0], n_lanes[c][1] - n_lanes[c][0]
        assert kernel.sram_words((c, r)) == sram_words(
            rows, kb, nb, top_row_bias=r == 0, half=True, last_column=c == len(n_lanes) - 1)
    # the multiply part (the dots) at the SIMD rate: 2 + (kb - 2) / 2 cycles for kb
    kb = wk
    assert dot_cycles(1, kb, step=step) == 2 + (kb - 2) // 2
    receive = rows * kb  # the x rows arrive at one fp32 wavelet a cycle either way
    copy = half_copy_cycles(wk, wn, convert, transposed=True)  # W^T's fp16 copy, once
    ratio = (forward["mixed"] - copy - receive) / (forward["fp32"] - receive)
    assert ratio == pytest.approx((2 + (kb - 2) / 2 + 1) / (kb + 1), rel=0.02)
