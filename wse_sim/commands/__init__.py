"""One module per CLI sub-command. Each exposes `HELP`, `add_arguments(parser)` and
`run(args) -> int`; `wse_sim.cli` collects the modules listed in COMMANDS."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn

COMMANDS = ("run", "compile", "simulate", "graph", "schema", "traffic", "plot", "sweep",
            "train", "generate")


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line and a pointer to --help (argparse's
    own usage block of a command with many options runs to ten lines)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists the "
                     "options)\n")


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in low..high (no upper bound if high is None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"must be {bounds} (got {value})")
        return value
    return parse
