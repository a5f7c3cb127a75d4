"""`python -m wse_sim run CONFIG`: compile, simulate and check one GPT training step; the
same as `compile` then `simulate`, plus the check against the float64 reference."""

from __future__ import annotations

import argparse
from typing import Any

from wse_sim.commands.simulate import (
    add_output_arguments,
    check_output_arguments,
    write_outputs,
)

HELP = ("Compile one GPT training step for the wafer, simulate it cycle by cycle, check the "
        "numbers against the numpy reference and report where the cycles went.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config YAML (see models/)")
    parser.add_argument("--placement", metavar="NAME",
                        help="placement strategy (overrides compile.placement)")
    add_output_arguments(parser)


def format_check(check: dict[str, Any]) -> str:
    """The check's lines for a terminal: every tensor's error, worst first."""
    tolerances = check["tolerances"]
    lines = [f"check (relative error, tolerance {check['tolerance']:g}; an update's is "
             f"derived from fp32 rounding): loss sim {check['loss_sim']:.7f} ref "
             f"{check['loss_ref']:.7f}"]
    for name, err in sorted(check["tensors"].items(), key=lambda item: -item[1]):
        verdict = "ok" if err <= tolerances[name] else "FAIL"
        lines.append(f"  {name:<40} {err:.2e}  (<= {tolerances[name]:.2e})  {verdict}")
    passed = sum(err <= tolerances[name] for name, err in check["tensors"].items())
    lines.append(f"check {'PASSED' if check['passed'] else 'FAILED'}: {passed} of "
                 f"{len(check['tensors'])} tensors within tolerance")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from wse_sim.pipeline import run_step
    from wse_sim.progress import Progress
    from wse_sim.report import format_report

    check_output_arguments(args, (args.config,))
    progress = Progress(not args.quiet)
    report = run_step(args.config, args.placement, args.max_cycles, progress)
    progress.done()
    print(format_report(report))
    print()
    print(format_check(report["check"]))
    write_outputs(args, report)
    return 0 if report["check"]["passed"] else 1
