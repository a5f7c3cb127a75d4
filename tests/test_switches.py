"""Switch positions, control wavelets and relays (`wse_sim.router`, `wse_sim.program`), with
every expected cycle count derived by hand from the timing model.

Latency (wse_sim.engine docstring): a wavelet sent by a FABOUT element in cycle t leaves its
router at t + 1, crosses h links of hop_latency L, enters the receiver's queue at
t + 1 + h*L and is consumed at t + h*L + 2. A control wavelet (SWITCH_ADV) travels the
same way; the router it leaves in cycle t routes that color under its next position from
t + 1 + switch_latency on, and a router that would deliver it to its PE consumes it.
"""

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from programs import RAMP, E, N, S, W, assert_same_run, route_east

from wse_sim.engine import simulate
from wse_sim.errors import DeadlockError, ProgramError, SwitchOrderError
from wse_sim.hardware import WaferConfig
from wse_sim.program import (
    FabIn,
    FabOut,
    Mem,
    Op,
    Program,
    Route,
    Task,
    Trigger,
    advance,
    load_program,
    port_mask,
    save_program,
    validate,
    vec,
)
from wse_sim.report import format_report, run_report


def wafer(**kw) -> WaferConfig:
    return WaferConfig(width=16, height=16, **kw)


def two_phases(n: int, m: int, ring: bool = False) -> Program:
    """Color 0 carries two streams to PE (2, 0): PE (0, 0) sends words 0..n-1 east over PE
    (1, 0), then a control wavelet; PE (1, 0)'s route is (rx W, tx E) with position 1
    (rx RAMP, tx E), so its own m words (100, 101, ...) leave only after the switch. PE
    (2, 0) stores the n + m words it receives in order."""
    p = Program(3, 1)
    src = p.pe(0, 0, n)
    src.load(0, np.arange(n, dtype=np.float32))
    src.tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, n, FabOut(0), Mem(0)), advance(0)]))
    mid = p.pe(1, 0, m)
    mid.load(0, 100 + np.arange(m, dtype=np.float32))
    mid.tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, m, FabOut(0), Mem(0))]))
    dst = p.pe(2, 0, n + m)
    dst.tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, n + m, Mem(0), FabIn(0))]))
    p.add_route(0, 0, 0, port_mask(RAMP), port_mask(E))
    p.set_route(1, 0, 0, Route(port_mask(W), port_mask(E),
                               positions=((port_mask(RAMP), port_mask(E)),), ring=ring))
    p.add_route(2, 0, 0, port_mask(W), port_mask(RAMP))
    return p


@pytest.mark.parametrize("hop_latency", [1, 2])
@pytest.mark.parametrize("switch_latency", [0, 3])
def test_one_color_two_streams_in_two_phases(hop_latency, switch_latency):
    """Closed form. PE (0, 0) sends data j in cycle j (j < n) and the control wavelet in
    cycle n. Data j leaves router (1, 0) at j + 1 + L and is consumed by PE (2, 0) at
    j + 2L + 2, so the first stream is consumed in cycles 2L + 2 .. n + 2L + 1. The
    control wavelet leaves router (1, 0) at t_s = n + 1 + L (the switch) and is consumed by
    router (2, 0) at n + 1 + 2L. PE (1, 0) filled its RAMP FIFO in cycles 0..3 (gated: its
    port is not in the base position) and refills it one cycle after each pop, so from
    t_s + 1 + switch_latency its m words leave one per cycle: word k at
    n + 2 + L + switch_latency + k, consumed at n + 3 + 2L + switch_latency + k. The last
    at n + m + 2 + 2L + switch_latency; the run ends the cycle after:

        cycles = n + m + 2L + 3 + switch_latency,

    one cycle (the control wavelet's slot) plus switch_latency more than one stream of
    n + m words from PE (0, 0) (n + m + 2L + 2)."""
    n, m, L = 6, 9, hop_latency
    r = simulate(two_phases(n, m), wafer(hop_latency=L, switch_latency=switch_latency))
    got = r.sram(2, 0)
    np.testing.assert_array_equal(got[:n], np.arange(n, dtype=np.float32))
    np.testing.assert_array_equal(got[n:], 100 + np.arange(m, dtype=np.float32))
    assert r.stats.first_cycle[0, 2] == 2 * L + 2
    assert r.stats.last_cycle[0, 2] == n + m + 2 + 2 * L + switch_latency
    assert r.cycles == n + m + 2 * L + 3 + switch_latency
    assert r.stats.control.sum() == r.stats.control[0, 0] == 1
    assert r.stats.switch_changes.sum() == r.stats.switch_changes[0, 1] == 1
    assert r.stats.control_sunk.sum() == r.stats.control_sunk[0, 2] == 1
    assert r.stats.delivered == n + m  # the control wavelet reached no PE's queue
    assert r.stats.link[1, 0, 0] == n + 1 and r.stats.link[1, 0, 1] == n + m + 1
    report = run_report(two_phases(n, m), wafer(), r.stats, 0.0)
    assert (report["control_wavelets"], report["switch_changes"],
            report["relayed_wavelets"]) == (1, 1, 0)
    assert "1 position changes by 1 control wavelets; 0 wavelets relayed" in format_report(
        report)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 12), m=st.integers(1, 12), hop_latency=st.integers(1, 3),
       extra_depth=st.integers(0, 3), switch_latency=st.integers(0, 4))
