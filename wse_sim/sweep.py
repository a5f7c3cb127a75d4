"""Sweeps: a grid of training steps (run configs x placement strategies x wafer, compile and
training overrides), each point compiled, simulated and checked as an independent task on
dask.distributed: a LocalCluster on this machine, or a running cluster's scheduler.

A sweep file (YAML, `SweepSpec`; unknown keys are errors):

    configs: [../gpt_tiny.yaml]      # run configs, relative to the sweep file
    placements: [linear, anneal]     # strategies; omitted: each config's compile.placement
    wafer: [{}, {hop_latency: 2}]    # mappings merged into the config's wafer section
    compile: [{}, {seed: 1}]         # ... into its compile section
    training: [{}, {seed: 1}]        # ... into its training section
    max_cycles: 100000000            # optional: a point that needs more cycles fails

The grid is the Cartesian product in that order (configs outermost, training innermost);
point i is the i-th of it, its label the config's name and the axis values it takes, its
id a hash of its whole merged config (the same run has the same id in any sweep). Every
point's config is validated before any task starts, so a bad point is reported at once.
A task sends back `FIGURES` and `HOST_TIMES` only, never the report's per-PE grids. A
point that fails at run time (unroutable, does not fit, deadlock, max_cycles, or a worker
that died) is a row with its one-line error; the sweep goes on. Rows are in grid order
whatever order the tasks finish in, and apart from HOST_TIMES their content depends only
on the sweep.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from compiler.config import (
    CompileConfig,
    Placement,
    RunConfig,
    TrainingConfig,
    format_validation_error,
    parse_config,
    preset_beside,
    read_config_data,
)
from wse_sim.errors import UserError
from wse_sim.hardware import WaferConfig
from wse_sim.outputs import strict_json, write_files
from wse_sim.pipeline import run_parsed
from wse_sim.userinput import read_user_yaml

SECTIONS: dict[str, type[BaseModel]] = {
    "wafer": WaferConfig, "compile": CompileConfig, "training": TrainingConfig}

# What a task reports of its step (None where the point failed), then its host timings.
FIGURES = ("check_passed", "cycles", "simulated_seconds", "tokens_per_second",
           "pe_utilization", "pes_used", "colors_used", "hop_words", "fabric_wavelet_hops",
           "max_link_load", "max_link_estimate", "loss_sim")
HOST_TIMES = ("compile_seconds", "simulate_seconds", "host_seconds")

CONNECT_SECONDS = 30  # to reach a --scheduler
WORKER_WAIT_SECONDS = 60  # for a remote cluster's first worker

Overrides = dict[str, Any]


def _no_overrides() -> list[Overrides]:
    return [{}]


class SweepSpec(BaseModel):
    """A sweep file: base configs and the axes whose Cartesian product is the grid."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)  # no 2.0 for 2

    configs: list[StrictStr] = Field(
        min_length=1, description="Run config files, relative to the sweep file.")
    placements: list[Placement] | None = Field(
        default=None, min_length=1,
        description="Placement strategies; null: each config's compile.placement.")
    wafer: list[Overrides] = Field(
        default_factory=_no_overrides, min_length=1,
        description="Mappings merged into each config's wafer section ({}: as it is); a "
        "relative preset file is found beside the sweep file.")
    compile: list[Overrides] = Field(
        default_factory=_no_overrides, min_length=1,
        description="Mappings merged into each config's compile section.")
    training: list[Overrides] = Field(
        default_factory=_no_overrides, min_length=1,
        description="Mappings merged into each config's training section.")
    max_cycles: int | None = Field(
        default=None, gt=0, description="A point whose simulation needs more cycles fails.")

    @field_validator("wafer", "compile", "training")
    @classmethod
    def _known_fields(cls, axis: list[Overrides], info: ValidationInfo) -> list[Overrides]:
        # a misspelt field is named here, by its place in the axis, not once per point
        section = info.field_name
        for i, overrides in enumerate(axis):
            for key in overrides:
                if key not in SECTIONS[section].model_fields:
                    raise PydanticCustomError(
                        "unknown_field", "not a field of the {section} section",
                        {"field": f"{section}[{i}].{key}", "section": section})
        return axis

    @model_validator(mode="after")
    def _placement_named_once(self) -> SweepSpec:
        if self.placements is not None:
            for i, overrides in enumerate(self.compile):
                if "placement" in overrides:
                    raise PydanticCustomError(
                        "placement_twice", "the placements axis already sets it",
                        {"field": f"compile[{i}].placement"})
        return self


