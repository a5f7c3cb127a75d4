"""The GELU kernel against its numpy oracle, and its cycle formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_bench import run_kernel

from compiler.lowering.kernel import StreamIds, lane_cols
from compiler.ops.gelu import build_gelu, cycles, gelu_derivative, gelu_forward, sram_words
from wse_sim.hardware import WaferConfig

# fp32 results of a handful of rounded operations (erf/tanh/exp, a few products)
RTOL = 1e-5


def error_scales(x: np.ndarray, activation: str) -> tuple[np.ndarray, np.ndarray]:
    """The sizes the fp32 rounding of gelu(x) and gelu'(x) is relative to.

    Both kernels build cdf = (1 + e) / 2 with e = erf(x / sqrt 2) (or tanh u), which
    cancels for negative x, and gelu' = cdf + slope, whose terms cancel near x = -0.75: an
    fp32 result is accurate relative to the sizes of its terms, (1 + |e|) / 2 * |x| and
    (1 + |e|) / 2 + |slope|, not to the (possibly tiny) value."""
    x = x.astype(np.float64)
    if activation == "gelu":
        e = np.vectorize(math.erf)(x / math.sqrt(2.0))
        slope = x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    else:
        k = math.sqrt(2.0 / math.pi)
        e = np.tanh(k * (x + 0.044715 * x**3))
        slope = 0.5 * x * (1 - e * e) * k * (1 + 3 * 0.044715 * x * x)
    cdf_size = 0.5 * (1 + np.abs(e))
    return cdf_size * np.abs(x), cdf_size + np.abs(slope)


def gelu_kernel(rows: int, cols: int, lw: int, activation: str):
    return build_gelu("gelu", ["gelu", "gelu.bwd"], StreamIds(), rows=rows,
                      lanes=lane_cols(cols, lw), activation=activation, x_tensor="x",
                      y_tensor="y", dy_tensor="dy", dx_tensor="dx",
                      queue_depth=WaferConfig().queue_depth)


@settings(max_examples=10, deadline=None)
@given(rows=st.integers(1, 20), cols=st.integers(1, 11), lw=st.integers(1, 5),
       activation=st.sampled_from(["gelu", "gelu_tanh"]), seed=st.integers(0, 2**16))
def test_gelu_forward_and_backward(rows, cols, lw, activation, seed):
    rng = np.random.default_rng(seed)
    x = (3 * rng.standard_normal((rows, cols))).astype(np.float32)
    dy = rng.standard_normal((rows, cols)).astype(np.float32)
    run = run_kernel(gelu_kernel(rows, cols, lw, activation), {"x": x, "dy": dy})
    x64 = x.astype(np.float64)
    y, dgelu = gelu_forward(x64, activation), gelu_derivative(x64, activation)
    y_size, dgelu_size = error_scales(x, activation)
    assert np.all(np.abs(run.outputs["y"] - y) <= RTOL * y_size)
    assert np.all(np.abs(run.outputs["dx"] - dy * dgelu) <= RTOL * np.abs(dy) * dgelu_size)


def test_gelu_rejects_unknown_activation():
    with pytest.raises(ValueError, match="relu"):
        gelu_kernel(2, 2, 2, "relu")


@pytest.mark.parametrize("activation,rows", [("gelu", 32), ("gelu_tanh", 32), ("gelu", 48)])
def test_gelu_cycles_and_sram_match_formula(activation, rows):
    cols, lw = 32, 16
    kernel = gelu_kernel(rows, cols, lw, activation)
    x = np.ones((rows, cols), np.float32)
    run = run_kernel(kernel, {"x": x, "dy": x})
    # the formula leaves out the fill: the fabric latency from source to sink, ~15 cycles
    assert run.cycles == pytest.approx(cycles(rows, lw, activation), rel=0.005)
    assert max(kernel.sram_words(pe) for pe in kernel.programs) == sram_words(rows, lw)