def test_two_phases_closed_form_for_any_shape(n, m, hop_latency, extra_depth, switch_latency):
    # The closed form above holds whenever a link runs at one wavelet per cycle
    # (queue_depth >= hop_latency + 1, `wse_sim.router`).
    L = hop_latency
    r = simulate(two_phases(n, m), wafer(hop_latency=L, queue_depth=L + 1 + extra_depth,
                                         switch_latency=switch_latency))
    assert r.cycles == n + m + 2 * L + 3 + switch_latency
    expected = np.concatenate([np.arange(n), 100 + np.arange(m)]).astype(np.float32)
    np.testing.assert_array_equal(r.sram(2, 0), expected)


def test_ring_mode_returns_to_the_base_position():
    # Three phases on color 0: PE (0, 0) sends 0..n-1 and a control wavelet (position 1:
    # PE (1, 0) sends), PE (1, 0) sends its m words and a control wavelet (ring: back to the
    # base), then PE (0, 0)'s next p words, which waited at (1, 0)'s W input meanwhile.
    n, m, q = 5, 4, 7
    p = two_phases(n, m, ring=True)
    src = p.pes[(0, 0)]
    src.sram_words = n + q
    src.load(n, 200 + np.arange(q, dtype=np.float32))
    src.tasks[0].instrs.append(vec(Op.MOV, q, FabOut(0), Mem(n)))
    p.pes[(1, 0)].tasks[0].instrs.append(advance(0))
    dst = p.pes[(2, 0)]
    dst.sram_words = n + m + q
    dst.tasks[0].instrs[0] = vec(Op.MOV, n + m + q, Mem(0), FabIn(0))
    r = simulate(p, wafer())
    expected = np.concatenate([np.arange(n), 100 + np.arange(m), 200 + np.arange(q)])
    np.testing.assert_array_equal(r.sram(2, 0), expected.astype(np.float32))
    assert r.stats.switch_changes[0, 1] == 2 and r.stats.control.sum() == 2
    assert r.stats.control_sunk.sum() == r.stats.control_sunk[0, 2] == 2


def cut_off(ring: bool = False) -> Program:
    """PE (0, 0) streams 20 words east over PE (1, 0) to PE (2, 0) on color 0; PE (1, 0)
    (route rx W+RAMP, tx E; position 1 rx RAMP) copies 5 words (cycles 0..4) and then sends
    a control wavelet (cycle 5) while the stream still flows: leaving router (1, 0) in cycle
    6 (never served before, it goes first) it switches away from W with wavelets waiting
    there."""
    n = 20
    p = Program(3, 1)
    src = p.pe(0, 0, n)
    src.tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, n, FabOut(0), Mem(0))]))
    p.pe(1, 0, 10).tasks.append(Task(0, Trigger.RESET, [
        vec(Op.MOV, 5, Mem(0), Mem(5)), advance(0)]))
    p.pe(2, 0, n).tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, n, Mem(0), FabIn(0))]))
    p.add_route(0, 0, 0, port_mask(RAMP), port_mask(E))
    p.set_route(1, 0, 0, Route(port_mask(W, RAMP), port_mask(E),
                               positions=((port_mask(RAMP), port_mask(E)),), ring=ring))
    p.add_route(2, 0, 0, port_mask(W), port_mask(RAMP))
    return p


