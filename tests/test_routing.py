"""Routing (streams -> candidate multicast trees -> negotiated trees and colors -> Program)
and the kernel harness."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from kernel_bench import run_kernel

from compiler.lowering.kernel import Kernel, LocalStream, StreamEnd, StreamIds, lane_cols
from compiler.routing import _candidates, _TreeRuns, link
from wse_sim.errors import UserError
from wse_sim.hardware import WaferConfig
from wse_sim.program import (
    OPPOSITE,
    PORT_OFFSET,
    FabIn,
    FabOut,
    Imm,
    Kind,
    Mem,
    Op,
    Port,
    port_mask,
    repeat,
    validate,
    vec,
)

WAFER = WaferConfig()


def sender(name: str, tensor: str, lanes: int, rows: int, ids: StreamIds) -> Kernel:
    """1 x `lanes` strip: PE (j, 0) sends lane j (rows x 1) of `tensor` from SRAM."""
    kernel = Kernel(name=name, op="test", ops=[], width=lanes, height=1,
                    shapes={tensor: (rows, lanes)})
    for j in range(lanes):
        sid = ids.new()
        off = kernel.alloc((j, 0), rows, "data")
        kernel.emit((j, 0), vec(Op.MOV, rows, FabOut(sid), Mem(off)))
        kernel.outputs.append(StreamEnd(tensor, j, (j, j + 1), ((j, 0),), sid))
    return kernel


def receiver(name: str, tensor: str, pes_of_lane: dict[int, tuple[tuple[int, int], ...]],
             width: int, height: int, rows: int, ids: StreamIds) -> Kernel:
    kernel = Kernel(name=name, op="test", ops=[], width=width, height=height,
                    shapes={tensor: (rows, len(pes_of_lane))})
    for lane, pes in pes_of_lane.items():
        sid = ids.new()
        for pe in pes:
            off = kernel.alloc(pe, rows, "data")
            kernel.emit(pe, vec(Op.MOV, rows, Mem(off), FabIn(sid)))
        kernel.inputs.append(StreamEnd(tensor, lane, (lane, lane + 1), pes, sid))
    return kernel


def passthrough(name: str, x: str, y: str, rows: int, cols: int, lw: int,
                ids: StreamIds) -> Kernel:
    """1 x lanes strip: PE (j, 0) forwards lane j of `x` as lane j of `y`, doubled (so
    the harness test sees the kernel compute), in chunks of one row (a REPEAT)."""
    lanes = lane_cols(cols, lw)
    kernel = Kernel(name=name, op="test", ops=[], width=len(lanes), height=1,
                    shapes={x: (rows, cols), y: (rows, cols)})
    for j, (c0, c1) in enumerate(lanes):
        sin, sout = ids.new(), ids.new()
        kernel.emit((j, 0), *repeat(rows, [vec(Op.MUL, c1 - c0, FabOut(sout), FabIn(sin),
                                              Imm(2.0))]))
        kernel.inputs.append(StreamEnd(x, j, (c0, c1), ((j, 0),), sin))
        kernel.outputs.append(StreamEnd(y, j, (c0, c1), ((j, 0),), sout))
    return kernel


def test_multicast_tree_is_xy_union():
    ids = StreamIds()
    src = sender("src", "t", 1, 3, ids)
    dst = receiver("dst", "t", {0: ((0, 0), (2, 0), (2, 2))}, 3, 3, 3, ids)
    linked = link([src, dst], {"src": (5, 1), "dst": (6, 0)}, WAFER)
    assert linked.origin == (5, 0)
    (stream,) = linked.streams
    e = stream.entries
    # source (5, 1) -> east along row 1 to x = 6, 8, then north / south in those columns
    assert e[(5, 1)].rx == port_mask(Port.RAMP) and e[(5, 1)].tx == port_mask(Port.E)
    assert e[(6, 1)].rx == port_mask(Port.W)
    assert e[(6, 1)].tx == port_mask(Port.N, Port.E)
    assert e[(6, 0)].tx == port_mask(Port.RAMP)
    assert e[(7, 1)].tx == port_mask(Port.E)
    assert e[(8, 1)].tx == port_mask(Port.N, Port.S)
    assert e[(8, 0)].rx == port_mask(Port.S) and e[(8, 0)].tx == port_mask(Port.RAMP)
    assert e[(8, 2)].rx == port_mask(Port.N) and e[(8, 2)].tx == port_mask(Port.RAMP)
    assert set(e) == {(5, 1), (6, 1), (6, 0), (7, 1), (8, 1), (8, 0), (8, 2)}
    # 3 wavelets on each of the 6 links of the tree, in program coordinates
    assert linked.link_wavelets.sum() == 3 * 6
    assert linked.link_wavelets[int(Port.E), 1, 0] == 3
    assert linked.link_wavelets[int(Port.S), 1, 3] == 3
    validate(linked.program, WAFER)


def test_row_multicast_from_above_takes_yx():
    ids = StreamIds()
    src = sender("src", "t", 1, 2, ids)
    dst = receiver("dst", "t", {0: tuple((x, 2) for x in range(4))}, 4, 3, 2, ids)
    linked = link([src, dst], {"src": (0, 0), "dst": (1, 0)}, WAFER)
    (stream,) = linked.streams
    # down column 0 to row 2, then east along it: 3 + 4 PEs (XY would take 1 + 4 * 3 + ...)
    assert set(stream.entries) == {(0, 0), (0, 1), (0, 2), (1, 2), (2, 2), (3, 2), (4, 2)}
    assert stream.entries[(0, 2)].tx == port_mask(Port.E)
    validate(linked.program, WAFER)


def test_conflicting_streams_get_different_colors_and_bound_programs():
    ids = StreamIds()
    src = sender("src", "t", 3, 4, ids)
    dst = receiver("dst", "t", {0: ((3, 0),), 1: ((3, 0),), 2: ((2, 0),)}, 4, 1, 4, ids)
    linked = link([src, dst], {"src": (0, 0), "dst": (3, 0)}, WAFER)
    colors = [s.color for s in linked.streams]
    assert len(set(colors)) == 3  # all three routes share PE (2, 0)
    assert linked.colors_used == 3
    # the receiver's two instructions at (6, 0) were rewritten to the real colors
    instrs = linked.program.pes[(6, 0)].tasks[0].instrs
    assert [i.a.color for i in instrs] == colors[:2]
    validate(linked.program, WAFER)


def test_disjoint_streams_share_a_color():
    ids = StreamIds()
    kernel = Kernel(name="k", op="test", ops=[], width=2, height=2)
    for y in range(2):
        sid = ids.new()
        off = kernel.alloc((0, y), 1, "x")
        kernel.emit((0, y), vec(Op.MOV, 1, FabOut(sid), Mem(off)))
        kernel.emit((1, y), vec(Op.MOV, 1, Mem(kernel.alloc((1, y), 1, "y")), FabIn(sid)))
        kernel.local_streams.append(LocalStream((0, y), ((1, y),), sid))
    linked = link([kernel], {"k": (0, 0)}, WAFER)
    assert linked.colors_used == 1
    assert [s.name for s in linked.streams] == ["k/local 0", "k/local 1"]


@settings(max_examples=10, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9), st.integers(0, 9),
                          st.integers(0, 9)), min_size=1, max_size=25, unique=True))
def test_random_streams_get_a_proper_coloring(pairs):
    """1x1 senders and receivers on a 10 x 20 patch: every two streams with an entry on a
    common PE differ in color, and the Program validates."""
    ids = StreamIds()
    kernels, positions = [], {}
    for i, (sx, sy, dx, dy) in enumerate(pairs):
        kernels += [sender(f"s{i}", f"t{i}", 1, 2, ids),
                    receiver(f"r{i}", f"t{i}", {0: ((0, 0),)}, 1, 1, 2, ids)]
        positions[f"s{i}"], positions[f"r{i}"] = (sx, sy), (dx, 10 + dy)
    assume(len(set(positions.values())) == len(positions))  # one kernel per PE
    linked = link(kernels, positions, WAFER)
    for a in linked.streams:
        for b in linked.streams:
            if a is not b and set(a.entries) & set(b.entries):
                assert a.color != b.color
    validate(linked.program, WAFER)


def test_too_few_colors_names_stream_and_pe():
    ids = StreamIds()
    src = sender("src", "t", 3, 2, ids)
    dst = receiver("dst", "t", {j: ((0, 0),) for j in range(3)}, 1, 1, 2, ids)
    with pytest.raises(UserError, match=r"^routing: stream t\[lane \d\] could not get a color: "
                                        r"PE \(3, 0\) is an end of 3 streams and the wafer "
                                        r"has 2 colors$"):
        link([src, dst], {"src": (0, 0), "dst": (3, 0)}, WaferConfig(colors=2))


def test_forced_crossing_fails_after_negotiation():
    """Two streams whose endpoints interleave on the border of their box must meet; with
    one color the negotiation gives up and names both and the PE."""
    ids = StreamIds()
    kernels = [sender("a", "ta", 1, 2, ids), receiver("ra", "ta", {0: ((0, 0),)}, 1, 1, 2, ids),
               sender("b", "tb", 1, 2, ids), receiver("rb", "tb", {0: ((0, 0),)}, 1, 1, 2, ids)]
    positions = {"a": (0, 1), "ra": (2, 1), "b": (1, 0), "rb": (1, 2)}
    with pytest.raises(UserError, match=r"^routing: stream t[ab]\[lane 0\] could not get a "
                                        r"color: after \d+ rounds of negotiation and 0 relays "
                                        r"it still shares color 0 at PE \(\d, \d\) with "
                                        r"t[ab]\[lane 0\] \(\d streams pass that PE\) and the "
                                        r"wafer has 1 colors$"):
        link(kernels, positions, WaferConfig(colors=1))


def test_negotiation_logs_each_round(caplog):
    """The forced crossing's rounds, one INFO record each (the progress line shows them)."""
    ids = StreamIds()
    kernels = [sender("a", "ta", 1, 2, ids), receiver("ra", "ta", {0: ((0, 0),)}, 1, 1, 2, ids),
               sender("b", "tb", 1, 2, ids), receiver("rb", "tb", {0: ((0, 0),)}, 1, 1, 2, ids)]
    positions = {"a": (0, 1), "ra": (2, 1), "b": (1, 0), "rb": (1, 2)}
    with caplog.at_level(logging.INFO, logger="compiler.routing"), pytest.raises(UserError):
        link(kernels, positions, WaferConfig(colors=1))
    rounds = [r.getMessage() for r in caplog.records if r.name == "compiler.routing"]
    assert rounds[:2] == [f"routing, negotiation: round {k}, 2 of 2 streams share a (PE, color)"
                          for k in (1, 2)]


