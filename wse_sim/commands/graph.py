"""`python -m wse_sim graph CONFIG [--json]`: op counts, parameters and FLOPs of one step."""

from __future__ import annotations

import argparse

HELP = "Build the training-step graph of a config; print op counts, parameters and FLOPs."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config YAML (e.g. models/gpt_small.yaml)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from compiler.config import load_config
    from compiler.footprint import graph_footprint
    from compiler.gpt import build_graph
    from wse_sim.hostmem import require
    from wse_sim.outputs import strict_json

    cfg = load_config(args.config)
    require(graph_footprint(cfg), args.config)
    summary = build_graph(cfg).summary()
    if args.json:
        print(strict_json(summary))
        return 0
    print(f"{args.config}: {summary['ops']:,} ops, {summary['tensors']:,} tensors")
    print(f"parameters: {summary['parameters']:,}")
    print("ops by kind:")
    for kind, count in summary["ops_by_kind"].items():
        print(f"  {kind:<20} {count:>8,}")
    print("FLOPs per step:")
    for phase, flops in summary["flops"].items():
        label = "matmul (fwd + bwd)" if phase == "matmul" else phase
        print(f"  {label:<20} {flops:>22,}")
    print(
        f"bytes read / written by ops: {summary['bytes']['read']:,} / "
        f"{summary['bytes']['written']:,}"
    )
    return 0