def test_route_changed_with_wavelets_in_flight_is_an_error():
    with pytest.raises(SwitchOrderError) as info:
        simulate(cut_off(), wafer())
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("switch order error at cycle 6: PE (1, 0) color 0: a control "
                              "wavelet switched the route to position 1 while")
    assert "waited at input W, which neither it nor a later position accepts" in message
    assert "positions 0: rx W+RAMP tx E, 1: rx RAMP tx E; ring off" in message


def test_cut_off_wavelets_wait_for_a_ring_that_never_turns():
    # With ring mode the W input is accepted again after one more control wavelet, which
    # nobody sends: the stranded stream is reported as a stuck fabric, naming the switch.
    with pytest.raises(DeadlockError, match=r"held by a switch position: PE \(1, 0\) W color "
                       r"0: \d+ wavelets, switch position 1 does not accept W"):
        simulate(cut_off(ring=True), wafer())


def test_switch_order_error_from_the_command_line(tmp_path):
    path = tmp_path / "cut.npz"
    save_program(cut_off(), path, WaferConfig(width=3, height=1))
    result = subprocess.run([sys.executable, "-m", "wse_sim", "simulate", str(path), "--quiet"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("error: switch order error at cycle 6: PE (1, 0) color 0")


def relay(n: int) -> Program:
    """PE (0, 0) sends words 0..n-1 east on color 1; PE (1, 0) relays each onto color 2 (one
    MOV from FABIN to FABOUT); PE (2, 0) stores them."""
    p = Program(3, 1)
    src = p.pe(0, 0, n)
    src.load(0, np.arange(n, dtype=np.float32))
    src.tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, n, FabOut(1), Mem(0))]))
    p.pe(1, 0, 1).tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, n, FabOut(2), FabIn(1))]))
    p.pe(2, 0, n).tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, n, Mem(0), FabIn(2))]))
    route_east(p, 1, 0, 1, 0)
    route_east(p, 2, 1, 2, 0)
    return p


def test_relay_counts_its_wavelets_at_the_cost_of_a_move():
    # Word j: sent at j, consumed and re-sent by PE (1, 0) at j + L + 2 (one MOV element),
    # consumed by PE (2, 0) at j + 2L + 4; the last at n + 2L + 3, the run ends one later.
    n = 12
    r = simulate(relay(n), wafer())
    np.testing.assert_array_equal(r.sram(2, 0), np.arange(n, dtype=np.float32))
    assert r.cycles == n + 2 * 1 + 4
    assert r.stats.relayed[0, 1] == r.stats.relayed.sum() == n
    assert r.stats.send[0, 1] == n  # each relay element is a send cycle
    assert r.stats.switch_changes.sum() == r.stats.control.sum() == 0
    report = run_report(relay(n), wafer(), r.stats, 0.0)
    assert report["relayed_wavelets"] == n


def _both_sides() -> Program:
    p = two_phases(2, 2)
    p.routes[(1, 0, 0)] = Route(port_mask(W), port_mask(E),
                                positions=((port_mask(RAMP), port_mask(E, RAMP)),))
    return p


def _too_many() -> Program:
    p = two_phases(2, 2)
    pos = (port_mask(RAMP), port_mask(E))
    p.routes[(1, 0, 0)] = Route(port_mask(W), port_mask(E), positions=(pos,) * 4)
    return p


def _start() -> Program:
    p = two_phases(2, 2)
    p.routes[(1, 0, 0)] = Route(port_mask(W), port_mask(E),
                                positions=((port_mask(RAMP), port_mask(E)),), start=2)
    return p


def _tx_nowhere() -> Program:
    p = two_phases(2, 2)  # position 1 sends north, off the mesh
    p.routes[(1, 0, 0)] = Route(port_mask(W), port_mask(E), positions=((port_mask(W),
                                                                        port_mask(N)),))
    return p


