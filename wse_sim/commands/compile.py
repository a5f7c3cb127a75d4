"""`python -m wse_sim compile CONFIG -o STEP.npz`: compile one training step into a
program file (the linked program, where each tensor lives, the wafer it is for)."""

from __future__ import annotations

import argparse

HELP = ("Compile one GPT training step for the wafer into a program file that `simulate` "
        "runs.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config YAML (see models/)")
    parser.add_argument("-o", "--output", required=True, metavar="FILE",
                        help="program file to write (.npz)")
    parser.add_argument("--placement", metavar="NAME",
                        help="placement strategy (overrides compile.placement)")
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def run(args: argparse.Namespace) -> int:
    from wse_sim.outputs import check_outputs
    from wse_sim.pipeline import compile_config
    from wse_sim.program import save_program
    from wse_sim.progress import Progress

    check_outputs(files={"-o": args.output}, inputs=(args.config,))
    with Progress(not args.quiet):
        compiled = compile_config(args.config, args.placement)
    program = compiled.linked.program
    save_program(program, args.output, compiled.cfg.wafer)
    switched = sum(1 for route in program.routes.values() if route.positions)
    relays = sum(1 for region in program.regions if region.label == "relay")
    sharing = (f", {switched} (PE, color)s taken in turn by a forward and a backward stream"
               if switched else "") + (f", {relays} relays" if relays else "")
    print(f"{args.config}: {len(compiled.kernels)} kernels on {program.width} x "
          f"{program.height} PEs ({len(program.pes)} used, {compiled.linked.colors_used} "
          f"colors{sharing}), {len(program.tensors)} tensors, compiled in "
          f"{compiled.seconds:.1f} s -> {args.output}")
    return 0
