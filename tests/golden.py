"""Golden counters of gpt_tiny's step: the guard that refactors and speed-ups keep every
simulated figure exact.

`golden_counters(report)` picks from a `run` report what the simulator and compiler decide:
cycles, the PE-cycle classes and the stalls by cause, SRAM and fabric counters, colors, link
loads (simulated and estimated), every kernel's rectangle, start and end cycle, utilization,
FLOPs and stalls by cause, the critical path, and the digest of every simulated result
tensor (its float32 bits). The test compares them exactly with `tests/golden/gpt_tiny.json`.
When a change is meant to move them, regenerate and commit the file with the reason in the
commit message:

    python tests/golden.py --update
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "models" / "gpt_tiny.yaml"
GOLDEN = Path(__file__).resolve().parent / "golden" / "gpt_tiny.json"

FABRIC_KEYS = ("cycles", "pes_used", "pe_cycles", "stalled_pe_cycles", "flops_counted",
               "sram_bytes_read", "sram_bytes_written", "fabric_wavelet_hops",
               "wavelets_injected", "max_link_load", "mean_link_load", "colors_used",
               "hop_words")
KERNEL_KEYS = ("name", "op", "x", "y", "w", "h", "start_cycle", "end_cycle", "utilization",
               "flops", "stalled_pe_cycles")


def golden_counters(report: dict[str, Any]) -> dict[str, Any]:
    """The exact figures of a run report that the golden file pins."""
    estimate = report["link_load_estimate"]
    return {
        **{key: report[key] for key in FABRIC_KEYS},
        "link_load_estimate": {"max": estimate["max"], "total": estimate["total"]},
        "kernels": [{key: k[key] for key in KERNEL_KEYS} for k in report["kernels"]],
        "critical_path": report["critical_path"],
        "loss_sim": report["check"]["loss_sim"],
        "results_sha256": report["check"]["results_sha256"],
    }


def run_report() -> dict[str, Any]:
    from wse_sim.pipeline import run_step

    return run_step(str(CONFIG))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="rewrite the golden file")
    args = parser.parse_args()
    counters = golden_counters(run_report())
    if args.update:
        GOLDEN.write_text(json.dumps(counters, indent=1) + "\n")
        print(f"wrote {GOLDEN}")
    else:
        print(json.dumps(counters, indent=1))


if __name__ == "__main__":
    main()
