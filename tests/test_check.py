"""The check catches what it must: a skipped SGD update fails it for every parameter, even
where the update is far below 1e-4 of the weight."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compiler.check import TOLERANCE, compare, read_results, relative_error, update_name
from compiler.graph import updated_name
from compiler.reference import reference_step
from wse_sim.commands.run import format_check
from wse_sim.engine import simulate
from wse_sim.outputs import strict_json
from wse_sim.pipeline import check_report, compile_config

TINY = Path(__file__).resolve().parent.parent / "models" / "gpt_tiny.yaml"


@pytest.fixture(scope="module")
def tiny():
    compiled = compile_config(str(TINY))
    result = simulate(compiled.linked.program, compiled.cfg.wafer)
    simulated = read_results(compiled.linked, result, compiled.graph.parameters)
    reference = reference_step(compiled.cfg, compiled.params, compiled.batch)
    return simulated, reference, compiled.params, compiled.cfg.training


def test_the_real_step_passes(tiny):
    assert compare(*tiny).passed


def test_a_skipped_update_fails_for_every_parameter(tiny):
    simulated, reference, initial, training = tiny
    hidden = 0  # parameters whose updated weight alone would pass without the update
    for p, start in initial.items():
        skipped = {**simulated, updated_name(p): np.asarray(start, np.float32)}
        check = compare(skipped, reference, initial, training)
        assert update_name(p) in check.failures(), p
        assert set(check.failures()) <= {update_name(p), updated_name(p)}, p
        hidden += relative_error(skipped[updated_name(p)], reference.updated[p]) <= TOLERANCE
    assert hidden > 0, "no parameter shows why the update check is needed"


def test_numbers_that_overflowed_are_null_in_the_report_with_the_reason(tiny):
    simulated, reference, initial, training = tiny
    broken = {**simulated, "loss": np.array([[np.nan]], np.float32),
              "grad:wte.weight": np.full_like(simulated["grad:wte.weight"], np.inf)}
    check = compare(broken, reference, initial, training)
    report = check_report(check)
    strict_json(report)  # no NaN or Infinity left
    overflow = "not finite: the simulated or the reference values overflowed"
    assert report["loss_sim"] is None and report["tensors"]["grad:wte.weight"] is None
    assert report["null_reasons"]["loss_sim"] == overflow
    # the optimizer's expected update is computed from the (infinite) gradient as well
    overflowed = {"loss", "grad:wte.weight", "updated:wte.weight", "update:wte.weight"}
    assert report["null_reasons"]["tensors"] == dict.fromkeys(overflowed, overflow)
    assert not report["passed"] and {"loss", "grad:wte.weight"} <= set(report["failures"])
    text = format_check(report)
    assert f"n/a: {overflow}" in text and "loss sim n/a" in text
