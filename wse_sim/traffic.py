"""Synthetic traffic: destination-routed single-wavelet packets on the same router core
(`wse_sim.router`: same FIFOs, credit timing, arbitration) as program mode. Each PE has one
route (color 0) accepting from every port; the next hop is the dimension-order (X then Y)
direction to the destination in the packet's tag, RAMP at the destination.

Sources. Every node creates packets by a Bernoulli process of rate R per cycle into an
unbounded source queue (FIFO); the head enters the node's RAMP FIFO whenever it has room
(at most one per cycle). Destinations (drawn when a packet enters the network; they are
i.i.d., so this equals drawing them at creation):

* uniform: any other node, uniformly;
* transpose: (x, y) -> (y, x) (square meshes; diagonal nodes send nothing);
* hotspot: with probability `hotspot_fraction` (default 0.2) the center node
  (width // 2, height // 2), else uniform; the center node itself sends uniform traffic;
* neighbor: (x + 1 mod width, y) (the last column's packets travel width - 1 hops west).

Measurement. Packets created in cycles [warmup, warmup + cycles) are measured. Latency is
ejection cycle minus creation cycle (source queueing included). Offered throughput: measured
packets per node per cycle; accepted: packets ejected during the window per node per cycle
(a packet is one flit). The network keeps running, sources included, until every measured
packet has arrived or `drain` more cycles have passed; unfinished packets are reported.

Zero-load latency. A packet created in cycle t enters the RAMP FIFO in cycle t, leaves
the source router at t + 1 (ramp latency 1), crosses h links of hop_latency L and is
ejected by the destination router in the cycle it becomes ready there: t + 1 + h*L.
Hence T0 = 1 + L * H, H the mean hop count of the pattern (computed exactly from the
destination distribution, averaged over sending nodes).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

from wse_sim.errors import UserError
from wse_sim.hostmem import mesh_bytes, require
from wse_sim.router import (
    B_PORT,
    CT_RAMP_IN,
    CT_RAMP_OUT,
    P_DEPTH,
    P_WIN0,
    P_WIN1,
    RAMP,
    SC_ACCEPTED,
    SC_LAT_MAX,
    SC_LAT_SUM,
    SC_MEASURED,
    TAG_COORD_BITS,
    TAG_DEST_BITS,
    Fabric,
    build_fabric,
    has_room,
    hot,
    inject,
    router_step,
)
from wse_sim.stats import Stats

# wse_sim.router's helpers (has_room, inject) are inlined here: see the note
# there on numba's cache.
PATTERNS = ("uniform", "transpose", "hotspot", "neighbor")
UNIFORM, TRANSPOSE, HOTSPOT, NEIGHBOR = range(4)
NEVER = np.iinfo(np.int64).max // 2
LATENCY_BINS = 1 << 20  # latencies beyond fall into the last bin
# Sources.sc indices
S_MEASURED_IN, S_BEHIND = range(2)


class Sources(NamedTuple):
    next_arr: np.ndarray  # int64 [nodes]: creation cycle of the head of the source queue
    ramp_buf: np.ndarray  # int64 [nodes]: the node's RAMP FIFO
    rng: np.ndarray  # uint64 [1]: splitmix64 state
    pattern: np.ndarray  # int64 [4]: pattern, width, height, center node
    rate: np.ndarray  # float64 [3]: rate, log(1 - rate), hotspot fraction
    sc: np.ndarray  # int64 [2]


@hot
def _uniform01(rng):
    """splitmix64: a float in [0, 1)."""
    z = rng[0] + np.uint64(0x9E3779B97F4A7C15)
    rng[0] = z
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@hot
def _gap(rate, rng):
    """Cycles to the next Bernoulli(rate) success: geometric on 1, 2, ..."""
    if rate[0] >= 1.0:
        return 1
    return 1 + int(np.log(1.0 - _uniform01(rng)) / rate[1])


@hot
def _destination(pattern, rate, rng, n):
    """Destination of node n's next packet, as tag bits (y << 12 | x)."""
    kind, width, height, center = pattern[0], pattern[1], pattern[2], pattern[3]
    x, y = n % width, n // width
    if kind == TRANSPOSE:
        x, y = y, x
    elif kind == NEIGHBOR:
        x = x + 1 if x + 1 < width else 0
    elif kind == HOTSPOT and n != center and _uniform01(rng) < rate[2]:
        x, y = center % width, center // width
    else:
        d = int(_uniform01(rng) * (width * height - 1))
        d = d + 1 if d >= n else d
        x, y = d % width, d // width
    return (y << TAG_COORD_BITS) | x


