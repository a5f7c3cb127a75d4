"""Which placement wins: every strategy on gpt_tiny and gpt_small, compiled, simulated, checked.

    python benchmarks/placement.py [--models gpt_tiny gpt_small] [--strategies linear ...]
                                   [--workers N | --scheduler ADDRESS] [--out benchmarks/out]

The grid (models x strategies) runs as a sweep (wse_sim/sweep.py): one task per point on
a LocalCluster of --workers processes (one per core by default) or on the Dask cluster
of --scheduler. Prints one row per (model, strategy): hop-words (words x hops between
kernel centres, the placement's own objective) and its ratio to `linear`, the busiest link
measured by the simulation (and the compiler's estimate), the colors the routes needed,
compile seconds, simulated cycles, tokens/s, and whether the numerical check passed. A
strategy whose placement cannot be routed with the wafer's colors is a row saying so, not
a crash. Writes placement.csv and placement.png (hop-words and cycles per strategy,
relative to linear) into --out.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

from compiler.placement import STRATEGIES
from wse_sim.errors import UserError
from wse_sim.sweep import SweepSpec, format_table, make_sweep, run_sweep

ROOT = Path(__file__).resolve().parents[1]

COLUMNS = ("model", "strategy", "hop_words", "hop_vs_linear", "max_link", "max_link_estimate",
           "colors", "compile_s", "cycles", "cycles_vs_linear", "tokens_per_s", "check")


def measure(models: list[str], strategies: list[str], scheduler: str | None,
            workers: int | None) -> list[dict]:
    """One row per (model, strategy), from a sweep over the models' configs."""
    spec = SweepSpec(configs=[f"{model}.yaml" for model in models], placements=strategies)
    sweep = make_sweep(spec, ROOT / "models", "benchmarks/placement.py")
    rows = []
    for result in run_sweep(sweep, scheduler=scheduler, workers=workers):
        row: dict = {"model": Path(result["config"]).stem, "strategy": result["placement"]}
        if result["error"] is not None:
            row["check"] = f"error: {result['error']}"
        else:
            row.update(hop_words=result["hop_words"], max_link=result["max_link_load"],
                       max_link_estimate=result["max_link_estimate"],
                       colors=result["colors_used"],
                       compile_s=round(result["compile_seconds"], 2), cycles=result["cycles"],
                       tokens_per_s=round(result["tokens_per_second"]),
                       check="passed" if result["check_passed"] else "FAILED")
        rows.append(row)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """hop-words and cycles of each row relative to the same model's `linear` row."""
    linear = {r["model"]: r for r in rows if r["strategy"] == "linear" and "cycles" in r}
    for row in rows:
        base = linear.get(row["model"])
        if base is None or "cycles" not in row:
            continue
        row["hop_vs_linear"] = round(row["hop_words"] / base["hop_words"], 3)
        row["cycles_vs_linear"] = round(row["cycles"] / base["cycles"], 3)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        done = [r for r in rows if r["model"] == model and "hop_vs_linear" in r]
        xs = range(len(done))
        ax.bar([x - 0.2 for x in xs], [r["hop_vs_linear"] for r in done], 0.4,
               label="hop-words / linear")
        ax.bar([x + 0.2 for x in xs], [r["cycles_vs_linear"] for r in done], 0.4,
               label="cycles / linear")
        ax.set_xticks(list(xs), [r["strategy"] for r in done])
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_title(f"{model}: placement strategies")
        ax.set_ylabel("relative to linear")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt_tiny", "gpt_small"])
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, help="LocalCluster processes (one per core)")
    where.add_argument("--scheduler", metavar="ADDRESS", help="a running Dask scheduler")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = parser.parse_args()
    started = time.perf_counter()
    try:
        rows = measure(args.models, args.strategies, args.scheduler, args.workers)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    add_ratios(rows)
    print(format_table(rows, list(COLUMNS)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "placement.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / "placement.png")
    print(f"{len(rows)} runs in {seconds:.1f} s; wrote {out / 'placement.csv'} and "
          f"{out / 'placement.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
