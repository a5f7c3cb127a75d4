"""The run pipeline: the one place (with the CLI) where the compiler and the simulator
meet. `compile_config` turns a run config into a Program whose `meta` says what the step
is; `simulate_program` runs any Program and reports its counters; `run_step` is both plus
the check against the float64 reference. `compile_parsed` and `run_parsed` do the same for
a config already parsed (a sweep's merged point), named by a label instead of a file.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np

from compiler.batch import BatchCode
from compiler.check import (
    TOLERANCE,
    CheckResult,
    compare,
    relative_error,
    update_checks,
)
from compiler.compile import Compiled, compile_step
from compiler.config import PLACEMENTS, RunConfig, TrainingConfig, load_config
from compiler.footprint import step_footprint
from compiler.gpt import build_graph
from compiler.graph import grad_name, updated_name
from compiler.inputs import init_params, make_batch
from compiler.ops.update import STEP_TENSOR, UpdateRule, moment_names
from compiler.optim import init_state, optimizer_step
from compiler.reference import reference_step
from compiler.state import WaferState
from compiler.streaming.gpt import Step, build_step, plan
from compiler.streaming.linear import LinearLayer, Precision, build_stack, phase_cost
from compiler.streaming.linear import reference as linear_reference
from compiler.streaming.projection import project
from compiler.streaming.service import apply_update, update_queue, update_seconds
from wse_sim.energy import events_joules
from wse_sim.engine import Loaded, SimResult, prepare_engine, simulate
from wse_sim.errors import SimulationStopped, UserError
from wse_sim.hardware import WaferConfig
from wse_sim.hostmem import program_bytes, require
from wse_sim.program import Program, read_tensor
from wse_sim.report import hottest_links, partial_report, run_report
from wse_sim.stats import Stats
from wse_sim.step import StepRun, StepStopped, run_micro_batches


def step_meta(source: str, compiled: Compiled) -> dict[str, Any]:
    """What a compiled step's report shows besides the counters (`Program.meta`); `source`
    names the config (its file, or a sweep point's label)."""
    summary = build_graph(compiled.cfg).summary()  # the whole step's (of every micro-batch)
    train = compiled.cfg.training
    # the program runs once per micro-batch: the step's traffic is that many times its own
    estimate = train.micro_batches * compiled.linked.link_wavelets
    micro = ({"micro_batches": {"count": train.micro_batches, "sequences": train.micro_batch}}
             if train.micro_batches > 1 else {})
    return {
        "config": source,
        "placement": compiled.placement,
        "lane_width": compiled.plan.width,
        "k_blocks": compiled.plan.k_blocks,
        "parameters": summary["parameters"],
        "kernels_count": len(compiled.kernels),
        "origin": list(compiled.linked.origin),
        "colors_used": compiled.linked.colors_used,
        "hop_words": train.micro_batches * compiled.hop_words,
        "link_load_estimate": {"max": int(estimate.max()),
                               "mean": float(estimate[estimate > 0].mean()),
                               "total": int(estimate.sum()),
                               "hottest_links": hottest_links(estimate)},
        "throughput": {"unit": "tokens", "per_run": train.batch_size * train.seq_len},
        "precision": compiled.cfg.compile.precision,
        "model_flops": summary["flops"]["total"],
        "flops_by_phase": summary["flops"],
        "compile_seconds": compiled.seconds,
        **micro,
    }


def compile_config(config_path: str, placement: str | None = None) -> Compiled:
    """Compile the step of a config file into a Program (carrying `step_meta`) that runs the
    whole step: a step of several micro-batches, which runs its Program once per
    micro-batch, is refused."""
    cfg = load_config(config_path)
    if cfg.training.micro_batches > 1:
        raise UserError(f"{config_path}: training.micro_batch_size: the step runs its program "
                        f"once per micro-batch ({cfg.training.micro_batches} times), which a "
                        "program file does not hold; `run` and `train` run it")
    return compile_parsed(cfg, config_path, placement)


def compile_parsed(cfg: RunConfig, source: str, placement: str | None = None) -> Compiled:
    """Compile the step of a parsed config that `source` names. A placement that does not
    exist, or a step too large for this machine's memory, is refused before anything is
    built."""
    if placement is not None and placement not in PLACEMENTS:
        raise UserError(f"--placement: unknown strategy {placement!r}; one of "
                        f"{', '.join(PLACEMENTS)}")
    if cfg.compile.mode == "weight_streaming":
        raise UserError(f"{source}: compile.mode: weight_streaming steps are built and run by "
                        "`run` (compile, simulate and train take layer-pipelined steps)")
    require(step_footprint(cfg, reference=False), source)
    compiled = compile_step(cfg, placement)
    compiled.linked.program.meta = step_meta(source, compiled)
    return compiled


def simulate_program(program: Program, wafer: WaferConfig, *, max_cycles: int | None = None,
                     progress: Callable[[int], None] | None = None, threads: int | None = None,
                     interruptible: bool = False) -> tuple[SimResult, dict[str, Any]]:
    """Run `program` on `threads` host threads (default: every core; the counters do not
    depend on it) and report its counters (`wse_sim.report.run_report`). A run stopped by
    `max_cycles` or (with `interruptible`) Ctrl-C raises SimulationStopped holding the
    partial report (`wse_sim.report.partial_report`). The engine's compile, on a first
    run, is timed on its own (`host_engine_seconds`), not as simulation."""
    engine_seconds = prepare_engine(wafer)
    started = time.perf_counter()
    try:
        result = simulate(program, wafer, max_cycles=max_cycles, progress=progress,
                          threads=threads, interruptible=interruptible)
    except SimulationStopped as stop:
        _attach_partial_report(stop, program, wafer, stop.result.stats, started)
        raise
    report = run_report(program, wafer, result.stats, time.perf_counter() - started)
    report["host_engine_seconds"] = engine_seconds
    return result, report


def _attach_partial_report(stop: SimulationStopped, program: Program, wafer: WaferConfig,
                           stats: Stats, started: float) -> None:
    """Give `stop` the partial report of the run (counted by `stats`) begun at `started`."""
    stop.report = partial_report(
        program, wafer, stats, stop.result.running(), time.perf_counter() - started,
        {"cycle": stop.cycle, "reason": stop.reason, "message": str(stop)})


def simulate_step(compiled: Compiled, *, max_cycles: int | None = None,
                  progress: Callable[[int], None] | None = None, threads: int | None = None,
                  interruptible: bool = False) -> tuple[StepRun, dict[str, Any]]:
    """Run the compiled step on its batch, micro-batch after micro-batch (`wse_sim.step`),
    and report its counters, as `simulate_program` a program's."""
    program, wafer = compiled.linked.program, compiled.cfg.wafer
    engine_seconds = prepare_engine(wafer)
    started = time.perf_counter()
    try:
        step = run_micro_batches(compiled, Loaded(program, wafer, threads=threads),
                                 BatchCode(compiled), WaferState(0, {}), compiled.batch,
                                 max_cycles=max_cycles, progress=progress,
                                 interruptible=interruptible)
    except StepStopped as stop:
        _attach_partial_report(stop, program, wafer, stop.stats, started)
        raise
    report = run_report(program, wafer, step.stats, time.perf_counter() - started)
    report["host_engine_seconds"] = engine_seconds
    return step, report


def check_report(check: CheckResult) -> dict[str, Any]:
    """The check as strict JSON data: a loss or error that is not finite (the numbers
    overflowed) and an unbounded tolerance are null, with the reason in `null_reasons`
    (shaped like the report: {"loss_sim": why, "tensors": {name: why}, ...})."""
    overflow = "not finite: the simulated or the reference values overflowed"
    nulls: dict[str, Any] = {}
    tensor_nulls: dict[str, str] = {}
    tolerance_nulls: dict[str, str] = {}
    report = {"passed": check.passed, "failures": check.failures(),
              "tolerance": check.tolerance,
              **_finite({"loss_sim": check.loss_sim, "loss_ref": check.loss_ref}, overflow,
                        nulls),
              "results_sha256": check.digest,
              "tensors": _finite(check.errors, overflow, tensor_nulls),
              "tolerances": _finite(check.tolerances, "unbounded: the reference update is zero",
                                    tolerance_nulls),
              "float32_judged": check.float32_judged}
    nulls.update((key, reasons) for key, reasons in (("tensors", tensor_nulls),
                                                      ("tolerances", tolerance_nulls)) if reasons)
    if nulls:
        report["null_reasons"] = nulls
    return report


def _finite(values: dict[str, float], why: str, reasons: dict[str, str]
            ) -> dict[str, float | None]:
    """`values` with each non-finite one null and `why` in `reasons` under its name."""
    reasons.update((name, why) for name, value in values.items() if not math.isfinite(value))
    return {name: None if name in reasons else value for name, value in values.items()}


def run_step(config_path: str, placement: str | None = None, max_cycles: int | None = None,
             progress: Callable[[int], None] | None = None, threads: int | None = None,
             interruptible: bool = False) -> dict[str, Any]:
    """Compile, simulate (on `threads` host threads) and check one step; the report as a
    JSON-ready dict. A stopped simulation raises SimulationStopped (`simulate_program`)."""
    return run_parsed(load_config(config_path), config_path, placement, max_cycles, progress,
                      threads, interruptible)


def run_parsed(cfg: RunConfig, source: str, placement: str | None = None,
               max_cycles: int | None = None, progress: Callable[[int], None] | None = None,
               threads: int | None = None, interruptible: bool = False) -> dict[str, Any]:
    """`run_step` for a parsed config that `source` names."""
    if cfg.compile.mode == "weight_streaming":
        if placement is not None:
            raise UserError("--placement: weight streaming lays the step out itself (a "
                            "sequence per PE row, a feature slice per column)")
        return run_weight_streaming(cfg, source, max_cycles, progress, threads, interruptible)
    compiled = compile_parsed(cfg, source, placement)
    # After compiling, which names the op and PE of a model too large for the wafer, and
    # before the simulation, not after it: the reference needs the most memory.
    require(step_footprint(compiled.cfg, reference=True), source)
    step, report = simulate_step(compiled, max_cycles=max_cycles, progress=progress,
                                 threads=threads, interruptible=interruptible)
    reference = reference_step(compiled.cfg, compiled.params, compiled.batch, np.float64)
    check = compare(step.results, reference, compiled.params, compiled.cfg.training,
                    precision=compiled.cfg.compile.precision,
                    float32_reference=lambda: reference_step(
                        compiled.cfg, compiled.params, compiled.batch, np.float32))
    report["check"] = check_report(check)
    return report


def run_weight_streaming(cfg: RunConfig, source: str, max_cycles: int | None = None,
                         progress: Callable[[int], None] | None = None,
                         threads: int | None = None, interruptible: bool = False
                         ) -> dict[str, Any]:
    """One training step of `cfg` in weight-streaming mode (`compiler.streaming.gpt`):
    build it, simulate it with the memory service at the edge, apply the optimizer in the
    service, check every result against float64 and report, besides the counters, the
    service's time, each layer pass's modelled bound, the measured timeline and a
    projection at the model's whole context."""
    plan(cfg)  # the wafer's limits first: they name the config's field
    require(step_footprint(cfg, reference=True), source)
    params, batch = init_params(cfg), make_batch(cfg)
    started = time.perf_counter()
    step = build_step(cfg, params, batch.tokens, batch.targets)
    # its code and the weights it streams, which the graph's estimate above does not know
    require(program_bytes(step.program), source)
    summary = build_graph(cfg).summary()
    tokens = step.shape.tokens
    step.program.meta = {"config": source, "mode": "weight_streaming",
                         "parameters": summary["parameters"],
                         "throughput": {"unit": "tokens", "per_run": tokens},
                         "precision": "fp32", "model_flops": summary["flops"]["total"],
                         "flops_by_phase": summary["flops"],
                         "compile_seconds": time.perf_counter() - started}
    wafer = cfg.wafer
    result, report = simulate_program(step.program, wafer, max_cycles=max_cycles,
                                      progress=progress, threads=threads,
                                      interruptible=interruptible)
    grads, token_losses = step.gradients(result.port_words, params)
    held = {name: np.asarray(p, np.float32) for name, p in params.items()}
    state = init_state(cfg.training.optimizer, held, np.float32)
    updated, after = apply_update(cfg.training, held, grads, state)
    simulated = {"loss": np.array([[token_losses.mean()]]),
                 **{name: read_tensor(layout, result.sram, name)
                    for name, layout in step.program.tensors.items()},
                 **{grad_name(p): grads[p] for p in params},
                 **{updated_name(p): updated[p] for p in params}}
    simulated["logits"] = simulated.pop("lm_head.out")
    if cfg.training.optimizer == "adamw":
        simulated[updated_name(STEP_TENSOR)] = np.array([[after.step]], np.float64)
        for p in params:
            for name, moments in zip(moment_names(p), (after.m, after.v), strict=True):
                simulated[updated_name(name)] = moments[p]
    reference = reference_step(cfg, params, batch, np.float64)
    report["check"] = check_report(compare(simulated, reference, params, cfg.training))
    report["weight_streaming"] = _streaming_report(step, result, wafer, cfg,
                                                   {p: v.size for p, v in params.items()})
    report["tokens_per_second"] = report["weight_streaming"]["tokens_per_second"]
    return report


def _streaming_report(step: Step, result: SimResult, wafer: WaferConfig, cfg: RunConfig,
                      sizes: dict[str, int]) -> dict[str, Any]:
    """The weight-streaming section of a step's report (`run_weight_streaming`); `sizes`
    are the parameters' element counts."""
    shape = step.shape
    tokens = shape.tokens
    timeline = step.timeline(result.port_marks)
    wafer_end = max(result.cycles, *result.port_last_cycle.values())
    arrived = {f"{entry['layer']} {entry['pass']}": entry["end"] for entry in timeline
               if entry["stream"] == "gradients out"}  # by pass
    updates = update_queue([(name.rsplit(" ", 1)[0], arrived[name] / wafer.clock_hz,
                             sum(sizes[p] for p in params))
                            for name, params in step.completed().items()], wafer)
    step_seconds = max(wafer_end / wafer.clock_hz, updates[-1]["end_seconds"])
    phases = [{"layer": layer.name, "pass": "backward" if backward else "forward",
               "parallel": layer.parallel, **asdict(cost), "cycles": cost.cycles,
               "bound": cost.bound}
              for layer in step.linear_layers() for backward in (False, True)
              for cost in [phase_cost(layer, tokens, shape.batch, shape.cols, wafer,
                                      backward=backward)]]
    try:
        p = project(cfg.model, cfg.model.n_ctx, wafer)
        joules = events_joules(p.events, wafer)
        projection = {"tokens": p.tokens, "rows": p.rows, "cols": p.cols, "cycles": p.cycles,
                      "step_seconds": p.seconds, "tokens_per_second": p.tokens_per_second,
                      "bound": p.bound(), "energy_per_token_joules": joules / p.tokens,
                      "average_power_watts": joules / p.seconds}
    except UserError as err:
        projection = {"error": str(err)}
    projection["what"] = (
        f"projected, not simulated: one sequence of the model's context (n_ctx = "
        f"{cfg.model.n_ctx} tokens) spread over every row of the wafer, the linear layers only "
        "(attention across PE rows is not built: the simulated step keeps a sequence per "
        "row), by the cost model (compiler.streaming.projection)")
    return {
        "rows": shape.batch, "cols": shape.cols, "tokens": tokens, "ring_slots": step.slots,
        "simulated": ("every block, the embedding and the LM head with its cross-entropy, "
                      "forward and backward, cycle by cycle: no block's cycles are reused"),
        "wafer_seconds": wafer_end / wafer.clock_hz,
        "optimizer_seconds": update_seconds(sum(sizes.values()), wafer),
        "exposed_update_seconds": step_seconds - wafer_end / wafer.clock_hz,
        "step_seconds": step_seconds,
        "tokens_per_second": tokens / step_seconds,
        "wafer_tokens_per_second": tokens / (wafer_end / wafer.clock_hz),
        "service_updates": updates,
        "modelled_cycles": sum(phase["cycles"] for phase in phases),
        "phases": phases,
        "timeline": timeline,
        "projection": projection,
    }


def run_linear_stack(layers: list[LinearLayer], x: np.ndarray, weights: dict[str, np.ndarray],
                     dy: np.ndarray, *, rows: int, cols: int, wafer: WaferConfig,
                     training: TrainingConfig, precision: Precision = "fp32",
                     threads: int | None = None) -> tuple[SimResult, dict[str, Any]]:
    """One weight-streaming step of a stack of linear layers (`compiler.streaming.linear`):
    build it on `rows` x `cols` PEs, simulate it with the memory service at the edge, apply
    the optimizer in the service, check everything against float64 and report, besides the
    counters, the time the service adds and each layer pass's modelled bound. `mixed`: the
    weights stream in fp16 (the service rounds its fp32 master copy)."""
    stack = build_stack(layers, x, weights, dy, rows=rows, cols=cols, wafer=wafer,
                        precision=precision)
    tokens = len(x)
    stack.program.meta = {"throughput": {"unit": "tokens", "per_run": tokens},
                          "parameters": sum(layer.k * layer.n for layer in layers)}
    result, report = simulate_program(stack.program, wafer, threads=threads)
    grads = stack.gradients(result.port_words)
    initial = {name: np.asarray(w, np.float32).astype(np.float64) for name, w in weights.items()}
    updated, _ = apply_update(training, initial, grads,
                              init_state(training.optimizer, initial, np.float32))
    expected_update, _ = optimizer_step(training, initial, grads,
                                        init_state(training.optimizer, initial))
    simulated = {name: read_tensor(layout, result.sram, name)
                 for name, layout in stack.program.tensors.items()}
    simulated |= {f"dw:{name}": grad for name, grad in grads.items()}
    expected = linear_reference(layers, x, weights, dy, precision)
    errors = {name: relative_error(simulated[name], expected[name]) for name in expected}
    tolerances = dict.fromkeys(errors, TOLERANCE)
    step_errors, step_tolerances = update_checks(updated, initial, expected_update,
                                                 UpdateRule.of(training), TOLERANCE)
    errors |= step_errors
    tolerances |= step_tolerances
    # The wafer's part ends when the last gradient word has reached the service (the edge's
    # latency after the fabric drained); the service updates each layer once its gradient
    # is complete, one layer after another, and what is left at the wafer's end is exposed.
    wafer_seconds = max(result.cycles, *result.port_last_cycle.values()) / wafer.clock_hz
    timeline = stack.timeline(result.port_marks)
    sizes = {layer.name: layer.k * layer.n for layer in layers}
    updates = update_queue([(entry["layer"], entry["end"] / wafer.clock_hz, sizes[entry["layer"]])
                            for entry in timeline if entry["stream"] == "gradients out"], wafer)
    exposed = max(updates[-1]["end_seconds"] - wafer_seconds, 0.0)
    phases = [{"layer": layer.name, "pass": "backward" if backward else "forward",
               "parallel": layer.parallel, **asdict(cost), "cycles": cost.cycles,
               "bound": cost.bound}
              for i, backward in stack.passes() for layer in [layers[i]]
              for cost in [phase_cost(layer, tokens, rows, cols, wafer, backward=backward,
                                      precision=precision)]]
    report["weight_streaming"] = {
        "rows": rows, "cols": cols, "precision": precision, "ring_slots": stack.slots,
        "wafer_seconds": wafer_seconds,
        "optimizer_seconds": update_seconds(sum(w.size for w in initial.values()), wafer),
        "exposed_update_seconds": exposed,
        "step_seconds": wafer_seconds + exposed,
        "tokens_per_second": tokens / (wafer_seconds + exposed),
        "modelled_cycles": sum(phase["cycles"] for phase in phases),
        "phases": phases,
        "timeline": timeline,
        "service_updates": updates,
    }
    report["check"] = {"passed": all(errors[n] <= tolerances[n] for n in errors),
                       "tensors": errors, "tolerances": tolerances}
    return result, report