@hot
def _traffic_chunk(fb, src, t, t_end):
    """Run cycles t..t_end-1, stopping early once every measured packet has arrived.
    Returns (cycle, drained)."""
    params, fsc, buf, wl, wval, node, ctr = (fb.params, fb.sc, fb.buf, fb.wl, fb.wval, fb.node,
                                             fb.ctr)
    next_arr, ramp_buf, rng, pattern, rate, ssc = (src.next_arr, src.ramp_buf, src.rng,
                                                   src.pattern, src.rate, src.sc)
    win0, win1, depth = params[P_WIN0], params[P_WIN1], params[P_DEPTH]
    nodes = next_arr.shape[0]
    while t < t_end:
        if t >= win1 and ssc[S_BEHIND] == 0 and fsc[SC_MEASURED] == ssc[S_MEASURED_IN]:
            return t, True
        router_step(fb, t)
        behind = 0
        for n in range(nodes):
            birth = next_arr[n]
            if birth <= t and has_room(buf, ramp_buf[n], t, depth):
                tag = (birth << TAG_DEST_BITS) | _destination(pattern, rate, rng, n)
                inject(buf, wl, wval, node, fsc, ctr, ramp_buf[n], n, np.float32(0.0), tag, t,
                       depth)
                if win0 <= birth < win1:
                    ssc[S_MEASURED_IN] += 1
                next_arr[n] = birth + _gap(rate, rng)
            if next_arr[n] < win1:
                behind += 1
        ssc[S_BEHIND] = behind
        t += 1
    return t, False


@hot
def _queued_before(src, end):
    """Packets created before cycle `end` still in source queues (drawing the rest of each
    node's arrival process; called once the run is over)."""
    total = 0
    next_arr, rate, rng = src.next_arr, src.rate, src.rng
    for n in range(next_arr.shape[0]):
        a = next_arr[n]
        while a < end:
            total += 1
            a += _gap(rate, rng)
    return total


@dataclass
class TrafficResult:
    mesh: str
    pattern: str
    rate: float
    nodes: int
    warmup: int
    cycles: int  # measurement window
    total_cycles: int  # simulated, warmup and drain included
    seed: int
    queue_depth: int
    hop_latency: int
    measured_packets: int
    unfinished_packets: int  # measured packets not delivered when the run stopped
    latency_avg: float
    latency_p99: float
    latency_max: int
    offered: float  # flits/node/cycle created in the window
    accepted: float  # flits/node/cycle ejected in the window
    mean_hops: float
    zero_load_latency: float
    stats: Stats | None = None

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("stats")
        return out


def mean_hops(width: int, height: int, pattern: str, hotspot_fraction: float = 0.2) -> float:
    """Exact mean XY hop count of a pattern's packets, averaged over sending nodes."""
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    x, y = xs.ravel(), ys.ravel()
    nodes = width * height
    if pattern == "transpose":
        sending = x != y
        return float(np.mean(2 * np.abs(x - y)[sending])) if sending.any() else 0.0
    if pattern == "neighbor":
        return float(np.mean(np.where(x < width - 1, 1, width - 1))) if width > 1 else 0.0
    # Sum of distances from each node to every node, per dimension, then exclude self.
    col = np.abs(np.arange(width)[:, None] - np.arange(width)[None, :]).sum(axis=1)
    row = np.abs(np.arange(height)[:, None] - np.arange(height)[None, :]).sum(axis=1)
    uniform = (col[x] * height + row[y] * width) / max(nodes - 1, 1)
    if pattern == "uniform":
        return float(uniform.mean())
    cx, cy = width // 2, height // 2
    to_center = np.abs(x - cx) + np.abs(y - cy)
    center = (x == cx) & (y == cy)
    per_node = np.where(center, uniform,
                        hotspot_fraction * to_center + (1 - hotspot_fraction) * uniform)
    return float(per_node.mean())


