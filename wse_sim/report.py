"""Reports of one run, built only from the simulator's counters (`Stats`).

The simulator knows nothing of what the PEs compute: the program names rectangular
`Region`s of the fabric (a compiler's kernels) and gets per-region start/end cycles,
utilization and cycle classes, the chain of regions that set the cycle count
(`wse_sim.critical`), plus fabric-wide figures and per-PE grids for plots. Every figure is
a count the cycle loop kept, never an estimate. What the program's builder declared in
`Program.meta` is copied to the top level of the report untouched (its keys must not be
the report's own), and two optional entries of it turn cycles into rates: `throughput`
({"unit": "tokens", "per_run": N}: N units of work per run -> "tokens_per_second") and
`model_flops` (FLOPs of the workload's own count per run -> FLOP/s and % of peak), the
peak being that of `precision` (meta, default "fp32": one FMAC a cycle; "mixed": the
wafer's `mixed_simd_width` fp16-multiply/fp32-accumulate FMACs a cycle,
`WaferConfig.peak_flops`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from wse_sim.critical import critical_path
from wse_sim.energy import Energy, run_energy
from wse_sim.hardware import WaferConfig
from wse_sim.outputs import strict_json, write_file
from wse_sim.program import BYTES_PER_WORD, Program, Region
from wse_sim.stats import PORT_NAMES, Stats

CLASSES = ("compute", "send", "receive", "move", "stalled", "idle")  # PE-cycles by class
STALLS = ("wait_output", "wait_input")  # the stalled PE-cycles by what they waited for
# The engine's cached code loads in well under this (`wse_sim.engine.prepare_engine`); more
# is numba compiling it.
ENGINE_LOADED_SECONDS = 5.0


def pe_cycles(stats: Stats, where: Any) -> dict[str, dict[str, int]]:
    """The PE-cycles of the PEs `stats` grids select with `where`: by class (they add up
    to those PEs x cycles), and the stalled ones split by what they waited for."""
    return {"pe_cycles": {name: int(getattr(stats, name)[where].sum()) for name in CLASSES},
            "stalled_pe_cycles": {name: int(getattr(stats, name)[where].sum())
                                  for name in STALLS}}


def region_report(stats: Stats, region: Region) -> dict[str, Any]:
    """Start/end cycle (first and last cycle any of its PEs worked), utilization (compute
    cycles over PE-cycles of the whole run, and over its own start-to-end span), its
    PE-cycles by class and its stalls by cause (`pe_cycles`), and of those the fill (before
    each PE's first work: stalled or idle) and the drain (after its last: idle)."""
    window = np.s_[region.y:region.y + region.height, region.x:region.x + region.width]
    first, last = stats.first_cycle[window], stats.last_cycle[window]
    worked = first >= 0
    pes = region.width * region.height
    compute = int(stats.compute[window].sum())
    start = int(first[worked].min()) if worked.any() else -1
    end = int(last[worked].max()) if worked.any() else -1
    span = end - start + 1 if worked.any() else 0
    return {
        "name": region.name, "op": region.label,
        "x": region.x, "y": region.y, "w": region.width, "h": region.height, "pes": pes,
        "start_cycle": start, "end_cycle": end,
        "utilization": compute / (pes * max(stats.cycles, 1)),
        "active_utilization": compute / (pes * span) if span else 0.0,
        "flops": int(stats.flops[window].sum()),
        **pe_cycles(stats, window),
        "fill_pe_cycles": int(np.where(worked, first, stats.cycles).sum()),
        "drain_pe_cycles": int(np.where(worked, stats.cycles - 1 - last, 0).sum()),
    }


def hottest_links(link: np.ndarray, count: int = 5) -> list[dict[str, Any]]:
    """The `count` links that carried the most wavelets: PE, direction, wavelets."""
    flat = np.argsort(link, axis=None)[::-1][:count]
    out = []
    for index in flat:
        port, y, x = np.unravel_index(index, link.shape)
        if link[port, y, x] == 0:
            break
        out.append({"x": int(x), "y": int(y), "dir": PORT_NAMES[port],
                    "wavelets": int(link[port, y, x])})
    return out


def fabric_report(stats: Stats, clock_hz: float, used: np.ndarray) -> dict[str, Any]:
    """Fabric-wide figures; `used` marks the PEs that hold a program (height, width)."""
    used_pes = int(used.sum())
    link = stats.link
    return {
        "cycles": stats.cycles,
        "simulated_seconds": stats.cycles / clock_hz,
        "pes_simulated": stats.width * stats.height,
        "pes_used": used_pes,
        "pe_utilization": float(stats.compute[used].sum()) / max(used_pes * stats.cycles, 1),
        **pe_cycles(stats, used),
        "flops_counted": int(stats.flops.sum()),
        "sram_bytes_read": BYTES_PER_WORD * int(stats.sram_read.sum()),
        "sram_bytes_written": BYTES_PER_WORD * int(stats.sram_write.sum()),
        "fabric_wavelet_hops": int(link.sum()),
        "wavelets_injected": stats.injected,
        "control_wavelets": int(stats.control.sum()),
        "switch_changes": int(stats.switch_changes.sum()),
        "relayed_wavelets": int(stats.relayed.sum()),
        "edge_words_in": int(stats.edge_in.sum()),  # through the memory-service edge ports
        "edge_words_out": int(stats.edge_out.sum()),
        "max_link_load": int(link.max()) if link.size else 0,
        "mean_link_load": float(link[link > 0].mean()) if (link > 0).any() else 0.0,
        "hottest_links": hottest_links(link),
    }


def energy_report(energy: Energy, wafer: WaferConfig, unit: str | None) -> dict[str, Any]:
    """The energy figures of a run (`wse_sim.energy`): total joules, joules per token (when
    the program's throughput `unit` is tokens), average power and its share of the
    wafer's published system power, joules and counted events by class."""
    power = energy.average_power_watts
    out: dict[str, Any] = {"energy_joules": energy.joules}
    if unit is not None:
        out["energy_per_token_joules"] = energy.joules_per_token
    out.update({
        "average_power_watts": power,
        "average_power_percent_of_system": (None if power is None
                                            else 100 * power / wafer.system_power_w),
        "energy_breakdown_joules": dict(energy.joules_by_class),
        "energy_events": dict(energy.events),
    })
    return out


def grids(stats: Stats, sram_words: np.ndarray, sram_capacity_words: int) -> dict[str, Any]:
    """Per-PE arrays for plots, [y][x] lists."""
    return {
        "utilization": stats.utilization().round(4).tolist(),
        "link_wavelets": {name: stats.link[i].tolist() for i, name in enumerate(PORT_NAMES)},
        "sram_words": sram_words.tolist(),
        "sram_capacity_words": sram_capacity_words,
    }


def run_report(program: Program, wafer: WaferConfig, stats: Stats,
               host_seconds: float) -> dict[str, Any]:
    """The JSON-ready report of a finished run of `program` (see the module docstring)."""
    used = np.zeros((program.height, program.width), bool)
    sram_words = np.zeros((program.height, program.width), np.int64)
    for (x, y), pe in program.pes.items():
        used[y, x] = True
        sram_words[y, x] = pe.sram_words
    fabric = fabric_report(stats, wafer.clock_hz, used)
    meta = program.meta
    seconds = fabric["simulated_seconds"]
    report: dict[str, Any] = {
        **meta,
        "wafer": wafer.model_dump(),
        "fabric": {"width": program.width, "height": program.height,
                   "origin": list(meta.get("origin", (0, 0)))},
        **fabric,
    }
    per_run: dict[str, float] = {}  # report key -> amount per run, reported per second
    throughput = meta.get("throughput")
    if throughput is not None:
        per_run[f"{throughput['unit']}_per_second"] = throughput["per_run"]
    if "model_flops" in meta:
        per_run["achieved_flops_per_second"] = meta["model_flops"]
    if seconds > 0:  # (then some PE held a program: the used PEs' peak is not 0)
        report.update((key, amount / seconds) for key, amount in per_run.items())
        if "model_flops" in meta:
            flops_per_second = report["achieved_flops_per_second"]
            precision = meta.get("precision", "fp32")  # the peak of the precision used
            report.update(
                percent_of_wafer_peak=100 * flops_per_second
                / wafer.peak_flops(precision=precision),
                percent_of_used_peak=100 * flops_per_second
                / wafer.peak_flops(fabric["pes_used"], precision))
    else:  # a program that did nothing has no rates: null, with the reason
        unknown = [*per_run, *(("percent_of_wafer_peak", "percent_of_used_peak")
                               if "model_flops" in meta else ())]
        if unknown:
            report.update(dict.fromkeys(unknown))
            report["null_reasons"] = dict.fromkeys(unknown, "no cycle was simulated (no PE "
                                                   "had work)")
    tokens = throughput["per_run"] if throughput and throughput["unit"] == "tokens" else None
    edge_bytes = BYTES_PER_WORD * int(stats.edge_in.sum() + stats.edge_out.sum())
    energy = run_energy(stats, wafer, edge_bytes, seconds=seconds, tokens=tokens)
    report.update(energy_report(energy, wafer, "tokens" if tokens is not None else None))
    if energy.average_power_watts is None:
        report.setdefault("null_reasons", {}).update(dict.fromkeys(
            ("average_power_watts", "average_power_percent_of_system"),
            "no cycle was simulated (no PE had work)"))
    if tokens is not None and energy.joules_per_token is None:
        report.setdefault("null_reasons", {})["energy_per_token_joules"] = (
            "the program declares no token per run")
    report["host_simulation_seconds"] = host_seconds
    report["kernels"] = [region_report(stats, region) for region in program.regions]
    report["critical_path"] = critical_path(program, stats,
                                            [k["end_cycle"] for k in report["kernels"]])
    report["grids"] = grids(stats, sram_words, wafer.sram_words_per_pe)
    return report


def partial_report(program: Program, wafer: WaferConfig, stats: Stats, running: np.ndarray,
                   host_seconds: float, stopped: dict[str, Any]) -> dict[str, Any]:
    """`run_report` of a run stopped before its end (`stats` count its cycles so far):
    marked `"partial": true`, with `stopped` (cycle, reason, message) and each kernel's
    progress: besides its span, utilization and FLOPs so far, `running_pes`, its PEs that
    were in the middle of a task (`running`, (height, width) bool). Rates per run (tokens/s,
    FLOP/s, % of peak, joules per token) and the critical path are null: the run's work was
    not done; the energy and average power cover the cycles so far."""
    report = run_report(program, wafer, stats, host_seconds)
    rates = [key for key in report
             if key.endswith("_per_second") or key.startswith("percent_of_")
             or key == "energy_per_token_joules"]
    report.update(dict.fromkeys([*rates, "critical_path"]))
    report["null_reasons"] = {
        **report.get("null_reasons", {}),
        **dict.fromkeys(rates, "the run stopped before its end: a rate per run needs the "
                        "whole run"),
        "critical_path": "the run stopped before its end: the path that sets the cycle "
                         "count needs the whole run"}
    for kernel, region in zip(report["kernels"], program.regions, strict=True):
        window = np.s_[region.y:region.y + region.height, region.x:region.x + region.width]
        kernel["running_pes"] = int(running[window].sum())
    return {"partial": True, "stopped": stopped, **report}


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write `data` as strict JSON, atomically (`wse_sim.outputs`)."""
    write_file(path, strict_json(data, indent=1).encode())


def _null(report: dict[str, Any], key: str) -> str:
    return f"n/a: {report['null_reasons'][key]}"


def _links(links: list[dict[str, Any]], count: int = 3) -> str:
    return ", ".join(f"({k['x']},{k['y']}){k['dir']} {k['wavelets']:,}" for k in links[:count])


def _critical_path(report: dict[str, Any]) -> str:
    path = report["critical_path"]
    if path is None:
        return _null(report, "critical_path")
    if not path:
        return "none: the program names no kernel that worked"
    # from a kernel's last input (the first kernel's: cycle 0) to its last output
    held = [(e["output_cycle"] - (e["input_cycle"] or 0), e["kernel"]) for e in path]
    cycles, name = max(held)
    return (f"{len(path)} kernels, longest from input to output: {name} ({cycles:,} "
            "cycles): " + " -> ".join(e["kernel"] for e in path))


def _si(value: float, unit: str) -> str:
    """`value` with an SI prefix: 0.00123 J -> '1.23 mJ'."""
    for factor, prefix in ((1e3, "k"), (1.0, ""), (1e-3, "m"), (1e-6, "u"), (1e-9, "n")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value / 1e-12:.3g} p{unit}"


ENERGY_LABELS = {"fma": "FMA", "fp_other": "other fp", "sram_read": "SRAM read",
                 "sram_write": "SRAM write", "hop": "hops", "edge_io": "edge I/O"}


def _energy_lines(report: dict[str, Any]) -> list[str]:
    """The energy section: joules per run and per token, by class, and the average power
    against the wafer's published system power, saying what the model leaves out."""
    total = report["energy_joules"]
    by_class = ", ".join(f"{ENERGY_LABELS[name]} {joules / total:.0%}" if total else
                         f"{ENERGY_LABELS[name]} 0"
                         for name, joules in report["energy_breakdown_joules"].items())
    line = f"energy        {_si(total, 'J')} per run ({by_class})"
    if "energy_per_token_joules" in report:
        per_token = report["energy_per_token_joules"]
        line += ("; per token " + (_null(report, "energy_per_token_joules")
                                   if per_token is None else _si(per_token, "J")))
    power = report["average_power_watts"]
    system = _si(report["wafer"]["system_power_w"], "W")
    return [line, "power         " + (
        _null(report, "average_power_watts") if power is None else
        f"{_si(power, 'W')} average = {report['average_power_percent_of_system']:.2g}% of "
        f"the system's published {system}: the model counts the dynamic energy of "
        "arithmetic, SRAM, the fabric and edge I/O only; it leaves out static/leakage power, "
        "clocking, the idle PEs, power delivery and cooling, and the memory service")]


def _k_blocks(report: dict[str, Any]) -> str:
    """", N matmuls in K blocks of r rows" when some matmuls hold their weights in blocks
    narrower than their input lanes (`k_blocks`), else nothing."""
    blocks = report.get("k_blocks") or {}
    if not blocks:
        return ""
    rows = " or ".join(str(b) for b in sorted(set(blocks.values())))
    return f", {len(blocks)} matmuls in K blocks of {rows} rows (narrower than their lanes)"


def _streaming_lines(report: dict[str, Any]) -> list[str]:
    """A weight-streaming step: its layout, the step's time with the memory service's
    exposed update, what bounds its layer passes, and the projection."""
    ws = report["weight_streaming"]
    bounds: dict[str, int] = {}
    for phase in ws["phases"]:
        bounds[phase["bound"]] = bounds.get(phase["bound"], 0) + phase["cycles"]
    total = max(sum(bounds.values()), 1)
    shares = ", ".join(f"{name} {cycles / total:.0%}" for name, cycles in
                       sorted(bounds.items(), key=lambda item: -item[1]))
    lines = [f"{report.get('config', 'program')}: {report['parameters']:,} parameters, weight "
             f"streaming: {ws['tokens']} tokens on {ws['cols']} x {ws['rows']} PEs (a sequence "
             f"per PE row), {ws['ring_slots']} weight vectors prefetched",
             f"step          {ws['step_seconds'] * 1e3:.3f} ms: the wafer "
             f"{ws['wafer_seconds'] * 1e3:.3f} ms, then the memory service's update "
             f"{ws['exposed_update_seconds'] * 1e3:.3f} ms more; "
             f"{ws['tokens_per_second']:,.0f} tokens/s",
             f"bound         linear layer passes (cost model): {shares}"]
    p = ws["projection"]
    lines.append("projection    " + (f"{p['tokens_per_second']:,.0f} tokens/s at {p['tokens']:,} "
                                     f"tokens a step, bound {p['bound']} ({p['what']})"
                                     if "error" not in p else f"{p['error']} ({p['what']})"))
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The report for a terminal: the builder's facts it knows of, then the counters and
    one line per region."""
    pc = report["pe_cycles"]
    total = max(sum(pc.values()), 1)
    fabric = report["fabric"]
    lines = []
    partial = report.get("partial", False)
    if partial:
        stopped = report["stopped"]
        lines.append(f"PARTIAL REPORT ({stopped['message']}): the counters cover cycles 0.."
                     f"{stopped['cycle'] - 1:,} only")
    if "kernels_count" in report:
        lines.append(f"{report.get('config', 'program')}: {report['parameters']:,} parameters, "
                     f"{report['kernels_count']} kernels, placement {report['placement']}, "
                     f"lane width {report['lane_width']}{_k_blocks(report)}")
    if "weight_streaming" in report:
        lines += _streaming_lines(report)
    colors = f", {report['colors_used']} colors" if "colors_used" in report else ""
    lines += [
        f"fabric        {fabric['width']} x {fabric['height']} PEs simulated at "
        f"{tuple(fabric['origin'])}, {report['pes_used']} used{colors}",
        f"cycles        {report['cycles']:,}  ({report['simulated_seconds'] * 1e3:.3f} ms "
        f"at {report['wafer']['clock_hz'] / 1e6:.0f} MHz)",
    ]
    if "micro_batches" in report:
        micro = report["micro_batches"]
        lines.append(f"micro-batches {micro['count']} of {micro['sequences']} sequences, one "
                     f"after another (gradients accumulate in SRAM, one update after the last)")
    if "throughput" in report:
        unit = report["throughput"]["unit"]
        rate = report[f"{unit}_per_second"]
        lines.append("throughput    " + (_null(report, f"{unit}_per_second") if rate is None
                                         else f"{rate:,.0f} {unit}/s"))
    if "model_flops" in report:
        flops = report["achieved_flops_per_second"]
        lines += [
            f"FLOPs         {report['model_flops']:.4g} per run (model count; the PEs executed "
            f"{report['flops_counted']:.4g})",
            "FLOP/s        " + (_null(report, "achieved_flops_per_second") if flops is None else
                                f"{flops:.4g}  = {report['percent_of_used_peak']:.2f}% of the "
                                f"used PEs' {report.get('precision', 'fp32')} peak, "
                                f"{report['percent_of_wafer_peak']:.4f}% of the wafer's"),
        ]
    stalls = report["stalled_pe_cycles"]
    shares = {k: f"{k} {v / total:.1%}" for k, v in pc.items()}
    shares["stalled"] += (f" (output room {stalls['wait_output'] / total:.1%}, input "
                          f"{stalls['wait_input'] / total:.1%})")
    lines += [
        f"utilization   {report['pe_utilization']:.1%} mean compute over the used PEs; "
        "PE-cycles: " + ", ".join(shares.values()),
        f"SRAM          {report['sram_bytes_read']:,} B read, "
        f"{report['sram_bytes_written']:,} B written",
        f"fabric        {report['fabric_wavelet_hops']:,} wavelet-hops"
        + (f"; hop-words {report['hop_words']:,}" if "hop_words" in report else ""),
        f"switches      {report['switch_changes']:,} position changes by "
        f"{report['control_wavelets']:,} control wavelets; {report['relayed_wavelets']:,} "
        "wavelets relayed",
    ]
    if report.get("edge_words_in") or report.get("edge_words_out"):
        lines.append(f"edge ports    {report['edge_words_in']:,} words in from the memory "
                     f"service, {report['edge_words_out']:,} out to it")
    lines += [
        f"links         simulated: max {report['max_link_load']:,}, mean "
        f"{report['mean_link_load']:,.0f}, hottest {_links(report['hottest_links'])}",
    ]
    estimate = report.get("link_load_estimate")
    if estimate is not None:
        lines.append(f"              compiler estimate: max {estimate['max']:,}, mean "
                     f"{estimate['mean']:,.0f}, hottest {_links(estimate['hottest_links'])}")
    lines += _energy_lines(report)
    compile_part = (f"compile {report['compile_seconds']:.1f} s, "
                    if "compile_seconds" in report else "")
    engine = report.get("host_engine_seconds")
    engine_part = ("" if engine is None else f"engine {engine:.1f} s"
                   + (" (numba compiled it: a first run; cached for the next)"
                      if engine > ENGINE_LOADED_SECONDS else "") + ", ")
    lines += [
        f"host          {compile_part}{engine_part}simulate "
        f"{report['host_simulation_seconds']:.1f} s",
        "critical path " + _critical_path(report),
        "",
        f"{'kernel':<28} {'op':<14} {'PEs':>5} {'start':>9} {'end':>9} {'util':>6} "
        f"{'wait-out':>8} {'wait-in':>7} {'idle':>6}"
        + (f" {'running':>8}" if partial else "") + "  (of which fill, drain)",
    ]
    for k in report["kernels"]:
        whole = max(k["pes"] * report["cycles"], 1)
        stalls = k["stalled_pe_cycles"]
        lines.append(f"{k['name']:<28} {k['op']:<14} {k['pes']:>5} {k['start_cycle']:>9,} "
                     f"{k['end_cycle']:>9,} {k['utilization']:>6.1%} "
                     f"{stalls['wait_output'] / whole:>8.1%} "
                     f"{stalls['wait_input'] / whole:>7.1%} "
                     f"{k['pe_cycles']['idle'] / whole:>6.1%}"
                     + (f" {k['running_pes']:>8}" if partial else "")
                     + f"  ({k['fill_pe_cycles'] / whole:.1%}, {k['drain_pe_cycles'] / whole:.1%})")
    return "\n".join(lines)