def test_negotiation_steps_aside_into_a_free_tree():
    """Plain XY trees of the two streams share PE (2, 1); the YX tree of the second is
    free, so one color is enough (graph coloring of the plain trees needed two)."""
    ids = StreamIds()
    kernels = [sender("a", "ta", 1, 2, ids), receiver("ra", "ta", {0: ((0, 0),)}, 1, 1, 2, ids),
               sender("b", "tb", 1, 2, ids), receiver("rb", "tb", {0: ((0, 0),)}, 1, 1, 2, ids)]
    positions = {"a": (0, 0), "ra": (2, 1), "b": (0, 1), "rb": (2, 2)}
    linked = link(kernels, positions, WaferConfig(colors=1))
    assert linked.colors_used == 1
    a, b = linked.streams
    assert not set(a.entries) & set(b.entries)
    validate(linked.program, WaferConfig(colors=1))


@settings(max_examples=25, deadline=None)
@given(src=st.tuples(st.integers(0, 6), st.integers(0, 6)),
       dsts=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=5,
                     unique=True),
       margin=st.sampled_from([None, 0, 2]))
def test_candidates_are_trees(src, dsts, margin):
    """Every candidate is a tree inside the box: each PE but the source is entered from
    one side, following tx ports from the source visits every PE once, and RAMP delivers at
    exactly the destinations."""
    assume(src not in dsts)
    box = (0, 0, 7, 7)
    trees = _candidates(src, dsts, box, margin)
    assert trees and sorted(t.size for t in trees) == [t.size for t in trees]
    for tree in trees:
        entries = tree.entries()
        assert entries[src].rx == port_mask(Port.RAMP)
        assert all(0 <= x < 7 and 0 <= y < 7 for x, y in entries)
        seen, todo = set(), [src]
        while todo:
            pe = todo.pop()
            assert pe not in seen
            seen.add(pe)
            for port, (dx, dy) in PORT_OFFSET.items():
                if entries[pe].tx & port_mask(port):
                    nxt = (pe[0] + dx, pe[1] + dy)
                    assert entries[nxt].rx == port_mask(OPPOSITE[port])
                    todo.append(nxt)
        assert seen == set(entries)
        assert {pe for pe, r in entries.items() if r.tx & port_mask(Port.RAMP)} == set(dsts)


