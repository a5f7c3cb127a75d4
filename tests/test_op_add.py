"""The add kernel (residual adds, gradient accumulation) against its numpy oracle, and its
cycle and SRAM formulas."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_bench import run_kernel

from compiler.lowering.kernel import StreamIds, lane_cols
from compiler.ops.add import add_forward, build_add, cycles, sram_words
from wse_sim.hardware import WaferConfig

QUEUE_DEPTH = WaferConfig().queue_depth


def add_kernel(rows: int, cols: int, lw: int, order: str = "ascending", block_rows: int = 4):
    return build_add("add", ["add"], StreamIds(), rows=rows, lanes=lane_cols(cols, lw),
                     first="a", second="b", out="y", order=order, queue_depth=QUEUE_DEPTH,
                     block_rows=block_rows)


@settings(max_examples=8, deadline=None)
@given(rows=st.integers(1, 60), cols=st.integers(1, 13), lw=st.integers(1, 5),
       block_rows=st.integers(1, 4), order=st.sampled_from(["ascending", "descending"]),
       seed=st.integers(0, 2**16))
def test_add_matches_numpy(rows, cols, lw, block_rows, order, seed):
    """Up to 60 rows: the ring of the early input wraps around several times."""
    rng = np.random.default_rng(seed)
    a, b = (rng.standard_normal((rows, cols)).astype(np.float32) for _ in range(2))
    run = run_kernel(add_kernel(rows, cols, lw, order, block_rows), {"a": a, "b": b})
    np.testing.assert_array_equal(run.outputs["y"], add_forward(a, b))  # one fp32 add


@pytest.mark.parametrize("rows", [128, 200])
def test_add_cycles_and_sram_match_formula(rows):
    cols, lw = 64, 16
    kernel = add_kernel(rows, cols, lw)
    x = np.ones((rows, cols), np.float32)
    run = run_kernel(kernel, {"a": x, "b": x})
    # the formula leaves out the fill: the first and last wavelets' hops, ~12 cycles
    assert run.cycles == pytest.approx(cycles(rows, lw), rel=0.005)
    assert max(kernel.sram_words(pe) for pe in kernel.programs) == sram_words(rows, lw,
                                                                              QUEUE_DEPTH)
