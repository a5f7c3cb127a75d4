"""Cerebras-GPT in weight-streaming mode: the family's seven configs on WSE-2 and WSE-3.

    python benchmarks/cerebras_gpt.py [--simulate cerebras_gpt_111m] [--rows 2] [--tokens-per-row 2]
                                      [--out benchmarks/out]

What a step is here: the linear layers of every block (the fused QKV projection, the
attention output projection, the MLP's two layers) and the tied LM head, forward and
backward, each on the whole fabric in weight-streaming mode (`compiler.streaming`): the
weights stream in through the north edge at the wafer's `edge_bytes_per_s`, dW streams
out, the memory service applies SGD. Attention's products and softmax, LayerNorm, GELU,
the embedding and the cross-entropy are not lowered in this mode yet; the table gives
the share of the step's FLOPs the linear layers carry (the rest is left out of the time).

Two kinds of rows, labelled:

* `simulated` (the configs in --simulate): each distinct layer (one block's four, the
  head) run cycle by cycle at the model's real widths on all the wafer's columns and
  --rows rows, --tokens-per-row tokens a row, checked against float64. Blocks are
  identical, so one block is simulated and its cycles count n_layers times; each layer
  pays the edge latency once in its own run.
* `projected`: one sequence of the model's context (n_ctx tokens) a step on every row of the
  wafer, by the cost model (`phase_cost`; `tests/test_streaming.py` holds it within 12% of
  simulated runs) and the event model (`phase_events`) for the energy. A config whose
  buffers do not fit a PE's SRAM at that shape is a row naming the resource.

Columns: parameters, training FLOPs per token (the graph's count: every op), the linear
layers' share of them, tokens per step, cycles per step, tokens/s per system, the bound
(the share of the step's cycles in layer passes bound by weight I/O, compute or the row
collectives), energy per token (dynamic: FMAs, SRAM, hops, edge bytes; `wse_sim.energy`)
and the average power it implies. Writes cerebras_gpt.csv into --out.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from compiler.config import TrainingConfig, load_config
from compiler.gpt import build_graph
from compiler.streaming.projection import (
    bound_shares,
    model_layers,
    project,
    step_seconds,
    step_total,
)
from wse_sim.energy import events_joules
from wse_sim.errors import UserError
from wse_sim.hardware import WaferConfig
from wse_sim.outputs import check_outputs, write_file
from wse_sim.pipeline import run_linear_stack

ROOT = Path(__file__).resolve().parents[1]
CSV = "cerebras_gpt.csv"
COLUMNS = ("config", "wafer", "precision", "mode", "parameters", "flops_per_token",
           "linear_share",
           "tokens", "cycles", "tokens_per_s", "bound", "joules_per_token", "power_w",
           "note")


def projected(cfg, wafer: WaferConfig, base: dict, precision: str) -> dict:
    model, train = cfg.model, cfg.training
    tokens = train.batch_size * train.seq_len
    row = {**base, "mode": "projected", "tokens": tokens}
    try:
        p = project(model, tokens, wafer, precision)
    except UserError as err:
        return {**row, "note": f"does not fit: {err}"}
    joules = events_joules(p.events, wafer)
    return {**row, "cycles": p.cycles, "tokens_per_s": round(p.tokens_per_second),
            "bound": p.bound(), "joules_per_token": joules / tokens,
            "power_w": joules / p.seconds, "note": f"{p.rows} x {p.cols} PEs, cost model"}


def simulated(name: str, cfg, wafer: WaferConfig, base: dict, rows: int,
              tokens_per_row: int, precision: str) -> dict:
    model = cfg.model
    tokens = rows * tokens_per_row
    block, head = model_layers(model)
    rng = np.random.default_rng(0)
    training = TrainingConfig(batch_size=1, seq_len=2, lr=cfg.training.lr)
    cycles: dict[str, float] = {}
    modelled: dict[str, float] = {}
    joules: dict[str, float] = {}
    bounds: Counter = Counter()
    passed = True
    for layer in (*block, head):
        x = rng.standard_normal((tokens, layer.k)).astype(np.float32)
        w = (0.02 * rng.standard_normal((layer.k, layer.n))).astype(np.float32)
        dy = rng.standard_normal((tokens, layer.n)).astype(np.float32)
        result, report = run_linear_stack([layer], x, {layer.name: w}, dy, rows=rows,
                                          cols=wafer.width, wafer=wafer, training=training,
                                          precision=precision)
        cycles[layer.name] = result.cycles
        modelled[layer.name] = (report["weight_streaming"]["modelled_cycles"]
                                + wafer.edge_latency_cycles)
        joules[layer.name] = report["energy_joules"]
        passed &= report["check"]["passed"]
        repeat = 1 if layer is head else model.n_layers
        for phase in report["weight_streaming"]["phases"]:
            bounds[phase["bound"]] += repeat * phase["cycles"]
        print(f"  {name} {precision} {layer.name} ({layer.k} x {layer.n}): "
              f"{result.cycles:,} cycles, "
              f"{report['host_simulation_seconds']:.0f} s host, check "
              f"{'passed' if report['check']['passed'] else 'FAILED'}", file=sys.stderr,
              flush=True)
    total = step_total(cycles, model.n_layers)
    seconds = step_seconds(total, head, wafer)
    step_joules = step_total(joules, model.n_layers)
    return {**base, "mode": "simulated", "tokens": tokens, "cycles": round(total),
            "tokens_per_s": round(tokens / seconds),
            "bound": bound_shares(bounds),
            "joules_per_token": step_joules / tokens, "power_w": step_joules / seconds,
            "note": f"{rows} x {wafer.width} PEs, check {'passed' if passed else 'FAILED'}; "
                    f"cost model {step_total(modelled, model.n_layers) / total - 1:+.1%}"}


def print_table(rows: list[dict]) -> None:
    def cell(row: dict, column: str) -> str:
        value = row.get(column, "")
        if isinstance(value, float):
            return f"{value:.3g}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)
    shown = [c for c in COLUMNS if c != "note"]
    widths = {c: max(len(c), *(len(cell(r, c)) for r in rows)) for c in shown}
    print("  ".join(c.ljust(widths[c]) for c in shown) + "  note")
    for row in rows:
        print("  ".join(cell(row, c).ljust(widths[c]) for c in shown) + "  " + row.get("note", ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulate", nargs="*", default=["cerebras_gpt_111m"],
                        help="configs also simulated cycle by cycle (at a short shape)")
    parser.add_argument("--rows", type=int, default=2, help="PE rows of a simulated run")
    parser.add_argument("--tokens-per-row", type=int, default=2)
    parser.add_argument("--precisions", nargs="*", choices=["fp32", "mixed"],
                        default=["fp32", "mixed"],
                        help="mixed: the weights stream in fp16 (dW leaves in fp32)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = parser.parse_args()
    for option in ("rows", "tokens_per_row"):  # (the CLI's int_in is not the package's API)
        if getattr(args, option) < 1:
            parser.error(f"argument --{option.replace('_', '-')}: must be >= 1 (got "
                         f"{getattr(args, option)})")
    unknown = sorted(set(args.simulate) - {path.stem for path in configs()})
    if unknown:
        parser.error(f"--simulate: no config {', '.join(unknown)} (one of "
                     f"{', '.join(path.stem for path in configs())})")
    try:
        check_outputs(folders={"--out": (args.out, [CSV])})
        table = family_table(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_table(table)
    lines = io.StringIO()
    writer = csv.DictWriter(lines, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(table)
    path = write_file(Path(args.out) / CSV, lines.getvalue().encode())
    print(f"wrote {path}")
    return 0


def configs() -> list[Path]:
    """The family's config files, smallest model first."""
    return sorted((ROOT / "models").glob("cerebras_gpt_*.yaml"),
                  key=lambda p: load_config(str(p)).model.d_model)


