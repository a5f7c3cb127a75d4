"""The whole training step passes the check whatever the placement, the batch or the lane
width: the same kernels, placed anywhere on the wafer and sized for any row count, compute
the float64 reference's step. (gpt_small at the scaling benchmark's budgets and batches
is `benchmarks/scaling.py`; these are gpt_tiny-sized, seconds each.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from compiler.compile import compile_step
from compiler.config import PLACEMENTS, parse_config
from wse_sim.errors import UserError
from wse_sim.pipeline import run_parsed

ROOT = Path(__file__).resolve().parent.parent
TINY = yaml.safe_load((ROOT / "models" / "gpt_tiny.yaml").read_text())


def _run(**sections: dict) -> dict:
    raw = {name: {**TINY[name], **sections.get(name, {})} if isinstance(TINY[name], dict)
           else sections.get(name, TINY[name]) for name in TINY}
    report = run_parsed(parse_config(raw, "gpt_tiny (varied)"), "gpt_tiny (varied)")
    assert report["check"]["passed"], report["check"]
    return report


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_every_placement_passes_the_check(placement):
    report = _run(compile={"placement": placement})
    assert report["placement"] == placement


@pytest.mark.parametrize("placement, colors", [("linear", 15), ("random", 16)])
def test_colors_shared_in_two_phases_compute_the_same_step(placement, colors):
    """On a wafer of 15 colors gpt_tiny's linear placement, and on one of 16 its random
    placement, route only with some (PE, color)s carrying a forward stream and then a
    backward one (`compiler/routing.py`, step 4): each such forward stream's source sends
    a control wavelet after its last wavelet, which switches the routers it shares; under
    random placement some of them the gradient enters from the same side as the forward
    stream, and FIFO order alone keeps it behind the control wavelet. The kernels are those
    of the 24-color wafer, so the step computes the same values: every checked tensor's
    error is the same."""
    wafer = {"preset": "wse2", "colors": colors}
    routes = compile_step(parse_config({**TINY, "wafer": wafer}), placement).linked.program.routes
    same_side = [r for r in routes.values() if r.positions and r.live[0][0] == r.live[1][0]]
    assert same_side or placement != "random"  # the case FIFO order alone keeps right
    wide = _run(compile={"placement": placement})
    narrow = _run(compile={"placement": placement}, wafer=wafer)
    assert (wide["switch_changes"], wide["control_wavelets"]) == (0, 0)
    assert narrow["switch_changes"] >= narrow["control_wavelets"] > 0
    assert narrow["colors_used"] == colors
    assert narrow["check"] == wide["check"]
    # the compiler's link loads count the control wavelets too: every crossing accounted
    assert narrow["link_load_estimate"]["total"] == narrow["fabric_wavelet_hops"]


@pytest.mark.parametrize("batch", [2, 8, 32])
def test_every_batch_passes_the_check(batch):
    # seq_len 4 keeps batch 32 at 128 rows, gpt_small's row count
    report = _run(training={"batch_size": batch, "seq_len": 4})
    assert round(report["tokens_per_second"] * report["simulated_seconds"]) == batch * 4


@pytest.mark.parametrize("lane_width, precision", [(8, "fp32"), (8, "mixed"), (32, "fp32")])
def test_lane_widths_other_than_d_head_pass_the_check(lane_width, precision):
    report = _run(compile={"lane_width": lane_width, "precision": precision})  # d_head 16
    assert report["lane_width"] == lane_width
    # below d_head the projections facing whole heads hold their weights in K blocks
    assert (set(report["k_blocks"]) == {f"h{i}.attn.{op}" for i in (0, 1)
                                        for op in ("qkv", "proj")}) == (lane_width < 16)


def test_micro_batches_run_a_batch_too_large_for_sram_at_once():
    """gpt_tiny's attention cannot hold 24 sequences; three micro-batches of 8, run one
    after another with the gradients accumulating in SRAM, give the whole batch's step."""
    with pytest.raises(UserError, match="needs .* bytes of SRAM"):
        _run(training={"batch_size": 24})
    report = _run(training={"batch_size": 24, "micro_batch_size": 8})
    assert report["micro_batches"] == {"count": 3, "sequences": 8}
    assert round(report["tokens_per_second"] * report["simulated_seconds"]) == 24 * 16


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_micro_batches_equal_the_whole_batch_step(optimizer):
    """Two micro-batches of 2 against the reference of the batch of 4 (the check compares
    loss, logits, gradients and the one update); the step does the whole batch's work."""
    training = {"batch_size": 4, "optimizer": optimizer, "lr": 0.1 if optimizer == "sgd" else 1e-3}
    split = _run(training={**training, "micro_batch_size": 2})
    whole = _run(training=training)
    assert split["check"]["loss_ref"] == whole["check"]["loss_ref"]
    assert split["model_flops"] == whole["model_flops"]
    assert "micro_batches" not in whole
    # the second micro-batch starts when the first has finished on every PE
    assert split["cycles"] > whole["cycles"]
