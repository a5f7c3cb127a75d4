"""Synthetic traffic: destination-routed single-wavelet packets on the same router core
(`wse_sim.router`: same FIFOs, credit timing, arbitration) as program mode. Each PE has one
route (color 0) accepting from every port; the next hop is the dimension-order (X then Y)
direction to the destination in the packet's tag, RAMP at the destination.

Sources. Every node creates packets by a Bernoulli process of rate R per cycle into an
unbounded source queue (FIFO); the head enters the node's RAMP FIFO whenever it has room
(at most one per cycle). Each node draws from its own random stream (splitmix64 seeded by
the seed and the node), so what a node draws does not depend on other nodes or on how the
fabric is split among worker threads. Destinations (drawn when a packet enters the
network; they are i.i.d., so this equals drawing them at creation):

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

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from wse_sim.errors import UserError
from wse_sim.hostmem import mesh_bytes, require
from wse_sim.jit import barrier, hot
from wse_sim.router import (
    RAMP,
    TAG_COORD_BITS,
    TAG_DEST_BITS,
    FabricSpec,
    RouteTable,
    U,
    build_fabric,
    exchange,
    has_room,
    inject,
    latencies,
    list_pushed,
    route_phase,
)
from wse_sim.state import NEVER, SOURCE, TRAFFIC_PARAMS, Fabric, Sources, Workers
from wse_sim.stats import Stats
from wse_sim.threads import ChunkPlan, cores, run_workers

PATTERNS = ("uniform", "transpose", "hotspot", "neighbor")
UNIFORM, TRANSPOSE, HOTSPOT, NEIGHBOR = range(4)
LATENCY_BINS = 1 << 20  # latencies beyond fall into the last bin
GOLDEN_GAMMA = 0x9E3779B97F4A7C15


@hot
def _mix(z):
    """splitmix64's output function (a bijection of uint64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@hot
