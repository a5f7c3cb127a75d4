"""Memory-service edge ports (`wse_sim.program.EdgePort`; timing: `wse_sim.engine`, "Edge
ports"), with every expected cycle count derived by hand from the model.

The model, in short. r = edge_bytes_per_s / clock_hz / 4 words per cycle each direction,
kept as a credit that grows by r a cycle up to max(r, 1) (full at cycle 0), one word per
credit. From cycle Lat = edge_latency_cycles on, an inbound port puts at most one word a
cycle into its router's FIFO (room judged on start-of-cycle occupancy): a word put in at
cycle s may leave that router from s + L (hop_latency L), as if it crossed a link. So,
like a wavelet a router moves at cycle s, it is consumed by a PE h hops further on at
s + (h + 1) L + 1. A router sending to an outbound port at cycle t puts the wavelet into
the port's FIFO, ready at t + L; the port takes it (one a cycle, within the outbound
credit) at some u >= t + L, and it reaches the memory service at u + Lat. A PE's FABOUT
element at cycle t puts a wavelet in its RAMP FIFO; the router moves it from t + 1.

With r = 1/k (k a power of two: exact in float) the credit is 1 at cycle Lat, spent, and
back to exactly 1 every k cycles: the j-th word of a lone port enters at Lat + k j.
"""

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from programs import RAMP, E, N, S, W, assert_same_run

from wse_sim.engine import simulate
from wse_sim.errors import DeadlockError, ProgramError
from wse_sim.hardware import WaferConfig
from wse_sim.program import (
    EdgePort,
    FabIn,
    FabOut,
    Mem,
    Op,
    Program,
    Route,
    Task,
    Trigger,
    load_program,
    port_mask,
    save_program,
    validate,
    vec,
)

CLOCK = 850e6
NONE = np.zeros(0, np.float32)


def wafer(words_per_cycle: float = 44.0, latency: int = 10, **kw) -> WaferConfig:
    """A 16 x 16 wafer whose edge carries `words_per_cycle` each way."""
    return WaferConfig(width=16, height=16, edge_bytes_per_s=4 * CLOCK * words_per_cycle,
                       edge_latency_cycles=latency, **kw)


def inbound_chain(n: int, hops: int, y: int = 0, color: int = 3, name: str = "w",
                  p: Program | None = None) -> tuple[Program, np.ndarray]:
    """An inbound port at PE (0, y)'s west side sends n words east over `hops` links to PE
    (hops, y), which MOVs them to SRAM word 0..n-1."""
    p = p or Program(hops + 1, 1)
    data = np.arange(n, dtype=np.float32) * 0.5 + 1000 * y
    p.ports.append(EdgePort(name, 0, y, W, color, True, data))
    p.add_route(0, y, color, port_mask(W), port_mask(E if hops else RAMP))
    for x in range(1, hops + 1):
        p.add_route(x, y, color, port_mask(W), port_mask(E if x < hops else RAMP))
    p.pe(hops, y, n).tasks.append(Task(0, Trigger.RESET, [
        vec(Op.MOV, n, Mem(0), FabIn(color))]))
    return p, data


def outbound(n: int, expected: int | None = None, color: int = 2) -> Program:
    """PE (1, 0) of a 2 x 1 fabric sends its words 0, 3, 6, ... (n of them) out of its east
    side to an outbound port."""
    p = Program(2, 1)
    pe = p.pe(1, 0, n)
    pe.load(0, np.arange(n, dtype=np.float32) * 3)
    pe.tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, n, FabOut(color), Mem(0))]))
    p.add_route(1, 0, color, port_mask(RAMP), port_mask(E))
    p.ports.append(EdgePort("g", 1, 0, E, color, False, NONE, n if expected is None
                            else expected))
    return p


