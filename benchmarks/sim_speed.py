"""Simulator speed: simulated PE-cycles per host second, host seconds and peak memory.

    python benchmarks/sim_speed.py [--quick] [--no-wafer] [--out DIR]

One table, one row per workload, each run in a fresh process (so its peak memory is its
own) after a warm-up that compiles or loads the numba code, which is not timed:

* synthetic uniform traffic (warmup 0, no drain) on 16x16, 32x32, 64x64 and 256x256
  meshes, at 1 thread and at every core: 0.05 packets/node/cycle (0.1 on 32x32); 4/k
  bounds uniform traffic on a k x k mesh, so the 32x32 and 64x64 rows run just below
  saturation (every router moves about two wavelets a cycle) and the 256x256 row past it
  (its FIFOs fill);
* one training step of gpt_tiny and gpt_small: its compile (config to placed, routed
  Program, one row) and its simulation (validation, assembly, the cycle loop and the
  counters, another row), PE-cycles counting every PE of the simulated rectangle;
* the full WSE-2 fabric (750 x 994) under uniform traffic at 0.01: 1000 warm-up cycles and
  1000 measured ones, every core.

Peak MiB is the row process's maximum resident memory (VmHWM: its Python, numpy and numba
included, not the memory of the parent it was started from).
A row the simulator-speed issue set a target for (64x64 at 1 thread and every core, 32x32
at every core, gpt_small's compile and simulate, the full wafer) shows it and whether it
is met. The table is also written as CSV to DIR (default benchmarks/out/sim_speed.csv).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from wse_sim.threads import cores

ROOT = Path(__file__).resolve().parents[1]


# The simulator-speed issue's targets on a 2-core machine (README, "Benchmarks"): traffic
# rows by (mesh side, one thread, every core), gpt_small's compile and simulate, the wafer
# (2 minutes for 1,000 cycles: the row runs 2,000, so 4).
TRAFFIC_TARGETS = {(64, True, False): {"min_rate": 60}, (64, False, True): {"min_rate": 100},
                   (32, False, True): {"min_rate": 40}}
GPT_SMALL_TARGET = {"max_seconds": 5}
WAFER_TARGET = {"max_seconds": 240, "max_mib": 4096}


def _judge(target: dict, rate: float | None, seconds: float, peak_mib: float
           ) -> tuple[str, str]:
    """A row's target as text and whether the row meets it ("yes", "no", "" if none)."""
    if not target:
        return "", ""
    text, met = [], True
    if "min_rate" in target:
        text.append(f">= {target['min_rate']}M PE-cycles/s")
        met &= rate is not None and rate >= target["min_rate"]
    if "max_seconds" in target:
        text.append(f"<= {target['max_seconds']} s")
        met &= seconds <= target["max_seconds"]
    if "max_mib" in target:
        text.append(f"<= {target['max_mib']} MiB")
        met &= peak_mib <= target["max_mib"]
    return ", ".join(text), "yes" if met else "no"


def traffic_row(size: tuple[int, int], rate: float, cycles: int, warmup: int,
                threads: int) -> dict:
    from wse_sim.traffic import run_traffic

    run_traffic(4, 4, "uniform", rate, 50, warmup=0, drain=0, threads=threads)  # compile
    started = time.perf_counter()
    r = run_traffic(*size, "uniform", rate, cycles, warmup=warmup, drain=0, threads=threads)
    seconds = time.perf_counter() - started
    return {"pe_cycles": r.nodes * r.total_cycles, "seconds": seconds}


def program_row(path: str, threads: int | None) -> dict:
    from wse_sim.engine import prepare_engine, simulate
    from wse_sim.program import read_program_file

    program, wafer = read_program_file(path)
    prepare_engine(wafer)
    started = time.perf_counter()
    r = simulate(program, wafer, threads=threads)
    seconds = time.perf_counter() - started
    return {"pe_cycles": program.width * program.height * r.cycles, "seconds": seconds}


def compile_row(config: str, path: str) -> dict:
    """Compile the step of `config` (timed: the pipeline's compile, config to placed and
    routed Program) and save it with its wafer to `path` for the program rows."""
    from wse_sim.pipeline import compile_config
    from wse_sim.program import save_program

    started = time.perf_counter()
    compiled = compile_config(config)
    seconds = time.perf_counter() - started
    save_program(compiled.linked.program, path, compiled.cfg.wafer)
    return {"pe_cycles": None, "seconds": seconds}


