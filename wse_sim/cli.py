"""`python -m wse_sim COMMAND ...`: the command line. User errors end in one line, exit 2."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from wse_sim.commands import COMMANDS
from wse_sim.errors import UserError


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line and a pointer to --help (argparse's
    own usage block of a command with many options runs to ten lines)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists the "
                     "options)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m wse_sim",
        description="Cycle-level wafer-scale engine simulator and GPT training-step compiler.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"wse_sim.commands.{name}")
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