def family_table(args: argparse.Namespace) -> list[dict]:
    """Every config on both wafers at every precision asked for: the rows of the table."""
    table = []
    for path in configs():
        for preset in ("wse2", "wse3"):
            cfg = load_config(str(path))
            # One sequence of the model's whole context a step (111M's config shortens its
            # own for the simulated run of `python -m wse_sim run`).
            full = cfg.training.model_copy(update={"batch_size": 1, "seq_len": cfg.model.n_ctx})
            cfg = cfg.model_copy(update={"wafer": WaferConfig(preset=preset), "training": full})
            summary = build_graph(cfg).summary()
            tokens = cfg.training.batch_size * cfg.training.seq_len
            block, head = model_layers(cfg.model)
            linear = 6 * tokens * step_total({layer.name: layer.k * layer.n
                                           for layer in (*block, head)}, cfg.model.n_layers)
            common = {"config": path.stem, "wafer": preset,
                      "parameters": summary["parameters"],
                      "flops_per_token": round(summary["flops"]["total"] / tokens),
                      "linear_share": round(linear / summary["flops"]["total"], 3)}
            for precision in args.precisions:
                base = {**common, "precision": precision}
                if path.stem in args.simulate:
                    table.append(simulated(path.stem, cfg, cfg.wafer, base, args.rows,
                                           args.tokens_per_row, precision))
                table.append(projected(cfg, cfg.wafer, base, precision))
            print(f"{path.stem} on {preset}: done", file=sys.stderr, flush=True)
    return table


if __name__ == "__main__":
    sys.exit(main())
