"""Simulator speed: simulated PE-cycles per host second, numba compile time excluded.

    python benchmarks/sim_speed.py [--quick]

Rows: synthetic uniform traffic at 0.05 packets/node/cycle on 16x16, 64x64 and 256x256
meshes (beyond saturation on the larger two: 4/k is 0.0625 and 0.0156, so their FIFOs fill
up, the router's worst case), and an output-stationary matrix product on 32 x 32 PEs
(tests/programs.py: every PE receives a column of A and a row of B per k step and runs an
outer-product update with FMAs; compute-bound). Peak host memory is the process maximum
(resource.getrusage), so it covers every row run before it.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # run from a checkout without installing
from programs import outer_product_matmul  # noqa: E402

from wse_sim.engine import simulate  # noqa: E402
from wse_sim.hardware import WaferConfig  # noqa: E402
from wse_sim.traffic import run_traffic  # noqa: E402


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def traffic_row(k: int, cycles: int) -> tuple[str, int, int, float]:
    started = time.perf_counter()
    r = run_traffic(k, k, "uniform", 0.05, cycles, warmup=0, drain=0)
    elapsed = time.perf_counter() - started
    return f"traffic uniform 0.05, {k}x{k}", k * k, r.total_cycles, elapsed


def matmul_row(grid: int, block: int, depth: int) -> tuple[str, int, int, float]:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((grid * block, depth)).astype(np.float32)
    b = rng.standard_normal((depth, grid * block)).astype(np.float32)
    program = outer_product_matmul(a, b, grid)
    wafer = WaferConfig(width=grid, height=grid)
    started = time.perf_counter()
    r = simulate(program, wafer)
    elapsed = time.perf_counter() - started
    c = np.block([[r.sram(x, y)[:block * block].reshape(block, block) for x in range(grid)]
                  for y in range(grid)])
    err = float(np.abs(c - a.astype(np.float64) @ b).max())
    util = float(r.stats.utilization().mean())
    label = (f"matmul {grid * block}x{depth}x{grid * block} on {grid}x{grid} PEs "
             f"(util {util:.0%}, max err {err:.1e})")
    return label, grid * grid, r.cycles, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cycles per row")
    quick = parser.parse_args().quick
    # Warm up: compile (or load from cache) every numba function outside the timings.
    run_traffic(4, 4, "uniform", 0.05, 50, warmup=0, drain=0)
    matmul_row(2, 2, 2)
    scale = 0.2 if quick else 1.0
    rows = [
        traffic_row(16, int(40_000 * scale)),
        traffic_row(64, int(4_000 * scale)),
        traffic_row(256, int(400 * scale)),
        matmul_row(32, 16, int(64 * scale)),
    ]
    print(f"{'workload':<64} {'PEs':>7} {'cycles':>8} {'seconds':>8} {'M PE-cycles/s':>14}")
    for label, pes, cycles, seconds in rows:
        rate = pes * cycles / seconds / 1e6
        print(f"{label:<64} {pes:>7} {cycles:>8} {seconds:>8.2f} {rate:>14.1f}")
    print(f"peak host memory: {peak_mib():.0f} MiB")


if __name__ == "__main__":
    main()
