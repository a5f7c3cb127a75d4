"""The measured timeline of one weight-streaming run: Cerebras-GPT-111M's MLP (768 -> 3072,
3072 -> 768) forward and backward on all of WSE-2's 750 columns.

    python benchmarks/streaming_timeline.py [--rows 2] [--tokens-per-row 2] [--preset wse2]
                                            [--out benchmarks/out]

Every bar is measured: the ports mark the first and the last word of each pass's weights
(entering the fabric, the first column's first word to the last column's last) and of each
layer's dW (reaching the memory service), `SimResult.port_marks`. Between a pass's weights
and the next pass's lie its products and its row collectives; the ring prefetches the next
pass's first weight vectors meanwhile. Prints the timeline and the modelled bound of each
pass; writes streaming_timeline.png into --out.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from compiler.config import TrainingConfig
from compiler.streaming.linear import LinearLayer
from wse_sim.errors import UserError
from wse_sim.hardware import WaferConfig
from wse_sim.outputs import check_outputs, write_file
from wse_sim.pipeline import run_linear_stack

ROOT = Path(__file__).resolve().parents[1]
PNG = "streaming_timeline.png"
COLOURS = {"weights in": "tab:blue", "gradients out": "tab:orange"}


def draw(timeline: list[dict], phases: list[dict], cycles: int, title: str) -> bytes:
    """The timeline as PNG bytes."""
    fig = Figure(figsize=(11, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = [f"{phase['layer']} {phase['pass']} ({phase['bound']})" for phase in phases]
    for entry in timeline:
        row = labels.index(next(label for label in labels
                                if label.startswith(f"{entry['layer']} {entry['pass']} ")))
        offset = 0.2 if entry["stream"] == "gradients out" else -0.2
        ax.barh(row + offset, entry["end"] - entry["start"] + 1, left=entry["start"],
                height=0.35, color=COLOURS[entry["stream"]])
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlim(0, cycles)
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
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--tokens-per-row", type=int, default=2)
    parser.add_argument("--preset", choices=["wse2", "wse3"], default="wse2")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = parser.parse_args()
    for option in ("rows", "tokens_per_row"):  # (the CLI's int_in is not the package's API)
        if getattr(args, option) < 1:
            parser.error(f"argument --{option.replace('_', '-')}: must be >= 1 (got "
                         f"{getattr(args, option)})")
    try:
        check_outputs(folders={"--out": (args.out, [PNG])})
        return timeline(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def timeline(args: argparse.Namespace) -> int:
    """Run the MLP, print and draw its timeline; 0 if the check passed."""
    wafer = WaferConfig(preset=args.preset)
    layers = [LinearLayer("fc", 768, 3072), LinearLayer("fc2", 3072, 768)]
    tokens = args.rows * args.tokens_per_row
    rng = np.random.default_rng(0)
    x = rng.standard_normal((tokens, 768)).astype(np.float32)
    weights = {layer.name: (0.02 * rng.standard_normal((layer.k, layer.n))).astype(np.float32)
               for layer in layers}
    dy = rng.standard_normal((tokens, 768)).astype(np.float32)
    result, report = run_linear_stack(layers, x, weights, dy, rows=args.rows, cols=wafer.width,
                                      wafer=wafer, training=TrainingConfig(
                                          batch_size=1, seq_len=2, lr=1e-3))
    streaming = report["weight_streaming"]
    print(f"{result.cycles:,} cycles, {tokens} tokens on {args.rows} x {wafer.width} PEs, "
          f"check {'passed' if report['check']['passed'] else 'FAILED'}, host "
          f"{report['host_simulation_seconds']:.0f} s")
    for entry in streaming["timeline"]:
        print(f"  {entry['layer']:4} {entry['pass']:9} {entry['stream']:14} "
              f"{entry['start']:>9,} .. {entry['end']:>9,}")
    for phase in streaming["phases"]:
        print(f"  {phase['layer']:4} {phase['pass']:9} modelled {phase['cycles']:>9,} cycles: "
              f"weight I/O {phase['weight_io']:,}, compute {phase['compute']:,}, fabric "
              f"{phase['fabric']:,} -> {phase['bound']}")
    path = write_file(Path(args.out) / PNG, draw(
        streaming["timeline"], streaming["phases"], result.cycles,
        f"Weight streaming, Cerebras-GPT-111M's MLP on {args.preset} ({args.rows} x "
        f"{wafer.width} PEs, {tokens} tokens): measured at the edge ports"))
    print(f"wrote {path}")
    return 0 if report["check"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