def test_sram_overflow_names_op_pe_and_bytes():
    ids = StreamIds()
    src = sender("src", "t", 1, 2, ids)
    dst = receiver("dst", "t", {0: ((0, 0),)}, 1, 1, 2, ids)
    dst.alloc((0, 0), 20_000, "huge buffer")
    with pytest.raises(UserError, match=r"op dst \(test\): PE \(5, 7\) needs 80008 bytes of "
                                        r"SRAM, has 49152"):
        link([src, dst], {"src": (4, 7), "dst": (5, 7)}, WAFER)


def test_unmatched_lanes_are_compiler_bugs():
    ids = StreamIds()
    dst = receiver("dst", "t", {0: ((0, 0),)}, 1, 1, 2, ids)
    with pytest.raises(ValueError, match="no producer"):
        link([dst], {"dst": (0, 0)}, WAFER)
    src = sender("src", "t", 1, 2, ids)
    with pytest.raises(ValueError, match="no consumer"):
        link([src], {"src": (0, 0)}, WAFER)
    twin = sender("twin", "t", 1, 2, ids)
    with pytest.raises(ValueError, match="two producers"):
        link([src, twin, dst], {"src": (0, 0), "twin": (0, 1), "dst": (1, 0)}, WAFER)


@settings(max_examples=6, deadline=None)
@given(rows=st.integers(1, 5), cols=st.integers(1, 11), lw=st.integers(2, 4))
def test_harness_passthrough(rows, cols, lw):
    x = np.random.default_rng(rows * 100 + cols).standard_normal((rows, cols)).astype(np.float32)
    kernel = passthrough("pass", "x", "y", rows, cols, lw, StreamIds())
    run = run_kernel(kernel, {"x": x})
    np.testing.assert_array_equal(run.outputs["y"], 2 * x)
    assert run.cycles >= rows * min(lw, cols)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), layers=st.sampled_from([1, 2]))