def _uniform01(node):
    """splitmix64 step of a node's stream: a float in [0, 1)."""
    node.rng += np.uint64(GOLDEN_GAMMA)
    return (_mix(node.rng) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@hot
def _gap(p, node):
    """Cycles to the node's next Bernoulli(rate) success: geometric on 1, 2, ..."""
    if p.rate >= 1.0:
        return 1
    return 1 + int(np.log(1.0 - _uniform01(node)) / p.log_miss)


@hot
def _destination(p, node, n):
    """Destination of node n's next packet, as tag bits (y << 12 | x)."""
    width = p.width
    x, y = n % width, n // width
    if p.pattern == TRANSPOSE:
        x, y = y, x
    elif p.pattern == NEIGHBOR:
        x = x + 1 if x + 1 < width else 0
    elif p.pattern == HOTSPOT and n != p.center and _uniform01(node) < p.hotspot:
        x, y = p.center % width, p.center // width
    else:
        d = int(_uniform01(node) * (width * p.height - 1))
        d = d + 1 if d >= n else d
        x, y = d % width, d // width
    return (y << TAG_COORD_BITS) | x


@hot
def _sources(fb, src, s, t):
    """Cycle t of the packet sources of stripe s (its nodes are its routers)."""
    p = src.params[0]
    win0, win1, depth = fb.params[0].win0, fb.params[0].win1, fb.params[0].depth
    behind = 0
    for n in range(s.r_lo, s.r_hi):
        node = src.node[U(n)]
        birth = node.next
        if birth <= t and has_room(fb, node.ramp, t, depth):
            tag = (birth << TAG_DEST_BITS) | _destination(p, node, n)
            inject(fb, s, node.ramp, tag, t)
            if win0 <= birth < win1:
                s.measured_in += 1
            node.next = birth + _gap(p, node)
        if node.next < win1:
            behind += 1
    s.behind = behind


@hot
def _traffic_worker(fb, src, wk, t, t_end, workers, w):
    """Run cycles t..t_end-1 of stripes w, w + workers, ..., stopping early once every
    measured packet has arrived. Returns (cycle, drained)."""
    stripes = wk.stripe
    n = len(stripes)
    win1 = fb.params[0].win1
    drained = False
    while True:
        barrier(wk.barrier, workers)
        behind = measured = measured_in = 0
        for k in range(n):
            behind += stripes[k].pub_behind
            measured += stripes[k].pub_measured
            measured_in += stripes[k].pub_measured_in
        if t >= win1 and behind == 0 and measured == measured_in:
            drained = True
            break
        if t >= t_end:
            break
        for k in range(w, n, workers):
            if n > 1:
                list_pushed(fb, stripes, k, t - 1)
            route_phase(fb, stripes, k, t)
        barrier(wk.barrier, workers)
        for k in range(w, n, workers):
            s = stripes[k]
            if n > 1:
                exchange(fb, stripes, k, t)
            _sources(fb, src, s, t)
            s.pub_behind, s.pub_measured, s.pub_measured_in = s.behind, s.measured, s.measured_in
        t += 1
    return t, drained


@hot
def _first_arrivals(src, silent):
    """Seed every node's stream and draw its first arrival: failures before the first
    success (cycle 0 with probability rate); silent nodes never send."""
    p = src.params[0]
    for n in range(len(src.node)):
        node = src.node[U(n)]
        # Streams start at unrelated points of splitmix64's cycle (node.rng holds the seed).
        node.rng = _mix(_mix(np.uint64(n) + np.uint64(GOLDEN_GAMMA)) + node.rng)
        node.next = NEVER if silent[n] else _gap(p, node) - 1


@hot
def _queued_before(src, end):
    """Packets created before cycle `end` still in source queues (drawing the rest of each
    node's arrival process; called once the run is over)."""
    total = 0
    p = src.params[0]
    for n in range(len(src.node)):
        node = src.node[U(n)]
        a = node.next
        while a < end:
            total += 1
            a += _gap(p, node)
    return total


@dataclass(frozen=True)
class RouterTiming:
    """The routers of a traffic run: input queue depth (wavelets), cycles per link, cycles
    from a PE onto its router (the wafer's `queue_depth`, `hop_latency`, `ramp_in`)."""
    queue_depth: int = 4
    hop_latency: int = 1
    ramp_in: int = 1


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
    router: RouterTiming = RouterTiming(),
    drain: int | None = None,
    hotspot_fraction: float = 0.2,
    progress: Callable[[int], None] | None = None,
    threads: int | None = None,
) -> TrafficResult:
    """Run synthetic traffic; see the module docstring. `drain` (default 4 * cycles) bounds
    the cycles run after the measurement window. The mesh's rows are split into `threads`
    stripes (default: one per core), run by as many host threads as the work per cycle
    pays for and the machine's load allows (`wse_sim.threads.ChunkPlan`); the results do not
    depend on either. Arguments
    out of range, and a mesh too large for this machine's memory, are UserErrors naming
    the argument."""
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
    queue_depth, hop_latency, ramp_in = router.queue_depth, router.hop_latency, router.ramp_in
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
    nodes = width * height
    spec = FabricSpec(width, height, colors=1, depth=queue_depth, hop_latency=hop_latency,
                      ramp_in=ramp_in, packet=True, latency_bins=LATENCY_BINS)
    fb, wk, src = _build(spec, pattern, rate, seed, hotspot_fraction, threads or cores())
    win0, win1 = warmup, warmup + cycles
    fb.params["win0"], fb.params["win1"] = win0, win1
    t, end = 0, win1 + drain
    plan = ChunkPlan(wk, 16, 64, 1 << 20)  # (a first chunk short: a big mesh's cycle is ms)
    while t < end:
        workers, chunk = plan.next()
        t0 = t
        t, drained = run_workers(_traffic_worker, workers, fb, src, wk, t,
                                 min(t + chunk, end), workers)
        plan.ran(t - t0)
        if progress is not None:
            progress(t)
        if drained:
            break
    queued = _queued_before(src, win1)
    measured = int(wk.stripe["measured_in"].sum()) + queued
    done = int(wk.stripe["measured"].sum())
    hist = latencies(fb)
    p99 = float(np.searchsorted(np.cumsum(hist), 0.99 * done)) if done else float("nan")
    hops = mean_hops(width, height, pattern, hotspot_fraction)
    stats = Stats.from_state(width, height, t, fb, wk)
    return TrafficResult(
        mesh=f"{width}x{height}", pattern=pattern, rate=rate, nodes=nodes, warmup=warmup,
        cycles=cycles, total_cycles=t, seed=seed, queue_depth=queue_depth,
        hop_latency=hop_latency, measured_packets=measured, unfinished_packets=measured - done,
        latency_avg=float(wk.stripe["lat_sum"].sum() / done) if done else float("nan"),
        latency_p99=p99, latency_max=int(wk.stripe["lat_max"].max()),
        offered=measured / nodes / cycles,
        accepted=float(wk.stripe["accepted"].sum()) / nodes / cycles,
        mean_hops=hops, zero_load_latency=1.0 + hop_latency * hops, stats=stats,
    )


def _build(spec: FabricSpec, pattern: str, rate: float, seed: int, hotspot_fraction: float,
           stripes: int) -> tuple[Fabric, Workers, Sources]:
    """Every node has one route (color 0) accepting from and sending to every link it has."""
    width, height = spec.width, spec.height
    nodes = width * height
    pe = np.arange(nodes, dtype=np.int64)
    x, y = pe % width, pe // width
    links = ((y > 0) << 0) | ((x < width - 1) << 1) | ((y < height - 1) << 2) | ((x > 0) << 3)
    mask = (links | (1 << RAMP)).astype(np.int64)
    fb, wk = build_fabric(spec, RouteTable(pe, np.zeros(nodes, np.int64), mask, mask),
                          np.zeros(0, np.int64), stripes)
    params = TRAFFIC_PARAMS.new(1)
    for name, value in (("pattern", PATTERNS.index(pattern)), ("width", width),
                        ("height", height), ("center", (height // 2) * width + width // 2),
                        ("rate", rate), ("log_miss", np.log1p(-rate) if rate < 1 else -np.inf),
                        ("hotspot", hotspot_fraction)):
        params[name] = value
    node = SOURCE.new(nodes)
    node["ramp"] = np.nonzero(fb.fifo["port"] == RAMP)[0]
    node["rng"] = np.uint64(seed)
    src = Sources(params=params, node=node)
    _first_arrivals(src, _silent_nodes(pattern, x, y, width))
    return fb, wk, src


def _silent_nodes(pattern: str, x: np.ndarray, y: np.ndarray, width: int) -> np.ndarray:
    """Nodes whose destination would be themselves: they send nothing."""
    if pattern == "transpose":
        return x == y
    if pattern == "neighbor" and width == 1:
        return np.ones_like(x, bool)
    return np.zeros_like(x, bool)
