"""Simulator speed: simulated PE-cycles per host second, numba compile time excluded.

    python benchmarks/sim_speed.py [--quick]

Rows: synthetic uniform traffic at 0.05 packets/node/cycle on 16x16, 64x64 and 256x256
meshes (the last two are past saturation: 4/k is 0.0625 and 0.0156, so their FIFOs fill
and every router moves wavelets every cycle, the router's worst case), the 64x64 mesh at a
light 0.01 for contrast, and an output-stationary matrix product on 32 x 32 PEs
(tests/programs.py: every PE receives a column of A and a row of B per k step and runs
an outer-product update with FMAs; compute-bound). "loop s" is the cycle loop alone,
"total s" adds building the state (and for the program, validating and assembling it).
Rates use the loop time. Wavelet moves per cycle show the work the routers do; a move
costs about the same at any mesh size, so PE-cycles/s falls as the load rises. Peak host
memory is the process maximum (resource.getrusage), so it covers every row before it.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # run from a checkout without installing
from programs import outer_product_matmul  # noqa: E402

from wse_sim.assemble import assemble  # noqa: E402
from wse_sim.engine import run_chunk, simulate  # noqa: E402
from wse_sim.hardware import WaferConfig  # noqa: E402
from wse_sim.program import validate  # noqa: E402
from wse_sim.traffic import run_traffic  # noqa: E402


@dataclass
class Row:
    label: str
    pes: int
    cycles: int
    loop_s: float
    total_s: float
    moves: float  # wavelet moves (link + ramp crossings) per cycle

    def rate(self) -> float:
        return self.pes * self.cycles / self.loop_s / 1e6


def traffic_row(k: int, rate: float, cycles: int) -> Row:
    started = time.perf_counter()
    r = run_traffic(k, k, "uniform", rate, cycles, warmup=0, drain=0)
    elapsed = time.perf_counter() - started
    moves = (r.stats.link.sum() + r.stats.ramp_in.sum()) / r.total_cycles
    # Building a packet fabric is a few numpy calls; count it in both columns.
    return Row(f"traffic uniform {rate}, {k}x{k}", k * k, r.total_cycles, elapsed, elapsed,
               moves)


def matmul_row(grid: int, block: int, depth: int) -> Row:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((grid * block, depth)).astype(np.float32)
    b = rng.standard_normal((depth, grid * block)).astype(np.float32)
    program = outer_product_matmul(a, b, grid)
    wafer = WaferConfig(width=grid, height=grid)
    started = time.perf_counter()
    r = simulate(program, wafer)
    total = time.perf_counter() - started
    validate(program, wafer)
    asm = assemble(program, wafer)
    started = time.perf_counter()
    run_chunk(asm.fabric, asm.cores, 0, 1 << 40)
    loop = time.perf_counter() - started
    c = np.block([[r.sram(x, y)[:block * block].reshape(block, block) for x in range(grid)]
                  for y in range(grid)])
    err = float(np.abs(c - a.astype(np.float64) @ b).max())
    label = (f"matmul {grid * block}x{depth}x{grid * block}, {grid}x{grid} PEs "
             f"(util {r.stats.utilization().mean():.0%}, err {err:.0e})")
    moves = (r.stats.link.sum() + r.stats.ramp_in.sum()) / r.cycles
    return Row(label, grid * grid, r.cycles, loop, total, moves)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cycles per row")
    quick = parser.parse_args().quick
    # Warm up: compile (or load from cache) every numba function outside the timings.
    run_traffic(4, 4, "uniform", 0.05, 50, warmup=0, drain=0)
    matmul_row(2, 2, 2)
    scale = 0.2 if quick else 1.0
    rows = [
        traffic_row(16, 0.05, int(40_000 * scale)),
        traffic_row(64, 0.05, int(4_000 * scale)),
        traffic_row(256, 0.05, int(400 * scale)),
        traffic_row(64, 0.01, int(4_000 * scale)),
        matmul_row(32, 16, int(64 * scale)),
    ]
    print(f"{'workload':<58} {'PEs':>6} {'cycles':>7} {'loop s':>7} {'total s':>7} "
          f"{'moves/cyc':>9} {'M PE-cyc/s':>10}")
    for r in rows:
        print(f"{r.label:<58} {r.pes:>6} {r.cycles:>7} {r.loop_s:>7.2f} {r.total_s:>7.2f} "
              f"{r.moves:>9.0f} {r.rate():>10.1f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak host memory: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
