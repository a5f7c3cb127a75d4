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

Layout. State is grouped into a few 2D int64 arrays (columns named by the constants below,
one row per buffer / wavelet slot / PE, so one item's fields share a cache line).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

# numba caches each compiled function keyed on its own file only: the helpers below are
# inlined into wse_sim.engine and wse_sim.traffic, so a change to them (or to the column
# layout) must also change those files, or their cached machine code keeps the old one.
#
# Row indices of 2D arrays go through U() (uint64): for a signed index numba emits
# negative-index wraparound code on every access (~13% of the router's instructions).
#
# The cycle loop's functions. `_nrt=False`: they allocate nothing, and numba's reference
# counting of array arguments (an atomic call per array per function call, ~100 ns for a
# helper taking six arrays) would otherwise cost more than the simulation itself.
hot = njit(cache=True, _nrt=False, error_model="numpy")
hot_inline = njit(cache=True, _nrt=False, error_model="numpy", inline="always")

RAMP = 4
RECV = 5  # buf[:, B_PORT] of a PE receive queue (not a router input)
SINK = -2  # dest of RAMP in packet mode: the packet leaves the network there
# Packet tag: creation cycle << 24 | destination y << 12 | destination x.
TAG_DEST_BITS = 24
TAG_COORD_BITS = 12
TAG_COORD_MASK = (1 << TAG_COORD_BITS) - 1

# params entries
P_WIDTH, P_HEIGHT, P_DEPTH, P_HOP, P_RAMP_IN, P_PACKET, P_WIN0, P_WIN1 = range(8)
# sc (int64 scalars)
(
    SC_NACT,  # routers in the active list
    SC_NWOKEN,  # PEs woken this cycle (a receive queue went 0 -> 1)
    SC_INFLIGHT,  # wavelets in all FIFOs and receive queues
    SC_COPIES,  # extra copies made by multicast
    SC_ACCEPTED,  # packet mode: packets ejected inside the measurement window
    SC_MEASURED,  # packet mode: measured packets ejected
    SC_LAT_SUM,  # packet mode: sum of their latencies
    SC_LAT_MAX,
) = range(8)
N_SC = 8
# route rows (route is [3, routes]: read once per move)
R_PE, R_COLOR, R_TX = range(3)
# buf columns
B_ROUTE, B_PORT, B_HEAD, B_COUNT, B_LAST_POP, B_LAST_GRANT = range(6)
# wl columns (per wavelet slot; the value is in wval)
W_TAG, W_READY = range(2)
# node columns (per PE)
N_OCC, N_IN_ACT, N_ACT = range(3)  # N_ACT: the active list (first sc[SC_NACT] entries)
# ctr columns (per PE counters): wavelets leaving through N, E, S, W; ramp in; ramp out
CT_RAMP_IN, CT_RAMP_OUT = 4, 5


class Fabric(NamedTuple):
    """Router state as grouped flat arrays (a numba-friendly named tuple)."""

    params: np.ndarray  # int64 [8]
    sc: np.ndarray  # int64 [N_SC]
    route: np.ndarray  # int64 [3, routes]
    dest: np.ndarray  # int64 [routes, 5]: buffer reached through each output (-1 none)
    buf: np.ndarray  # int64 [buffers, 6]
    rb_lo: np.ndarray  # int64 [pes + 1]: router input FIFOs of PE p are rb_lo[p]:rb_lo[p+1]
    wl: np.ndarray  # int64 [buffers * depth, 2]
    wval: np.ndarray  # float32 [buffers * depth]
    node: np.ndarray  # int64 [pes, 3]
    woken: np.ndarray  # int64 [pes * ramp_in]: PEs whose receive queue became non-empty
    cand: np.ndarray  # int64 scratch for arbitration
    lat_hist: np.ndarray  # int64 [bins]: packet mode latency histogram (last bin: overflow)
    ctr: np.ndarray  # int64 [pes, 6]: link N/E/S/W crossings leaving the PE, ramp in, out
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
    buf_port = np.nonzero(has_in)[1]
    rb_lo = np.searchsorted(route_pe[buf_route], np.arange(npe + 1)).astype(np.int64)
    dest = np.full((nroute, 5), -1, np.int64)
    if packet:
        dest[:, RAMP] = SINK
        recv_routes = np.zeros(0, np.int64)
    else:
        recv_routes = np.nonzero((tx >> RAMP) & 1)[0]
        dest[recv_routes, RAMP] = n_in + np.arange(len(recv_routes))
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
    nbuf = n_in + len(recv_routes)
    buf = np.zeros((nbuf, 6), np.int64)
    buf[:, B_ROUTE] = np.concatenate([buf_route, recv_routes])
    buf[:, B_PORT] = np.concatenate([buf_port, np.full(len(recv_routes), RECV)])
    buf[:, B_LAST_POP] = buf[:, B_LAST_GRANT] = -1
    max_local = int(np.max(np.diff(rb_lo))) if npe else 0
    return Fabric(
        params=np.array([width, height, depth, hop_latency, ramp_in, int(packet), 0, 0],
                        np.int64),
        sc=np.zeros(N_SC, np.int64),
        route=np.stack([route_pe, route_color, tx]).reshape(3, nroute),
        dest=dest,
        buf=buf,
        rb_lo=rb_lo,
        wl=np.zeros((nbuf * depth, 2), np.int64),
        wval=np.zeros(nbuf * depth, np.float32),
        node=np.zeros((npe, 3), np.int64),
        woken=np.zeros(max(npe * ramp_in, 1), np.int64),
        cand=np.zeros(max(max_local, 1), np.int64),
        lat_hist=np.zeros(max(latency_bins, 1), np.int64),
        ctr=np.zeros((npe, 6), np.int64),
        color_hops=np.zeros(colors, np.int64),
    )


@hot_inline
def U(i):
    """A row index as uint64: numba emits no negative-index wraparound for it."""
    return np.uint64(i)


@hot_inline
def has_room(buf, b, t, depth):
    """Room in FIFO b for a wavelet arriving in cycle t (start-of-cycle occupancy)."""
    freed = 1 if buf[U(b), B_LAST_POP] == t else 0
    return buf[U(b), B_COUNT] + freed < depth


@hot_inline
def head_ready(buf, wl, b, t, depth):
    """FIFO or receive queue b holds a wavelet that may move (be consumed) in cycle t."""
    return buf[U(b), B_COUNT] > 0 and wl[U(b * depth + buf[U(b), B_HEAD]), W_READY] <= t


@hot_inline
def _push(buf, wl, wval, b, value, tag, ready, depth):
    pos = buf[U(b), B_HEAD] + buf[U(b), B_COUNT]  # ring buffer; no division in the hot path
    if pos >= depth:
        pos -= depth
    slot = b * depth + pos
    wval[slot] = value
    wl[U(slot), W_TAG] = tag
    wl[U(slot), W_READY] = ready
    buf[U(b), B_COUNT] += 1


@hot_inline
def _pop(buf, b, depth):
    """Remove the head of b; returns its slot."""
    head = buf[U(b), B_HEAD]
    buf[U(b), B_HEAD] = head + 1 if head + 1 < depth else 0
    buf[U(b), B_COUNT] -= 1
    return b * depth + head


@hot_inline
def _enter_router(node, sc, pe):
    node[U(pe), N_OCC] += 1
    if node[U(pe), N_IN_ACT] == 0:
        node[U(pe), N_IN_ACT] = 1
        node[U(sc[SC_NACT]), N_ACT] = pe
        sc[SC_NACT] += 1


@hot_inline
def inject(buf, wl, wval, node, sc, ctr, b, pe, value, tag, t, depth):
    """The PE (or a packet source) puts a wavelet into its router's RAMP FIFO b in cycle t;
    the caller has checked `has_room`. It may leave the router from cycle t + 1."""
    _push(buf, wl, wval, b, value, tag, t + 1, depth)
    sc[SC_INFLIGHT] += 1
    _enter_router(node, sc, pe)
    ctr[U(pe), CT_RAMP_OUT] += 1


@hot_inline
def pop_recv(buf, wval, sc, b, depth):
    """The PE consumes the head of its receive queue b; returns the value."""
    sc[SC_INFLIGHT] -= 1
    return wval[_pop(buf, b, depth)]


@hot_inline
def _xy_port(x, y, tag):
    """Dimension-order next hop from (x, y) to the destination in `tag`."""
    dx = (tag & TAG_COORD_MASK) - x
    if dx > 0:
        return 1
    if dx < 0:
        return 3
    dy = ((tag >> TAG_COORD_BITS) & TAG_COORD_MASK) - y
    if dy > 0:
        return 2
    if dy < 0:
        return 0
    return RAMP


@hot_inline
def route_cycle(t, params, sc, route, dest, buf, rb_lo, wl, wval, node, woken, cand,
                lat_hist, ctr, color_hops):
    """Advance every active router by cycle t. Returns the number of wavelets moved."""
    width = params[P_WIDTH]
    depth = params[P_DEPTH]
    hop = params[P_HOP]
    ramp_cap = params[P_RAMP_IN]
    packet = params[P_PACKET] != 0
    moved = 0
    copies = 0  # extra wavelets made by multicast
    delta = 0  # change of the wavelets in flight
    i_first_new = sc[SC_NACT]
    i = 0
    while i < sc[SC_NACT]:  # routers activated during this cycle are appended
        pe = node[U(i), N_ACT]
        i += 1
        if packet:
            x = pe % width
            y = pe // width
        # Ready heads, least recently served first.
        nc = 0
        for b in range(rb_lo[pe], rb_lo[pe + 1]):
            if not head_ready(buf, wl, b, t, depth):
                continue
            age = buf[U(b), B_LAST_GRANT]
            j = nc
            while j > 0 and buf[U(cand[j - 1]), B_LAST_GRANT] > age:
                cand[j] = cand[j - 1]
                j -= 1
            cand[j] = b
            nc += 1
        used = 0  # mesh output ports used this cycle (bit mask)
        ramp_used = 0
        for k in range(nc):
            b = cand[k]
            r = buf[U(b), B_ROUTE]
            if packet:
                tx = 1 << _xy_port(x, y, wl[U(b * depth + buf[U(b), B_HEAD]), W_TAG])
            else:
                tx = route[R_TX, r]
            if tx & used & 15:
                continue
            if (tx >> RAMP) & 1 and ramp_used >= ramp_cap:
                continue
            ok = True
            for o in range(5):
                if (tx >> o) & 1:
                    d = dest[U(r), o]
                    if d >= 0 and not has_room(buf, d, t, depth):
                        ok = False
                        break
            if not ok:
                continue
            # Move: pop once, copy to every output.
            slot = _pop(buf, b, depth)
            delta -= 1
            buf[U(b), B_LAST_POP] = t
            buf[U(b), B_LAST_GRANT] = t
            node[U(pe), N_OCC] -= 1
            value = wval[slot]
            tag = wl[U(slot), W_TAG]
            color = route[R_COLOR, r]
            copies -= 1
            for o in range(4):
                if (tx >> o) & 1:
                    d = dest[U(r), o]
                    _push(buf, wl, wval, d, value, tag, t + hop, depth)
                    delta += 1
                    _enter_router(node, sc, route[R_PE, buf[U(d), B_ROUTE]])
                    ctr[U(pe), o] += 1
                    color_hops[color] += 1
                    copies += 1
            used |= tx & 15
            if (tx >> RAMP) & 1:
                ramp_used += 1
                copies += 1
                ctr[U(pe), CT_RAMP_IN] += 1
                d = dest[U(r), RAMP]
                if d >= 0:
                    if buf[U(d), B_COUNT] == 0:
                        woken[sc[SC_NWOKEN]] = pe
                        sc[SC_NWOKEN] += 1
                    _push(buf, wl, wval, d, value, tag, t + 1, depth)
                    delta += 1
                else:
                    _eject(params, sc, lat_hist, tag, t)
            moved += 1
    sc[SC_COPIES] += copies
    sc[SC_INFLIGHT] += delta
    _compact_active(node, sc, i_first_new)
    return moved


@hot
def _compact_active(node, sc, n_old):
    """Drop idle routers from the active list. When it is dense and entries were appended
    this cycle (from n_old on), rebuild it in PE order so the next cycle walks memory in
    order."""
    total = sc[SC_NACT]
    npe = node.shape[0]
    if total > n_old and 8 * total > npe:  # dense: rebuild from the flags, in order
        n = 0
        for pe in range(npe):
            if node[pe, N_IN_ACT]:
                if node[pe, N_OCC] > 0:
                    node[n, N_ACT] = pe
                    n += 1
                else:
                    node[pe, N_IN_ACT] = 0
        sc[SC_NACT] = n
        return
    n = 0
    for j in range(total):
        pe = node[j, N_ACT]
        if node[pe, N_OCC] > 0:
            node[n, N_ACT] = pe
            n += 1
        else:
            node[pe, N_IN_ACT] = 0
    sc[SC_NACT] = n


@hot_inline
def _eject(params, sc, lat_hist, tag, t):
    """Packet mode: a packet leaves the network at its destination in cycle t."""
    if params[P_WIN0] <= t < params[P_WIN1]:
        sc[SC_ACCEPTED] += 1
    birth = tag >> TAG_DEST_BITS
    if params[P_WIN0] <= birth < params[P_WIN1]:
        latency = t - birth
        sc[SC_MEASURED] += 1
        sc[SC_LAT_SUM] += latency
        sc[SC_LAT_MAX] = max(sc[SC_LAT_MAX], latency)
        lat_hist[min(latency, lat_hist.shape[0] - 1)] += 1


@hot
def router_step(fb, t):
    """`route_cycle` on a Fabric tuple (unpacked once per call)."""
    return route_cycle(t, fb.params, fb.sc, fb.route, fb.dest, fb.buf, fb.rb_lo, fb.wl, fb.wval,
                       fb.node, fb.woken, fb.cand, fb.lat_hist, fb.ctr, fb.color_hops)
