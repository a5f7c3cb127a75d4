"""How one gpt_small step scales: cycles, tokens/s and utilization at growing PE budgets
(strong scaling, batch 2) and at growing batches (the default budget).

    python benchmarks/scaling.py [--model gpt_small] [--budgets 1100 2000 4000 8000 16000]
                                 [--batches 2 8 32] [--micro-batch 2] [--placement NAME]
                                 [--out benchmarks/out]

Each point compiles the model with `compile.pes` (or `training.batch_size`) overridden,
simulates it and checks it against the float64 reference. A batch larger than
--micro-batch sequences runs as micro-batches of that many (`training.micro_batch_size`:
one after another, gradients accumulating; gpt_small's SRAM holds 2 sequences' rows at the
default budget). --placement overrides the config's strategy at every point. Prints one
row per point: the budget, the batch and its micro-batches,
the lane width the sizer chose and the PEs used, cycles, tokens/s, the mean compute
utilization of the used PEs, host seconds (compile + simulation) and the check; a point
that cannot be compiled (a model too large for a PE's SRAM) is a row with its one-line
error. Writes scaling.csv and scaling.png (cycles against PEs; tokens/s against batch)
into --out.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import yaml

from compiler.config import PLACEMENTS
from wse_sim.errors import UserError
from wse_sim.pipeline import run_step

ROOT = Path(__file__).resolve().parents[1]

COLUMNS = ("series", "budget", "batch", "micro_batches", "lane_width", "pes_used", "cycles",
           "tokens_per_s", "utilization", "host_s", "check")


def measure(model: str, out: Path, series: str, *, budget: int | None, batch: int,
            micro_batch: int, placement: str | None) -> dict:
    """Compile, simulate and check `model` with the budget, batch and (unless None)
    placement overridden, the batch in micro-batches of at most `micro_batch` sequences."""
    config = yaml.safe_load((ROOT / "models" / f"{model}.yaml").read_text())
    config["training"]["batch_size"] = batch
    if batch > micro_batch:
        config["training"]["micro_batch_size"] = micro_batch
    config["compile"] = {**config.get("compile", {}), "lane_width": None, "pes": budget}
    path = out / f"{model}_{series}_{budget or 'default'}_b{batch}.yaml"
    path.write_text(yaml.safe_dump(config))
    row: dict = {"series": series, "budget": budget or "", "batch": batch,
                 "micro_batches": max(batch // micro_batch, 1)}
    try:
        report = run_step(str(path), placement)
    except UserError as err:
        row["check"] = f"error: {err}"
        return row
    row.update(lane_width=report["lane_width"], pes_used=report["pes_used"],
               cycles=report["cycles"], tokens_per_s=round(report["tokens_per_second"]),
               utilization=round(report["pe_utilization"], 3),
               host_s=round(report["compile_seconds"] + report["host_simulation_seconds"], 1),
               check="passed" if report["check"]["passed"] else "FAILED")
    return row


def print_table(rows: list[dict]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in COLUMNS}
    print("  ".join(c.ljust(widths[c]) for c in COLUMNS))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in COLUMNS))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (pes_ax, batch_ax) = plt.subplots(1, 2, figsize=(11, 4))
    done = [r for r in rows if r["series"] == "budget" and "cycles" in r]
    pes_ax.loglog([r["pes_used"] for r in done], [r["cycles"] for r in done], "o-",
                  label="simulated")
    if done:
        first = done[0]
        pes_ax.loglog([r["pes_used"] for r in done],
                      [first["cycles"] * first["pes_used"] / r["pes_used"] for r in done], "--",
                      color="grey", label="linear speed-up")
    pes_ax.set_xlabel("PEs used")
    pes_ax.set_ylabel("cycles per step")
    pes_ax.set_title("strong scaling (batch 2)")
    pes_ax.legend()
    done = [r for r in rows if r["series"] == "batch" and "cycles" in r]
    batch_ax.plot([r["batch"] for r in done], [r["tokens_per_s"] for r in done], "o-")
    batch_ax.set_xlabel("batch size (sequences)")
    batch_ax.set_ylabel("tokens / s")
    batch_ax.set_title("batch scaling (default budget)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt_small")
    parser.add_argument("--budgets", nargs="*", type=int, default=[1100, 2000, 4000, 8000, 16000])
    parser.add_argument("--batches", nargs="*", type=int, default=[2, 8, 32])
    parser.add_argument("--micro-batch", type=int, default=2,
                        help="sequences per micro-batch of a larger batch (default 2)")
    parser.add_argument("--placement", choices=PLACEMENTS,
                        help="placement strategy (default: the config's)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = parser.parse_args()
    if args.micro_batch < 1:
        parser.error(f"argument --micro-batch: must be >= 1 (got {args.micro_batch})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    points = ([("budget", budget, 2) for budget in args.budgets]
              + [("batch", None, batch) for batch in args.batches])
    rows = []
    for series, budget, batch in points:
        rows.append(measure(args.model, out, series, budget=budget, batch=batch,
                            micro_batch=args.micro_batch, placement=args.placement))
        print(f"{series} {budget or 'default'} batch {batch}: {rows[-1].get('cycles', '-')} "
              f"cycles, {rows[-1]['check']}", file=sys.stderr, flush=True)
    print_table(rows)
    with open(out / "scaling.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / "scaling.png")
    print(f"wrote {out / 'scaling.csv'} and {out / 'scaling.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