def run_traffic(
    width: int,
    height: int,
    pattern: str,
    rate: float,
    cycles: int,
    *,
    warmup: int = 1000,
    seed: int = 1,
    queue_depth: int = 4,
    hop_latency: int = 1,
    ramp_in: int = 1,
    drain: int | None = None,
    hotspot_fraction: float = 0.2,
    progress: Callable[[int], None] | None = None,
) -> TrafficResult:
    """Run synthetic traffic; see the module docstring. `drain` (default 4 * cycles) bounds
    the cycles run after the measurement window. Arguments out of range, and a mesh too
    large for this machine's memory, are UserErrors naming the argument."""
    if pattern not in PATTERNS:
        raise UserError(f"pattern must be one of {', '.join(PATTERNS)} (got {pattern!r})")
    if not 0.0 < rate <= 1.0:  # also refuses NaN
        raise UserError(f"rate must be in (0, 1] packets/node/cycle (got {rate})")
    if not 0.0 <= hotspot_fraction <= 1.0:
        raise UserError(f"hotspot_fraction must be in [0, 1] (got {hotspot_fraction})")
    if width < 1 or height < 1 or width * height < 2:
        raise UserError(f"mesh must have at least 2 nodes (got {width} x {height})")
    if max(width, height) > 1 << TAG_COORD_BITS:
        raise UserError(f"mesh sides are limited to {1 << TAG_COORD_BITS} nodes in traffic "
                        f"mode (got {width} x {height})")
    if pattern == "transpose" and width != height:
        raise UserError(f"transpose needs a square mesh (got {width} x {height})")
    if not 0 <= seed < 1 << 64:  # the generator's state is one uint64
        raise UserError(f"seed must be in 0 .. 2**64 - 1 (got {seed})")
    drain = 4 * cycles if drain is None else drain
    for name, value, least in (("cycles", cycles, 1), ("warmup", warmup, 0),
                               ("drain", drain, 0), ("queue_depth", queue_depth, 1),
                               ("hop_latency", hop_latency, 1), ("ramp_in", ramp_in, 1)):
        if value < least:
            raise UserError(f"{name} must be >= {least} (got {value})")
    # A packet's tag holds its creation cycle above the destination bits of an int64,
    # and a wavelet's ready cycle is a cycle plus hop_latency: both must not overflow.
    last = warmup + cycles + drain
    if max(last, hop_latency) >= 1 << (63 - TAG_DEST_BITS):
        raise UserError(f"warmup + cycles + drain ({last:,}) and hop_latency ({hop_latency:,}) "
                        f"must be below 2**{63 - TAG_DEST_BITS} cycles")
    require(mesh_bytes(width, height, queue_depth))
    fb, src = _build(width, height, pattern, rate, seed, queue_depth, hop_latency, ramp_in,
                     hotspot_fraction)
    win0, win1 = warmup, warmup + cycles
    fb.params[P_WIN0], fb.params[P_WIN1] = win0, win1
    t, end, chunk = 0, win1 + drain, 256
    while t < end:
        started = time.perf_counter()
        t, drained = _traffic_chunk(fb, src, t, min(t + chunk, end))
        elapsed = time.perf_counter() - started
        if progress is not None:
            progress(t)
        if drained:
            break
        chunk = int(min(max(chunk * min(0.2 / max(elapsed, 1e-4), 4.0), 64), 1 << 20))
    queued = _queued_before(src, win1)
    measured = int(src.sc[S_MEASURED_IN]) + queued
    done = int(fb.sc[SC_MEASURED])
    nodes = width * height
    hist = fb.lat_hist
    p99 = float(np.searchsorted(np.cumsum(hist), 0.99 * done)) if done else float("nan")
    hops = mean_hops(width, height, pattern, hotspot_fraction)
    stats = Stats.from_state(width, height, t, fb, None,
                             injected=int(fb.ctr[:, CT_RAMP_OUT].sum()),
                             delivered=int(fb.ctr[:, CT_RAMP_IN].sum()))
    return TrafficResult(
        mesh=f"{width}x{height}", pattern=pattern, rate=rate, nodes=nodes, warmup=warmup,
        cycles=cycles, total_cycles=t, seed=seed, queue_depth=queue_depth,
        hop_latency=hop_latency, measured_packets=measured, unfinished_packets=measured - done,
        latency_avg=float(fb.sc[SC_LAT_SUM] / done) if done else float("nan"),
        latency_p99=p99, latency_max=int(fb.sc[SC_LAT_MAX]),
        offered=measured / nodes / cycles, accepted=float(fb.sc[SC_ACCEPTED]) / nodes / cycles,
        mean_hops=hops, zero_load_latency=1.0 + hop_latency * hops, stats=stats,
    )


def _build(width: int, height: int, pattern: str, rate: float, seed: int, depth: int,
           hop_latency: int, ramp_in: int, hotspot_fraction: float) -> tuple[Fabric, Sources]:
    nodes = width * height
    pe = np.arange(nodes, dtype=np.int64)
    x, y = pe % width, pe // width
    links = ((y > 0) << 0) | ((x < width - 1) << 1) | ((y < height - 1) << 2) | ((x > 0) << 3)
    mask = (links | (1 << RAMP)).astype(np.int64)
    fb = build_fabric(width, height, pe, np.zeros(nodes, np.int64), mask, mask, colors=1,
                      depth=depth, hop_latency=hop_latency, ramp_in=ramp_in, packet=True,
                      latency_bins=LATENCY_BINS)
    n_in = int(fb.rb_lo[-1])
    ramp_buf = np.nonzero(fb.buf[:n_in, B_PORT] == RAMP)[0].astype(np.int64)
    center = (height // 2) * width + width // 2
    src = Sources(
        next_arr=np.zeros(nodes, np.int64),
        ramp_buf=ramp_buf,
        rng=np.array([seed], np.uint64),
        pattern=np.array([PATTERNS.index(pattern), width, height, center], np.int64),
        rate=np.array([rate, np.log1p(-rate) if rate < 1 else -np.inf, hotspot_fraction]),
        sc=np.zeros(2, np.int64),
    )
    silent = _silent_nodes(pattern, x, y, width)
    # First arrival: failures before the first success (cycle 0 with probability rate).
    src.next_arr[:] = [_gap(src.rate, src.rng) - 1 for _ in range(nodes)]
    src.next_arr[silent] = NEVER
    return fb, src


def _silent_nodes(pattern: str, x: np.ndarray, y: np.ndarray, width: int) -> np.ndarray:
    """Nodes whose destination would be themselves: they send nothing."""
    if pattern == "transpose":
        return x == y
    if pattern == "neighbor" and width == 1:
        return np.ones_like(x, bool)
    return np.zeros_like(x, bool)
