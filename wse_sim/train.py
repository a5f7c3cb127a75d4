"""The training loop: many steps of one compiled program on the simulated wafer, each
checked against float64.

One program. The step is compiled, placed and routed once (`wse_sim.pipeline`) and loaded
into the engine once (validated and assembled: `wse_sim.engine.Loaded`). Every step then
runs that program with
* the weights and optimizer state the previous step left in SRAM (`compiler.state`), and
* the code of the kernels that read the batch rebuilt for the step's batch
  (`compiler.batch`: the host's per-step rewrite of the input descriptors);
nothing else changes between steps. Each step is simulated from cycle 0 to its end, a
step of several micro-batches one micro-batch after another (`wse_sim.step`).

Batches: step s trains on the windows `compiler.data.training_batch(..., s)`, a function
of the seed and s only, so a resumed run trains on the batches the uninterrupted run would.

Checks, every step:
* the step's loss, logits and gradients against the float64 reference's step from the
  same weights (`compiler.reference`), the update (weights, AdamW moments and step count)
  against the float64 optimizer applied to the wafer's own gradient (`compiler.check`);
* a float64 run trained alongside from the same initial weights on the same batches, whose
  loss is recorded next to the wafer's; at the end the weights' drift, the largest relative
  difference ||wafer - float64|| / ||float64|| of any parameter, says how far many float32
  steps took the wafer from it.

Validation loss (every `val_every` steps, and after the last): the mean cross-entropy of
the wafer's weights (and of the float64 run's) on `val_windows` windows of the validation
split, evenly spaced, computed by the float64 reference's forward pass (the wafer's weights
are exact in float64): a measurement of the model, not a simulated step.

State between steps is committed at the end of a step in one assignment, so an interrupt
(KeyboardInterrupt) anywhere leaves the last completed step's state: `checkpoint()` then
holds it, and `--resume` continues from it bit for bit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from compiler.batch import BatchCode
from compiler.check import compare, relative_error
from compiler.checkpoint import Checkpoint, load_checkpoint
from compiler.config import RunConfig
from compiler.data import Dataset, load_dataset, training_batch, validation_batches
from compiler.inputs import Batch
from compiler.optim import OptimizerState, init_state
from compiler.reference import mean_loss, reference_step
from compiler.state import WaferState, initial_state, read_state, training_state
from wse_sim.engine import Loaded, prepare_engine
from wse_sim.errors import UserError
from wse_sim.pipeline import compile_parsed
from wse_sim.step import run_micro_batches

VAL_EVERY = 25  # default: steps between validation losses
VAL_WINDOWS = 128  # default: validation windows evaluated
STEP_COLUMNS = ("loss", "loss_reference", "loss_float64", "cycles", "host_seconds",
                "check_passed", "check_worst", "rewritten")
VAL_COLUMNS = ("val_step", "val_loss", "val_loss_float64")
CHECKPOINT_FILE = "checkpoint.npz"  # the files a run writes into its folder, as one set
SUMMARY_FILE = "summary.json"
CURVE_FILE = "loss.png"
OUTPUT_FILES = (CHECKPOINT_FILE, SUMMARY_FILE, CURVE_FILE)


@dataclass(frozen=True)
class RunState:
    """Everything a step changes: the wafer's state, the float64 run and the history
    (columns `STEP_COLUMNS` and `VAL_COLUMNS`, lists of numbers)."""

    wafer: WaferState
    float64_params: dict[str, np.ndarray]
    float64_state: OptimizerState
    history: dict[str, list[float]]


@dataclass(frozen=True)
class StepResult:
    """What one step did, for the step's line."""

    step: int  # its index (0 = the first step)
    loss: float
    loss_reference: float
    loss_float64: float
    cycles: int
    host_seconds: float
    check_passed: bool
    failures: list[str]


