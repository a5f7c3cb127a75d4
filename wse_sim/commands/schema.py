"""`python -m wse_sim schema`: the JSON Schema of a run config YAML."""

from __future__ import annotations

import argparse

HELP = "Print the JSON Schema of a run config (sections model, training, wafer, compile)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--indent", type=int, default=2, help="JSON indentation (default 2)")


def run(args: argparse.Namespace) -> int:
    import json

    from compiler.config import RunConfig

    print(json.dumps(RunConfig.model_json_schema(), indent=args.indent))
    return 0
