"""`python -m wse_sim traffic`: synthetic packet traffic on the mesh (router benchmark)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wse_sim.traffic import TrafficResult

HELP = "Synthetic packet traffic on a k x k mesh: latency and throughput of the router model."


def _mesh(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"mesh must look like 16x16 (got {text!r})") from None
    return w, h


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from wse_sim.commands.simulate import add_threads_argument
    from wse_sim.traffic import PATTERNS  # imported here to keep CLI start-up light

    parser.add_argument("--mesh", type=_mesh, default=(16, 16), help="WIDTHxHEIGHT (16x16)")
    parser.add_argument("--pattern", choices=PATTERNS, default="uniform")
    parser.add_argument("--rate", type=float, required=True,
                        help="offered packets (= flits) per node per cycle")
    parser.add_argument("--cycles", type=int, default=10_000, help="measurement cycles")
    parser.add_argument("--warmup", type=int, default=1_000, help="cycles before measuring")
    parser.add_argument("--drain", type=int, default=None,
                        help="max cycles after the window for measured packets (4 x cycles)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--queue-depth", type=int, default=4, help="wavelets per FIFO")
    parser.add_argument("--hop-latency", type=int, default=1, help="cycles per link")
    parser.add_argument("--hotspot-fraction", type=float, default=0.2,
                        help="hotspot: share of packets sent to the center node")
    add_threads_argument(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


LATENCIES = ("latency_avg", "latency_p99", "latency_max")


def latency_unknown(result: TrafficResult) -> str | None:
    """Why a run has no latency figures (no measured packet arrived), or None."""
    if result.measured_packets > result.unfinished_packets:
        return None
    if result.measured_packets == 0:
        return "no packet was created in the measurement window"
    return (f"none of the {result.measured_packets} measured packets arrived before the "
            "drain limit")


def result_json(result: TrafficResult) -> dict[str, Any]:
    """The result as strict JSON data: latencies no packet gave are null, with the reason
    in `null_reasons`."""
    out = result.to_json()
    why = latency_unknown(result)
    if why is not None:
        out.update(dict.fromkeys(LATENCIES), null_reasons=dict.fromkeys(LATENCIES, why))
    return out


def run(args: argparse.Namespace) -> int:
    from wse_sim.outputs import strict_json
    from wse_sim.traffic import RouterTiming, run_traffic

    width, height = args.mesh
    result = run_traffic(width, height, args.pattern, args.rate, args.cycles,
                         warmup=args.warmup, seed=args.seed,
                         router=RouterTiming(args.queue_depth, args.hop_latency), drain=args.drain,
                         hotspot_fraction=args.hotspot_fraction, threads=args.threads)
    if args.json:
        print(strict_json(result_json(result)))
        return 0
    r = result
    print(f"{r.mesh} mesh, {r.pattern} traffic at {r.rate} packets/node/cycle "
          f"(warmup {r.warmup}, {r.cycles} measured cycles, {r.total_cycles} simulated)")
    why = latency_unknown(r)
    latency = (f"n/a ({why})" if why is not None else
               f"average {r.latency_avg:.2f} cycles, 99th percentile {r.latency_p99:.0f}, "
               f"max {r.latency_max}")
    print(f"latency: {latency}; zero-load {r.zero_load_latency:.2f} "
          f"(1 + {r.hop_latency} x {r.mean_hops:.3f} mean hops)")
    print(f"throughput: offered {r.offered:.4f}, accepted {r.accepted:.4f} flits/node/cycle")
    if r.unfinished_packets:
        print(f"unfinished: {r.unfinished_packets} of {r.measured_packets} measured packets "
              f"had not arrived when the drain limit stopped the run (latencies cover the rest)")
    return 0
