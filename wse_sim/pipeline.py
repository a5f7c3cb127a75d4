"""The run pipeline: the one place (with the CLI) where the compiler and the simulator
meet. `compile_config` turns a run config into a Program whose `meta` says what the step
is; `simulate_program` runs any Program and reports its counters; `run_step` is both plus
the check against the float64 reference.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from compiler.check import CheckResult, check_step
from compiler.compile import Compiled, compile_step
from compiler.config import load_config
from compiler.reference import reference_step
from wse_sim.engine import SimResult, simulate
from wse_sim.hardware import WaferConfig
from wse_sim.program import Program
from wse_sim.report import hottest_links, run_report


def step_meta(config_path: str, compiled: Compiled) -> dict[str, Any]:
    """What a compiled step's report shows besides the counters (`Program.meta`)."""
    summary = compiled.graph.summary()
    train = compiled.cfg.training
    estimate = compiled.linked.link_wavelets
    return {
        "config": config_path,
        "placement": compiled.placement,
        "lane_width": compiled.plan.width,
        "parameters": summary["parameters"],
        "kernels_count": len(compiled.kernels),
        "origin": list(compiled.linked.origin),
        "colors_used": compiled.linked.colors_used,
        "hop_words": compiled.hop_words,
        "link_load_estimate": {"max": int(estimate.max()),
                               "mean": float(estimate[estimate > 0].mean()),
                               "total": int(estimate.sum()),
                               "hottest_links": hottest_links(estimate)},
        "throughput": {"unit": "tokens", "per_run": train.batch_size * train.seq_len},
        "model_flops": summary["flops"]["total"],
        "flops_by_phase": summary["flops"],
        "compile_seconds": compiled.seconds,
    }


def compile_config(config_path: str, placement: str | None = None) -> Compiled:
    """Compile the step of a config file; its Program carries `step_meta`."""
    compiled = compile_step(load_config(config_path), placement)
    compiled.linked.program.meta = step_meta(config_path, compiled)
    return compiled


def simulate_program(program: Program, wafer: WaferConfig, *, max_cycles: int | None = None,
                     progress: Callable[[int], None] | None = None
                     ) -> tuple[SimResult, dict[str, Any]]:
    """Run `program` and report its counters (`wse_sim.report.run_report`)."""
    started = time.perf_counter()
    result = simulate(program, wafer, max_cycles=max_cycles, progress=progress)
    return result, run_report(program, wafer, result.stats, time.perf_counter() - started)


def check_report(check: CheckResult) -> dict[str, Any]:
    return {"passed": check.passed, "tolerance": check.tolerance, "loss_sim": check.loss_sim,
            "loss_ref": check.loss_ref, "results_sha256": check.digest,
            "tensors": check.errors, "tolerances": check.tolerances}


def run_step(config_path: str, placement: str | None = None, max_cycles: int | None = None,
             progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Compile, simulate and check one step; the report as a JSON-ready dict."""
    compiled = compile_config(config_path, placement)
    result, report = simulate_program(compiled.linked.program, compiled.cfg.wafer,
                                      max_cycles=max_cycles, progress=progress)
    reference = reference_step(compiled.cfg, compiled.params, compiled.tokens, np.float64)
    check = check_step(compiled.linked, result, reference, compiled.params)
    report["check"] = check_report(check)
    return report
