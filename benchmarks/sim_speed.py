"""Simulator speed: simulated PE-cycles per host second, host seconds and peak memory.

    python benchmarks/sim_speed.py [--quick] [--no-wafer] [--out DIR]

One table, one row per workload, each run in a fresh process (so its peak memory is its
own) after a warm-up that compiles or loads the numba code, which is not timed:

* synthetic uniform traffic (warmup 0, no drain) on 16x16, 32x32, 64x64 and 256x256
  meshes, at 1 thread and at every core: 0.05 packets/node/cycle (0.1 on 32x32), past
  saturation on the larger meshes (4/k bounds uniform traffic on a k x k mesh), so their
  FIFOs fill and every router moves wavelets every cycle, the router's worst case;
* one training step of gpt_tiny and gpt_small (`simulate`: validation, assembly, the cycle
  loop and the counters; the compiler's time is excluded), PE-cycles counting every PE of
  the simulated rectangle;
* the full WSE-2 fabric (750 x 994) under uniform traffic at 0.01: 1000 warm-up cycles and
  1000 measured ones, every core.

Peak MiB is the process's maximum resident memory (its Python, numpy and numba included).
The table is also written as CSV to DIR (default benchmarks/out/sim_speed.csv).
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

ROOT = Path(__file__).resolve().parents[1]


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def traffic_row(size: tuple[int, int], rate: float, cycles: int, warmup: int,
                threads: int) -> dict:
    from wse_sim.traffic import run_traffic

    run_traffic(4, 4, "uniform", rate, 50, warmup=0, drain=0, threads=threads)  # compile
    started = time.perf_counter()
    r = run_traffic(*size, "uniform", rate, cycles, warmup=warmup, drain=0, threads=threads)
    seconds = time.perf_counter() - started
    return {"pe_cycles": r.nodes * r.total_cycles, "seconds": seconds}


def program_row(path: str, threads: int | None) -> dict:
    from wse_sim.engine import simulate
    from wse_sim.program import read_program_file

    program, wafer = read_program_file(path)
    simulate(_tiny_program(), wafer, threads=threads)  # compile
    started = time.perf_counter()
    r = simulate(program, wafer, threads=threads)
    seconds = time.perf_counter() - started
    return {"pe_cycles": program.width * program.height * r.cycles, "seconds": seconds}


def _tiny_program():
    import numpy as np

    from wse_sim.program import FabIn, FabOut, Mem, Op, Port, Program, Task, Trigger, vec

    p = Program(2, 1)
    src = p.pe(0, 0, 4)
    src.load(0, np.arange(4, dtype=np.float32))
    src.tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, 4, FabOut(1), Mem(0))]))
    p.pe(1, 0, 4).tasks.append(Task(0, Trigger.RESET, [vec(Op.FMA, 4, Mem(0), FabIn(1),
                                                           Mem(0), Mem(0))]))
    p.add_route(0, 0, 1, 1 << Port.RAMP, 1 << Port.E)
    p.add_route(1, 0, 1, 1 << Port.W, 1 << Port.RAMP)
    return p


def compile_program(config: Path, out: Path) -> Path:
    """The step's Program, saved with its wafer for the program rows."""
    from wse_sim.pipeline import compile_config
    from wse_sim.program import save_program

    compiled = compile_config(str(config))
    path = out / f"{config.stem}.npz"
    save_program(compiled.linked.program, path, compiled.cfg.wafer)
    return path


def run_row(spec: dict) -> dict:
    """One row in a fresh process: its figures, and its peak memory from wait4."""
    proc = subprocess.Popen([sys.executable, __file__, "--row", json.dumps(spec)],
                            stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.stdout.close()
    if status != 0:
        raise SystemExit(f"row {spec['label']} failed")
    row = json.loads(out.strip().splitlines()[-1])
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
        else:
            row = program_row(spec["path"], spec["threads"])
        print(json.dumps({**spec, **row}))
        return
    scale = 0.2 if args.quick else 1.0
    cores = _cores()
    specs = []
    for k, rate, cycles in ((16, 0.05, 40_000), (32, 0.1, 10_000), (64, 0.05, 4_000),
                            (256, 0.05, 400)):
        for threads in sorted({1, cores}):
            specs.append({"kind": "traffic", "size": [k, k], "rate": rate, "warmup": 0,
                          "cycles": int(cycles * scale), "threads": threads,
                          "label": f"traffic {k}x{k} uniform {rate}, {threads} thread(s)"})
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("gpt_tiny", "gpt_small"):
            path = compile_program(ROOT / "models" / f"{name}.yaml", Path(tmp))
            specs.append({"kind": "program", "path": str(path), "threads": None,
                          "label": f"{name} simulate, {cores} thread(s)"})
        if not args.no_wafer:
            specs.append({"kind": "traffic", "size": [750, 994], "rate": 0.01,
                          "warmup": int(1000 * scale), "cycles": int(1000 * scale),
                          "threads": cores, "label": f"WSE-2 750x994 traffic uniform 0.01, "
                          f"{int(2000 * scale)} cycles, {cores} thread(s)"})
        rows = [run_row(spec) for spec in specs]
    print(f"{'workload':<58} {'M PE-cycles/s':>13} {'host s':>8} {'peak MiB':>9}")
    for r in rows:
        r["mpe_cycles_per_s"] = r["pe_cycles"] / r["seconds"] / 1e6
        print(f"{r['label']:<58} {r['mpe_cycles_per_s']:>13.1f} {r['seconds']:>8.2f} "
              f"{r['peak_mib']:>9.0f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "sim_speed.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["workload", "threads", "pe_cycles", "host_seconds",
                         "mpe_cycles_per_s", "peak_mib"])
        for r in rows:
            writer.writerow([r["label"], r["threads"] or cores, r["pe_cycles"],
                             f"{r['seconds']:.3f}", f"{r['mpe_cycles_per_s']:.2f}",
                             f"{r['peak_mib']:.0f}"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
