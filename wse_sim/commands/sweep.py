"""`python -m wse_sim sweep SWEEP.yaml`: a grid of training steps as tasks on dask.distributed
(wse_sim/sweep.py describes the file); one CSV and one JSON of results."""

from __future__ import annotations

import argparse
from pathlib import Path

from wse_sim.commands import int_in

HELP = ("Run a grid of training steps (configs x placements x wafer, compile and training "
        "overrides) as tasks on a local or remote Dask cluster; write one CSV and one JSON.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="sweep file (YAML; see README 'Sweeps')")
    parser.add_argument("--out", default="out", metavar="DIR",
                        help="folder of the results, STEM.csv and STEM.json after the sweep "
                             "file's name (out)")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="run on the Dask cluster of this scheduler (tcp://host:8786) "
                             "instead of a LocalCluster")
    parser.add_argument("--workers", type=int_in(1), metavar="N",
                        help="LocalCluster worker processes (one per core, at most one per "
                             "point)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import time

    from wse_sim.errors import UserError
    from wse_sim.outputs import check_outputs
    from wse_sim.sweep import format_table, load_sweep, run_sweep, summary, write_results

    if args.scheduler and args.workers:
        raise UserError("--workers sizes a LocalCluster; with --scheduler the cluster has "
                        "its own workers")
    sweep = load_sweep(args.sweep)
    stem = Path(args.sweep).stem
    out = Path(args.out)
    csv_path, json_path = out / f"{stem}.csv", out / f"{stem}.json"
    check_outputs(folders={"--out": (args.out, [csv_path.name, json_path.name])},
                  inputs=[args.sweep])  # before the sweep runs, not after
    where = f"scheduler {args.scheduler}" if args.scheduler else "a LocalCluster"
    print(f"{args.sweep}: {len(sweep.points)} points on {where}")
    started = time.perf_counter()
    rows = run_sweep(sweep, scheduler=args.scheduler, workers=args.workers,
                     progress=not args.quiet)
    seconds = time.perf_counter() - started
    write_results(sweep, rows, csv_path, json_path)
    shown = [{**row, "tokens_per_second": _rounded(row["tokens_per_second"]),
              "pe_utilization": _rounded(row["pe_utilization"], 4),
              "check": "error" if row["error"] else
              "passed" if row["check_passed"] else "FAILED"} for row in rows]
    print(format_table(shown, ["point", "label", "cycles", "tokens_per_second",
                               "pe_utilization", "colors_used", "max_link_load", "check",
                               "error"]))
    counts = summary(rows)
    print(f"{counts['points']} points in {seconds:.1f} s: {counts['passed']} passed the check, "
          f"{counts['check_failed']} failed it, {counts['errors']} errors")
    print(f"wrote {csv_path} and {json_path}")
    return 0 if counts["passed"] == counts["points"] else 1


def _rounded(value: float | None, digits: int = 0) -> float | int | None:
    if value is None:
        return None
    return round(value, digits) if digits else round(value)
