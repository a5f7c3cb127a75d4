"""`python -m wse_sim plot RUN.json [--out DIR]`: the five PNGs of a run (see wse_sim.plots)."""

from __future__ import annotations

import argparse

HELP = ("Draw a run's pictures (utilization, link traffic, placement, SRAM, timeline) as PNGs "
        "from the RUN.json the run command wrote.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="RUN.json written by the run command")
    parser.add_argument("--out", default=None,
                        help="folder for the PNGs (default: the folder of RUN.json)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from wse_sim.outputs import check_outputs
    from wse_sim.plots import PLOT_FILES, plot_file

    out = args.out if args.out is not None else str(Path(args.run).parent)
    check_outputs(folders={"--out": (out, PLOT_FILES)}, inputs=(args.run,))
    for path in plot_file(args.run, out):
        print(path)
    return 0
