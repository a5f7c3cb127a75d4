"""Orientation: mirrored kernels compute the same numbers, and mirroring uncrosses bundles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_bench import run_kernel

from compiler.compile import kernel_traffic
from compiler.config import load_config
from compiler.gpt import build_graph
from compiler.inputs import init_params, make_batch
from compiler.lower import lower
from compiler.lowering.kernel import Kernel, StreamEnd, StreamIds, lane_cols
from compiler.ops.matmul import build_linear
from compiler.ops.update import UpdateRule
from compiler.orient import FLIPS, flip_kernel, orient
from compiler.placement import Box, place
from compiler.plan import plan_step
from compiler.routing import link
from wse_sim.hardware import WaferConfig
from wse_sim.program import FabIn, FabOut, Mem, Op, validate, vec

SGD = UpdateRule("sgd", 0.1)

ROOT = Path(__file__).resolve().parent.parent


@settings(max_examples=4, deadline=None)
@given(rows=st.integers(1, 4), k=st.integers(1, 11), n=st.integers(1, 11),
       lw=st.integers(3, 5))
def test_mirrored_linear_kernel_gives_identical_results(rows, k, n, lw):
    """A weight-stationary linear layer (forward, backward, SGD) mirrored every way: the
    same programs on mirrored PEs, so outputs and results are bit-identical."""
    rng = np.random.default_rng(rows * 1000 + k * 31 + n)
    x, dy = (rng.standard_normal(s).astype(np.float32) for s in ((rows, k), (rows, n)))
    w, b = rng.standard_normal((k, n)).astype(np.float32), rng.standard_normal(n)
    kernel = build_linear(
        "lin", ["lin"], StreamIds(), rows=rows, k_lanes=lane_cols(k, lw),
        n_lanes=lane_cols(n, lw), weight=w, bias=b.astype(np.float32), update=SGD, x_tensor="x",
        y_tensor="y", dy_tensor="dy", dx_tensor="dx", weight_name="w", bias_name="b",
        queue_depth=WaferConfig().queue_depth)
    base = run_kernel(kernel, {"x": x, "dy": dy})
    for flip in FLIPS[1:]:
        run = run_kernel(flip_kernel(kernel, flip), {"x": x, "dy": dy})
        for got, want in ((run.outputs, base.outputs), (run.results, base.results)):
            assert got.keys() == want.keys()
            for name in want:
                np.testing.assert_array_equal(got[name], want[name], err_msg=f"{flip} {name}")


def test_flip_maps_every_pe_and_is_an_involution():
    ids = StreamIds()
    kernel = Kernel(name="k", op="test", ops=[], width=3, height=2)
    sid = ids.new()
    kernel.emit((0, 1), vec(Op.MOV, 1, FabOut(sid), Mem(kernel.alloc((0, 1), 1, "x"))))
    kernel.outputs.append(StreamEnd("t", 0, (0, 1), ((0, 1),), sid))
    flipped = flip_kernel(kernel, (True, True))
    assert set(flipped.programs) == {(2, 0)} and flipped.outputs[0].pes == ((2, 0),)
    assert set(flipped.allocations) == {(2, 0)}
    assert flip_kernel(flipped, (True, True)) == kernel
    assert flip_kernel(kernel, (False, False)) is kernel


def strip_and_rows(lanes: int) -> list[Kernel]:
    """A 1 x L strip whose PE j sends lane j, and a 2 x L kernel whose row j receives lane
    j on both PEs: the GELU strip -> matmul rows shape."""
    ids = StreamIds()
    strip = Kernel(name="strip", op="test", ops=[], width=lanes, height=1)
    rows = Kernel(name="rows", op="test", ops=[], width=2, height=lanes)
    for j in range(lanes):
        out, inp = ids.new(), ids.new()
        strip.emit((j, 0), vec(Op.MOV, 4, FabOut(out), Mem(strip.alloc((j, 0), 4, "x"))))
        strip.outputs.append(StreamEnd("t", j, (4 * j, 4 * j + 4), ((j, 0),), out))
        for x in range(2):
            rows.emit((x, j), vec(Op.MOV, 4, Mem(rows.alloc((x, j), 4, "y")), FabIn(inp)))
        rows.inputs.append(StreamEnd("t", j, (4 * j, 4 * j + 4), ((0, j), (1, j)), inp))
    return [strip, rows]


def test_orientation_uncrosses_a_bundle_turning_a_corner():
    """Strip on top, rows below and to the right: lane j turns down column j and along row
    j, so with the strip's PEs in lane order every two lanes cross and the bundle needs a
    color per lane. Mirroring the strip (or the rows) nests the turns: one color."""
    lanes = 6
    kernels = strip_and_rows(lanes)
    positions = {"strip": (0, 0), "rows": (lanes, 1)}
    wafer = WaferConfig(colors=lanes)
    assert link(kernels, positions, wafer).colors_used == lanes
    oriented = orient(kernels, positions)
    assert link(oriented, positions, wafer).colors_used == 1


@pytest.fixture(scope="module")
def gpt_small() -> tuple[list[Kernel], list[tuple[str, str, int]], WaferConfig]:
    cfg = load_config(ROOT / "models" / "gpt_small.yaml")
    graph = build_graph(cfg)
    kernels = lower(graph, init_params(cfg), make_batch(cfg), plan_step(graph, cfg.model.d_head))
    return kernels, kernel_traffic(kernels), cfg.wafer


@pytest.mark.parametrize("strategy", ["linear", "snake", "greedy", "anneal", "partition"])
def test_gpt_small_routes_with_the_wafers_colors(gpt_small, strategy):
    """Compile-only (no simulation): place, orient and link gpt_small's 59 kernels. (Not
    `random`: a shuffled op order needs ~33k (PE, color) route entries in its 2560-PE box,
    about 20 per PE over its west half, and does not route in 24 colors.)"""
    kernels, traffic, wafer = gpt_small
    boxes = [Box(k.name, k.width, k.height) for k in kernels]
    positions = place(boxes, traffic, (wafer.width, wafer.height), strategy)
    linked = link(orient(kernels, positions), positions, wafer)
    assert linked.colors_used <= wafer.colors
    validate(linked.program, wafer)
