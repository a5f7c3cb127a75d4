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
* Candidates are served least-recently-served first (ties: lower FIFO index), which is
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

Switch positions (program mode; `wse_sim.program` has the model's sources). A route may
have switch positions: each an (rx, tx) pair, the route's FIFOs those of every position's
rx ports, its outputs those of every position's tx ports. The router uses the *current*
position only: a head whose port the position does not accept is not a candidate (its FIFO
is gated, `Fifo.gate`), outputs are the position's tx.

* A control wavelet (data CONTROL, put on the ramp by a PE's SWITCH_ADV) is routed exactly
  like a data wavelet under the current position: the same arbitration, output ports, room
  and ramp slot, multicast included. In the cycle t it leaves a router, that router's
  position for its color advances (`_switch`: the next position; past the last one the
  base in ring mode, else it stays; a static route does not change).
* Latency: from cycle t + 1 + `switch_latency` the color moves again at that router, under
  the new position (until then its FIFOs are held, GATE_HELD). The time a hardware switch
  takes is not published: the wafer field defaults to 0 (the cycle after).
* At a RAMP output the router consumes a control wavelet: it never enters the PE's receive
  queue and starts no task (a modelling choice; the hardware may also hand it to a control
  task, which this model does not have). Counters: `sunk` per router, `switches` per route.

Ordering. Wavelets of one color that enter a router through one port keep their order (one
FIFO), so a control wavelet sent after a stream's last data wavelet on the same path
switches each router only after the whole stream has left it: that is how a program ends
one phase of a color and starts the next (a relay, a MOV from FABIN to FABOUT on a PE,
moves a stream to another color instead). FIFO order cannot order wavelets of the color
waiting at another input port of the router, or behind the control wavelet in its own
FIFO: after the switch they wait, gated, until a position that accepts their port comes
round (another control wavelet). If neither the new position nor any position after it
(every position, in ring mode) accepts their port, they can never move: the switch is a
fault, and the run stops with SwitchOrderError naming PE, color, port and positions. Only
wavelets that entered the FIFO before cycle t are judged (those pushed in cycle t are
ready at t + hop_latency at the earliest; counting them would depend on the order routers
run in); wavelets that arrive later at a port no position will accept again are stranded
and reported when the fabric stops (DeadlockError, "held by a switch position").

Edge ports (program mode; `wse_sim.engine` has the timing). An inbound port fills the input
FIFO of its route for its off-wafer side (Fifo.producer EDGE_FED: no router feeds it);
an outbound port has a FIFO of its own (port EDGE_OUT, after the receive queues) behind
its route's output of that side. `edge_phase` serves them at the start of a cycle, on one
worker, before the routers: it pushes and pops like a neighbouring router (ready after
hop_latency, room on start-of-cycle occupancy) and leaves the routers it touched in its
stripe's `edge_woken` list, which that stripe's `route_phase` lists for the next cycle.
What it decided the workers read from slot `seq & 1` of the EDGE record's pub_ fields
(double-buffered: a worker may still read the previous phase's while the next runs).

Order does not matter. Within a cycle no router's decision depends on another's: heads
pushed this cycle are not ready before t + 1, room is start-of-cycle occupancy, every
FIFO has one producer, and a route's switch position is changed only by its own router.
So routers may run in any order, or in parallel stripes of rows (`wse_sim.state`): a move
into a FIFO of another stripe judges room on that FIFO's occupancy published at the end of
the previous cycle (`XFifo.occupied`, kept by the producer's stripe) and is pushed after
all stripes finished routing (`exchange`).

Who runs. Only listed routers run in a cycle (`Fabric.active`). A router stays listed
while it moves wavelets and still holds one, or holds a head that is not ready yet; one
whose heads are all ready but blocked (every destination full) leaves the list, and so
does an empty one. It is listed again by a push into an empty FIFO of its own (a wavelet
behind an older head cannot move first) or by a pop of a full FIFO it feeds (only then can
it have waited for room there): the only events that can let it move, so blocked and idle
routers cost nothing. A push into another stripe lists its router at the start of the next
cycle (`list_pushed`). Counters are not kept per move: link crossings, ramp deliveries and
sends are each FIFO's `pushed` count at the end (`fabric_counters`).

Layout and the meaning of every field: `wse_sim.state`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from wse_sim.jit import atomic_add, bits_float, float_bits, hot, hot_inline, trailing_zeros
from wse_sim.program import OPPOSITE, PORT_OFFSET, Port
from wse_sim.state import (
    CONTROL,
    EDGE,
    EDGE_FED,
    EDGE_OUT,
    EDGE_PORT,
    FABRIC_PARAMS,
    FIFO,
    GATE_HELD,
    GATE_OFF,
    NEVER,
    NO_DEST,
    RECV,
    REMOTE,
    ROUTE,
    ROUTER,
    SINK,
    STRIPE,
    SWITCH,
    SWPOS,
    WAVELET,
    XFIFO,
    XPUSH,
    Fabric,
    Workers,
)

N, E, S, W, RAMP = (int(p) for p in (Port.N, Port.E, Port.S, Port.W, Port.RAMP))
MESH = int(sum(1 << p for p in PORT_OFFSET))  # bit mask of the mesh ports
# Packet tag: creation cycle << 24 | destination y << 12 | destination x.
TAG_DEST_BITS = 24
TAG_COORD_BITS = 12
TAG_COORD_MASK = (1 << TAG_COORD_BITS) - 1
# Packet latencies below this count in the ejecting stripe's own histogram (128 KiB): the
# atomic adds of every worker to one shared histogram cost two-thread traffic 3-7%.
NEAR_LATENCY_BINS = 1 << 14
# Fabric.woken entries: slot << 1 | what happened.
WOKEN_POP, WOKEN_DELIVERY = 0, 1  # its RAMP FIFO was popped / a receive queue went 0 -> 1


@dataclass(frozen=True)
class FabricSpec:
    """The fabric's size and router parameters."""

    width: int
    height: int
    colors: int
    depth: int
    hop_latency: int
    ramp_in: int
    packet: bool = False  # destination-routed packets, ejected at RAMP
    switch_latency: int = 0  # extra cycles a switch change holds its color
    latency_bins: int = 1  # packet mode latency histogram
    edge_rate: float = 1.0  # edge ports: words per cycle each direction (all ports)
    edge_latency: int = 0  # edge ports: cycles to and from the memory service


class RouteTable(NamedTuple):
    """Route table entries, sorted by (pe, color), unique; masks are Port bit sets (of a
    route with switch positions: the ports of any position)."""

    pe: np.ndarray
    color: np.ndarray
    rx: np.ndarray
    tx: np.ndarray


class SwitchTable(NamedTuple):
    """The routes with switch positions: their RouteTable index (ascending), start position,
    ring flag, and their positions (rx, tx; the base first), route after route."""

    route: np.ndarray
    start: np.ndarray
    ring: np.ndarray
    count: np.ndarray  # positions of each, the base included
    rx: np.ndarray  # [sum(count)]
    tx: np.ndarray


NO_SWITCHES = SwitchTable(*(np.zeros(0, np.int64) for _ in range(6)))


class PortTable(NamedTuple):
    """The edge ports, in program order: RouteTable index of their (PE, color) route, side
    (Port), inbound flag, words (inbound: to send; outbound: expected), marks per port, the
    inbound ports' words (float32, an array a port: the program's own, not a copy) and the
    marks end to end (word indices)."""

    route: np.ndarray
    side: np.ndarray
    inbound: np.ndarray
    words: np.ndarray
    nmarks: np.ndarray
    data: tuple[np.ndarray, ...]
    marks: np.ndarray


NO_PORTS = PortTable(*(np.zeros(0, np.int64) for _ in range(5)), (), np.zeros(0, np.int64))


def _unicast_port(tx: np.ndarray) -> np.ndarray:
    """The port of each unicast tx mask, -1 for a multicast (or empty) one."""
    single = (tx & (tx - 1)) == 0
    return np.where(single & (tx > 0), np.log2(np.maximum(tx, 1)).astype(np.int64), -1)


def build_fabric(spec: FabricSpec, routes: RouteTable, program_pes: np.ndarray,
                 stripes: int, switches: SwitchTable = NO_SWITCHES,
                 ports: PortTable = NO_PORTS) -> tuple[Fabric, Workers]:
    """Fabric state at cycle 0 for `routes` (with the switch positions `switches` and the
    edge ports `ports`), and the workers of `stripes` bands of rows. `program_pes` (sorted
    PE indices) are the PEs that run a program: each has a router (maybe without FIFOs)
    and its slot is its rank there. An inbound port fills its route's input FIFO of its
    side; an outbound port has a FIFO of its own (after the receive queues) behind its
    route's output `side`."""
    width = spec.width
    rpe = np.asarray(routes.pe, np.int64)
    color = np.asarray(routes.color, np.int64)
    rx = np.asarray(routes.rx, np.int64)
    tx = np.asarray(routes.tx, np.int64)
    nroute = len(rpe)
    router_pe = np.union1d(rpe, np.asarray(program_pes, np.int64))
    nrouter = len(router_pe)
    route_router = np.searchsorted(router_pe, rpe)
    # Router input FIFOs, ordered (router, color, port): each router's FIFOs are contiguous.
    has_in = (rx[:, None] >> np.arange(len(Port))) & 1  # [routes, ports]
    in_fifo = np.full((nroute, len(Port)), -1, np.int64)
    flat = has_in.ravel().astype(bool)
    n_in = int(flat.sum())
    in_fifo.ravel()[flat] = np.arange(n_in)
    fifo_route = np.repeat(np.arange(nroute), has_in.sum(axis=1))
    fifo_port = np.nonzero(has_in)[1]
    recv_routes = (np.zeros(0, np.int64) if spec.packet
                   else np.nonzero((tx >> RAMP) & 1)[0])
    p_route = np.asarray(ports.route, np.int64)
    p_side = np.asarray(ports.side, np.int64)
    p_in = np.asarray(ports.inbound, bool)
    out_routes = p_route[~p_in]
    n_recv = n_in + len(recv_routes)
    nfifo = n_recv + len(out_routes)
    fifo = FIFO.new(nfifo, align=64)
    fifo["route"] = np.concatenate([fifo_route, recv_routes, out_routes])
    fifo["router"] = route_router[fifo["route"]]
    fifo["port"] = np.concatenate([fifo_port, np.full(len(recv_routes), RECV),
                                   np.full(len(out_routes), EDGE_OUT)])
    # a receive queue or an outbound port's FIFO: fed by its own router
    fifo["producer"][n_in:] = fifo["router"][n_in:]
    port_fifo = np.zeros(len(p_route), np.int64)
    port_fifo[p_in] = in_fifo[p_route[p_in], p_side[p_in]]
    port_fifo[~p_in] = n_recv + np.arange(len(out_routes))
    fifo["producer"][port_fifo[p_in]] = EDGE_FED
    route = ROUTE.new(nroute)
    route["tx"], route["color"] = tx, color
    route["out"] = _unicast_port(tx)
    dest = np.full((nroute, len(Port)), NO_DEST, np.int64)
    dest[:, RAMP] = SINK if spec.packet else NO_DEST
    dest[recv_routes, RAMP] = n_in + np.arange(len(recv_routes))
    # Mesh outputs: the neighbour's route of the same color, its opposite input FIFO.
    key = rpe * spec.colors + color
    x, y = rpe % width, rpe // width
    for port, (dx, dy) in PORT_OFFSET.items():
        sel = np.nonzero((tx >> port) & 1)[0]
        nx, ny = x[sel] + dx, y[sel] + dy
        inside = (nx >= 0) & (nx < width) & (ny >= 0) & (ny < spec.height)
        sel, nx, ny = sel[inside], nx[inside], ny[inside]
        nkey = (ny * width + nx) * spec.colors + color[sel]
        pos = np.minimum(np.searchsorted(key, nkey), max(nroute - 1, 0))
        found = key[pos] == nkey
        sel, d = sel[found], in_fifo[pos[found], OPPOSITE[port]]
        dest[sel, port] = d
        fifo["producer"][d] = route_router[sel]
    dest[out_routes, p_side[~p_in]] = port_fifo[~p_in]
    router = ROUTER.new(nrouter)
    router["fifo_lo"] = np.searchsorted(route_router[fifo_route], np.arange(nrouter))
    router["fifo_hi"] = np.searchsorted(route_router[fifo_route], np.arange(nrouter), "right")
    router["x"], router["y"] = router_pe % width, router_pe // width
    is_program = np.isin(router_pe, program_pes)
    router["slot"][is_program] = np.arange(int(is_program.sum()))
    fifo["bit"] = np.arange(nfifo) - router["fifo_lo"][fifo["router"]]

    # Stripes: bands of rows with about equal numbers of FIFOs (plus one per router).
    weight = np.bincount(router["y"], minlength=spec.height).astype(np.float64)
    weight += np.bincount(router["y"][fifo["router"]], minlength=spec.height)
    stripes = max(1, min(stripes, spec.height))
    cum = np.cumsum(weight)
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, stripes) / stripes, "right")
    row_lo = np.unique(np.concatenate([[0], cuts, [spec.height]]))
    stripes = len(row_lo) - 1
    r_bounds = np.searchsorted(router["y"], row_lo)
    stripe_of = np.searchsorted(r_bounds, np.arange(nrouter), "right") - 1
    # Cross-stripe FIFOs: the producer's stripe pushes them after the routing phase.
    d_route, d_port = np.nonzero(dest >= 0)
    d_fifo = dest[d_route, d_port]
    cross = stripe_of[route_router[d_route]] != stripe_of[fifo["router"][d_fifo]]
    cross &= d_port != RAMP
    order = np.lexsort((d_fifo[cross], stripe_of[route_router[d_route[cross]]]))
    xf_route, xf_port, xf_fifo = (a[cross][order] for a in (d_route, d_port, d_fifo))
    xfifo = XFIFO.new(len(xf_fifo))
    xfifo["fifo"], xfifo["producer"] = xf_fifo, route_router[xf_route]
    dest[xf_route, xf_port] = REMOTE - np.arange(len(xf_fifo))
    fifo["producer"][xf_fifo] = -1  # woken by its producer's stripe (`exchange`)
    route["dest"] = dest
    xin = np.argsort(stripe_of[fifo["router"][xf_fifo]], kind="stable").astype(np.int32)

    wakers = np.bincount(fifo["router"][(fifo["port"] == RAMP) | (fifo["port"] == RECV)],
                         minlength=nrouter)
    w_lo = np.concatenate([[0], np.cumsum(wakers)])[r_bounds[:-1]]
    # A stripe's program PEs: from the first PE of its first row (a program without
    # routes or PEs has no router to start a stripe at).
    slot_bounds = np.searchsorted(np.asarray(program_pes, np.int64), row_lo[:-1] * width)
    stripe = STRIPE.new(stripes)
    stripe["r_lo"], stripe["r_hi"] = r_bounds[:-1], r_bounds[1:]
    stripe["s_lo"] = slot_bounds
    stripe["s_hi"] = np.append(slot_bounds[1:], len(program_pes))
    x_stripe = stripe_of[xfifo["producer"]]
    stripe["x_lo"] = np.searchsorted(x_stripe, np.arange(stripes))
    stripe["x_hi"] = np.searchsorted(x_stripe, np.arange(stripes), "right")
    xi_stripe = stripe_of[fifo["router"][xf_fifo[xin]]]
    stripe["xi_lo"] = np.searchsorted(xi_stripe, np.arange(stripes))
    stripe["xi_hi"] = np.searchsorted(xi_stripe, np.arange(stripes), "right")
    stripe["w_lo"] = w_lo
    near = min(spec.latency_bins, NEAR_LATENCY_BINS)
    stripe["h_lo"] = np.arange(stripes) * near
    port_stripe = stripe_of[route_router[p_route]] if len(p_route) else p_route
    stripe["e_lo"] = np.searchsorted(np.sort(port_stripe), np.arange(stripes))

    params = FABRIC_PARAMS.new(1)
    shift = max(int(spec.depth - 1).bit_length(), 0)
    for name, value in (("width", width), ("height", spec.height), ("colors", spec.colors),
                        ("depth", spec.depth),
                        ("shift", shift), ("hop", spec.hop_latency),
                        ("ramp_in", spec.ramp_in), ("packet", int(spec.packet))):
        params[name] = value
    widest = int((router["fifo_hi"] - router["fifo_lo"]).max()) if nrouter else 0
    switch, swpos, route_sw = _switches(switches, route, fifo, in_fifo, has_in.sum(axis=1),
                                        spec.packet)
    params["switch_latency"] = spec.switch_latency
    params["near_bins"] = near
    fb = Fabric(
        params=params,
        fifo=fifo,
        wl=WAVELET.new(nfifo << shift, align=64),  # a FIFO's slots share cache lines
        route=route,
        router=router,
        router_pe=router_pe,
        occupied=np.zeros((max(nrouter, 1), max(-(-widest // 64), 1)), np.uint64),
        active=np.zeros((2, max(nrouter, 1)), np.int32),
        woken=np.zeros(max(int(wakers.sum()), 1), np.int64),
        cand=np.zeros((stripes, max(widest, 1)), np.int64),
        xfifo=xfifo,
        xin=xin,
        xpush=XPUSH.new(len(xf_fifo)),
        lat_hist=np.zeros(max(spec.latency_bins, 1), np.int64),
        lat_near=np.zeros(stripes * near, np.int64),
        switch=switch,
        swpos=swpos,
        route_sw=route_sw,
        **_edge(spec, ports, port_fifo, route_router[p_route], port_stripe),
    )
    return fb, Workers(stripe=stripe, barrier=np.zeros(16, np.int64))


def _edge(spec: FabricSpec, ports: PortTable, fifo: np.ndarray, router: np.ndarray,
          stripe: np.ndarray) -> dict[str, np.ndarray]:
    """The Fabric fields of the edge ports at cycle 0 (`edge_phase`)."""
    nports = len(ports.route)
    port = EDGE_PORT.new(nports)
    inbound = np.asarray(ports.inbound, bool)
    words = np.asarray(ports.words, np.int64)
    port["n"], port["fifo"], port["router"], port["stripe"] = words, fifo, router, stripe
    port["inbound"] = inbound
    port["data"] = np.concatenate([[0], np.cumsum(words)])[:-1]
    port["mark"] = np.concatenate([[0], np.cumsum(ports.nmarks)])[:-1]
    port["mark_hi"] = port["mark"] + ports.nmarks
    data = np.zeros(int(words.sum()), np.float32)
    # the inbound words, port after port (outbound ports' slots stay zero until received)
    for at, words_in in zip(port["data"][inbound].tolist(), ports.data, strict=True):
        data[at:at + len(words_in)] = words_in
    order = np.concatenate([np.nonzero(inbound & (words > 0))[0], np.nonzero(~inbound)[0]])
    edge = EDGE.new(1)
    cap = max(spec.edge_rate, 1.0)
    edge["rate"], edge["cap"], edge["cin"], edge["cout"] = spec.edge_rate, cap, cap, cap
    edge["latency"], edge["nports"] = spec.edge_latency, nports
    edge["nin"] = int((inbound & (words > 0)).sum())
    edge["out_lo"], edge["nout"] = edge["nin"], int((~inbound).sum())
    edge["in_left"] = edge["pub_left"] = int(words[inbound].sum())
    if nports:
        edge["pub_next"] = 0
    return {"edge": edge, "port": port, "edge_data": data,
            "edge_marks": np.append(np.asarray(ports.marks, np.int64), 0),
            "edge_mark_cycle": np.full(len(ports.marks) + 1, -1, np.int64),
            "edge_order": np.append(order, 0).astype(np.int32),
            "edge_served": np.zeros(nports + 1, np.int32),
            "edge_woken": np.zeros(nports + 1, np.int32)}


def _switches(sw: SwitchTable, route: np.ndarray, fifo: np.ndarray, in_fifo: np.ndarray,
              n_in: np.ndarray, packet: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SWITCH, SWPOS and Route -> Switch records of the routes with switch positions; sets
    their routes' tx and out and their FIFOs' gates to the start position's."""
    nsw = len(sw.route)
    assert not (packet and nsw), "packet mode has no switch positions"
    switch = SWITCH.new(nsw)
    swpos = SWPOS.new(int(np.sum(sw.count)))
    route_sw = np.full(max(len(route), 1), -1, np.int32)
    first = np.concatenate([[0], np.cumsum(sw.count)])[:-1].astype(np.int64)
    swpos["rx"], swpos["tx"] = sw.rx, sw.tx
    swpos["out"] = _unicast_port(np.asarray(sw.tx, np.int64))
    for k in range(nsw):
        r, count, lo = int(sw.route[k]), int(sw.count[k]), int(first[k])
        ring = bool(sw.ring[k])
        rxs = [int(m) for m in sw.rx[lo:lo + count]]
        for j in range(count):  # the rx ports some position from j on accepts
            later = range(count) if ring else range(j, count)
            reach = 0
            for i in later:
                reach |= rxs[i]
            swpos["reach"][lo + j] = reach
        f_lo = int(in_fifo[r][in_fifo[r] >= 0].min()) if n_in[r] else 0
        switch[k] = (0, 0, r, int(sw.start[k]), count, int(ring), lo, f_lo, f_lo + int(n_in[r]))
        route_sw[r] = k
        start = swpos[lo + int(sw.start[k])]
        route["tx"][r], route["out"][r] = start["tx"], start["out"]
        ports = fifo["port"][f_lo:f_lo + int(n_in[r])]
        fifo["gate"][f_lo:f_lo + int(n_in[r])] = np.where((start["rx"] >> ports) & 1, 0,
                                                           GATE_OFF)
    return switch, swpos, route_sw


def latencies(fb: Fabric) -> np.ndarray:
    """Packet mode, after a run: the histogram of packet latencies of every stripe (last
    bin: overflow). The stripes' own counts move into the shared histogram (no copy of
    its megabytes), so a second call returns the same."""
    near = int(fb.params["near_bins"][0])
    fb.lat_hist[:near] += fb.lat_near.reshape(-1, near).sum(axis=0)
    fb.lat_near[:] = 0
    return fb.lat_hist


def fabric_counters(fb: Fabric) -> dict[str, np.ndarray]:
    """Per router: wavelets that left its PE through each mesh port ("link", [4, routers]),
    were delivered to its PE or ejected ("ramp_in") and were sent by it ("ramp_out"); per
    color: mesh link crossings ("color_hops"). Every push into an input FIFO is one crossing
    of the link (or ramp) that feeds it, so these are FIFO push counts."""
    width, colors = int(fb.params["width"][0]), int(fb.params["colors"][0])
    fifo, nrouter = fb.fifo, len(fb.router)
    port, pushed, owner = fifo["port"], fifo["pushed"], fifo["router"]
    # (an inbound edge port's words crossed no mesh link: counted by the port, EDGE_PORT)
    mesh = (port < RAMP) & (pushed > 0) & (fifo["producer"] != EDGE_FED)
    offset = np.array([PORT_OFFSET[Port(o)] for o in range(RAMP)], np.int64)
    opposite = np.array([OPPOSITE[Port(o)] for o in range(RAMP)], np.int64)
    here = fb.router_pe[owner[mesh]]
    dx, dy = offset[port[mesh]].T
    feeder = np.searchsorted(fb.router_pe, here + dy * width + dx)
    link = np.zeros((RAMP, nrouter), np.int64)
    np.add.at(link, (opposite[port[mesh]], feeder), pushed[mesh])

    def per_router(sel: np.ndarray) -> np.ndarray:
        return np.bincount(owner[sel], pushed[sel], nrouter).astype(np.int64)

    color = fb.route["color"][fifo["route"][mesh]]
    return {"link": link, "ramp_in": per_router(port == RECV) + fb.router["ejected"],
            "ramp_out": per_router(port == RAMP),
            "color_hops": np.bincount(color, pushed[mesh], colors).astype(np.int64)}


# ---------------------------------------------------------------------------------------------
# The cycle: numba code. `fb` a Fabric, `s` a STRIPE record (the calling worker's), `t` the
# cycle. Activation and wake-ups always target cycle t + 1.


@hot_inline
def U(i):
    """A row index as uint64: numba emits no negative-index wraparound for it."""
    return np.uint64(i)


@hot_inline
def activate(fb, s, r, t):
    """List router r (of stripe s) to run in cycle t + 1."""
    rt = fb.router[U(r)]
    if rt.queued != t + 1:
        rt.queued = t + 1
        fb.active[U(1 - s.rcur), U(s.r_lo + s.r_nnext)] = r
        s.r_nnext += 1


@hot_inline
def has_room(fb, b, t, depth):
    """Room in FIFO b for a wavelet arriving in cycle t (start-of-cycle occupancy)."""
    f = fb.fifo[U(b)]
    return f.pushed - f.popped + (1 if f.last_grant == t else 0) < depth


@hot_inline
def head_ready(fb, b, t):
    """FIFO or receive queue b holds a wavelet that may move (be consumed) in cycle t."""
    return fb.fifo[U(b)].head_ready <= t


@hot_inline
def _mark(fb, r, b, on):
    """Set (or clear) router r's bit of its input FIFO b in `occupied`."""
    j = fb.fifo[U(b)].bit
    bit = np.uint64(1) << np.uint64(j & 63)
    if on:
        fb.occupied[U(r), U(j >> 6)] |= bit
    else:
        fb.occupied[U(r), U(j >> 6)] &= ~bit


@hot_inline
def _push(fb, d, data, ready, shift):
    f = fb.fifo[U(d)]
    if f.pushed == f.popped:
        f.head_ready = ready
        f.head = data
    w = fb.wl[U((d << shift) | (f.pushed & ((1 << shift) - 1)))]
    w.ready = ready
    w.data = data
    f.pushed += 1


@hot_inline
def _pop(fb, b, shift):
    """Remove the head of b (its data is in f.head until now)."""
    f = fb.fifo[U(b)]
    f.popped += 1
    if f.popped == f.pushed:
        f.head_ready = NEVER
    else:
        w = fb.wl[U((b << shift) | (f.popped & ((1 << shift) - 1)))]
        f.head_ready = w.ready
        f.head = w.data


@hot_inline
def inject(fb, s, b, data, t):
    """The PE (or a packet source) puts a wavelet into its RAMP FIFO b in cycle t; the
    caller has checked `has_room`. It may leave the router from cycle t + 1."""
    r = fb.fifo[U(b)].router
    if fb.fifo[U(b)].pushed == fb.fifo[U(b)].popped:
        # (behind an older head it can move only after that one, whose router is listed
        # or waits for room)
        _mark(fb, r, b, True)
        activate(fb, s, r, t)
    _push(fb, b, data, t + 1, fb.params[0].shift)
    s.inflight += 1


@hot_inline
def send(fb, s, b, value, t):
    """`inject` of a float32 value (program mode)."""
    inject(fb, s, b, float_bits(value), t)


@hot_inline
def pop_recv(fb, s, b, t):
    """The PE consumes the head of its receive queue b in cycle t; returns the value."""
    f = fb.fifo[U(b)]
    value = bits_float(f.head)
    p = fb.params[0]
    _pop(fb, b, p.shift)
    # Only read after the run (Stats.last_ramp): routers judge a receive queue's room in
    # cycle t + 1 at the earliest, on its occupancy alone.
    f.last_grant = t
    s.inflight -= 1
    if f.pushed - f.popped == p.depth - 1:  # it was full: its router may wait for room
        activate(fb, s, fb.fifo[U(b)].producer, t)
    return value


@hot_inline
def _xy_port(x, y, tag):
    """Dimension-order next hop from (x, y) to the destination in `tag`."""
    dx = (tag & TAG_COORD_MASK) - x
    if dx > 0:
        return E
    if dx < 0:
        return W
    dy = ((tag >> TAG_COORD_BITS) & TAG_COORD_MASK) - y
    if dy > 0:
        return S
    if dy < 0:
        return N
    return RAMP


@hot_inline
def _room(fb, d, t, depth):
    """Destination d of a move (a FIFO, SINK, or a cross-stripe FIFO) has room."""
    if d >= 0:
        return has_room(fb, d, t, depth)
    if d <= REMOTE:
        return fb.xfifo[U(REMOTE - d)].occupied < depth
    return True  # SINK


@hot_inline
def _eject(fb, s, rt, tag, t):
    """Packet mode: a packet leaves the network at its destination in cycle t."""
    p = fb.params[0]
    rt.ejected += 1
    s.inflight -= 1
    if p.win0 <= t < p.win1:
        s.accepted += 1
    birth = tag >> TAG_DEST_BITS
    if p.win0 <= birth < p.win1:
        latency = t - birth
        s.measured += 1
        s.lat_sum += latency
        s.lat_max = max(s.lat_max, latency)
        b = min(latency, len(fb.lat_hist) - 1)
        if b < p.near_bins:
            fb.lat_near[U(s.h_lo + b)] += 1
        else:  # (rare) one histogram for every stripe: its workers count into it atomically
            atomic_add(fb.lat_hist, b, 1)


@hot_inline
def _woken(fb, s, slot, what):
    fb.woken[U(s.w_lo + s.nwoken)] = slot << 1 | what
    s.nwoken += 1


@hot_inline
def _output(fb, s, rt, o, d, data, t):
    """Copy a moved wavelet to output o of router rt, destination d."""
    p = fb.params[0]
    if o < RAMP:
        if d >= 0 and fb.fifo[U(d)].port == EDGE_OUT:  # to an outbound edge port
            if data == CONTROL:  # ends there, as at a RAMP output
                rt.sunk += 1
                return
            _push(fb, d, data, t + p.hop, p.shift)  # it crossed the link off the wafer
            s.out_pushed += 1
        elif d >= 0:
            r = fb.fifo[U(d)].router
            if fb.fifo[U(d)].pushed == fb.fifo[U(d)].popped:
                _mark(fb, r, d, True)
                activate(fb, s, r, t)  # (behind an older head: as `inject`)
            _push(fb, d, data, t + p.hop, p.shift)
        else:  # into another stripe, once every stripe has routed (`exchange`)
            x = fb.xpush[U(s.x_lo + s.nxpush)]
            x.ready, x.data, x.xfifo = t + p.hop, data, REMOTE - d
            s.nxpush += 1
        s.inflight += 1
    elif d >= 0:
        if data == CONTROL:  # consumed by the router, never queued for the PE
            rt.sunk += 1
            return
        f = fb.fifo[U(d)]
        if f.pushed == f.popped and rt.slot >= 0:
            _woken(fb, s, rt.slot, WOKEN_DELIVERY)
        _push(fb, d, data, t + 1, p.shift)
        s.inflight += 1
    else:
        _eject(fb, s, rt, data, t)


@hot_inline
def _move(fb, s, rt_index, b, route, out, t):
    """Move the head of FIFO b (of router rt_index, run in stripe s) to output port
    `out`, or to every output of the route if out < 0 (room checked)."""
    rt = fb.router[U(rt_index)]
    f = fb.fifo[U(b)]
    data = f.head
    _pop(fb, b, fb.params[0].shift)
    if f.popped == f.pushed:
        _mark(fb, rt_index, b, False)
    f.last_grant = t
    s.inflight -= 1
    if f.producer >= 0:
        if f.pushed - f.popped == fb.params[0].depth - 1:
            activate(fb, s, f.producer, t)  # it was full: its producer may wait for room
    elif f.port == RAMP:
        if rt.slot >= 0:
            _woken(fb, s, rt.slot, WOKEN_POP)  # the PE may be asleep on a full RAMP FIFO
    elif f.producer != EDGE_FED:  # (an edge port looks at its FIFO every cycle)
        s.xpops += 1  # fed from another stripe: `exchange` lists its producer
    if out >= 0:
        _output(fb, s, rt, out, route.dest[out], data, t)
    else:
        s.copies -= 1
        for o in range(RAMP + 1):
            if (route.tx >> o) & 1:
                _output(fb, s, rt, o, route.dest[o], data, t)
                s.copies += 1
    if data == CONTROL:
        _switch(fb, s, f.route, t)


@hot
def _switch(fb, s, ri, t):
    """A control wavelet left route ri's router in cycle t: advance its switch position (a
    static route, or one at its last position without ring mode, stays). Every FIFO of the
    route is gated until t + 1 + switch_latency: those the new position accepts then move
    again, the others wait (GATE_OFF) for a position that accepts them. A FIFO cut off with
    wavelets that arrived before this cycle, which neither this nor any later position
    accepts, is a fault (the lowest such FIFO of the stripe is kept)."""
    k = fb.route_sw[U(ri)]
    if k < 0:
        return
    sw = fb.switch[U(k)]
    pos = sw.pos + 1
    if pos == sw.npos:
        pos = 0 if sw.ring else sw.pos
    if pos == sw.pos:
        return
    sw.pos = pos
    sw.switches += 1
    sp = fb.swpos[U(sw.first + pos)]
    route = fb.route[U(ri)]
    route.tx = sp.tx
    route.out = sp.out
    p = fb.params[0]
    sw.hold = t + 1 + p.switch_latency
    for b in range(sw.f_lo, sw.f_hi):
        f = fb.fifo[U(b)]
        port = f.port
        if (sp.rx >> port) & 1:
            f.gate = GATE_HELD
            continue
        f.gate = GATE_OFF
        # Wavelets pushed in this cycle are ready at t + hop at the earliest: only those
        # before it count, whatever order the routers of this cycle run in.
        if f.pushed > f.popped and f.head_ready < t + p.hop and not (sp.reach >> port) & 1:
            if s.fault < 0 or b < s.fault:
                s.fault = b


@hot_inline
def _holds(fb, r):
    """Router r has a wavelet in an input FIFO (a push into an empty one lists it)."""
    for word in range(fb.occupied.shape[1]):
        if fb.occupied[U(r), U(word)]:
            return True
    return False


@hot_inline
def _route_one(fb, s, w, r, t):
    """Cycle t of router r. Returns its progress: the wavelets it moved, plus one if a
    wavelet is still crossing a link into it (it arrives within hop_latency cycles)."""
    p = fb.params[0]
    depth = p.depth
    packet = p.packet
    ramp_cap = p.ramp_in
    rt = fb.router[U(r)]
    cand = fb.cand[U(w)]
    # Ready heads, least recently served first (ties: lower index).
    nc = 0
    waiting = False  # a head that becomes ready later
    for word in range(fb.occupied.shape[1]):
        bits = fb.occupied[U(r), U(word)]
        while bits:
            b = rt.fifo_lo + 64 * word + trailing_zeros(bits)
            bits &= bits - np.uint64(1)
            f = fb.fifo[U(b)]
            if f.head_ready > t:
                waiting = True
                continue
            age = f.last_grant
            j = nc
            while j > 0 and fb.fifo[U(cand[j - 1])].last_grant > age:
                cand[j] = cand[j - 1]
                j -= 1
            cand[j] = b
            nc += 1
    moved = 0
    used = 0  # mesh output ports used this cycle (bit mask)
    ramp_used = 0
    for k in range(nc):
        b = cand[k]
        f = fb.fifo[U(b)]
        gate = f.gate
        if gate:  # a route with switch positions: see `_switch`
            if gate == GATE_OFF or fb.switch[U(fb.route_sw[U(f.route)])].hold > t:
                waiting |= gate == GATE_HELD
                continue
            f.gate = 0
        route = fb.route[U(f.route)]
        if packet:
            out = _xy_port(rt.x, rt.y, f.head)
        else:
            out = route.out
        if out >= 0:  # unicast
            if out < RAMP:
                if (used >> out) & 1:
                    continue
            elif ramp_used >= ramp_cap:
                continue
            if not _room(fb, route.dest[out], t, depth):
                continue
            tx = 1 << out
        else:
            tx = route.tx
            if tx & used & MESH or ((tx >> RAMP) & 1 and ramp_used >= ramp_cap):
                continue
            ok = True
            for o in range(RAMP + 1):
                if (tx >> o) & 1 and not _room(fb, route.dest[o], t, depth):
                    ok = False
                    break
            if not ok:
                continue
        _move(fb, s, r, b, route, out, t)
        used |= tx
        ramp_used += (tx >> RAMP) & 1
        moved += 1
    if waiting or (moved > 0 and _holds(fb, r)):
        activate(fb, s, r, t)
    return moved + waiting


@hot
def route_phase(fb, stripes, w, t):
    """Cycle t of the routers listed for it in worker w's stripe; lists those to run in
    t + 1. Returns their progress (`_route_one`)."""
    s = stripes[w]
    s.rcur = 1 - s.rcur
    s.r_ncur = s.r_nnext
    s.r_nnext = 0
    s.visits += s.r_ncur
    s.xpops = 0
    s.out_pushed = 0
    if 8 * s.r_ncur > s.r_hi - s.r_lo:
        # Dense: walk the routers in index order (memory order) instead of listing order.
        n = s.r_lo
        for r in range(s.r_lo, s.r_hi):
            if fb.router[U(r)].queued == t:
                fb.active[U(s.rcur), U(n)] = r
                n += 1
    moved = 0
    for j in range(s.r_lo, s.r_lo + s.r_ncur):
        moved += _route_one(fb, s, w, fb.active[U(s.rcur), U(j)], t)
    # routers whose FIFO an edge port filled or emptied this cycle (`edge_phase`)
    for j in range(s.e_lo, s.e_lo + s.nedge):
        activate(fb, s, fb.edge_woken[U(j)], t)
    s.nedge = 0
    return moved


@hot_inline
def _edge_woken(fb, stripes, pt):
    """List port pt's router (in its stripe's route phase of this cycle, for the next)."""
    s = stripes[pt.stripe]
    fb.edge_woken[U(s.e_lo + s.nedge)] = pt.router
    s.nedge += 1


@hot_inline
def _served_last(fb, order, lo, kept, nserved):
    """Put the ports served this cycle (edge_served[:nserved], in serving order) after the
    `kept` ports not served at order[lo:], by port index: least recently served first."""
    served = fb.edge_served
    for i in range(1, nserved):  # insertion sort: a few ports a cycle
        k = served[i]
        j = i
        while j > 0 and served[j - 1] > k:
            served[j] = served[j - 1]
            j -= 1
        served[j] = k
    for i in range(nserved):
        order[U(lo + kept + i)] = served[i]


@hot_inline
def _record_mark(fb, pt, cycle):
    """Word `pt.done` of port `pt` moved at `cycle`: record it if it is the port's next mark."""
    if pt.mark < pt.mark_hi and fb.edge_marks[U(pt.mark)] == pt.done:
        fb.edge_mark_cycle[U(pt.mark)] = cycle
        pt.mark += 1


@hot
def edge_phase(fb, stripes, t):
    """Cycle t of the edge ports, before the routers, run by one worker (module docstring,
    "Edge ports"). Inbound ports with words left, least recently served first (ties: lower
    port index), each put at most one word into its FIFO if it has room (start-of-cycle
    occupancy) and the inbound credit allows; outbound ports with a ready head likewise
    take one word each within the outbound credit. Publishes (EDGE pub_*, slot seq & 1)
    what the workers decide the next cycle by."""
    e = fb.edge[0]
    p = fb.params[0]
    depth, shift, hop = p.depth, p.shift, p.hop
    order = fb.edge_order
    moved = 0
    busy = 0
    if e.in_left > 0:
        if t < e.latency:
            busy = 1  # the memory service's first words are on their way
        else:
            credit = min(e.cin + e.rate * (t - e.cin_t), e.cap)
            e.cin_t = t
            kept = 0
            nserved = 0
            for j in range(e.nin):
                k = order[U(j)]
                pt = fb.port[U(k)]
                b = pt.fifo
                if has_room(fb, b, t, depth):
                    if credit >= 1.0:
                        credit -= 1.0
                        if fb.fifo[U(b)].pushed == fb.fifo[U(b)].popped:
                            _mark(fb, pt.router, b, True)
                        _push(fb, b, float_bits(fb.edge_data[U(pt.data + pt.done)]),
                              t + hop, shift)
                        _record_mark(fb, pt, t)
                        pt.done += 1
                        pt.last = t
                        pt.cycle = t
                        e.in_left -= 1
                        stripes[pt.stripe].inflight += 1
                        _edge_woken(fb, stripes, pt)
                        moved += 1
                        if pt.done < pt.n:
                            fb.edge_served[U(nserved)] = k
                            nserved += 1
                        continue
                    busy = 1  # waits only for the memory service's bandwidth
                order[U(kept)] = k
                kept += 1
            _served_last(fb, order, 0, kept, nserved)
            e.nin = kept + nserved
            e.cin = credit
    held = 0
    if e.nout > 0:
        credit = min(e.cout + e.rate * (t - e.cout_t), e.cap)
        e.cout_t = t
        lo = e.out_lo
        kept = 0
        nserved = 0
        for j in range(e.nout):
            k = order[U(lo + j)]
            pt = fb.port[U(k)]
            b = pt.fifo
            f = fb.fifo[U(b)]
            if f.head_ready <= t:
                if credit >= 1.0:
                    credit -= 1.0
                    value = bits_float(f.head)
                    _pop(fb, b, shift)
                    f.last_grant = t
                    if pt.done < pt.n:
                        fb.edge_data[U(pt.data + pt.done)] = value
                    elif e.fault < 0:
                        e.fault = k  # more words than expected
                    _record_mark(fb, pt, t + e.latency)
                    pt.done += 1
                    pt.last = t
                    pt.cycle = t + e.latency
                    stripes[pt.stripe].inflight -= 1
                    _edge_woken(fb, stripes, pt)  # its router may wait for room
                    moved += 1
                    fb.edge_served[U(nserved)] = k
                    nserved += 1
                    held += f.pushed > f.popped
                    continue
                busy = 1
            held += f.pushed > f.popped
            order[U(lo + kept)] = k
            kept += 1
        _served_last(fb, order, lo, kept, nserved)
        e.cout = credit
    q = e.seq & 1
    e.seq += 1
    e.pub_work[q] = moved + busy
    e.pub_left[q] = e.in_left
    e.pub_fault[q] = e.fault
    if held > 0:
        e.pub_next[q] = t + 1
    elif e.in_left > 0:
        e.pub_next[q] = max(t + 1, e.latency)
    else:
        e.pub_next[q] = NEVER


@hot
def exchange(fb, stripes, w, t):
    """After every stripe routed cycle t: push stripe w's moves into other stripes' FIFOs
    and keep the occupancy of the FIFOs it feeds there; if a neighbour popped one of them,
    list w's routers that feed a popped one (they may have been blocked on it)."""
    s = stripes[w]
    shift = fb.params[0].shift
    for j in range(s.x_lo, s.x_lo + s.nxpush):
        x = fb.xpush[U(j)]
        k = fb.xfifo[U(x.xfifo)]
        _push(fb, k.fifo, x.data, x.ready, shift)
        k.pushed_at = t
        k.occupied = fb.fifo[U(k.fifo)].pushed - fb.fifo[U(k.fifo)].popped
    s.pub_xpush = s.nxpush
    s.nxpush = 0
    if (w > 0 and stripes[w - 1].xpops > 0) or (w + 1 < len(stripes)
                                                 and stripes[w + 1].xpops > 0):
        for j in range(s.x_lo, s.x_hi):
            x = fb.xfifo[U(j)]
            f = fb.fifo[U(x.fifo)]
            if f.last_grant == t:
                x.occupied = f.pushed - f.popped
                activate(fb, s, x.producer, t)


@hot
def list_pushed(fb, stripes, w, t):
    """Before cycle t + 1: list (and mark occupied) stripe w's FIFOs that a neighbour
    pushed into in t."""
    if not ((w > 0 and stripes[w - 1].pub_xpush > 0) or (w + 1 < len(stripes)
                                                          and stripes[w + 1].pub_xpush > 0)):
        return
    s = stripes[w]
    for j in range(s.xi_lo, s.xi_hi):
        x = fb.xfifo[U(fb.xin[U(j)])]
        if x.pushed_at == t:
            r = fb.fifo[U(x.fifo)].router
            _mark(fb, r, x.fifo, True)
            activate(fb, s, r, t)
