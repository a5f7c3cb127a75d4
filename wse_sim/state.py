"""The engine's state, declared once: every array the cycle loop reads or writes, its dtype,
its fields and its length, and the named bundles the numba functions take.

Each per-item array is a numpy *record* array (one record per FIFO, router, PE, task, ...),
so one item's fields share cache lines and every field is read by name (`fifo[b].pushed`):
there are no column numbers to keep in step between files. A record dtype is part of the
numba type of the array, so changing a table below recompiles the loops (see `wse_sim.jit`).

Indices. A *router* is a PE whose router holds at least one route (or that runs a program);
routers are numbered in PE order (row-major) and only they are stored, so a program placed
anywhere on the wafer costs memory for the PEs it uses. A *slot* is a PE with a program, in
PE order. FIFOs: every router's input FIFOs are contiguous (`Router.fifo_lo:fifo_hi`, ordered
(color, port)); the PE receive queues follow all input FIFOs. Tasks of a slot and instructions
of a task are contiguous; an instruction's operands (dst, a, b, c) are 4 consecutive records.

Stripes. The fabric's rows are split into `stripes` bands of whole rows, one per worker
thread (`wse_sim.jit`); routers and slots of a stripe are index ranges, and each list below
marked "per-stripe segments" holds stripe k's entries in that stripe's index range.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from wse_sim.program import Port

NEVER = 1 << 62  # a cycle that never comes: empty FIFO's head_ready, no bulk end, ...
RECV = len(Port)  # Fifo.port of a PE receive queue (a router output, not an input port)
OPERANDS = 4  # dst, a, b, c
NO_DEST = -1  # Route.dest: nothing behind this output
SINK = -2  # Route.dest of RAMP in packet mode: the packet leaves the network
REMOTE = -3  # Route.dest <= REMOTE: cross-stripe FIFO, XFifo index REMOTE - dest
CONTROL = -1  # a control wavelet's data (a float32's bits and a packet's tag are >= 0)
GATE_OFF = 1  # Fifo.gate: its route's switch position does not accept its port
GATE_HELD = 2  # ... accepts it, from the Switch's `hold` cycle on (then gate 0)
EDGE_OUT = RECV + 1  # Fifo.port of an outbound edge port's FIFO (a router output)
EDGE_FED = -2  # Fifo.producer of a router input FIFO an inbound edge port fills


class Table:
    """One record array: its fields (name, dtype[, shape]) and their initial values."""

    def __init__(self, *fields: tuple, init: dict[str, float] | None = None,
                 pad_to: int = 1) -> None:
        dtype = np.dtype(list(fields), align=True)
        size = -(-dtype.itemsize // pad_to) * pad_to  # padded: no false sharing between workers
        self.dtype = np.dtype({"names": dtype.names, "formats": [dtype.fields[n][0] for n in
                               dtype.names], "offsets": [dtype.fields[n][1] for n in
                               dtype.names], "itemsize": size, "aligned": True})
        self.init = init or {}

    def new(self, n: int, align: int = 16) -> np.ndarray:
        """n records holding the initial values, the first at an `align`-byte address."""
        raw = np.zeros(n * self.dtype.itemsize + align, np.uint8)
        start = -raw.ctypes.data % align
        out = raw[start: start + n * self.dtype.itemsize].view(self.dtype)
        for name, value in self.init.items():
            out[name] = value
        return out


i4, i8, f4, f8 = np.int32, np.int64, np.float32, np.float64

# ---------------------------------------------------------------------------------------------
# Fabric: routers, FIFOs, wavelets (wse_sim.router)

FABRIC_PARAMS = Table(
    ("width", i8), ("height", i8), ("colors", i8),
    ("depth", i8),  # wavelets per FIFO
    ("shift", i8),  # log2 of the wavelet slots per FIFO (a power of two >= depth)
    ("hop", i8),  # cycles per mesh link
    ("ramp_in", i8),  # wavelets a router may deliver to its PE per cycle
    ("packet", i8),  # 1: destination-routed packets (traffic), 0: static routes (program)
    ("switch_latency", i8),  # extra cycles a switch change holds its color (wafer field)
    ("win0", i8), ("win1", i8),  # packet mode: the measurement window [win0, win1)
    ("near_bins", i8),  # packet mode: latencies below it count in a stripe's own histogram
)
FIFO = Table(  # one input FIFO or receive queue: a 64-byte record, so a move touches one
    # cache line of each FIFO it pops and pushes. What the cycle loop changes:
    ("pushed", i8),  # wavelets ever pushed: tail position; link/ramp counters at the end
    ("popped", i8),  # wavelets ever popped: head position
    ("head_ready", i8),  # cycle from which the head may move (be consumed); NEVER: empty
    ("head", i8),  # the head's data (see WAVELET)
    ("last_grant", i8),  # last cycle its head moved (a receive queue's: was consumed):
    # arbitration age, credit return; after the run, when the last wavelet left it
    ("gate", np.int16),  # 0: its head may move; GATE_OFF / GATE_HELD (switch positions)
    # What it is:
    ("port", np.int16),  # the Port it is an input of; RECV for a receive queue
    ("route", i4),  # the Route whose wavelets it holds
    ("router", i4),  # the router that owns it (for a receive queue: the PE's router)
    ("producer", i4),  # the router feeding it and listed by its pops, -1: none / other stripe
    ("bit", i4),  # its bit in its router's `occupied` words: its index - Router.fifo_lo,
    # kept here so that marking it touches no router record (the move holds this line)
    init={"head_ready": NEVER, "last_grant": -1, "producer": -1},
    pad_to=64,
)
# One slot of a FIFO. data: packet mode the tag, program mode the float32 value's bits.
WAVELET = Table(("ready", i8), ("data", i8))
ROUTE = Table(
    ("tx", i4),  # output ports (Port bit mask); packet mode: chosen per wavelet
    ("out", i4),  # the one port of a unicast tx, -1 multicast
    ("color", i4),
    ("dest", i4, (len(Port),)),  # FIFO behind each output, or NO_DEST / SINK / REMOTE - x
)
SWITCH = Table(  # the switch of a route with switch positions (`wse_sim.router`)
    ("hold", i8),  # its FIFOs' heads may not move before this cycle (after a change)
    ("switches", i8),  # position changes so far
    ("route", i4),
    ("pos", i4),  # current position (0: the base)
    ("npos", i4),  # positions, the base included
    ("ring", i4),  # past the last position back to the base, else stay
    ("first", i4),  # its positions' SWPOS records: first .. first + npos - 1
    ("f_lo", i4), ("f_hi", i4),  # its route's input FIFOs
)
SWPOS = Table(  # one switch position of a route
    ("rx", i4), ("tx", i4),  # Port bit masks
    ("out", i4),  # the one port of a unicast tx, -1 multicast
    ("reach", i4),  # the rx ports of this and every position reachable after it
)
ROUTER = Table(
    ("queued", i8),  # the cycle it is listed to run in (its stripe's next list)
    ("ejected", i8),  # packet mode: packets it delivered to its node
    ("sunk", i8),  # control wavelets it consumed at its RAMP output
    ("fifo_lo", i4), ("fifo_hi", i4),  # its input FIFOs
    ("slot", i4),  # the PE's slot, -1 without a program
    ("x", i4), ("y", i4),
    init={"queued": -1, "slot": -1},
)
XFIFO = Table(  # an input FIFO fed from another stripe (multi-worker runs only)
    ("occupied", i8),  # its wavelets at the start of the cycle, as the producer sees them
    ("pushed_at", i8),  # the last cycle the producer's stripe pushed into it
    ("fifo", i4),
    ("producer", i4),  # the feeding router
    init={"pushed_at": -1},
)
XPUSH = Table(("ready", i8), ("data", i8), ("xfifo", i4))  # a deferred push
EDGE = Table(  # the memory service behind the edge ports (`wse_sim.router.edge_phase`)
    ("rate", f8),  # words per cycle, each direction, all ports together ...
    ("cap", f8),  # ... kept as a credit up to max(rate, 1), one per direction:
    ("cin", f8), ("cout", f8),  # inbound, outbound credit
    ("cin_t", i8), ("cout_t", i8),  # the cycle each was last brought up to date
    ("latency", i8),  # wafer edge_latency_cycles
    ("nports", i8),
    ("nin", i8),  # inbound ports with words left: the first nin of Fabric.edge_order
    ("out_lo", i8), ("nout", i8),  # outbound ports: edge_order[out_lo:out_lo + nout]
    ("in_left", i8),  # inbound words not yet in the fabric
    ("fault", i8),  # the outbound port that received more than expected, -1
    ("seq", i8),  # port phases run so far
    # What port phase q published for every worker's decision before the next cycle, in
    # slot q & 1 (a worker may still read the other slot while phase q runs):
    ("pub_left", i8, (2,)),  # in_left
    ("pub_next", i8, (2,)),  # the first cycle the ports may act (NEVER: none)
    ("pub_work", i8, (2,)),  # progress: words moved, or a port waited only for latency or
    # credit
    ("pub_fault", i8, (2,)),  # fault
    init={"fault": -1, "pub_next": NEVER, "pub_fault": -1},
)
EDGE_PORT = Table(  # one edge port (`wse_sim.program.EdgePort`), in program order
    ("done", i8),  # words sent into the fabric (inbound) / received from it (outbound)
    ("n", i8),  # inbound: words to send; outbound: words expected
    ("data", i8),  # its words in Fabric.edge_data (outbound: room for n)
    ("last", i8),  # the last cycle it was served (arbitration age), -1 never
    ("cycle", i8),  # inbound: cycle its last word entered the fabric; outbound: the cycle its
    # last word reached the memory service (latency included); -1 never
    ("mark", i8), ("mark_hi", i8),  # its next mark and its end in Fabric.edge_marks
    ("fifo", i4),  # inbound: the route's input FIFO of its side; outbound: its own FIFO
    ("router", i4), ("stripe", i4),  # its PE's router and that router's stripe
    ("inbound", i4),
    init={"last": -1, "cycle": -1},
)


class Fabric(NamedTuple):
    """Router state (a numba-friendly named tuple of arrays)."""

    params: np.ndarray  # FABRIC_PARAMS [1]
    fifo: np.ndarray  # FIFO [fifos]
    wl: np.ndarray  # WAVELET [fifos << shift], 64-byte aligned
    route: np.ndarray  # ROUTE [routes]
    router: np.ndarray  # ROUTER [routers]
    router_pe: np.ndarray  # int64 [routers]: PE index (y * width + x)
    occupied: np.ndarray  # uint64 [routers, words]: bit j set iff input FIFO fifo_lo + j holds
    # a wavelet (the router looks at no other)
    active: np.ndarray  # int32 [2, routers]: this and next cycle's routers, per-stripe segments
    woken: np.ndarray  # int64 [receive queues + RAMP FIFOs]: PE wake-ups, per-stripe segments
    cand: np.ndarray  # int64 [stripes, FIFOs of the largest router]: arbitration scratch
    xfifo: np.ndarray  # XFIFO [cross-stripe FIFOs], grouped by producer stripe
    xin: np.ndarray  # int32 [cross-stripe FIFOs]: XFIFO indices grouped by owner stripe
    xpush: np.ndarray  # XPUSH [cross-stripe FIFOs]: deferred pushes, producer-stripe segments
    lat_hist: np.ndarray  # int64 [bins]: packet latencies (last bin: overflow), all stripes
    lat_near: np.ndarray  # int64 [stripes * near_bins]: those below near_bins, per stripe
    # (h_lo): no worker adds to a line another one adds to (`wse_sim.router.latencies`)
    switch: np.ndarray  # SWITCH [routes with switch positions]
    swpos: np.ndarray  # SWPOS [their positions]
    route_sw: np.ndarray  # int32 [routes]: its SWITCH, -1 a static route
    edge: np.ndarray  # EDGE [1]
    port: np.ndarray  # EDGE_PORT [edge ports]
    edge_data: np.ndarray  # float32: inbound ports' words, outbound ports' received words
    edge_marks: np.ndarray  # int64: the ports' marks (word indices), port after port
    edge_mark_cycle: np.ndarray  # int64: the cycle each mark's word moved (as `cycle`), -1
    edge_order: np.ndarray  # int32 [ports]: arbitration order, inbound then outbound
    edge_served: np.ndarray  # int32 [ports]: scratch of the port phase
    edge_woken: np.ndarray  # int32 [ports]: routers to list, per-stripe segments (e_lo)


# ---------------------------------------------------------------------------------------------
# Cores: PEs, tasks, instructions (wse_sim.engine, built by wse_sim.assemble)

CORE_PARAMS = Table(
    ("threads", i8),  # microthreads per PE
    ("reads", i8), ("writes", i8),  # SRAM words per cycle
    ("ramp_out", i8),  # wavelets a PE may send per cycle
    ("deadlock", i8),  # cycles without progress that make a deadlock
    ("fp_rate", f8),  # fp32 elements per cycle ...
    ("fp_cap", f8),  # ... kept as a credit up to max(rate, 1)
    ("bulk", i8),  # 1: run instructions in bulk where that is exact; 0: every cycle one by one
)
SLOT = Table(
    ("rd_debt", i8),  # SRAM reads owed to the next cycle(s)
    ("fp_t", i8),  # the cycle fpc was last brought up to date
    ("fpc", f8),  # fp32 credit
    ("queued", i8),  # the cycle it is listed to run in
    ("busy", i8),  # inside a bulk run until this cycle
    ("sleep", i8),  # asleep since this cycle (all threads wait for the fabric), -1 awake
    ("running", i8),  # bit k set: microthread k runs a task (a cycle visits only those)
    ("router", i4),
    ("tk_lo", i4), ("tk_hi", i4),  # its tasks
    ("halted", i4),
    ("wake", i4),  # a task may be ready: scan them
    ("th_rr", i4), ("tk_rr", i4),  # round-robin starts: threads, tasks
    ("full", i4),  # asleep with a thread waiting on a full RAMP FIFO
    init={"queued": -1, "sleep": -1},
)
PE_COUNTERS = Table(
    # cycles by class, first that applies (wse_sim.engine): the Stats fields of that name
    ("compute", i8), ("send", i8), ("receive", i8), ("move", i8),
    ("wait_output", i8), ("wait_input", i8),  # the stalls: output room, input
    ("sram_read", i8), ("sram_write", i8),  # words
    ("ops", i8), ("flops", i8),
    ("first_cycle", i8), ("last_cycle", i8),  # cycles it did work, -1 never
    ("control", i8),  # control wavelets sent (SWITCH_ADV)
    ("relayed", i8),  # wavelets relayed: elements of MOVs from FABIN to FABOUT
    init={"first_cycle": -1, "last_cycle": -1},
)
CYCLE_CLASSES = PE_COUNTERS.dtype.names[:6]
BULK = Table(  # a PE's last bulk run: what it started from (`wse_sim.engine`
    # replays its timing up to the cycle it is closed at: its end, or earlier if cut short)
    ("t0", i8),  # the cycle it started in
    ("fp_t", i8), ("debt", i8), ("credit", f8),  # SLOT's fp_t, rd_debt and fpc then
    ("ins", i4), ("e0", i4),  # the instruction and its first element
    ("thr", i4),  # the thread running it
    ("open", i4),  # started and not yet closed: its elements and counts are still to do
    ("pop", i4),  # a thread beside it waits for room in a full RAMP FIFO: a pop cuts it short
)
TASK = Table(
    ("trig", i4),  # Trigger
    ("recv", i4),  # COLOR: its receive queue
    ("first", i4), ("end", i4),  # its instructions
    ("act", i4),  # activated (RESET tasks start activated)
    ("blk", i4), ("run", i4),
)
INSTR = Table(
    ("op", i4), ("n", i4),  # Op, elements
    ("count", i4), ("body", i4),  # REPEAT
    ("task", i4),  # ACTIVATE / BLOCK / UNBLOCK: its PE's task index (from Slot.tk_lo)
    ("nrd", i4),  # SRAM words read per element (strided memory sources) ...
    ("nrd0", i4),  # ... plus at element 0 (stride-0 memory sources)
    ("wr", i4),  # SRAM words written per element
    ("flops", i4),  # per element: FMA 2, other arithmetic 1, MOV 0
    ("bulk", i4),  # may run in one go (vector op without fabric operands)
    ("simd", i4),  # fp16 instruction: elements per step (cycle) at most; 0: fp32
    ("nrdh", i4),  # fp16: unit-stride half sources, a word per pair of elements
    ("wrh", i4),  # fp16: 1 if the destination is a unit-stride half vector (a word a pair)
)
OPERAND = Table(
    ("addr", i8),  # MEM: absolute word address in the SRAM pool at element 0, iteration 0
    ("stride", i4), ("loop_stride", i4),  # MEM: words per element, per REPEAT iteration
    ("kind", i4),  # Kind
    ("fifo", i4),  # FABIN: the receive queue; FABOUT: the router's RAMP FIFO
    ("reg", i4),  # REG: absolute index in the register pool
    ("imm", f4),  # IMM
    ("half", i4),  # fp16 (MEM: addr, stride, loop_stride count halves; fabric: 2 a wavelet)
)
THREAD = Table(  # a microthread
    ("task", i4),  # running task, -1 free
    ("pc", i4), ("e", i4),  # instruction, element
    ("iter", i4), ("rfirst", i4), ("rlast", i4), ("rcount", i4),  # REPEAT state
    ("scal", f4, (OPERANDS,)),  # stride-0 memory operands, loaded at element 0; fp16:
    # a half FABIN's high half (element e + 1), a half FABOUT's (index 0) low half
    init={"task": -1},
)


class Cores(NamedTuple):
    """PE state and code (a numba-friendly named tuple of arrays)."""

    params: np.ndarray  # CORE_PARAMS [1]
    slot: np.ndarray  # SLOT [slots]
    ctr: np.ndarray  # PE_COUNTERS [slots]
    bulk: np.ndarray  # BULK [slots]
    task: np.ndarray  # TASK [tasks]
    ins: np.ndarray  # INSTR [instructions]
    opnd: np.ndarray  # OPERAND [instructions * OPERANDS]
    th: np.ndarray  # THREAD [slots * threads]
    sram: np.ndarray  # float32 pool
    regs: np.ndarray  # float32 [slots * registers]
    active: np.ndarray  # int32 [2, slots]: this and next cycle's PEs, per-stripe segments
    timer_t: np.ndarray  # int64 [slots]: min-heaps of bulk-run PEs' resume cycles ...
    timer_s: np.ndarray  # int32 [slots]: ... and their slots, per-stripe segments
    timer_at: np.ndarray  # int32 [slots]: a slot's position in its stripe's heap, -1 none


# ---------------------------------------------------------------------------------------------
# Packet sources (wse_sim.traffic)

TRAFFIC_PARAMS = Table(
    ("pattern", i8),  # index in wse_sim.traffic.PATTERNS
    ("width", i8), ("height", i8),
    ("center", i8),  # hotspot node
    ("rate", f8),  # packets per node per cycle ...
    ("log_miss", f8),  # ... and log(1 - rate), for geometric gaps
    ("hotspot", f8),  # hotspot fraction
)
SOURCE = Table(
    ("next", i8),  # creation cycle of the head of its unbounded source queue
    ("rng", np.uint64),  # its own splitmix64 state: draws do not depend on other nodes
    ("ramp", i8),  # its router's RAMP FIFO
)


class Sources(NamedTuple):
    params: np.ndarray  # TRAFFIC_PARAMS [1]
    node: np.ndarray  # SOURCE [nodes]


# ---------------------------------------------------------------------------------------------
# Workers: one per stripe (wse_sim.jit)

STRIPE = Table(
    ("r_lo", i8), ("r_hi", i8),  # its routers
    ("s_lo", i8), ("s_hi", i8),  # its slots
    ("x_lo", i8), ("x_hi", i8),  # XFIFOs it feeds
    ("xi_lo", i8), ("xi_hi", i8),  # its entries of Fabric.xin (XFIFOs it owns)
    ("w_lo", i8),  # its segment of Fabric.woken
    ("h_lo", i8),  # its segment of Fabric.lat_near
    ("e_lo", i8), ("nedge", i8),  # its segment of Fabric.edge_woken, entries in it
    ("rcur", i8), ("r_ncur", i8), ("r_nnext", i8),  # router lists (Fabric.active[rcur])
    ("pcur", i8), ("p_ncur", i8), ("p_nnext", i8),  # PE lists (Cores.active[pcur])
    ("timers", i8),  # entries in its timer heap
    ("nwoken", i8), ("nxpush", i8),
    ("xpops", i8),  # pops this cycle of its FIFOs fed from another stripe
    ("out_pushed", i8),  # words its routers put into outbound edge ports' FIFOs this cycle
    ("visits", i8),  # routers and PEs it ran, ever (how much work a cycle holds)
    # running totals, its own
    ("inflight", i8),  # wavelets put into FIFOs minus taken out, by this stripe
    ("copies", i8),  # extra wavelets made by multicast
    ("fault", i8),  # the lowest input FIFO a switch change cut off with wavelets in it, -1
    ("moved", i8), ("progress", i8),  # this cycle: wavelets moved; elements, ops, starts
    ("nsleep", i8),  # PEs asleep ...
    ("nfull", i8),  # ... of which some thread waits on a full RAMP FIFO
    ("last_progress", i8),  # the last cycle anything moved or ran (every worker's copy)
    ("bulk_end", i8),  # the last cycle a bulk run ends in, + 1
    ("accepted", i8), ("measured", i8), ("lat_sum", i8), ("lat_max", i8),  # packet mode
    ("measured_in", i8), ("behind", i8),  # packet sources
    ("rd_left", i8), ("wr_left", i8), ("ramp_left", i8),  # a PE's budgets left this cycle
    # published at the end of a cycle for every worker to decide the same next step
    ("pub_inflight", i8), ("pub_active", i8), ("pub_routers", i8), ("pub_nsleep", i8),
    ("pub_full", i8),
    ("pub_work", i8), ("pub_bulk_end", i8), ("pub_next_free", i8),
    ("pub_measured", i8), ("pub_measured_in", i8), ("pub_behind", i8),
    ("pub_xpush", i8),  # pushes it made into other stripes last cycle
    ("pub_out_pushed", i8),  # out_pushed of last cycle
    ("pub_fault", i8),
    init={"bulk_end": -1, "pub_bulk_end": -1, "pub_next_free": NEVER, "last_progress": -1,
          "fault": -1, "pub_fault": -1},
    pad_to=64,
)


class Workers(NamedTuple):
    stripe: np.ndarray  # STRIPE [stripes]
    barrier: np.ndarray  # int64 [16]: arrivals, generation (wse_sim.jit.barrier)