class Training:
    """A training run of `cfg` (named `source`) on the data `data_path` (None: the config's
    or the default corpus), its files in `out_dir`; `resume` continues the checkpoint
    there."""

    def __init__(self, cfg: RunConfig, source: str, out_dir: str | Path,
                 data_path: str | None = None, *, resume: bool = False,
                 val_every: int = VAL_EVERY, val_windows: int = VAL_WINDOWS) -> None:
        self.cfg, self.source = cfg, source
        self.val_every = val_every
        if not resume and (Path(out_dir) / CHECKPOINT_FILE).exists():
            raise UserError(f"--out {out_dir}: holds the checkpoint of a run; --resume "
                            "continues it, another --out starts a new one")
        self.dataset: Dataset = load_dataset(cfg, out_dir, data_path)
        self.data = {"source": self.dataset.source, "tokenizer": cfg.data.tokenizer,
                     "train_tokens": len(self.dataset.train),
                     "validation_tokens": len(self.dataset.validation)}
        checkpoint = self._resumable(Path(out_dir) / CHECKPOINT_FILE) if resume else None
        self.compiled = compile_parsed(cfg, source)
        self.parameters = self.compiled.graph.parameters
        self.code = BatchCode(self.compiled)
        self.loaded = Loaded(self.compiled.linked.program, cfg.wafer)
        prepare_engine(cfg.wafer)  # (so that numba's first compile is no step's host time)
        windows = np.concatenate(validation_batches(self.dataset.validation, 1,
                                                    cfg.training.seq_len))
        pick = np.linspace(0, len(windows) - 1, min(val_windows, len(windows)))
        self.val_windows = windows[np.unique(pick.round().astype(int))]
        self.interrupted_at: int | None = None  # the cycle a step's simulation reached
        if checkpoint is not None:
            self.run = RunState(checkpoint.wafer, checkpoint.float64_params,
                                checkpoint.float64_state,
                                {name: checkpoint.history[name].tolist()
                                 for name in STEP_COLUMNS + VAL_COLUMNS})
        else:
            params = self.compiled.params
            program = self.compiled.linked.program
            self.run = RunState(initial_state(program, training_state(program, self.parameters)),
                                params, init_state(cfg.training.optimizer, params),
                                {name: [] for name in STEP_COLUMNS + VAL_COLUMNS})
            self.validate()

    @property
    def step(self) -> int:
        """Steps done."""
        return self.run.wafer.step

    def _resumable(self, path: Path) -> Checkpoint:
        """The checkpoint at `path`, if it continues this run (same config and data)."""
        if not path.exists():
            raise UserError(f"--resume: no checkpoint {path} to continue")
        checkpoint = load_checkpoint(path)
        differs = _first_difference(checkpoint.config, self.cfg.model_dump(mode="json"))
        if differs is None and checkpoint.data != self.data:
            differs = f"data ({checkpoint.data['source']} there, {self.data['source']} here)"
        if differs is not None:
            raise UserError(f"--resume: {path} is another run: {differs}")
        return checkpoint

    def batch(self, step: int) -> Batch:
        train = self.cfg.training
        return Batch.from_windows(training_batch(self.dataset.train, train.batch_size,
                                                 train.seq_len, train.seed, step))

    def train_step(self, progress: Callable[[int], None] | None = None) -> StepResult:
        """Simulate and check the next step; commit its state (module docstring)."""
        started = time.perf_counter()
        run, cfg, linked = self.run, self.cfg, self.compiled.linked
        batch = self.batch(self.step)
        self.interrupted_at = 0

        def reached(cycle: int) -> None:
            self.interrupted_at = cycle
            if progress is not None:
                progress(cycle)

        step = run_micro_batches(self.compiled, self.loaded, self.code, run.wafer, batch,
                                 progress=reached)
        graph = self.compiled.graph
        params, state = run.wafer.params(graph), run.wafer.optimizer(graph)
        check = compare(step.results, reference_step(cfg, params, batch, state=state), params,
                        cfg.training, state, cfg.compile.precision,
                        lambda: reference_step(cfg, params, batch, np.float32, state=state))
        float64 = reference_step(cfg, run.float64_params, batch, state=run.float64_state)
        seconds = time.perf_counter() - started
        worst = max((err / check.tolerances[name] if math.isfinite(err) else math.inf)
                    for name, err in check.errors.items())
        history = {name: list(values) for name, values in run.history.items()}
        for name, value in (("loss", check.loss_sim), ("loss_reference", check.loss_ref),
                            ("loss_float64", float64.loss), ("cycles", step.cycles),
                            ("host_seconds", seconds), ("check_passed", check.passed),
                            ("check_worst", worst), ("rewritten", step.rewritten)):
            history[name].append(float(value))
        self.run = RunState(read_state(linked.program, step.last.sram,
                                       training_state(linked.program, self.parameters),
                                       self.step + 1),
                            float64.updated, float64.state, history)
        self.interrupted_at = None
        return StepResult(self.step - 1, check.loss_sim, check.loss_ref, float64.loss,
                          step.cycles, seconds, check.passed, check.failures())

    def validation_due(self, steps: int) -> bool:
        """Whether the validation loss is due now, in a run of `steps` steps."""
        done = self.run.history["val_step"]
        return (self.step % self.val_every == 0 or self.step == steps) and (
            not done or done[-1] != self.step)

    def validate(self) -> tuple[float, float]:
        """The validation loss of the wafer's weights and of the float64 run's, recorded
        under the current step."""
        wafer = mean_loss(self.cfg, self.run.wafer.params(self.compiled.graph),
                          self.val_windows)
        float64 = mean_loss(self.cfg, self.run.float64_params, self.val_windows)
        history = {name: list(values) for name, values in self.run.history.items()}
        for name, value in (("val_step", self.step), ("val_loss", wafer),
                            ("val_loss_float64", float64)):
            history[name].append(float(value))
        self.run = replace(self.run, history=history)
        return wafer, float64

    def checkpoint(self) -> Checkpoint:
        run = self.run
        return Checkpoint(self.cfg.model_dump(mode="json"), self.data, run.wafer,
                          run.float64_params, run.float64_state,
                          {name: np.asarray(values, np.float64)
                           for name, values in run.history.items()})

    def drift(self) -> tuple[float, str | None]:
        """The largest relative difference of a parameter between the wafer and the float64
        run, and which parameter it is (None before any step)."""
        if not self.step:
            return 0.0, None
        wafer = self.run.wafer.params(self.compiled.graph)
        errors = {p: relative_error(wafer[p], self.run.float64_params[p])
                  for p in self.parameters}
        worst = max(errors, key=errors.__getitem__)
        return errors[worst], worst

    def summary(self, *, partial: bool) -> dict[str, Any]:
        """The run as JSON-ready data (README: the train command's summary)."""
        h, train = self.run.history, self.cfg.training
        tokens = train.batch_size * train.seq_len
        cycles = int(sum(h["cycles"]))
        seconds = cycles / self.cfg.wafer.clock_hz
        nulls: dict[str, str] = {}

        def finite(name: str, value: float | None) -> float | None:
            if value is None or math.isfinite(value):
                return value
            nulls[name] = "not finite: the loss overflowed"
            return None

        errors = [abs(a - b) / abs(b) for a, b in zip(h["loss"], h["loss_reference"],
                                                      strict=True)]
        drift, worst = self.drift()
        step0 = h["loss"][0] if h["loss"] else None
        val = h["val_loss"][-1] if h["val_loss"] else None
        summary: dict[str, Any] = {
            "config": self.source,
            "optimizer": train.optimizer,
            "partial": partial,
            "steps": self.step,
            "data": self.data,
            "tokens_per_step": tokens,
            "total_cycles": cycles,
            "simulated_seconds": seconds,
            "tokens_per_second": tokens * self.step / seconds if seconds else None,
            "host_seconds": sum(h["host_seconds"]),
            "step0_loss": finite("step0_loss", step0),
            "final_val_loss": finite("final_val_loss", val),
            "val_loss_drop": finite("val_loss_drop", 1 - val / step0
                                    if step0 is not None and val is not None else None),
            "max_loss_error": finite("max_loss_error", max(errors, default=0.0)),
            "checks_passed": all(h["check_passed"]),
            "weight_drift": {"max": finite("weight_drift", drift), "parameter": worst},
            "rewritten_instructions_per_step": (sum(h["rewritten"]) / self.step
                                                if self.step else None),
            "steps_detail": [
                {"step": s, "loss": finite(f"steps_detail[{s}].loss", h["loss"][s]),
                 "loss_reference": finite(f"steps_detail[{s}].loss_reference",
                                          h["loss_reference"][s]),
                 "loss_float64": finite(f"steps_detail[{s}].loss_float64",
                                        h["loss_float64"][s]),
                 "cycles": int(h["cycles"][s]), "check_passed": bool(h["check_passed"][s]),
                 "host_seconds": h["host_seconds"][s]}
                for s in range(self.step)],
            "validation": [
                {"step": int(s), "loss": finite(f"validation[{i}].loss", v),
                 "loss_float64": finite(f"validation[{i}].loss_float64", f)}
                for i, (s, v, f) in enumerate(zip(h["val_step"], h["val_loss"],
                                                  h["val_loss_float64"], strict=True))],
        }
        if summary["tokens_per_second"] is None:
            nulls["tokens_per_second"] = "no step was simulated"
        if nulls:
            summary["null_reasons"] = nulls
        return summary



def _first_difference(old: Any, new: Any, path: str = "") -> str | None:
    """The first dotted field where two config dumps differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(old.keys() | new.keys()):
            found = _first_difference(old.get(key), new.get(key), f"{path}{key}.")
            if found is not None:
                return found
        return None
    return None if old == new else f"{path.rstrip('.')} is {old!r} there, {new!r} here"