@pytest.mark.parametrize("hops", [0, 1, 3])
@pytest.mark.parametrize("latency", [0, 7, 850])
@pytest.mark.parametrize("hop_latency", [1, 2])
def test_inbound_stream_link_bound(hops, latency, hop_latency):
    """r >= 1 (44 words a cycle, the CS-2's): the port is link-bound, one word a cycle.
    Word j enters at Lat + j and is consumed at Lat + j + (h + 1) L + 1; the run ends the
    cycle after the last: cycles = Lat + n + (h + 1) L + 1."""
    n = 25
    p, data = inbound_chain(n, hops)
    r = simulate(p, wafer(latency=latency, hop_latency=hop_latency))
    np.testing.assert_array_equal(r.sram(hops, 0), data)
    assert r.cycles == latency + n + (hops + 1) * hop_latency + 1
    assert r.port_last_cycle == {"w": latency + n - 1}
    assert r.stats.edge_in[0, 0] == r.stats.edge_in.sum() == n
    assert r.stats.link.sum() == n * hops  # the edge link is no mesh link
    assert r.stats.totals()["edge_in"] == n and r.stats.totals()["edge_out"] == 0
    assert f"{n} words in and 0 out through edge ports" in r.stats.summary()


@pytest.mark.parametrize("k", [2, 4, 8, 16])
def test_inbound_stream_bandwidth_bound(k):
    """r = 1/k: word j enters at Lat + k j, the last at Lat + k (n - 1), consumed
    (h + 1) L + 1 later: cycles = Lat + k (n - 1) + (h + 1) L + 2. Halving the bandwidth
    (k -> 2k) doubles the streaming part k (n - 1) exactly."""
    n, hops, lat = 30, 2, 10
    p, data = inbound_chain(n, hops)
    r = simulate(p, wafer(1 / k, lat))
    np.testing.assert_array_equal(r.sram(hops, 0), data)
    assert r.cycles == lat + k * (n - 1) + (hops + 1) + 2
    assert r.port_last_cycle == {"w": lat + k * (n - 1)}
    half = simulate(p, wafer(1 / (2 * k), lat))
    assert half.cycles - (lat + (hops + 1) + 2) == 2 * (r.cycles - (lat + (hops + 1) + 2))


@pytest.mark.parametrize("k", [1, 4])
def test_marks_record_when_their_words_moved(k):
    """Inbound at r = 1/k: word j enters at Lat + k j. Outbound at r >= 1: word j reaches
    the memory service at j + 1 + L + Lat (the closed forms above)."""
    n, lat = 30, 10
    p, _ = inbound_chain(n, 2)
    p.ports[0] = replace(p.ports[0], marks=(0, 7, n - 1))
    r = simulate(p, wafer(1 / k, lat))
    assert r.port_marks["w"].tolist() == [lat + k * j for j in (0, 7, n - 1)]
    q = outbound(n)
    q.ports[0] = replace(q.ports[0], marks=(3, 4))
    assert simulate(q, wafer(44, lat)).port_marks["g"].tolist() == [j + 1 + 1 + lat
                                                                   for j in (3, 4)]


def shared(ports: int, n: int, hops: int = 1) -> tuple[Program, list[np.ndarray]]:
    """`ports` inbound chains, one per row (port "p{y}" at (0, y)), n words each."""
    p = Program(hops + 1, ports)
    datas = [inbound_chain(n, hops, y, name=f"p{y}", p=p)[1] for y in range(ports)]
    return p, datas


@pytest.mark.parametrize("rate", [1, 2])
def test_inbound_ports_share_one_budget_round_robin(rate):
    """k = 4 ports, n words each, r = 1 or 2 (< k): r words a cycle in all, served round
    robin by port index (all start never served, the served go last by index), so word j
    of port i is the (j k + i)-th word overall and enters at Lat + (j k + i) // r. The
    last (port k - 1, word n - 1) at Lat + (n k - 1) // r; one hop on: cycles = that + 2L
    + 2. The total streaming time is n k / r: the budget, not the links, bounds it."""
    k, n, lat = 4, 12, 5
    p, datas = shared(k, n)
    r = simulate(p, wafer(rate, lat))
    for y in range(k):
        np.testing.assert_array_equal(r.sram(1, y), datas[y])
        assert r.port_last_cycle[f"p{y}"] == lat + ((n - 1) * k + y) // rate
        assert r.stats.edge_in[y, 0] == n
    assert r.cycles == lat + (n * k - 1) // rate + 2 + 2


