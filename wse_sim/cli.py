"""`python -m wse_sim COMMAND ...`: the command line. User errors end in one line, exit 2;
Ctrl-C in one line, exit 130 (during a simulation, `run` and `simulate` stop it at a cycle
boundary and report what ran); a closed stdout (`... | head -1`) is no error."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
from typing import Any, TextIO

from wse_sim.commands import COMMANDS, OneLineParser
from wse_sim.errors import UserError

INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process Ctrl-C stopped


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
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
    from wse_sim import outputs

    outputs.written.clear()
    stdout = sys.stdout
    sys.stdout = _ClosedPipeProof(stdout)
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted_line(outputs.written), file=sys.stderr)
        return INTERRUPTED
    finally:
        sys.stdout = stdout


def interrupted_line(written: list[Any]) -> str:
    """What a Ctrl-C stopped: every file is either one this command wrote whole (named
    here) or untouched (`wse_sim.outputs` writes atomically)."""
    if not written:
        return "interrupted: no file written"
    return f"interrupted: wrote only {', '.join(map(str, written))}"


class _ClosedPipeProof:
    """stdout for a command: once the reader has gone (`python -m wse_sim ... | head -1`),
    what the command still prints is dropped, and it goes on to write its files and
    return its exit code. (Python would raise BrokenPipeError at the next print, and
    again when it flushes stdout at exit: the file descriptor is pointed at a nameless
    temporary file, so those flushes succeed.)"""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._divert()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._divert()

    def _divert(self) -> None:
        sink = tempfile.TemporaryFile()  # unlinked at once: nothing is left behind
        os.dup2(sink.fileno(), self._stream.fileno())
        sink.close()
        self._stream.flush()  # what the pipe refused goes to the sink

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)
