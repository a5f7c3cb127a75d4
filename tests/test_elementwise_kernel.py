"""The add and GELU kernels against numpy, and their cycle formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler.lowering.elementwise import build_add, build_gelu
from compiler.lowering.harness import run_kernel
from compiler.lowering.kernel import StreamIds

# fp32 results of a handful of rounded operations (erf/tanh/exp, a few products)
RTOL = 1e-5


def gelu_reference(x: np.ndarray, activation: str) -> tuple[np.ndarray, ...]:
    """gelu(x), gelu'(x), and the sizes their fp32 rounding is relative to, in float64.

    Both use cdf = (1 + e) / 2 with e = erf(x / sqrt 2) (or tanh u), which cancels for
    negative x, and gelu' = cdf + slope, whose terms cancel near x = -0.75: an fp32 result
    is accurate relative to the terms, (1 + |e|) / 2 * |x| and (1 + |e|) / 2 + |slope|,
    not to the (possibly tiny) value."""
    x = x.astype(np.float64)
    if activation == "gelu":
        e = np.vectorize(math.erf)(x / math.sqrt(2.0))
        slope = x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    else:
        k = math.sqrt(2.0 / math.pi)
        e = np.tanh(k * (x + 0.044715 * x**3))
        slope = 0.5 * x * (1 - e * e) * k * (1 + 3 * 0.044715 * x * x)
    cdf, cdf_size = 0.5 * (1 + e), 0.5 * (1 + np.abs(e))
    return x * cdf, cdf + slope, cdf_size * np.abs(x), cdf_size + np.abs(slope)


def add_kernel(rows: int, cols: int, lw: int):
    return build_add("add", ["add"], StreamIds(), rows=rows, cols=cols, lane_width=lw,
                     first="a", second="b", out="y")


def gelu_kernel(rows: int, cols: int, lw: int, activation: str, block_rows: int = 8):
    return build_gelu("gelu", ["gelu", "gelu.bwd"], StreamIds(), rows=rows, cols=cols,
                      lane_width=lw, activation=activation, x_tensor="x", y_tensor="y",
                      dy_tensor="dy", dx_tensor="dx", block_rows=block_rows)


@settings(max_examples=8, deadline=None)
@given(rows=st.integers(1, 7), cols=st.integers(1, 13), lw=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_add_matches_numpy(rows, cols, lw, seed):
    rng = np.random.default_rng(seed)
    a, b = (rng.standard_normal((rows, cols)).astype(np.float32) for _ in range(2))
    run = run_kernel(add_kernel(rows, cols, lw), {"a": a, "b": b})
    np.testing.assert_array_equal(run.outputs["y"], a + b)  # one fp32 add: bit-exact


@settings(max_examples=10, deadline=None)
@given(rows=st.integers(1, 7), cols=st.integers(1, 11), lw=st.integers(1, 5),
       block_rows=st.integers(1, 4), activation=st.sampled_from(["gelu", "gelu_tanh"]),
       seed=st.integers(0, 2**16))
def test_gelu_forward_and_backward(rows, cols, lw, block_rows, activation, seed):
    rng = np.random.default_rng(seed)
    x = (3 * rng.standard_normal((rows, cols))).astype(np.float32)
    dy = rng.standard_normal((rows, cols)).astype(np.float32)
    run = run_kernel(gelu_kernel(rows, cols, lw, activation, block_rows), {"x": x, "dy": dy})
    y, dgelu, y_size, dgelu_size = gelu_reference(x, activation)
    assert np.all(np.abs(run.outputs["y"] - y) <= RTOL * y_size)
    assert np.all(np.abs(run.outputs["dx"] - dy * dgelu) <= RTOL * np.abs(dy) * dgelu_size)


def test_gelu_rejects_unknown_activation():
    with pytest.raises(ValueError, match="relu"):
        gelu_kernel(2, 2, 2, "relu")


@pytest.mark.parametrize(("activation", "per_element"), [("gelu", 11), ("gelu_tanh", 14)])
def test_gelu_cycles_match_formula(activation, per_element):
    """Docstring formula: forward 5 (7 tanh) + derivative 5 (6) + backward 1 cycle per
    element of a lane; the lanes run in parallel."""
    rows, cols, lw = 32, 32, 16
    x = np.ones((rows, cols), np.float32)
    run = run_kernel(gelu_kernel(rows, cols, lw, activation), {"x": x, "dy": x})
    assert run.cycles == pytest.approx(per_element * rows * lw, rel=0.03)


def test_add_cycles_match_formula():
    """3 M w: both inputs absorbed through the PE's one ramp (2 M w), then one ADD per
    element out (M w); the join token costs a few cycles."""
    rows, cols, lw = 64, 64, 16
    x = np.ones((rows, cols), np.float32)
    run = run_kernel(add_kernel(rows, cols, lw), {"a": x, "b": x})
    assert run.cycles == pytest.approx(3 * rows * lw, rel=0.03)