def test_round_robin_skips_a_port_without_room():
    """Port p0 feeds a PE that never takes a word (its FIFO, then the receive queue fill:
    queue depth D words in the receive queue, D in the FIFO, stuck), port p1 a PE that
    does. With r = 1 the blocked port leaves its turn to p1: p1's 12 words still enter one
    every cycle once p0 is full, and the run deadlocks naming p0's words left."""
    p, _ = shared(2, 12, hops=0)
    p.pes[(0, 0)].tasks[0] = Task(0, Trigger.RESET, [vec(Op.MOV, 1, Mem(0), Mem(1))])
    with pytest.raises(DeadlockError, match=r"edge ports: 'p0' inbound \d+ words left"):
        simulate(p, wafer(1, 3, deadlock_cycles=200))


def test_outbound_words_arrive_in_order_after_the_latency():
    """r >= 1: the PE sends word j at cycle j; the router moves it at j + 1 into the port's
    FIFO (ready j + 1 + L), the port takes it then, and it reaches the memory service at
    j + 1 + L + Lat. The run ends the cycle after the last take: cycles = n + L + 1, and
    port_last_cycle = n + L + Lat."""
    n, lat = 40, 10
    r = simulate(outbound(n), wafer(44, lat))
    np.testing.assert_array_equal(r.port_words["g"], np.arange(n, dtype=np.float32) * 3)
    assert r.cycles == n + 1 + 1
    assert r.port_last_cycle == {"g": n + 1 + lat}
    assert r.stats.edge_out[0, 1] == r.stats.totals()["edge_out"] == n
    assert r.stats.wait_output[0, 1] == 0


@pytest.mark.parametrize("k", [4, 8])
def test_a_narrow_outbound_budget_back_pressures_the_sender(k):
    """r = 1/k: the port takes word j at T_j = 1 + L + k j (the credit is back to 1 every
    k cycles, and a word is always waiting): cycles = T_{n-1} + 1, port_last_cycle =
    T_{n-1} + Lat. The FIFOs back up: with the port FIFO and the RAMP FIFO full (depth D),
    the take at T_j frees a port-FIFO slot the router fills at T_j + 1, freeing a RAMP slot
    the PE fills at T_j + 2 with word j + 2D. So the PE's last send (word n - 1) is at
    T_{n-1-2D} + 2, and every earlier cycle of its task that sent nothing waited for output
    room: wait_output = last send + 1 - n."""
    n, lat, depth, hop = 40, 10, 4, 1
    r = simulate(outbound(n), wafer(1 / k, lat))

    def take(j):
        return 1 + hop + k * j

    np.testing.assert_array_equal(r.port_words["g"], np.arange(n, dtype=np.float32) * 3)
    assert r.cycles == take(n - 1) + 1
    assert r.port_last_cycle == {"g": take(n - 1) + lat}
    last_send = take(n - 1 - 2 * depth) + 2
    assert r.stats.last_cycle[0, 1] == last_send
    assert r.stats.send[0, 1] == n
    assert r.stats.wait_output[0, 1] == last_send + 1 - n > 0


def test_outbound_word_count_is_checked():
    with pytest.raises(ProgramError, match=r"^port 'g' at PE \(1, 0\) side E color 2 "
                       r"\(outbound\): the memory service received more than the 39 words"):
        simulate(outbound(40, expected=39), wafer())
    with pytest.raises(ProgramError, match=r"received 40 of the 41 words expected"):
        simulate(outbound(40, expected=41), wafer())


def test_inbound_to_outbound_through_the_fabric_multicast():
    """An inbound port on the west of row 0 multicasts each word to PE (0, 0) and east to
    PE (1, 0), which sends it on out of the east side: every word reaches the memory
    service again, and PE (0, 0) has a copy. Ports on one PE's two sides of a color."""
    n = 16
    p = Program(2, 1)
    data = np.linspace(-1, 1, n, dtype=np.float32)
    p.ports += [EdgePort("in", 0, 0, W, 0, True, data),
                EdgePort("out", 1, 0, E, 0, False, NONE, n)]
    p.add_route(0, 0, 0, port_mask(W), port_mask(RAMP, E))
    p.add_route(1, 0, 0, port_mask(W), port_mask(E))
    p.pe(0, 0, n).tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, n, Mem(0), FabIn(0))]))
    r = simulate(p, wafer(44, 5))
    np.testing.assert_array_equal(r.port_words["out"], data)
    np.testing.assert_array_equal(r.sram(0, 0), data)
    # word j enters at 5 + j, leaves (0, 0) at 6 + j, (1, 0) at 7 + j, taken at 8 + j
    assert r.port_last_cycle == {"in": 5 + n - 1, "out": 8 + n - 1 + 5}
    assert r.cycles == 8 + n  # (the last take at 8 + n - 1; the PE's last MOV before)