def _tx_unaccepted() -> Program:
    p = two_phases(2, 2)
    p.height = 2  # position 1 sends south to PE (1, 1), whose route does not accept N
    p.add_route(1, 1, 0, port_mask(RAMP), port_mask(N))
    p.routes[(1, 0, 0)] = Route(port_mask(W, S), port_mask(E),
                                positions=((port_mask(W, S), port_mask(S)),))
    return p


def _advance_without_ramp() -> Program:
    p = two_phases(2, 2)
    p.pes[(2, 0)].tasks[0].instrs.append(advance(0))
    return p


@pytest.mark.parametrize("build, message", [
    (_both_sides, r"^route at PE \(1, 0\) color 0: field positions: position 1 changes both "
                  r"rx and tx of the base route; .* \(switch_both_sides false\)$"),
    (_too_many, r"^route at PE \(1, 0\) color 0: field positions: 4 switch positions besides "
                r"the base, the wafer has 3 \(switch_positions 4\)$"),
    (_start, r"^route at PE \(1, 0\) color 0: field start: position 2 not in 0\.\.1$"),
    (_tx_nowhere, r"^route at PE \(1, 0\) color 0 position 1: tx N leads off the mesh edge$"),
    (_tx_unaccepted, r"^route at PE \(1, 0\) color 0 position 1: tx S but the route of PE "
                     r"\(1, 1\) color 0 does not accept from N$"),
    (_advance_without_ramp, r"^PE \(2, 0\) task 0 instr 1: field dst: FABOUT color 0 but "
                            r"that color's route does not accept from RAMP$"),
])
def test_invalid_switches_named_in_one_line(build, message):
    with pytest.raises(ProgramError, match=message):
        validate(build(), wafer())


def test_switches_allowed_on_both_sides_when_the_wafer_says_so():
    validate(_both_sides(), wafer(switch_both_sides=True))
    validate(_too_many(), wafer(switch_positions=5))


def test_add_route_does_not_merge_into_switch_positions():
    p = two_phases(2, 2)
    with pytest.raises(ValueError, match="has switch positions"):
        p.add_route(1, 0, 0, port_mask(N), 0)
    p.set_route(1, 0, 0, p.routes[(1, 0, 0)])  # the same route again is fine
    with pytest.raises(ValueError, match="already"):
        p.set_route(1, 0, 0, Route(port_mask(W), port_mask(E)))


def test_save_load_round_trip_keeps_switches(tmp_path):
    p = two_phases(3, 4, ring=True)
    p.routes[(1, 0, 0)] = Route(port_mask(W), port_mask(E),
                                positions=((port_mask(RAMP), port_mask(E)),
                                           (port_mask(N), port_mask(E))), start=1, ring=True)
    path = tmp_path / "p.npz"
    save_program(p, path)
    q = load_program(path)
    assert q.routes == p.routes
    assert q.pes[(0, 0)].tasks == p.pes[(0, 0)].tasks  # advance(0) included


def transposed(p: Program) -> Program:
    """The same program along columns: (x, y) -> (y, x), E <-> S, W <-> N."""
    swap = {N: W, W: N, E: S, S: E, RAMP: RAMP}

    def mask(m: int) -> int:
        return port_mask(*(swap[port] for port in swap if m >> port & 1))

    q = Program(p.height, p.width, meta=p.meta)
    q.pes = {(y, x): pe for (x, y), pe in p.pes.items()}
    for (x, y, c), r in p.routes.items():
        q.routes[(y, x, c)] = Route(mask(r.rx), mask(r.tx), tuple(
            (mask(rx), mask(tx)) for rx, tx in r.positions), r.start, r.ring)
    return q


