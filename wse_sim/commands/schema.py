"""`python -m wse_sim schema`: the JSON Schema of a run config YAML."""

from __future__ import annotations

import argparse

from wse_sim.commands import int_in

HELP = "Print the JSON Schema of a run config (sections model, training, wafer, compile)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--indent", type=int_in(0, 16), default=2,
                        help="JSON indentation, 0 to 16 (default 2)")


def run(args: argparse.Namespace) -> int:
    from compiler.config import RunConfig
    from wse_sim.outputs import strict_json

    print(strict_json(RunConfig.model_json_schema(), indent=args.indent))
    return 0