def test_ports_round_trip_through_a_saved_program(tmp_path):
    p, _ = shared(2, 5)
    p.ports.append(EdgePort("o", 1, 0, E, 7, False, NONE, 3, marks=(0, 2)))
    p.add_route(1, 0, 7, port_mask(W), port_mask(E))
    p.add_route(0, 0, 7, port_mask(RAMP), port_mask(E))
    save_program(p, tmp_path / "p.npz")
    q = load_program(tmp_path / "p.npz")
    assert [(a.name, a.x, a.y, a.side, a.color, a.inbound, a.expected, a.marks)
            for a in q.ports] == [(a.name, a.x, a.y, a.side, a.color, a.inbound, a.expected,
                                   a.marks) for a in p.ports]
    for a, b in zip(p.ports, q.ports, strict=True):
        if a.inbound:
            assert b.data.dtype == np.float32
            np.testing.assert_array_equal(a.data, b.data)


def _ok() -> Program:
    p, _ = inbound_chain(4, 1)
    return p


def _with(port_fields: dict, routes: dict | None = None) -> Program:
    p = _ok()
    base = dict(name="w", x=0, y=0, side=W, color=3, inbound=True,
                data=np.zeros(4, np.float32), expected=0)
    p.ports = [EdgePort(**{**base, **port_fields})]
    for key, route in (routes or {}).items():
        p.routes[key] = route
    return p


def _two() -> Program:
    p = _ok()
    p.ports.append(EdgePort("v", 0, 0, W, 3, True, np.zeros(2, np.float32)))
    return p


BAD = [
    ("interior side", lambda: _with({"side": E}),
     r"port 'w' at PE \(0, 0\) side E color 3 \(inbound\): side E does not face off the 2 x "
     r"1 fabric"),
    ("same PE side color", _two,
     r"port 'v' at PE \(0, 0\) side W color 3 \(inbound\): a second port on the same PE, "
     r"side and color"),
    ("data 2-D", lambda: _with({"data": np.zeros((2, 2), np.float32)}),
     r"port 'w' .*: field data must be a 1-D float32 array \(got float32 of shape \(2, 2\)\)"),
    ("data float64", lambda: _with({"data": np.zeros(3)}),
     r"field data must be a 1-D float32 array \(got float64"),
    ("expected < 0", lambda: _with({"inbound": False, "expected": -1, "side": N},
                                   {(0, 0, 3): Route(port_mask(W), port_mask(E, N))}),
     r"port 'w' at PE \(0, 0\) side N color 3 \(outbound\): field expected must be an "
     r"integer >= 0 \(got -1\)"),
    ("marks out of order", lambda: _with({"marks": (2, 1)}),
     r"port 'w' at PE \(0, 0\) side W color 3 \(inbound\): field marks must be a tuple of "
     r"increasing word indices in 0..3$"),
    ("route missing", lambda: _with({"color": 5}),
     r"port 'w' at PE \(0, 0\) side W color 5 \(inbound\): the route of color 5 at that PE "
     r"is missing"),
    ("route not from side", lambda: _with({"side": N}),
     r"port 'w' at PE \(0, 0\) side N color 3 \(inbound\): the route of color 3 at that PE "
     r"does not accept from N"),
    ("route not to side", lambda: _with({"side": S, "inbound": False, "expected": 2}),
     r"port 'w' at PE \(0, 0\) side S color 3 \(outbound\): the route of color 3 at that PE "
     r"does not send to S"),
    ("undeclared tx off the edge", lambda: _with(
        {}, {(0, 0, 3): Route(port_mask(W), port_mask(E, S))}),
     r"route at PE \(0, 0\) color 3: tx S leads off the mesh edge"),
    ("inbound port but tx off the edge", lambda: _with(
        {}, {(0, 0, 3): Route(port_mask(W), port_mask(E, W))}),
     r"route at PE \(0, 0\) color 3: tx W leads off the mesh edge"),
    ("duplicate name", lambda: _ok() if False else _dup(),
     r"port 'w': name used by two ports"),
    ("outside", lambda: _with({"x": 5}), r"port 'w' at PE \(5, 0\): PE outside the 2 x 1"),
    ("side RAMP", lambda: _with({"side": RAMP}), r"field side must be N, E, S or W"),
]