@dataclass(frozen=True)
class Point:
    """One run of the grid: its merged, validated config and how the sweep names it."""

    index: int
    id: str
    label: str
    config: str  # as the sweep file names it
    cfg: RunConfig


@dataclass(frozen=True)
class Sweep:
    source: str  # the sweep file, or whatever built the spec
    spec: SweepSpec
    points: list[Point]
    varied: list[str]  # "section.field" of every field an override axis sets

    @property
    def columns(self) -> list[str]:
        """Keys of a result row: the point, the effective value of every varied field, the
        error, the figures, the host timings."""
        return ["point", "id", "label", "config", "placement", *self.varied, "error",
                *FIGURES, *HOST_TIMES]


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file and every point of its grid; any problem raises a
    one-line UserError naming the file and the field (or the point)."""
    data = read_user_yaml(path, "sweep")
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping with keys {', '.join(SweepSpec.model_fields)}")
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as err:
        raise UserError(f"{path}: {format_validation_error(err)}") from None
    return make_sweep(spec, Path(path).parent, str(path))


def make_sweep(spec: SweepSpec, folder: Path, source: str) -> Sweep:
    """The grid of `spec`, paths relative to `folder`; each point's merged config validated
    (errors name `source` and the point)."""
    bases = []
    for i, name in enumerate(spec.configs):
        try:
            bases.append((name, read_config_data(folder / name)))
        except UserError as err:
            raise UserError(f"{source}: configs[{i}]: {err}") from None
    axes = [[("wafer", w) for w in spec.wafer], [("compile", c) for c in spec.compile],
            [("training", t) for t in spec.training]]
    points: list[Point] = []
    by_id: dict[str, Point] = {}
    grid = itertools.product(bases, spec.placements or [None], *axes)
    for index, ((name, data), placement, *overrides) in enumerate(grid):
        label = " ".join([Path(name).stem, *([placement] if placement else []),
                          *(f"{section}.{key}={value}" for section, values in overrides
                            for key, value in values.items())])
        sections = dict(overrides)
        sections["wafer"] = preset_beside(sections["wafer"], folder)
        if placement is not None:
            sections["compile"] = {**sections["compile"], "placement": placement}
        cfg = parse_config(_merged(data, sections), f"{source}: point {index} ({label})")
        point = Point(index, hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:12],
                      label, name, cfg)
        twin = by_id.setdefault(point.id, point)
        if twin is not point:
            raise UserError(f"{source}: points {twin.index} ({twin.label}) and {index} "
                            f"({label}) are the same run")
        points.append(point)
    varied = dict.fromkeys(f"{section}.{key}" for axis in axes for section, values in axis
                           for key in values)
    return Sweep(source, spec, points, list(varied))


def _merged(data: Any, overrides: dict[str, Overrides]) -> Any:
    """`data` (a config's mapping) with each section's overrides merged in; a section that
    is not a mapping is left for the config's validation to name."""
    if not isinstance(data, dict):
        return data
    merged = dict(data)
    for section, values in overrides.items():
        base = merged.get(section)
        if section == "wafer" and isinstance(base, str):
            base = {"preset": base}  # `wafer: wse2` is short for `wafer: {preset: wse2}`
        if values and (base is None or isinstance(base, dict)):
            merged[section] = {**(base or {}), **values}
    return merged


def run_point(cfg: RunConfig, label: str, max_cycles: int | None) -> dict[str, Any]:
    """A task: compile, simulate and check one point on a worker; its figures (or its
    one-line error) and host timings."""
    started = time.perf_counter()
    try:
        # one host thread: the sweep's points are what runs in parallel
        report = run_parsed(cfg, label, max_cycles=max_cycles, threads=1)
    except UserError as err:  # caught here so that workers do not log an expected failure
        return {"error": str(err), "host_seconds": time.perf_counter() - started}
    return {
        "error": None,
        "check_passed": report["check"]["passed"],
        "cycles": report["cycles"],
        "simulated_seconds": report["simulated_seconds"],
        "tokens_per_second": report["tokens_per_second"],
        "pe_utilization": report["pe_utilization"],
        "pes_used": report["pes_used"],
        "colors_used": report["colors_used"],
        "hop_words": report["hop_words"],
        "fabric_wavelet_hops": report["fabric_wavelet_hops"],
        "max_link_load": report["max_link_load"],
        "max_link_estimate": report["link_load_estimate"]["max"],
        "loss_sim": report["check"]["loss_sim"],
        "compile_seconds": report["compile_seconds"],
        "simulate_seconds": report["host_simulation_seconds"],
        "host_seconds": time.perf_counter() - started,
    }


def _quiet_logs() -> None:
    """Nothing from dask.distributed's loggers in this process but critical failures: what
    the cluster logs while it shuts down (after a Ctrl-C cancelled tasks and killed
    workers; or at the end, a worker's heartbeat racing the scheduler's close) is not news,
    and comes with tracebacks."""
    for name in ("distributed", "tornado"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def dask_client(scheduler: str | None, workers: int) -> Iterator[Any]:
    """A client of the cluster at `scheduler`, or of a LocalCluster of `workers`
    single-threaded processes (the engine holds the GIL, so threads would not help)."""
    from distributed import Client, LocalCluster

    if scheduler is None:
        # Its worker processes ignore Ctrl-C, which a terminal sends to all of them: this
        # process stops the sweep and the cluster (else each worker prints a traceback).
        # Only SIG_IGN survives the exec of a spawned process, so a Ctrl-C while the
        # workers start is lost. Its HTTP server is on any free local port: a default
        # 8787 may be taken (a warning).
        with _sigint_ignored():
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address="127.0.0.1:0")
        with cluster, Client(cluster) as client:
            try:
                yield client
            except KeyboardInterrupt:
                _quiet_logs()
                client.run(_quiet_logs)
                raise
            client.run(_quiet_logs)  # the workers, before the cluster closes
        return
    try:
        client = Client(scheduler, timeout=CONNECT_SECONDS)
    except (OSError, ValueError) as err:
        raise UserError(f"scheduler {scheduler}: cannot connect: {_one_line(err)}") from None
    with client:
        try:
            client.wait_for_workers(1, timeout=WORKER_WAIT_SECONDS)
        except TimeoutError:
            raise UserError(f"scheduler {scheduler}: no worker joined in "
                            f"{WORKER_WAIT_SECONDS} s (start one: dask worker {scheduler})"
                            ) from None
        yield client


def run_sweep(sweep: Sweep, *, scheduler: str | None = None, workers: int | None = None,
              progress: bool = True) -> list[dict[str, Any]]:
    """Run every point as a task (on the cluster at `scheduler`, else on a LocalCluster of
    `workers` processes, default one per core) with a progress bar on stderr; the rows in
    grid order, keys `sweep.columns`."""
    from distributed import as_completed
    from tqdm import tqdm

    workers = workers or min(os.cpu_count() or 1, len(sweep.points))
    outcomes: dict[int, dict[str, Any]] = {}
    with dask_client(scheduler, workers) as client:
        futures = {client.submit(run_point, p.cfg, p.label, sweep.spec.max_cycles,
                                 pure=False): p.index for p in sweep.points}
        with tqdm(total=len(futures), desc="sweep", unit="point", file=sys.stderr,
                  disable=None if progress else True) as bar:
            for future in as_completed(futures):
                try:
                    outcome = future.result()
                except Exception as err:  # a bug of ours or a dead worker: still one row
                    outcome = {"error": f"{type(err).__name__}: {_one_line(err)}"}
                outcomes[futures[future]] = outcome
                future.release()
                bar.update()
                bar.set_postfix(failed=sum(o["error"] is not None for o in outcomes.values()))
    return [_row(sweep, point, outcomes[point.index]) for point in sweep.points]


def _row(sweep: Sweep, point: Point, outcome: dict[str, Any]) -> dict[str, Any]:
    row = {"point": point.index, "id": point.id, "label": point.label, "config": point.config,
           "placement": point.cfg.compile.placement}
    for column in sweep.varied:
        section, key = column.split(".")
        row[column] = getattr(getattr(point.cfg, section), key)
    row["error"] = outcome["error"]
    return row | {column: outcome.get(column) for column in (*FIGURES, *HOST_TIMES)}


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def summary(rows: list[dict[str, Any]]) -> dict[str, int]:
    """How many points passed the check, failed it, or did not run to the end."""
    return {"points": len(rows),
            "passed": sum(r["check_passed"] is True for r in rows),
            "check_failed": sum(r["check_passed"] is False for r in rows),
            "errors": sum(r["error"] is not None for r in rows)}


def write_results(sweep: Sweep, rows: list[dict[str, Any]], csv_path: str | Path,
                  json_path: str | Path) -> None:
    """The rows as one CSV and one JSON file, written as a set (both or neither)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=sweep.columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    summary_json = strict_json({"sweep": sweep.source, **summary(rows), "rows": rows}, indent=1)
    write_files({csv_path: text.getvalue().encode(), json_path: summary_json.encode()})


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """`rows` as aligned text columns (a missing value is blank)."""
    cells = [[str(c) for c in columns]] + [
        ["" if row.get(c) is None else str(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True))
                     .rstrip() for line in cells)
