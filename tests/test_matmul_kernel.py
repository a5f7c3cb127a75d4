"""The weight-stationary linear kernel against numpy, and its forward cycle formula."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler.lowering.harness import run_kernel
from compiler.lowering.kernel import StreamIds, lane_cols
from compiler.lowering.matmul import build_linear
from compiler.routing import link
from wse_sim.errors import UserError
from wse_sim.hardware import WaferConfig

EPS32 = 2.0 ** -23


def assert_sums_close(got: np.ndarray, ref: np.ndarray, abs_terms: np.ndarray, terms: int):
    """|got - ref| within the fp32 rounding bound of a `terms`-term sum whose absolute
    terms add up to `abs_terms` (the classical (n + 1) eps sum |a_i| bound)."""
    bound = (terms + 1) * EPS32 * abs_terms + 1e-30
    worst = np.max(np.abs(got - ref) / bound)
    assert worst <= 1.0, f"error {worst:.2f} x the fp32 bound"


def linear(rows, k, n, lw, *, bias=True, backward=True, dx=True, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    dy = rng.standard_normal((rows, n)).astype(np.float32)
    kernel = build_linear(
        "lin", ["lin"], StreamIds(), rows=rows, k=k, n=n, lane_width=lw, weight=w, bias=b,
        lr=0.1, x_tensor="x", y_tensor="y", dy_tensor="dy" if backward else None,
        dx_tensor="dx" if backward and dx else None, weight_name="w",
        bias_name="b" if bias else None)
    return kernel, x, w, b, dy


@settings(max_examples=8, deadline=None)
@given(rows=st.integers(1, 6), k=st.integers(1, 19), n=st.integers(1, 19),
       lw=st.integers(3, 8), bias=st.booleans(), dx=st.booleans())
def test_linear_matches_numpy(rows, k, n, lw, bias, dx):
    kernel, x, w, b, dy = linear(rows, k, n, lw, bias=bias, dx=dx)
    run = run_kernel(kernel, {"x": x, "dy": dy})
    x64, w64, dy64 = x.astype(np.float64), w.astype(np.float64), dy.astype(np.float64)
    b64 = b.astype(np.float64) if bias else np.zeros(n)
    assert_sums_close(run.outputs["y"], x64 @ w64 + b64, np.abs(x64) @ np.abs(w64)
                      + np.abs(b64), k + 1)
    if dx:
        assert_sums_close(run.outputs["dx"], dy64 @ w64.T, np.abs(dy64) @ np.abs(w64.T), n)
    else:
        assert "dx" not in run.outputs
    dw = x64.T @ dy64
    assert_sums_close(run.results["grad:w"], dw, np.abs(x64.T) @ np.abs(dy64), rows)
    assert_sums_close(run.results["updated:w"], w64 - 0.1 * dw,
                      np.abs(w64) + 0.1 * (np.abs(x64.T) @ np.abs(dy64)), rows + 2)
    if bias:
        db = dy64.sum(axis=0)
        assert_sums_close(run.results["grad:b"][0], db, np.abs(dy64).sum(axis=0), rows)
        assert_sums_close(run.results["updated:b"][0], b64 - 0.1 * db,
                          np.abs(b64) + 0.1 * np.abs(dy64).sum(axis=0), rows + 2)
    else:
        assert "grad:b" not in run.results


def test_forward_only_kernel_has_no_backward():
    kernel, x, w, b, _ = linear(3, 10, 7, 4, backward=False)
    assert [end.tensor for end in kernel.inputs] == ["x"] * 3
    assert kernel.results == []
    run = run_kernel(kernel, {"x": x})
    assert_sums_close(run.outputs["y"], x.astype(np.float64) @ w + b,
                      np.abs(x) @ np.abs(w) + np.abs(b), 11)


def forward_cycles(rows: int, k: int, n: int, lw: int) -> int:
    """Closed form of a lone forward matmul (with bias), derived from the program:

    per row a PE (c, r) receives its x row (kb cycles), runs kb FMA/MUL instructions of nb
    elements (kb nb cycles, plus one cycle for every instruction whose first element reads
    three SRAM words -- two vectors and the stride-0 x[k] -- against a budget of two: the
    FMAs, i.e. all kb on the top row (the bias is the first addend) and kb - 1 elsewhere,
    whose first term is a MUL), and all but the top row add the partial from the north
    (nb). The multicast x rows and the column chains keep the grid in lock step, so the
    slowest PE sets the pace for all M rows. Fill: each wavelet takes 3 cycles per hop
    (ramp, link, receive queue) from the source through the R chain PEs to the sink."""
    k_lanes, n_lanes = lane_cols(k, lw), lane_cols(n, lw)
    per_row = max(
        kb + kb * nb + (kb if r == 0 else kb - 1 + nb)
        for r, (k0, k1) in enumerate(k_lanes) for n0, n1 in n_lanes
        for kb, nb in [(k1 - k0, n1 - n0)])
    return rows * per_row + 3 * (len(k_lanes) + 2)


@pytest.mark.parametrize("rows,k,n,lw", [(32, 32, 32, 16), (24, 40, 24, 16), (16, 64, 96, 32)])
def test_forward_cycles_match_closed_form(rows, k, n, lw):
    kernel, x, _, _, _ = linear(rows, k, n, lw, backward=False)
    run = run_kernel(kernel, {"x": x})
    expected = forward_cycles(rows, k, n, lw)
    assert abs(run.cycles - expected) <= 0.1 * expected, (run.cycles, expected)


def test_sram_overflow_is_a_user_error():
    kernel, *_ = linear(800, 16, 16, 16)  # 800 stored x rows + 800 dY rows of 16 words
    with pytest.raises(UserError, match=r"op lin \(matmul\): PE \(0, 0\) needs \d+ bytes of "
                                        r"SRAM, has 49152"):
        link([kernel], {"lin": (0, 0)}, WaferConfig())