def _dup() -> Program:
    p = _ok()
    p.ports.append(EdgePort("w", 1, 0, E, 3, False, NONE, 0))
    return p


@pytest.mark.parametrize(("make", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_ports_are_one_line_program_errors(make, message):
    with pytest.raises(ProgramError, match=message) as info:
        validate(make(), wafer())
    assert "\n" not in str(info.value)


def test_outbound_route_is_valid_only_with_its_port():
    p = _with({"side": S, "inbound": False, "expected": 0},
              {(0, 0, 3): Route(port_mask(W), port_mask(E, S))})
    validate(p, wafer())  # the same route as "undeclared tx off the edge", now declared


def test_cli_run_of_a_saved_program_with_a_bad_port_exits_2_in_one_line(tmp_path):
    path = tmp_path / "bad.npz"
    save_program(_with({"side": E}), path, WaferConfig(width=2, height=1))
    result = subprocess.run([sys.executable, "-m", "wse_sim", "simulate", str(path)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "port 'w' at PE (0, 0) side E color 3 (inbound): side E does not face off" in lines[0]


def test_edge_ports_bit_identical_for_any_thread_count(all_workers):
    """Inbound streams down four columns (their words cross every stripe boundary), two of
    them sharing a narrow budget with back-pressure, and outbound ports at the bottom: the
    same cycles, counters, words and arrival cycles with 1, 2 and 4 workers."""
    height, n = 8, 20
    p = Program(4, height)
    for x in range(4):
        data = np.arange(n, dtype=np.float32) + 100 * x
        p.ports.append(EdgePort(f"in{x}", x, 0, N, 1, True, data))
        p.ports.append(EdgePort(f"out{x}", x, height - 1, S, 1, False, NONE, n))
        p.add_route(x, 0, 1, port_mask(N), port_mask(S, RAMP))
        for y in range(1, height - 1):
            p.add_route(x, y, 1, port_mask(N), port_mask(S))
        p.add_route(x, height - 1, 1, port_mask(N), port_mask(S))
        p.pe(x, 0, n).tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, n, Mem(0),
                                                                FabIn(1))]))
    w = WaferConfig(width=4, height=height, edge_bytes_per_s=4 * CLOCK * 1.5,
                    edge_latency_cycles=3, queue_depth=2)
    runs = {k: simulate(p, w, threads=k) for k in (1, 2, 4)}
    assert [len(r._asm.workers.stripe) for r in runs.values()] == [1, 2, 4]
    for k in (2, 4):
        assert_same_run(runs[1], runs[k])
        assert runs[k].port_last_cycle == runs[1].port_last_cycle
        for x in range(4):
            np.testing.assert_array_equal(runs[k].port_words[f"out{x}"],
                                          np.arange(n, dtype=np.float32) + 100 * x)
            np.testing.assert_array_equal(runs[k].sram(x, 0), runs[1].sram(x, 0))
    assert runs[1].stats.edge_in.sum() == runs[1].stats.edge_out.sum() == 4 * n


def test_report_counts_edge_words():
    """The JSON report holds the words the ports moved (counted by the port phase), the text
    report a line for them; a run without ports prints no such line."""
    from wse_sim.report import format_report, run_report

    n = 9
    p, _ = inbound_chain(n, 2)
    w = wafer()
    report = run_report(p, w, simulate(p, w).stats, 0.0)
    assert (report["edge_words_in"], report["edge_words_out"]) == (n, 0)
    assert f"edge ports    {n} words in from the memory service, 0 out to it" in \
        format_report(report)
    report = run_report(outbound(n), w, simulate(outbound(n), w).stats, 0.0)
    assert (report["edge_words_in"], report["edge_words_out"]) == (0, n)
    p.ports = []
    p.routes[(0, 0, 3)] = Route(port_mask(RAMP), port_mask(E))  # PE (0, 0) sends instead
    p.pe(0, 0, n).tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, n, FabOut(3), Mem(0))]))
    report = run_report(p, w, simulate(p, w).stats, 0.0)
    assert report["edge_words_in"] == 0 and "edge ports" not in format_report(report)