def test_tree_costs_from_runs_equal_the_gathered_sums(seed, layers):
    """A stream's tree costs summed from straight runs over prefix sums (its ends in the
    other layer among them) are the gathered sums to the bit, for costs of the
    negotiation's form (1 + history) x (1 + pressure x streams), in any order of the
    resources; past the exact range the runs decline."""
    rng = np.random.default_rng(seed)
    width, height, colors = 13, 11, 24
    src = (int(rng.integers(width)), int(rng.integers(height)))
    dsts = sorted({(int(rng.integers(width)), int(rng.integers(height)))
                   for _ in range(rng.integers(1, 20))} - {src})
    assume(dsts)
    # each tree in a layer of its own; with two, the stream's ends in the other layer too
    # (as a stream of one phase holds them: `_resources`)
    ends = np.array([y * width + x for x, y in [src, *dsts]])
    trees = []
    for tree in _candidates(src, dsts, (0, 0, width, height), 4):
        layer = int(rng.integers(layers))
        held = [(layer * height + tree.y) * width + tree.x]
        if layers == 2:
            held.append((1 - layer) * height * width + ends)
        trees.append(rng.permutation(np.concatenate(held)))
    grid = (layers, height, width)
    history = 2.0 * rng.integers(0, 400, (layers * height * width, colors))
    occupancy = rng.integers(0, 6, history.shape)
    pressure = 0.5 * 1.5 ** int(rng.integers(0, 20))
    cost = (1.0 + history) * (1.0 + pressure * occupancy)
    gathered = np.add.reduceat(cost[np.concatenate(trees)],
                               np.cumsum([0] + [t.size for t in trees[:-1]]), axis=0)
    runs = _TreeRuns(trees, grid)
    np.testing.assert_array_equal(
        runs.totals(cost, pressure.as_integer_ratio()[1]), gathered)
    assert runs.totals(cost, 2**52) is None


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), group=st.sampled_from([1, 50, 400]))
def test_tree_costs_gathered_in_groups_equal_the_whole_gather(seed, group):
    """Gathered a group of trees at a time, a stream's tree costs are the sums of one
    gather to the bit, whatever the costs (no exact range needed: the same order)."""
    import compiler.routing as routing

    rng = np.random.default_rng(seed)
    trees = [rng.integers(0, 300, size) for size in rng.integers(1, 300, rng.integers(1, 30))]
    negotiation = routing._Negotiation([trees], (1, 12, 25), 24)
    negotiation.cost = rng.random(negotiation.cost.shape) * 10.0 ** rng.integers(0, 12)
    whole = np.add.reduceat(negotiation.cost[np.concatenate(trees)],
                            np.cumsum([0] + [t.size for t in trees[:-1]]), axis=0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(routing, "GATHER_ROWS", group)
        np.testing.assert_array_equal(negotiation._gathered(0), whole)


def test_negotiation_picks_the_same_trees_summing_runs_or_gathering(monkeypatch):
    """Six lanes multicast to overlapping bands of rows of a 12 x 10 block, on a wafer of
    6 colors: their candidates' costs are summed from runs (they pay), and the routed
    program is the one the gathered sums give."""
    import compiler.routing as routing

    def routed():
        ids = StreamIds()
        bands = {j: tuple((x, y) for x in range(12) for y in range(j, j + 5)) for j in range(6)}
        kernels = [sender("s", "t", 6, 2, ids), receiver("r", "t", bands, 12, 10, 2, ids)]
        return link(kernels, {"s": (3, 20), "r": (0, 0)}, WaferConfig(colors=6))

    summed = []
    totals = _TreeRuns.totals

    def counted(*args):
        summed.append(totals(*args))
        return summed[-1]

    monkeypatch.setattr(_TreeRuns, "totals", counted)
    with_runs = routed()
    assert summed and all(t is not None for t in summed)
    monkeypatch.setattr(routing, "RUNS_MIN_PAIRS", 10**9)
    gathered = routed()
    assert [(s.color, s.entries) for s in with_runs.streams] == [
        (s.color, s.entries) for s in gathered.streams]


def test_streams_negotiation_cannot_color_are_split_at_relays(monkeypatch):
    """Five point-to-point streams on a two-color wafer: no choice of one tree and one color
    per stream avoids sharing a (PE, color), but with two streams split at relay PEs (each
    segment its own color) every one is routed, and each receiver gets its sender's rows
    through the relay's MOV task."""
    import compiler.routing as routing
    from wse_sim.engine import simulate

    wafer = WaferConfig(colors=2)
    ends = [((2, 1), (4, 7)), ((2, 5), (6, 1)), ((6, 3), (0, 4)), ((1, 2), (4, 4)),
            ((2, 2), (0, 5))]
    ids = StreamIds()
    kernels, positions = [], {}
    for i, (src, dst) in enumerate(ends):
        send = sender(f"s{i}", f"t{i}", 1, 3, ids)
        send.load((0, 0), 0, np.arange(3, dtype=np.float32) + 10 * i)
        kernels += [send, receiver(f"r{i}", f"t{i}", {0: ((0, 0),)}, 1, 1, 3, ids)]
        positions |= {f"s{i}": src, f"r{i}": dst}

    monkeypatch.setattr(routing, "RELAY_PASSES", 0)
    with pytest.raises(UserError, match="could not get a color"):
        link(kernels, positions, wafer)
    monkeypatch.undo()

    linked = link(kernels, positions, wafer)
    relayed = [s for s in linked.streams if s.upstream is not None]
    assert len(relayed) == 2
    for stream in relayed:
        (task,) = linked.program.pes[linked.local(stream.src)].tasks
        assert task.instrs == [vec(Op.MOV, 3, FabOut(stream.color),
                                   FabIn(stream.upstream.color))]
        assert stream.upstream.dsts == (stream.src,)
        lane = stream.name.split(" from ")[0]
        assert (stream.name, stream.upstream.name) == (f"{lane} from relay {stream.src}",
                                                       f"{lane} to relay {stream.src}")
        assert stream.color != stream.upstream.color
    result = simulate(linked.program, wafer)
    for i in range(len(ends)):
        got = result.sram(*linked.kernel_pe(f"r{i}", (0, 0)))[:3]
        np.testing.assert_array_equal(got, np.arange(3) + 10 * i)


def test_crossing_streams_of_the_two_phases_share_one_color_in_turn():
    """The forced crossing again, now a forward stream (ta, a -> ra, eastward through PE
    (1, 1)) and a gradient (grad:tb, b -> rb, southward through it): on one color they
    cannot meet at once, but the backward's may follow the forward's. The route at (1, 1)
    starts at position 1 (W -> E) and the control wavelet a sends after its last word
    switches it to position 2 (N -> S); b's words wait for it, gated at the N port.

    Closed form (`tests/test_switches.py`'s timing, L = 1, switch latency 0): a sends its
    n words in cycles 0..n-1 and the control wavelet in cycle n, which leaves router
    (1, 1) at n + 2; from n + 3 that router passes b's words, one per cycle, each consumed
    by rb two cycles after it left: the last at n + m + 4, the run ends the cycle after."""
    from wse_sim.critical import streams as traced_streams
    from wse_sim.engine import simulate
    from wse_sim.report import run_report

    n, m = 3, 2
    wafer = WaferConfig(colors=1)
    ids = StreamIds()
    a, b = sender("a", "ta", 1, n, ids), sender("b", "grad:tb", 1, m, ids)
    a.load((0, 0), 0, np.arange(n, dtype=np.float32))
    b.load((0, 0), 0, 100 + np.arange(m, dtype=np.float32))
    kernels = [a, receiver("ra", "ta", {0: ((0, 0),)}, 1, 1, n, ids),
               b, receiver("rb", "grad:tb", {0: ((0, 0),)}, 1, 1, m, ids)]
    positions = {"a": (0, 1), "ra": (2, 1), "b": (1, 0), "rb": (1, 2)}
    linked = link(kernels, positions, wafer)

    assert linked.colors_used == 1
    w, e, s, north = (port_mask(p) for p in (Port.W, Port.E, Port.S, Port.N))
    crossing = linked.program.routes[(*linked.local((1, 1)), 0)]
    assert (crossing.start, crossing.live) == (1, [(w, e), (north, s)])
    assert linked.switched == {"a": frozenset({a.outputs[0].stream})}
    (task,) = linked.program.pes[linked.local((0, 1))].tasks
    assert task.instrs[-1].op is Op.SWITCH_ADV
    validate(linked.program, wafer)
    assert {(src, tuple(sinks)) for src, _, sinks in traced_streams(linked.program)} == {
        (linked.local((0, 1)), (linked.local((2, 1)),)),
        (linked.local((1, 0)), (linked.local((1, 2)),))}

    result = simulate(linked.program, wafer)
    np.testing.assert_array_equal(result.sram(*linked.kernel_pe("ra", (0, 0)))[:n], np.arange(n))
    np.testing.assert_array_equal(result.sram(*linked.kernel_pe("rb", (0, 0)))[:m],
                                  100 + np.arange(m))
    report = run_report(linked.program, wafer, result.stats, 0.0)
    assert (report["switch_changes"], report["control_wavelets"]) == (1, 1)
    assert result.cycles == n + m + 5


def test_binding_keeps_each_operands_precision():
    """One stream read as fp32 in one instruction and as fp16 halves in another: each
    operand is bound to the routed color with its own precision."""
    from compiler.lowering.kernel import SYMBOLIC_BASE, bind_colors

    sid = SYMBOLIC_BASE + 7
    instrs = [vec(Op.MOV, 2, Mem(0), FabIn(sid)), vec(Op.MOV, 2, Mem(2), FabIn(sid, half=True)),
              vec(Op.MOV, 2, FabOut(sid, half=True), Mem(0))]
    bound = bind_colors(instrs, {sid: 5}, "test")
    assert [(i.a if i.a.kind is not Kind.MEM else i.dst) for i in bound] == [
        FabIn(5), FabIn(5, half=True), FabOut(5, half=True)]
