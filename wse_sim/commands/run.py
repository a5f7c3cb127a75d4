"""`python -m wse_sim run CONFIG`: compile, simulate and check one GPT training step; the
same as `compile` then `simulate`, plus the check against the float64 reference."""

from __future__ import annotations

import argparse
import math
from typing import Any

from wse_sim.commands.simulate import (
    add_output_arguments,
    check_output_arguments,
    report_stopped,
    write_outputs,
)
from wse_sim.errors import SimulationStopped

HELP = ("Compile one GPT training step for the wafer, simulate it cycle by cycle, check the "
        "numbers against the numpy reference and report where the cycles went.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config YAML (see models/)")
    parser.add_argument("--placement", metavar="NAME",
                        help="placement strategy (overrides compile.placement)")
    add_output_arguments(parser)


def format_check(check: dict[str, Any]) -> str:
    """The check's lines for a terminal: every tensor's error, worst first (a null error,
    one that is not finite, first of all)."""
    tolerances, failures = check["tolerances"], set(check["failures"])

    def shown(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    lines = [f"check (relative error, tolerance {check['tolerance']:g}; an update's is "
             f"derived from fp32 rounding): loss sim {shown(check['loss_sim'], '.7f')} ref "
             f"{shown(check['loss_ref'], '.7f')}"]
    worst_first = sorted(check["tensors"].items(),
                         key=lambda item: -math.inf if item[1] is None else -item[1])
    float32_judged = check.get("float32_judged", {})
    for name, err in worst_first:
        verdict = "FAIL" if name in failures else "ok"
        against = (f", against float32: float64 cannot tell, the float32 reference misses it "
                   f"by {float32_judged[name]:.2e}" if name in float32_judged else "")
        lines.append(f"  {name:<40} {shown(err, '.2e'):>8}  (<= {shown(tolerances[name], '.2e')}"
                     f"{against})  {verdict}")
    lines.append(f"check {'PASSED' if check['passed'] else 'FAILED'}: "
                 f"{len(check['tensors']) - len(failures)} of {len(check['tensors'])} tensors "
                 "within tolerance")
    if "null_reasons" in check:
        lines.append(f"n/a: {_reasons(check['null_reasons'])}")
    return "\n".join(lines)


def _reasons(nulls: dict[str, Any]) -> str:
    """The distinct reasons of a null_reasons mirror, in order."""
    found: dict[str, None] = {}
    for value in nulls.values():
        found.update(dict.fromkeys([value] if isinstance(value, str) else value.values()))
    return "; ".join(found)


def run(args: argparse.Namespace) -> int:
    from wse_sim.pipeline import run_step
    from wse_sim.progress import Progress
    from wse_sim.report import format_report

    check_output_arguments(args, (args.config,))
    try:
        with Progress(not args.quiet) as progress:
            report = run_step(args.config, args.placement, args.max_cycles, progress,
                              args.threads, interruptible=True)
    except SimulationStopped as stop:
        return report_stopped(args, stop)
    print(format_report(report))
    print()
    print(format_check(report["check"]))
    write_outputs(args, report)
    return 0 if report["check"]["passed"] else 1
