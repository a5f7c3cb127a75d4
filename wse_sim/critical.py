"""The critical path of a finished run: the chain of kernels that set its cycle count.

What it is built from. The program's regions are its kernels. Its routes say which kernel
feeds which: a stream leaves a PE on a color (RAMP in the route's rx) and follows the
routes' tx ports to every PE that takes it in (RAMP in tx); a stream between PEs of one
kernel is that kernel's own business and is not followed. The run's counters say, per PE
and color, the cycle the last wavelet the PE sent left its router and the cycle the PE
consumed the last wavelet it received (`Stats.last_ramp`). Streams are in order, so these
are the cycles of each stream's last row.

What it computes, walking back in time from the end:

1. Start at the kernel whose work ends last (the largest `end_cycle`), with the deadline
   t = that cycle.
2. Its inputs at t are the streams from other kernels whose last wavelet it had consumed
   by cycle t. Of those, the one whose last wavelet left its producer last is the input the
   kernel waited for last: step to that producer, with t = the cycle that wavelet left it.
3. Repeat until a kernel has no input at t (a kernel that starts from its own SRAM and
   code, such as the embedding).

Each step goes back at least the two cycles a wavelet takes from a sender to a consumer,
so the walk ends. The path is listed from its first kernel to the last. Each entry says
which kernel fed it (`input_from`, the previous entry), the cycle it consumed that input's
last wavelet (`input_cycle`), and the cycle its own last wavelet to the next kernel left it
(`output_cycle`; for the last kernel, its last working cycle). The run's cycles are the sum
of the time each kernel held the chain (input_cycle to output_cycle) and the time between
a kernel's output and the next one's input: fabric latency, plus queueing where the next
kernel was busy with other work.

Limits. It follows data, the last row of each stream, so it explains when the run ended,
not the rate of its steady state: a kernel on the path may have held it because it was
slow (see its compute share and its stalls) or because its own input came late, and a
kernel that slowed every row without being last is not on it. Back-pressure (a producer
waiting for output room) and a consumer busy with other work are not edges. Time inside a
kernel is not split among its PEs or its internal streams. Where routes merge several
senders onto one color, each of them counts as a producer of the stream. A router with
switch positions passes a wavelet on per every position that accepts the side it came
from: where one passes two streams in turn from the same side, the walk from either
sender reaches the other's sinks too, and a sink that took its last wavelet no later than
the sender's last left it is dropped as not that sender's (the other pairing has the
later sender, which the walk prefers, so a wrong one is never chosen over it).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from wse_sim.program import OPPOSITE, PORT_OFFSET, Port, Program, port_mask
from wse_sim.stats import Stats

PE = tuple[int, int]
RAMP = port_mask(Port.RAMP)
# per mesh port: its tx bit, the step to the neighbour, the neighbour's rx bit it enters by
MESH = [(port_mask(port), offset, port_mask(OPPOSITE[port]))
        for port, offset in PORT_OFFSET.items()]


def streams(program: Program) -> list[tuple[PE, int, list[PE]]]:
    """Every sending PE and color, with the PEs its wavelets reach: (source, color, sinks).
    A route with switch positions passes a wavelet entering from a side on to the outputs
    of every position it can be in that accepts that side."""
    out = []
    for (x, y, color), route in program.routes.items():
        if not any(rx & RAMP for rx, _ in route.live) or (x, y) not in program.pes:
            continue
        sinks, seen, todo = [], {(x, y, RAMP)}, [(x, y, RAMP)]
        while todo:
            px, py, side = todo.pop()
            tx = 0
            for rx, out_ports in program.routes[(px, py, color)].live:
                if rx & side:
                    tx |= out_ports
            if tx & RAMP and (px, py) not in sinks:
                sinks.append((px, py))
            for bit, (dx, dy), entered in MESH:
                nxt = (px + dx, py + dy, entered)
                on_fabric = 0 <= nxt[0] < program.width and 0 <= nxt[1] < program.height
                # `validate` checked it has a route; off the fabric: an outbound edge port
                if tx & bit and on_fabric and nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        out.append(((x, y), color, sinks))
    return out


def critical_path(program: Program, stats: Stats, ends: list[int]) -> list[dict[str, Any]]:
    """The chain of `program.regions` that set the run's cycles (module docstring); `ends`
    is each region's last working cycle (-1: never worked). Empty if no region worked."""
    regions = program.regions
    if not regions or max(ends) < 0:
        return []
    kernel_of = {(x, y): k for k, r in enumerate(regions)
                 for y in range(r.y, r.y + r.height) for x in range(r.x, r.x + r.width)}
    last: dict[bool, dict[tuple[int, int, int], int]] = {True: {}, False: {}}
    for x, y, color, sent, cycle in stats.last_ramp.tolist():
        last[sent][(x, y, color)] = cycle
    # consumer -> [(cycle the input's last wavelet left its producer, cycle the consumer
    # took its last wavelet, producer)]
    inputs: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for (x, y), color, sinks in streams(program):
        producer, left = kernel_of.get((x, y)), last[True].get((x, y, color))
        if producer is None or left is None:
            continue
        taken: dict[int, int] = {}
        for sink in sinks:
            consumer, cycle = kernel_of.get(sink), last[False].get((*sink, color))
            # a sink that took its last wavelet before this sender's last left it is not
            # this stream's (a router passing two streams in turn from one side)
            if consumer is not None and consumer != producer and cycle is not None \
                    and cycle > left:
                taken[consumer] = max(taken.get(consumer, -1), cycle)
        for consumer, cycle in taken.items():
            inputs[consumer].append((left, cycle, producer))
    k = max(range(len(regions)), key=lambda i: (ends[i], -i))  # first of those ending last
    t = output = ends[k]
    path = []
    while True:
        entry = {"kernel": regions[k].name, "op": regions[k].label, "input_from": None,
                 "input_cycle": None, "output_cycle": output}
        path.append(entry)
        ready = [f for f in inputs[k] if f[1] <= t]
        if not ready:
            break
        left, cycle, producer = max(ready, key=lambda f: (f[0], f[1], -f[2]))
        entry.update(input_from=regions[producer].name, input_cycle=cycle)
        k, t, output = producer, left, left
    return path[::-1]