def _peak_mib() -> float | None:
    """This process's peak resident memory (Linux: VmHWM, which a fork's child does not
    inherit, unlike wait4's ru_maxrss), or None where /proc is missing."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def run_row(spec: dict) -> dict:
    """One row in a fresh process: its figures and its peak memory."""
    proc = subprocess.Popen([sys.executable, __file__, "--row", json.dumps(spec)],
                            stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.stdout.close()
    if status != 0:
        raise SystemExit(f"row {spec['label']} failed")
    row = json.loads(out.strip().splitlines()[-1])
    if row["peak_mib"] is None:  # no /proc: wait4's figure, which may include the parent's
        row["peak_mib"] = usage.ru_maxrss / 1024
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cycles per row")
    parser.add_argument("--no-wafer", action="store_true", help="skip the full-wafer row")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        spec = json.loads(args.row)
        if spec["kind"] == "traffic":
            row = traffic_row(tuple(spec["size"]), spec["rate"], spec["cycles"],
                              spec["warmup"], spec["threads"])
        elif spec["kind"] == "compile":
            row = compile_row(spec["config"], spec["path"])
        else:
            row = program_row(spec["path"], spec["threads"])
        print(json.dumps({**spec, **row, "peak_mib": _peak_mib()}))
        return
    scale = 0.2 if args.quick else 1.0
    every_core = cores()
    specs = []
    for k, rate, cycles in ((16, 0.05, 40_000), (32, 0.1, 10_000), (64, 0.05, 4_000),
                            (256, 0.05, 400)):
        for threads in sorted({1, every_core}):
            specs.append({"kind": "traffic", "size": [k, k], "rate": rate, "warmup": 0,
                          "cycles": int(cycles * scale), "threads": threads,
                          "label": f"traffic {k}x{k} uniform {rate}, {threads} thread(s)",
                          "target": TRAFFIC_TARGETS.get((k, threads == 1, threads == every_core),
                                                        {})})
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("gpt_tiny", "gpt_small"):
            path = str(Path(tmp) / f"{name}.npz")
            target = GPT_SMALL_TARGET if name == "gpt_small" else {}
            specs.append({"kind": "compile", "config": str(ROOT / "models" / f"{name}.yaml"),
                          "path": path, "threads": 1, "label": f"{name} compile",
                          "target": target})
            specs.append({"kind": "program", "path": path, "threads": None,
                          "label": f"{name} simulate, {every_core} thread(s)", "target": target})
        if not args.no_wafer:
            specs.append({"kind": "traffic", "size": [750, 994], "rate": 0.01,
                          "warmup": int(1000 * scale), "cycles": int(1000 * scale),
                          "threads": every_core, "label": f"WSE-2 750x994 traffic uniform 0.01, "
                          f"{int(2000 * scale)} cycles, {every_core} thread(s)",
                          "target": {} if args.quick else WAFER_TARGET})
        rows = [run_row(spec) for spec in specs]
    print(f"{'workload':<58} {'M PE-cycles/s':>13} {'host s':>8} {'peak MiB':>9}  "
          f"{'target':<26} met")
    for r in rows:
        rate = None if r["pe_cycles"] is None else r["pe_cycles"] / r["seconds"] / 1e6
        r["mpe_cycles_per_s"] = rate
        r["target_text"], r["met"] = _judge(r["target"], rate, r["seconds"], r["peak_mib"])
        print(f"{r['label']:<58} {'-' if rate is None else f'{rate:.1f}':>13} "
              f"{r['seconds']:>8.2f} {r['peak_mib']:>9.0f}  {r['target_text'] or '-':<26} "
              f"{r['met']}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "sim_speed.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["workload", "threads", "pe_cycles", "host_seconds",
                         "mpe_cycles_per_s", "peak_mib", "target", "met"])
        for r in rows:
            rate = r["mpe_cycles_per_s"]
            writer.writerow([r["label"], r["threads"] or every_core, r["pe_cycles"] or "",
                             f"{r['seconds']:.3f}", "" if rate is None else f"{rate:.2f}",
                             f"{r['peak_mib']:.0f}", r["target_text"], r["met"]])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
