"""The router core: one cycle of every router on the fabric, shared by program mode (static
per-(PE, color) routes) and packet mode (dimension-order X-then-Y routing from a
destination tag). There is one router implementation; only the next-hop choice differs.

Buffers. A *route* is one (PE, color) pair that has a route table entry. Each route owns a
FIFO of `depth` wavelets per input port in its `rx` set (N, E, S, W, RAMP) and, in program
mode, a receive queue (depth `depth`) at its PE if RAMP is in its `tx` set. A wavelet is a
float32 value plus an int64 tag (packet mode: creation cycle << 24 | destination PE) plus
the cycle from which it may move again (`ready`).

One cycle `t` of one router:

* Candidates are the input FIFOs whose head is ready (`ready <= t`). A head entered a
  FIFO at cycle `s` with ready = s + hop_latency (mesh link) or s + 1 (PE -> router ramp,
  router -> PE receive queue).
* Its output set is the route's `tx` mask (program mode) or the XY direction of its
  destination (packet mode; RAMP at the destination).
* Candidates are served least-recently-served first (ties: lower buffer index), which is
  round-robin among inputs that keep competing; deterministic.
* A candidate moves iff every output port of its set is still unused this cycle (mesh
  ports carry one wavelet per cycle, the ramp to the PE `ramp_in_per_cycle`) and every
  destination has room judged on start-of-cycle occupancy: a slot freed in cycle t is
  reusable from t + 1 (credit return takes one cycle). Multicast moves atomically.
* There is no per-input-port crossbar limit: FIFOs of different colors behind one input
  port may leave in the same cycle towards different outputs (an input port still receives
  at most one wavelet per cycle over its link).

A link of latency L fed by a FIFO of depth D carries min(1, D / (L + 1)) wavelets per cycle
when saturated: with the defaults (L = 1, D = 4) exactly one per cycle. Nothing is dropped:
a wavelet only moves into a FIFO with room. Colors have separate FIFOs, so a blocked color
never blocks another.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

RAMP = 4
RECV = 5  # buf_port of a PE receive queue (not a router input)
SINK = -2  # dest of RAMP in packet mode: the packet leaves the network there
TAG_DEST_BITS = 24
TAG_DEST_MASK = (1 << TAG_DEST_BITS) - 1

# params (int64) indices
P_WIDTH, P_HEIGHT, P_DEPTH, P_HOP, P_RAMP_IN, P_PACKET, P_WIN0, P_WIN1 = range(8)
# sc (int64 scalars) indices
(
    SC_NACT,  # routers in the active list
    SC_NWOKEN,  # PEs woken this cycle (receive queue went 0 -> 1)
    SC_INFLIGHT,  # wavelets in all FIFOs and receive queues
    SC_COPIES,  # extra copies made by multicast
    SC_EJECTED,  # packet mode: packets ejected
    SC_ACCEPTED,  # packet mode: packets ejected inside the measurement window
    SC_MEASURED,  # packet mode: measured packets ejected
    SC_LAT_SUM,  # packet mode: sum of their latencies
    SC_LAT_MAX,
) = range(9)
N_SC = 9


class Fabric(NamedTuple):
    """Router state as flat arrays (a numba-friendly named tuple)."""

    params: np.ndarray  # int64 [8]
    sc: np.ndarray  # int64 [N_SC]
    route_pe: np.ndarray  # int64 [routes]
    route_color: np.ndarray  # int64 [routes]
    route_tx: np.ndarray  # int64 [routes] output port mask (program mode)
    dest: np.ndarray  # int64 [routes, 5]: buffer reached through each output (-1 none)
    buf_route: np.ndarray  # int64 [buffers]
    buf_port: np.ndarray  # int64 [buffers]: input port 0..4, or RECV
    rb_lo: np.ndarray  # int64 [pes + 1]: router input FIFOs of PE p are rb_lo[p]:rb_lo[p+1]
    head: np.ndarray  # int64 [buffers]
    count: np.ndarray  # int64 [buffers]
    last_pop: np.ndarray  # int64 [buffers]: cycle of the last pop (start-of-cycle room)
    last_grant: np.ndarray  # int64 [buffers]: cycle last served (arbitration age)
    val: np.ndarray  # float32 [buffers * depth]
    tag: np.ndarray  # int64 [buffers * depth]
    ready: np.ndarray  # int64 [buffers * depth]
    occ: np.ndarray  # int64 [pes]: wavelets in the PE's router input FIFOs
    act: np.ndarray  # int64 [pes]: routers with occ > 0 (first sc[SC_NACT] entries)
    in_act: np.ndarray  # uint8 [pes]
    woken: np.ndarray  # int64 [pes * ramp_in]: PEs whose receive queue became non-empty
    cand: np.ndarray  # int64 scratch for arbitration
    lat_hist: np.ndarray  # int64 [bins]: packet mode latency histogram (last bin: overflow)
    # counters
    link: np.ndarray  # int64 [4, pes]: wavelets leaving PE p through N/E/S/W
    ramp_in: np.ndarray  # int64 [pes]: wavelets the router delivered to its PE
    ramp_out: np.ndarray  # int64 [pes]: wavelets the PE put on its router
    color_hops: np.ndarray  # int64 [colors]: mesh link crossings per color


def build_fabric(
    width: int,
    height: int,
    route_pe: np.ndarray,
    route_color: np.ndarray,
    route_rx: np.ndarray,
    route_tx: np.ndarray,
    *,
    colors: int,
    depth: int,
    hop_latency: int,
    ramp_in: int,
    packet: bool = False,
    latency_bins: int = 1,
) -> Fabric:
    """Allocate buffers for the given routes (sorted by (pe, color), unique). Program mode
    gives each route with RAMP in tx a receive queue; packet mode ejects at RAMP."""
    npe = width * height
    nroute = len(route_pe)
    route_pe = np.asarray(route_pe, np.int64)
    route_color = np.asarray(route_color, np.int64)
    rx = np.asarray(route_rx, np.int64)
    tx = np.asarray(route_tx, np.int64)
    # Router input FIFOs, ordered (pe, color, port): each PE's FIFOs are contiguous.
    has_in = (rx[:, None] >> np.arange(5)) & 1  # [routes, 5]
    in_buf = np.full((nroute, 5), -1, np.int64)
    flat = has_in.ravel().astype(bool)
    n_in = int(flat.sum())
    in_buf.ravel()[flat] = np.arange(n_in)
    buf_route = np.repeat(np.arange(nroute), has_in.sum(axis=1))
    buf_port = np.nonzero(has_in)[1].astype(np.int64)
    rb_lo = np.searchsorted(route_pe[buf_route], np.arange(npe + 1)).astype(np.int64)
    dest = np.full((nroute, 5), -1, np.int64)
    if packet:
        dest[:, RAMP] = SINK
        recv_routes = np.zeros(0, np.int64)
    else:
        recv_routes = np.nonzero((tx >> RAMP) & 1)[0]
        dest[recv_routes, RAMP] = n_in + np.arange(len(recv_routes))
    buf_route = np.concatenate([buf_route, recv_routes]).astype(np.int64)
    buf_port = np.concatenate([buf_port, np.full(len(recv_routes), RECV)]).astype(np.int64)
    # Mesh outputs: the neighbour's route of the same color, its opposite input FIFO.
    key = route_pe * colors + route_color
    x, y = route_pe % width, route_pe // width
    for port, (dx, dy), opp in ((0, (0, -1), 2), (1, (1, 0), 3), (2, (0, 1), 0), (3, (-1, 0), 1)):
        sel = np.nonzero((tx >> port) & 1)[0]
        nx, ny = x[sel] + dx, y[sel] + dy
        inside = (nx >= 0) & (nx < width) & (ny >= 0) & (ny < height)
        sel, nx, ny = sel[inside], nx[inside], ny[inside]
        nkey = (ny * width + nx) * colors + route_color[sel]
        pos = np.minimum(np.searchsorted(key, nkey), max(nroute - 1, 0))
        found = key[pos] == nkey
        dest[sel[found], port] = in_buf[pos[found], opp]
    nbuf = len(buf_route)
    max_local = int(np.max(np.diff(rb_lo))) if npe else 0
    params = np.array(
        [width, height, depth, hop_latency, ramp_in, int(packet), 0, 0], np.int64
    )
    return Fabric(
        params=params,
        sc=np.zeros(N_SC, np.int64),
        route_pe=route_pe,
        route_color=route_color,
        route_tx=tx,
        dest=dest,
        buf_route=buf_route,
        buf_port=buf_port,
        rb_lo=rb_lo,
        head=np.zeros(nbuf, np.int64),
        count=np.zeros(nbuf, np.int64),
        last_pop=np.full(nbuf, -1, np.int64),
        last_grant=np.full(nbuf, -1, np.int64),
        val=np.zeros(nbuf * depth, np.float32),
        tag=np.zeros(nbuf * depth, np.int64),
        ready=np.zeros(nbuf * depth, np.int64),
        occ=np.zeros(npe, np.int64),
        act=np.zeros(npe, np.int64),
        in_act=np.zeros(npe, np.uint8),
        woken=np.zeros(max(npe * ramp_in, 1), np.int64),
        cand=np.zeros(max(max_local, 1), np.int64),
        lat_hist=np.zeros(max(latency_bins, 1), np.int64),
        link=np.zeros((4, npe), np.int64),
        ramp_in=np.zeros(npe, np.int64),
        ramp_out=np.zeros(npe, np.int64),
        color_hops=np.zeros(colors, np.int64),
    )


@njit(cache=True, inline="always")
def has_room(fb, b, t):
    """Room in FIFO b for a wavelet arriving in cycle t (start-of-cycle occupancy)."""
    freed = 1 if fb.last_pop[b] == t else 0
    return fb.count[b] + freed < fb.params[P_DEPTH]


@njit(cache=True, inline="always")
def _push(fb, b, value, tag, ready):
    depth = fb.params[P_DEPTH]
    slot = b * depth + (fb.head[b] + fb.count[b]) % depth
    fb.val[slot] = value
    fb.tag[slot] = tag
    fb.ready[slot] = ready
    fb.count[b] += 1
    fb.sc[SC_INFLIGHT] += 1


@njit(cache=True, inline="always")
def _enter_router(fb, pe):
    fb.occ[pe] += 1
    if fb.in_act[pe] == 0:
        fb.in_act[pe] = 1
        fb.act[fb.sc[SC_NACT]] = pe
        fb.sc[SC_NACT] += 1


@njit(cache=True)
def inject(fb, b, pe, value, tag, t):
    """The PE (or a packet source) puts a wavelet into its router's RAMP FIFO b in cycle t;
    the caller has checked `has_room`. It may leave the router from cycle t + 1."""
    _push(fb, b, value, tag, t + 1)
    _enter_router(fb, pe)
    fb.ramp_out[pe] += 1


@njit(cache=True)
def pop_recv(fb, b):
    """The PE consumes the head of its receive queue b; returns the value."""
    depth = fb.params[P_DEPTH]
    slot = b * depth + fb.head[b]
    fb.head[b] = (fb.head[b] + 1) % depth
    fb.count[b] -= 1
    fb.sc[SC_INFLIGHT] -= 1
    return fb.val[slot]


@njit(cache=True, inline="always")
def _xy_port(width, pe, dest):
    dx = dest % width - pe % width
    if dx > 0:
        return 1
    if dx < 0:
        return 3
    dy = dest // width - pe // width
    if dy > 0:
        return 2
    if dy < 0:
        return 0
    return RAMP


@njit(cache=True)
def router_step(fb, t):
    """Advance every active router by cycle t. Returns the number of wavelets moved."""
    width = fb.params[P_WIDTH]
    depth = fb.params[P_DEPTH]
    hop = fb.params[P_HOP]
    ramp_cap = fb.params[P_RAMP_IN]
    packet = fb.params[P_PACKET] != 0
    cand = fb.cand
    moved = 0
    i = 0
    while i < fb.sc[SC_NACT]:  # routers activated during this cycle are appended
        pe = fb.act[i]
        i += 1
        # Ready heads, least recently served first.
        nc = 0
        for b in range(fb.rb_lo[pe], fb.rb_lo[pe + 1]):
            if fb.count[b] == 0 or fb.ready[b * depth + fb.head[b]] > t:
                continue
            age = fb.last_grant[b]
            j = nc
            while j > 0 and fb.last_grant[cand[j - 1]] > age:
                cand[j] = cand[j - 1]
                j -= 1
            cand[j] = b
            nc += 1
        used = 0  # mesh output ports used this cycle (bit mask)
        ramp_used = 0
        for k in range(nc):
            b = cand[k]
            slot = b * depth + fb.head[b]
            r = fb.buf_route[b]
            if packet:
                tx = 1 << _xy_port(width, pe, fb.tag[slot] & TAG_DEST_MASK)
            else:
                tx = fb.route_tx[r]
            if tx & used & 15:
                continue
            if (tx >> RAMP) & 1 and ramp_used >= ramp_cap:
                continue
            ok = True
            for o in range(5):
                if (tx >> o) & 1:
                    d = fb.dest[r, o]
                    if d >= 0 and not has_room(fb, d, t):
                        ok = False
                        break
            if not ok:
                continue
            # Move: pop once, copy to every output.
            fb.head[b] = (fb.head[b] + 1) % depth
            fb.count[b] -= 1
            fb.sc[SC_INFLIGHT] -= 1
            fb.last_pop[b] = t
            fb.last_grant[b] = t
            fb.occ[pe] -= 1
            value = fb.val[slot]
            tag = fb.tag[slot]
            color = fb.route_color[r]
            copies = -1
            for o in range(4):
                if (tx >> o) & 1:
                    d = fb.dest[r, o]
                    _push(fb, d, value, tag, t + hop)
                    _enter_router(fb, fb.route_pe[fb.buf_route[d]])
                    fb.link[o, pe] += 1
                    fb.color_hops[color] += 1
                    copies += 1
            used |= tx & 15
            if (tx >> RAMP) & 1:
                ramp_used += 1
                copies += 1
                fb.ramp_in[pe] += 1
                d = fb.dest[r, RAMP]
                if d >= 0:
                    if fb.count[d] == 0:
                        fb.woken[fb.sc[SC_NWOKEN]] = pe
                        fb.sc[SC_NWOKEN] += 1
                    _push(fb, d, value, tag, t + 1)
                else:
                    _eject(fb, tag, t)
            fb.sc[SC_COPIES] += copies
            moved += 1
    # Drop idle routers from the active list.
    n = 0
    for j in range(fb.sc[SC_NACT]):
        pe = fb.act[j]
        if fb.occ[pe] > 0:
            fb.act[n] = pe
            n += 1
        else:
            fb.in_act[pe] = 0
    fb.sc[SC_NACT] = n
    return moved


@njit(cache=True, inline="always")
def _eject(fb, tag, t):
    """Packet mode: a packet leaves the network at its destination in cycle t."""
    fb.sc[SC_EJECTED] += 1
    if fb.params[P_WIN0] <= t < fb.params[P_WIN1]:
        fb.sc[SC_ACCEPTED] += 1
    birth = tag >> TAG_DEST_BITS
    if fb.params[P_WIN0] <= birth < fb.params[P_WIN1]:
        latency = t - birth
        fb.sc[SC_MEASURED] += 1
        fb.sc[SC_LAT_SUM] += latency
        fb.sc[SC_LAT_MAX] = max(fb.sc[SC_LAT_MAX], latency)
        bins = fb.lat_hist.shape[0]
        fb.lat_hist[min(latency, bins - 1)] += 1
