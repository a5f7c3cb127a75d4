"""Which placement wins: every strategy on gpt_tiny and gpt_small, compiled, simulated, checked.

    python benchmarks/placement.py [--models gpt_tiny gpt_small] [--strategies linear ...]
                                   [--out benchmarks/out]

Prints one row per (model, strategy): hop-words (words x hops between kernel centres, the
placement's own objective) and its ratio to `linear`, the busiest link measured by the
simulation (and the compiler's estimate), the colors the routes needed, compile seconds,
simulated cycles, tokens/s, and whether the numerical check passed. A strategy whose
placement cannot be routed with the wafer's colors is a row saying so, not a crash.
Writes placement.csv and placement.png (hop-words and cycles per strategy, relative to
linear) into --out.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from compiler.placement import STRATEGIES
from wse_sim.errors import UserError
from wse_sim.pipeline import run_step

ROOT = Path(__file__).resolve().parents[1]

COLUMNS = ("model", "strategy", "hop_words", "hop_vs_linear", "max_link", "max_link_estimate",
           "colors", "compile_s", "cycles", "cycles_vs_linear", "tokens_per_s", "check")


def measure(model: str, strategy: str) -> dict:
    row: dict = {"model": model, "strategy": strategy}
    try:
        report = run_step(str(ROOT / "models" / f"{model}.yaml"), strategy)
    except UserError as err:
        row["check"] = f"error: {err}"
        return row
    row.update(hop_words=report["hop_words"], max_link=report["max_link_load"],
               max_link_estimate=report["link_load_estimate"]["max"],
               colors=report["colors_used"], compile_s=round(report["compile_seconds"], 2),
               cycles=report["cycles"], tokens_per_s=round(report["tokens_per_second"]),
               check="passed" if report["check"]["passed"] else "FAILED")
    return row


def add_ratios(rows: list[dict]) -> None:
    """hop-words and cycles of each row relative to the same model's `linear` row."""
    linear = {r["model"]: r for r in rows if r["strategy"] == "linear" and "cycles" in r}
    for row in rows:
        base = linear.get(row["model"])
        if base is None or "cycles" not in row:
            continue
        row["hop_vs_linear"] = round(row["hop_words"] / base["hop_words"], 3)
        row["cycles_vs_linear"] = round(row["cycles"] / base["cycles"], 3)


def print_table(rows: list[dict]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in COLUMNS}
    print("  ".join(c.ljust(widths[c]) for c in COLUMNS))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in COLUMNS))


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
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = parser.parse_args()
    rows = []
    for model in args.models:
        for strategy in args.strategies:
            rows.append(measure(model, strategy))
            print(f"{model} {strategy}: {rows[-1].get('cycles', '-')} cycles, "
                  f"{rows[-1]['check']}", file=sys.stderr, flush=True)
    add_ratios(rows)
    print_table(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "placement.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / "placement.png")
    print(f"wrote {out / 'placement.csv'} and {out / 'placement.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