def baton(width: int, switchers: list[int], sizes: list[int]) -> Program:
    """Color 0 along a row of `width` PEs carries one stream per sender, in turn, to PE
    (width - 1, 0): PE (0, 0), then the PEs at x in `switchers` (ascending, inside the
    row). Each sender sends its words (sender i: 1000 * i + 0, 1, ...) and then a control
    wavelet. The j-th switcher's route (j = 1, 2, ...) is (rx W, tx E), j - 1 positions the
    same, then (rx RAMP, tx E): the j control wavelets of the senders before it (each
    passes it after its stream) bring it to its own turn."""
    p = Program(width, 1)
    senders = [0, *switchers]
    for i, (x, n) in enumerate(zip(senders, sizes, strict=True)):
        pe = p.pe(x, 0, n)
        pe.load(0, 1000 * i + np.arange(n, dtype=np.float32))
        pe.tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, n, FabOut(0), Mem(0)),
                                                advance(0)]))
    total = sum(sizes)
    p.pe(width - 1, 0, total).tasks.append(Task(0, Trigger.RESET, [
        vec(Op.MOV, total, Mem(0), FabIn(0))]))
    p.add_route(0, 0, 0, port_mask(RAMP), port_mask(E))
    for x in range(1, width - 1):
        base = (port_mask(W), port_mask(E))
        if x in switchers:
            j = switchers.index(x) + 1
            p.set_route(x, 0, 0, Route(*base, positions=(base,) * (j - 1)
                                       + ((port_mask(RAMP), port_mask(E)),)))
        else:
            p.add_route(x, 0, 0, *base)
    p.add_route(width - 1, 0, 0, port_mask(W), port_mask(RAMP))
    return p


@st.composite
def batons(draw):
    width = draw(st.integers(3, 6))
    switchers = sorted(draw(st.sets(st.integers(1, width - 2), max_size=3)))
    sizes = [draw(st.integers(1, 9)) for _ in range(1 + len(switchers))]
    fields = dict(queue_depth=draw(st.integers(1, 4)), hop_latency=draw(st.integers(1, 3)),
                  switch_latency=draw(st.integers(0, 3)),
                  ramp_in_per_cycle=draw(st.integers(1, 2)),
                  ramp_out_per_cycle=draw(st.integers(1, 2)))
    return width, switchers, sizes, fields


@settings(max_examples=30, deadline=None)
@given(batons())
def test_streams_take_turns_on_one_color(case):
    # The streams arrive whole and in turn on any wafer, each switcher's position changes
    # once per control wavelet before its own, every control wavelet ends at the receiver's
    # router, and the run is bit-identical down a column split into 1 or 3 stripes.
    width, switchers, sizes, fields = case
    p = baton(width, switchers, sizes)
    r = simulate(p, WaferConfig(width=width, height=1, **fields))
    expected = np.concatenate([1000 * i + np.arange(n) for i, n in enumerate(sizes)])
    np.testing.assert_array_equal(r.sram(width - 1, 0), expected.astype(np.float32))
    for j, x in enumerate(switchers, 1):
        assert r.stats.switch_changes[0, x] == j
    assert r.stats.switch_changes.sum() == sum(range(1, len(switchers) + 1))
    assert r.stats.control.sum() == r.stats.control_sunk[0, width - 1] == len(sizes)
    column = WaferConfig(width=1, height=width, **fields)
    one, three = (simulate(transposed(p), column, threads=k) for k in (1, 3))
    assert_same_run(one, three)
    assert one.cycles == r.cycles
    np.testing.assert_array_equal(three.sram(0, width - 1), expected.astype(np.float32))


def test_switches_bit_identical_for_any_thread_count(all_workers):
    # Two-phase streams down columns, so wavelets and control wavelets cross stripes.
    wide = Program(6, 3)
    for col in range(6):
        one = transposed(two_phases(4 + col, 3 + col, ring=bool(col % 2)))
        for (x, y), pe in one.pes.items():
            wide.pes[(x + col, y)] = pe
        for (x, y, c), r in one.routes.items():
            wide.routes[(x + col, y, c)] = r
    wafer_ = WaferConfig(width=6, height=3, queue_depth=2)
    runs = {k: simulate(wide, wafer_, threads=k) for k in (1, 2, 3)}
    assert [len(r._asm.workers.stripe) for r in runs.values()] == [1, 2, 3]
    for k in (2, 3):
        assert_same_run(runs[1], runs[k])
        for col in range(6):
            np.testing.assert_array_equal(runs[1].sram(col, 2), runs[k].sram(col, 2))
    assert runs[3].stats.switch_changes.sum() == 6
    errors = set()
    for k in (1, 2, 3):
        with pytest.raises(SwitchOrderError) as info:
            simulate(transposed(cut_off()), WaferConfig(width=1, height=3), threads=k)
        errors.add(str(info.value))
    assert len(errors) == 1
