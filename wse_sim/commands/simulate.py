"""`python -m wse_sim simulate PROGRAM.npz`: run a saved program (from `compile`, or from
another compiler that writes the format of `wse_sim.program.save_program`) and report
its counters."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from wse_sim.commands import int_in
from wse_sim.errors import SimulationStopped

HELP = ("Simulate a saved program cycle by cycle on the wafer it was compiled for and "
        "report cycles, utilization, SRAM and fabric traffic per region.")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `simulate` and `run` share."""
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    parser.add_argument("--plot", metavar="DIR", help="also write the five PNG plots")
    parser.add_argument("--max-cycles", type=int_in(1), metavar="N",
                        help="stop after N cycles (a partial report, exit 2)")
    add_threads_argument(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """--threads, shared with `traffic`."""
    parser.add_argument("--threads", type=int_in(1), metavar="N",
                        help="host threads sharing the fabric's rows (default: every core); "
                             "results do not depend on it")


def check_output_arguments(args: argparse.Namespace, inputs: tuple[str, ...],
                           **files: str | None) -> None:
    """Check --json, --plot and the command's other output `files` (option -> path) before
    any work (`wse_sim.outputs.check_outputs`)."""
    from wse_sim.outputs import check_outputs

    plot_files: tuple[str, ...] = ()
    if args.plot is not None:
        from wse_sim.plots import PLOT_FILES  # matplotlib: only when plots are asked for

        plot_files = PLOT_FILES
    check_outputs(files={"--json": args.json, **files},
                  folders={"--plot": (args.plot, plot_files)}, inputs=inputs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("program", help="program file written by `compile` (.npz)")
    parser.add_argument("--tensors", metavar="FILE",
                        help="also write every named tensor of the program, read from the "
                             "final SRAM, as one .npz")
    add_output_arguments(parser)


def write_outputs(args: argparse.Namespace, report: dict[str, Any]) -> None:
    from wse_sim.plots import write_plots
    from wse_sim.report import write_json

    if args.json:
        write_json(args.json, report)
    if args.plot:
        for path in write_plots(report, args.plot, source=args.json or "report"):
            print(f"wrote {path}")


def report_stopped(args: argparse.Namespace, stop: SimulationStopped) -> int:
    """A simulation stopped by --max-cycles or Ctrl-C: its partial report on stdout and to
    --json (marked partial; plots, tensors and the check need a finished run and are not
    written), one line `stopped at cycle N: ...` on stderr; exit 130 for Ctrl-C, else 2."""
    from wse_sim.report import format_report, write_json

    assert stop.report is not None  # the pipeline attaches it
    print(format_report(stop.report))
    if args.json:
        write_json(args.json, stop.report)
    print(stop, file=sys.stderr)
    return 130 if stop.reason == "interrupted" else 2


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from wse_sim.errors import UserError
    from wse_sim.hardware import WaferConfig
    from wse_sim.hostmem import program_bytes, require
    from wse_sim.outputs import write_file
    from wse_sim.pipeline import simulate_program
    from wse_sim.program import read_program_file, read_tensor
    from wse_sim.progress import Progress
    from wse_sim.report import format_report
    from wse_sim.userinput import check_user_file

    check_output_arguments(args, (args.program,), **{"--tensors": args.tensors})
    check_user_file(args.program, "program")  # not a FIFO (np.load would wait on it)
    program, wafer = read_program_file(args.program)
    if args.tensors and not program.tensors:
        raise UserError(f"{args.program}: the program names no tensors to write (--tensors)")
    if wafer is None:
        wafer = WaferConfig()
    require(program_bytes(program), args.program)
    try:
        with Progress(not args.quiet) as progress:
            result, report = simulate_program(program, wafer, max_cycles=args.max_cycles,
                                              progress=progress, threads=args.threads,
                                              interruptible=True)
    except SimulationStopped as stop:
        return report_stopped(args, stop)
    print(format_report(report))
    if args.tensors:
        tensors = {name: read_tensor(layout, result.sram, name)
                   for name, layout in program.tensors.items()}
        write_file(args.tensors, lambda fh: np.savez(fh, **tensors))
    write_outputs(args, report)
    return 0
