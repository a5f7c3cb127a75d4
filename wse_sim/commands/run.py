"""`python -m wse_sim run CONFIG`: compile, simulate and check one GPT training step."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

HELP = ("Compile one GPT training step for the wafer, simulate it cycle by cycle, check the "
        "numbers against the numpy reference and report where the cycles went.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config YAML (see models/)")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    parser.add_argument("--plot", metavar="DIR", help="also write the five PNG plots")
    parser.add_argument("--placement", metavar="NAME",
                        help="placement strategy (overrides compile.placement)")
    parser.add_argument("--max-cycles", type=int, metavar="N",
                        help="stop with an error if the step needs more cycles")
    parser.add_argument("--quiet", action="store_true", help="no progress line")


class Progress:
    """One self-overwriting stderr line: cycles simulated and the simulation rate."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.started = time.perf_counter()

    def __call__(self, cycle: int) -> None:
        if self.enabled:
            elapsed = time.perf_counter() - self.started
            rate = cycle / max(elapsed, 1e-9)
            print(f"\rsimulating: {cycle:>12,} cycles  {elapsed:6.1f} s  "
                  f"{rate / 1e3:8.1f} k cycles/s", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


def execute(config_path: str, placement: str | None = None, max_cycles: int | None = None,
            progress: Progress | None = None) -> dict[str, Any]:
    """Compile, simulate and check one step; the report as a JSON-ready dict."""
    import numpy as np

    from compiler.check import check_step
    from compiler.compile import compile_step
    from compiler.config import load_config
    from compiler.reference import reference_step
    from wse_sim.engine import simulate
    from wse_sim.report import Region, fabric_report, grids, hottest_links, region_report

    cfg = load_config(config_path)
    compiled = compile_step(cfg, placement)
    linked, wafer = compiled.linked, cfg.wafer
    started = time.perf_counter()
    result = simulate(linked.program, wafer, max_cycles=max_cycles, progress=progress)
    sim_seconds = time.perf_counter() - started
    if progress is not None:
        progress.done()
    reference = reference_step(cfg, compiled.params, compiled.tokens, np.float64)
    check = check_step(linked, result, reference, compiled.graph.parameters)

    stats = result.stats
    program = linked.program
    used = np.zeros((program.height, program.width), bool)
    sram_words = np.zeros((program.height, program.width), np.int64)
    for (x, y), pe in program.pes.items():
        used[y, x] = True
        sram_words[y, x] = pe.sram_words
    regions = []
    for kernel in compiled.kernels:
        x, y = linked.kernel_pe(kernel.name, (0, 0))
        regions.append(Region(kernel.name, kernel.op, x, y, kernel.width, kernel.height))

    fabric = fabric_report(stats, wafer.clock_hz, used)
    summary = compiled.graph.summary()
    step_flops = summary["flops"]["total"]
    tokens = cfg.training.batch_size * cfg.training.seq_len
    seconds = fabric["simulated_seconds"]
    estimate = linked.link_wavelets
    return {
        "config": config_path,
        "placement": compiled.placement,
        "lane_width": compiled.lane_width,
        "wafer": {"width": wafer.width, "height": wafer.height, "clock_hz": wafer.clock_hz,
                  "sram_bytes_per_pe": wafer.sram_bytes_per_pe, "colors": wafer.colors},
        "fabric": {"width": program.width, "height": program.height,
                   "origin": list(linked.origin)},
        **fabric,
        "tokens_per_second": tokens / seconds,
        "flops": step_flops,
        "flops_by_phase": summary["flops"],
        "achieved_flops_per_second": step_flops / seconds,
        "percent_of_wafer_peak": 100 * step_flops / seconds / wafer.peak_flops(),
        "percent_of_used_peak": 100 * step_flops / seconds / wafer.peak_flops(fabric["pes_used"]),
        "parameters": summary["parameters"],
        "kernels_count": len(compiled.kernels),
        "colors_used": linked.colors_used,
        "hop_words": compiled.hop_words,
        "link_load_estimate": {"max": int(estimate.max()),
                               "mean": float(estimate[estimate > 0].mean()),
                               "total": int(estimate.sum()),
                               "hottest_links": hottest_links(estimate)},
        "compile_seconds": compiled.seconds,
        "host_simulation_seconds": sim_seconds,
        "kernels": [region_report(stats, region) for region in regions],
        "check": {"passed": check.passed, "tolerance": check.tolerance,
                  "loss_sim": check.loss_sim, "loss_ref": check.loss_ref,
                  "results_sha256": check.digest, "tensors": check.errors},
        "grids": grids(stats, sram_words, wafer.sram_words_per_pe),
    }


def _links(links: list[dict[str, Any]], count: int = 3) -> str:
    return ", ".join(f"({k['x']},{k['y']}){k['dir']} {k['wavelets']:,}" for k in links[:count])


def format_report(report: dict[str, Any]) -> str:
    """The report for a terminal."""
    pc = report["pe_cycles"]
    estimate = report["link_load_estimate"]
    total = max(sum(pc.values()), 1)
    check = report["check"]
    lines = [
        f"{report['config']}: {report['parameters']:,} parameters, "
        f"{report['kernels_count']} kernels, placement {report['placement']}, "
        f"lane width {report['lane_width']}",
        f"fabric        {report['fabric']['width']} x {report['fabric']['height']} PEs "
        f"simulated at {tuple(report['fabric']['origin'])}, {report['pes_used']} used, "
        f"{report['colors_used']} colors",
        f"cycles        {report['cycles']:,}  ({report['simulated_seconds'] * 1e3:.3f} ms "
        f"at {report['wafer']['clock_hz'] / 1e6:.0f} MHz)",
        f"throughput    {report['tokens_per_second']:,.0f} tokens/s",
        f"FLOPs         {report['flops']:.4g} per step (model count; the PEs executed "
        f"{report['flops_counted']:.4g})",
        f"FLOP/s        {report['achieved_flops_per_second']:.4g}  "
        f"= {report['percent_of_used_peak']:.2f}% of the used PEs' peak, "
        f"{report['percent_of_wafer_peak']:.4f}% of the wafer's",
        f"utilization   {report['pe_utilization']:.1%} mean compute over the used PEs; "
        "PE-cycles: " + ", ".join(f"{k} {v / total:.1%}" for k, v in pc.items()),
        f"SRAM          {report['sram_bytes_read']:,} B read, "
        f"{report['sram_bytes_written']:,} B written",
        f"fabric        {report['fabric_wavelet_hops']:,} wavelet-hops; hop-words "
        f"{report['hop_words']:,}",
        f"links         simulated: max {report['max_link_load']:,}, mean "
        f"{report['mean_link_load']:,.0f}, hottest {_links(report['hottest_links'])}",
        f"              compiler estimate: max {estimate['max']:,}, mean "
        f"{estimate['mean']:,.0f}, hottest {_links(estimate['hottest_links'])}",
        f"host          compile {report['compile_seconds']:.1f} s, simulate "
        f"{report['host_simulation_seconds']:.1f} s",
        "",
        f"{'kernel':<28} {'op':<14} {'PEs':>5} {'start':>9} {'end':>9} {'util':>6}",
    ]
    for k in report["kernels"]:
        lines.append(f"{k['name']:<28} {k['op']:<14} {k['pes']:>5} {k['start_cycle']:>9,} "
                     f"{k['end_cycle']:>9,} {k['utilization']:>6.1%}")
    lines += ["", f"check (relative error, tolerance {check['tolerance']:g}): "
              f"loss sim {check['loss_sim']:.7f} ref {check['loss_ref']:.7f}"]
    worst = sorted(check["tensors"].items(), key=lambda item: -item[1])
    for name, err in worst:
        verdict = "ok" if err <= check["tolerance"] else "FAIL"
        lines.append(f"  {name:<40} {err:.2e}  {verdict}")
    lines.append(f"check {'PASSED' if check['passed'] else 'FAILED'}: "
                 f"{sum(e <= check['tolerance'] for e in check['tensors'].values())} of "
                 f"{len(check['tensors'])} tensors within tolerance")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from wse_sim.plots import write_plots
    from wse_sim.report import write_json

    report = execute(args.config, args.placement, args.max_cycles, Progress(not args.quiet))
    print(format_report(report))
    if args.json:
        write_json(args.json, report)
    if args.plot:
        for path in write_plots(report, args.plot, source=args.config):
            print(f"wrote {path}")
    return 0 if report["check"]["passed"] else 1
