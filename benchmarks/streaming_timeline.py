"""The measured timeline of a weight-streaming training step: per pass (the embedding, every
block, the LM head with its cross-entropy; forward, then backward), when its weights
entered the fabric and when its gradients reached the memory service.

    python benchmarks/streaming_timeline.py [--report RUN.json | --config CONFIG]
                                            [--out benchmarks/out]

--report draws the report `python -m wse_sim run CONFIG --json RUN.json` wrote for a config
in weight-streaming mode; --config (default models/cerebras_gpt_111m.yaml, about 15
minutes) runs the step first. Every bar is measured: the edge ports mark the first and the
last word of each pass's weights (entering the fabric, the first column's first word to the
last column's last) and of its gradients (reaching the memory service),
`SimResult.port_marks`. Between a pass's weights and the next pass's lie its products, its
row collectives and its local ops; the ring prefetches the next pass's first weight
vectors meanwhile. Each pass is labelled with what bounds its linear layers by the cost
model (their cycles' largest share). Prints the timeline; writes
weight_streaming_timeline.png into --out (the README's picture: --out docs).
"""

from __future__ import annotations

import argparse
import io
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from compiler.config import load_config
from wse_sim.errors import UserError
from wse_sim.outputs import check_outputs, write_file
from wse_sim.pipeline import run_step
from wse_sim.plots import load_run

ROOT = Path(__file__).resolve().parents[1]
PNG = "weight_streaming_timeline.png"
COLOURS = {"weights in": "tab:blue", "gradients out": "tab:orange"}


def pass_bounds(phases: list[dict]) -> dict[str, str]:
    """Per pass ("h0 forward", "head backward"...): the bound of most of its linear layers'
    modelled cycles."""
    by_pass: dict[str, Counter] = {}
    for phase in phases:
        part = "head" if phase["layer"] == "lm_head" else phase["layer"].split(".")[0]
        by_pass.setdefault(f"{part} {phase['pass']}", Counter())[phase["bound"]] += \
            phase["cycles"]
    return {name: bounds.most_common(1)[0][0] for name, bounds in by_pass.items()}


def draw(timeline: list[dict], bounds: dict[str, str], cycles: int, title: str) -> bytes:
    """The timeline as PNG bytes, a row per pass in order."""
    passes = list(dict.fromkeys(f"{e['layer']} {e['pass']}" for e in timeline))
    fig = Figure(figsize=(11, 1.2 + 0.28 * len(passes)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for entry in timeline:
        row = passes.index(f"{entry['layer']} {entry['pass']}")
        offset = 0.2 if entry["stream"] == "gradients out" else -0.2
        ax.barh(row + offset, entry["end"] - entry["start"] + 1, left=entry["start"],
                height=0.35, color=COLOURS[entry["stream"]])
    ax.set_yticks(range(len(passes)), [f"{name} ({bounds[name]})" if name in bounds else name
                                       for name in passes], fontsize=8)
    ax.invert_yaxis()
    # (the last gradient words reach the service after the fabric drained)
    ax.set_xlim(0, max(cycles, *(e["end"] + 1 for e in timeline)))
    ax.set_xlabel("cycle")
    ax.set_title(title, fontsize=10)
    ax.legend(handles=[ax.barh(0, 0, color=c, label=k) for k, c in COLOURS.items()],
              loc="upper right")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    return png.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--report", help="a weight-streaming run's JSON report")
    source.add_argument("--config", default=str(ROOT / "models" / "cerebras_gpt_111m.yaml"),
                        help="a config in weight-streaming mode, run first")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = parser.parse_args()
    try:
        check_outputs(folders={"--out": (args.out, [PNG])})
        if not args.report and load_config(args.config).compile.mode != "weight_streaming":
            raise UserError(f"--config {args.config}: compile.mode is not weight_streaming")
        report = load_run(args.report) if args.report else run_step(args.config)
        return timeline(report, args.report or args.config, args.out)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def timeline(report: dict[str, Any], source: str, out: str) -> int:
    """Print and draw the report's timeline; 0 if its check passed."""
    streaming = report.get("weight_streaming")
    if not isinstance(streaming, dict) or "timeline" not in streaming:
        raise UserError(f"{source}: not a weight-streaming run (no weight_streaming.timeline; "
                        "compile.mode: weight_streaming)")
    passed = report["check"]["passed"]
    print(f"{report['cycles']:,} cycles, {streaming['tokens']} tokens on {streaming['cols']} x "
          f"{streaming['rows']} PEs, check {'passed' if passed else 'FAILED'}")
    for entry in streaming["timeline"]:
        print(f"  {entry['layer']:9} {entry['pass']:9} {entry['stream']:14} "
              f"{entry['start']:>11,} .. {entry['end']:>11,}")
    config = Path(str(report.get("config", source))).stem
    path = write_file(Path(out) / PNG, draw(
        streaming["timeline"], pass_bounds(streaming["phases"]), report["cycles"],
        f"Weight streaming, {config} on {report['wafer'].get('preset') or 'its wafer'} "
        f"({streaming['cols']} x {streaming['rows']} PEs, {streaming['tokens']} tokens): "
        "measured at the edge ports"))
    print(f"wrote {path}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
