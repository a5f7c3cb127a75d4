"""Routing: connect placed kernels' streams, route them on the mesh, give them real colors.

`link(kernels, positions, wafer)` turns placed `Kernel`s into one `wse_sim.program.Program`:

1. Streams. Every (tensor, lane) has exactly one producer (a `StreamEnd` in some kernel's
   `outputs`) and at least one consumer (`StreamEnd`s in `inputs`); the consumers' PEs are
   merged into one destination set (`match_lanes`). Each `LocalStream` of a kernel is a
   stream too.
2. Candidate trees. A stream is a multicast tree: every PE on it receives from exactly one
   port (`RAMP` at the source, the upstream neighbour elsewhere) and transmits to its
   downstream neighbours and to `RAMP` at destinations. The candidates of a stream are the
   *via trees*: a straight run from the source along its row to a column `xm`, then YX
   paths (down `xm` to each destination's row, then along it); or along its column to a
   row `ym`, then XY paths. `xm` = the source's column gives the plain YX tree, `ym` = its
   row the plain XY tree; other `xm` / `ym` are the one-bend-more routes that move a
   bundle's turn to another column or row, and up to `ROUTE_MARGIN` PEs beyond the
   endpoints' bounding box they are detours around a crowded spot. Kernel-local streams
   keep to the plain XY and YX trees. Every route stays inside the bounding box of the
   placed kernels.
3. Colors: negotiated congestion (PathFinder, McMurchie and Ebeling 1995). The hardware
   keeps one route per (PE, color), so the resources are (PE, color) pairs of capacity one,
   and a stream takes one candidate tree and one color. Each stream in turn takes the
   (tree, color) of least cost sum over its PEs of (1 + history) x (1 + pressure x streams
   already there); after each round the pairs still shared get more history and the
   pressure grows, and only the streams on a shared pair are rerouted, until none is
   shared. Plain graph coloring of fixed trees cannot do this: bundles of lanes that meet
   or cross form cliques larger than any one PE's stream count (gpt_small's plain trees
   needed 35-77 colors where no PE carried more than 23-52 streams), and picking each
   stream's tree *with* its color lets lanes step aside into a color that is free along
   another path. Cost: a reroute is one vectorised pass over the (colors x PEs of all
   candidates) costs, ~50 us; for a wide multicast, whose candidates cover its window of
   the box many times over, two prefix sums over the window and a sum per straight run
   of each candidate instead (`_TreeRuns`: the same sums to the bit). gpt_small (about
   4400 streams, most of them one-PE token channels) needs 5-300 rounds and 0.01-1.4
   reroutes per stream. A round gives up after `MAX_ROUNDS` rounds, `REROUTES_PER_STREAM`
   reroutes per stream or `STALLED_ROUNDS` rounds without fewer streams sharing a pair. A
   PE that more streams start or end at than the wafer has colors is a `UserError` naming
   a stream at once.
4. Colors shared in time. A route held for the whole step makes 24 colors the scarce
   resource of the whole step, but a training step has two phases: a stream of the forward
   (a tensor that is not a gradient) carries its last wavelet before the loss sends its
   first gradient, and the backward's streams (gradients) carry theirs after. When
   negotiation gives up, it starts again (with the history so far) with phases: the
   resources are then (layer, PE) pairs, a forward stream holding its PEs in the forward
   layer and a gradient in the backward layer, so the two may share a (PE, color). A
   shared router starts at switch position 1, the forward route, and the control wavelet
   the forward stream's source sends right after its last wavelet (`with_advances`; one
   cycle and one ramp slot) switches it to position 2, the gradient's route
   (`_switched_route`). Two rules keep that correct whatever the timing. A stream holds
   its ends in both layers: a PE sends or takes in one stream per color, so no kernel has
   to order two streams on one color (and the run's counters per (PE, color) belong to one
   stream). And a kernel-local stream, or a forward stream that more than one task of its
   PE sends, holds both layers everywhere (it has no one last wavelet to follow). Then the
   switch orders the two streams at every shared router: follow the gradient upstream
   from one while it enters from the same side as the forward stream; the PE it comes
   from carries both too, and not as an end, so the walk reaches a shared router that the
   two enter from different sides (their sources differ). There the gradient's wavelets
   wait at a port the forward position does not accept, gated, until the forward stream's
   control wavelet has left; from there on they follow it through the same FIFOs, which
   keep order, so every router downstream has switched before they come. In a training
   step the forward never waits for the backward, so the wait cannot deadlock. Placements
   that route without phases get none (their programs are unchanged); gpt_tiny's linear
   placement on a wafer of 15 colors needs them, gpt_small's `random` placement too.
   Source of the mechanism: `wse_sim.program` (the CSL switch positions and SWITCH_ADV).
5. Relays: segments of a long route. A stream needs one color on every PE of its tree,
   which a crowded fabric may not have free along any candidate even where no PE carries
   more streams than there are colors. A relay task lifts that: a PE receives the stream on
   one color and re-sends it on another (one MOV of all its wavelets, FabIn -> FabOut, at
   the PE's usual cost of one wavelet per cycle and two cycles of latency through its
   ramps; then a control wavelet if its segment hands a pair on). When negotiation gives
   up even with phases, every stream still sharing a pair (not kernel-local, its farthest
   destination at least `MIN_RELAYED_HOPS` away) is split in two at a relay PE: one
   outside every kernel and not yet a relay, near the middle of the way to its farthest
   destination, little off it, where few colors are in use. The segments negotiate as
   streams of their own (of their stream's phase), the others starting where they were,
   with the history so far; up to `RELAY_PASSES` times, then the pairs still shared are a
   `UserError` naming a stream. Placements that route without relays get none.
   Symbolic stream ids are mapped per kernel (ids of separately built kernels may coincide)
   and rewritten with `bind_colors`.
6. Program. Only the bounding box of the placed kernels is simulated; `Linked.origin` is
   that box's top-left PE on the wafer. Each PE's SRAM is checked against
   `wafer.sram_words_per_pe` at compile time. Each relay is a region of its own, labelled
   `relay`, so reports and the critical path show it.

Wavelet counts (for the link-load estimate) are read from the producer's program: the
number of FabOut elements it emits on the stream (rows x lane width for a tensor lane).

The orientation pass (`compiler/orient.py`) runs before `link` and mirrors kernels so
that the bundles between them cross less; without it gpt_small's negotiation needs 1.4-10x
the rounds, and does not converge for the greedy placement.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from compiler.graph import is_gradient
from compiler.lowering.ir import FabIn, FabOut, vec
from compiler.lowering.kernel import (
    Kernel,
    LocalPE,
    bind_colors,
)
from wse_sim.errors import UserError
from wse_sim.hardware import WaferConfig
from wse_sim.program import (
    BYTES_PER_WORD,
    OPPOSITE,
    Instr,
    Kind,
    Op,
    PEProgram,
    Port,
    Program,
    Region,
    Route,
    Task,
    TensorLayout,
    TensorSlot,
    Trigger,
    advance,
    port_mask,
    read_tensor,
)

PE = tuple[int, int]  # (x, y) on the wafer
MESH_PORTS = (Port.N, Port.E, Port.S, Port.W)
# The phases of a training step a stream carries wavelets in (module docstring, step 4)
FORWARD, BACKWARD = 1, 2
WHOLE = FORWARD | BACKWARD

# One INFO record per negotiation round: a fine-lane compile may negotiate for minutes
# (the CLI's progress line shows them on a terminal).
_log = logging.getLogger(__name__)

ROUTE_MARGIN = 8  # a lane's turns may lie this many PEs beyond its endpoints' bounding box
MAX_ROUNDS = 800  # negotiation rounds before routing gives up ...
REROUTES_PER_STREAM = 8  # ... or reroutes per stream
PRESSURE_START = 0.5  # cost factor per other stream on a (PE, color), first round ...
PRESSURE_GROWTH = 1.5  # ... grown this much per round ...
PRESSURE_MAX = 1000.0  # ... up to this
HISTORY_STEP = 2.0  # cost added per round to a (PE, color) that is still shared
STALLED_ROUNDS = 100  # ... or rounds without fewer streams sharing a pair
RELAY_PASSES = 8  # times the streams still sharing a pair are split at relays ...
MIN_RELAYED_HOPS = 4  # ... if their farthest destination is at least this many hops away
RUNS_MIN_PAIRS = 1000  # candidates' pairs per color below which a stream's costs are gathered
GATHER_ROWS = 4096  # ... at most this many at once (`_Negotiation._gathered`)


def fabric_elements(instrs: list[Instr], kind: Kind) -> dict[int, int]:
    """Elements a straight-line task moves through each stream (color) as `kind` (FABIN:
    wavelets it receives, FABOUT: wavelets it sends), REPEAT bodies counted `count` times."""
    total: dict[int, int] = defaultdict(int)
    repeat_end, count = 0, 1
    for i, instr in enumerate(instrs):
        if instr.op is Op.REPEAT:
            repeat_end, count = i + 1 + instr.body, instr.count
            continue
        times = instr.n * (count if i < repeat_end else 1)
        for operand in (instr.dst, instr.a, instr.b, instr.c):
            if operand.kind is kind:
                total[operand.color] += times
    return total


def program_elements(program: PEProgram, kind: Kind) -> dict[int, int]:
    """`fabric_elements` summed over all tasks of a PE program."""
    total: dict[int, int] = defaultdict(int)
    for task in program.tasks:
        for stream, elements in fabric_elements(task.instrs, kind).items():
            total[stream] += elements
    return total


class FinalSram(Protocol):
    """What `read_tensor` needs of a simulation result (wse_sim.engine.SimResult)."""

    def sram(self, x: int, y: int) -> np.ndarray: ...


@dataclass
class RoutedStream:
    """One routed stream: a tensor lane or a kernel-local stream."""

    name: str  # "tensor[lane j]" or "kernel/local i"
    src: PE  # wafer coordinates
    dsts: tuple[PE, ...]
    ends: list[tuple[str, int]]  # (kernel name, symbolic id) of every end naming it
    wavelets: int  # wavelets the source emits
    entries: dict[PE, Route] = field(default_factory=dict)  # wafer coordinates
    color: int = -1
    local: bool = False  # a kernel-local stream
    # The segment feeding this one through a relay task at `src` (a segment of a split
    # stream); None when `src` is a kernel's PE (then `ends[0]` is the producer's end).
    upstream: RoutedStream | None = None
    phase: int = WHOLE  # FORWARD, BACKWARD or WHOLE (module docstring, step 4)

    def links(self) -> list[tuple[PE, Port]]:
        """The mesh links (PE, outgoing port) the stream uses."""
        return [(pe, port) for pe, route in self.entries.items() for port in MESH_PORTS
                if route.tx & port_mask(port)]


@dataclass
class Linked:
    """The routed, colored, checked program of a set of placed kernels."""

    program: Program
    origin: PE  # wafer coordinates of the program's PE (0, 0)
    kernels: dict[str, Kernel]
    positions: dict[str, PE]
    streams: list[RoutedStream]
    # wavelets leaving each PE per direction, [port N/E/S/W, y, x] in program coordinates
    link_wavelets: np.ndarray
    colors_used: int
    # per kernel, the symbolic ids of its output streams whose last wavelet a control
    # wavelet follows: forward streams that hand a (PE, color) on to a backward one
    switched: dict[str, frozenset[int]] = field(default_factory=dict)

    def local(self, pe: PE) -> PE:
        """Program coordinates of wafer PE `pe`."""
        return pe[0] - self.origin[0], pe[1] - self.origin[1]

    def kernel_pe(self, kernel: str, pe: LocalPE) -> PE:
        """Program coordinates of PE `pe` of kernel `kernel`."""
        kx, ky = self.positions[kernel]
        return self.local((kx + pe[0], ky + pe[1]))

    def read_tensor(self, sim_result: FinalSram, tensor: str) -> np.ndarray:
        """Assemble `tensor` from its slots in the final SRAM of `sim_result` (`.sram(x, y)`
        in program coordinates)."""
        layout = self.program.tensors.get(tensor)
        if layout is None:
            raise KeyError(f"no result slot holds tensor {tensor!r}")
        return read_tensor(layout, sim_result.sram, tensor)


_TO = {port: port_mask(port) for port in Port}  # tx bit of each port
_FROM = {port: port_mask(OPPOSITE[port]) for port in MESH_PORTS}  # rx bit after moving


@dataclass
class _Tree:
    """A candidate multicast tree: its PEs in the order it reaches them (`x`, `y`), each
    with the rx port mask of its route (the side it is entered from; RAMP at the source),
    and the destinations, which fix the tx masks. Arrays, not a dict of PEs: a fine-lane
    step's streams have tens of millions of candidate PEs."""

    x: np.ndarray  # int32
    y: np.ndarray  # int32
    rx: np.ndarray  # uint8 port masks
    dsts: Sequence[PE]

    @classmethod
    def of(cls, rx: dict[PE, int], dsts: Sequence[PE]) -> _Tree:
        xy = np.array(list(rx), dtype=np.int32).reshape(-1, 2)
        return cls(xy[:, 0], xy[:, 1], np.fromiter(rx.values(), dtype=np.uint8), dsts)

    @property
    def size(self) -> int:
        return self.x.size

    def pes(self) -> list[PE]:
        return list(zip(self.x.tolist(), self.y.tolist(), strict=True))

    def entries(self) -> dict[PE, Route]:
        rx = dict(zip(self.pes(), self.rx.tolist(), strict=True))
        # each PE's upstream neighbour sends to it; destinations also send to RAMP
        tx: dict[PE, int] = defaultdict(int)
        for (x, y), came in rx.items():
            if came in _UPSTREAM:
                dx, dy, out = _UPSTREAM[came]
                tx[(x - dx, y - dy)] |= out
        for dst in self.dsts:
            tx[dst] |= _TO[Port.RAMP]
        return {pe: Route(came, tx.get(pe, 0)) for pe, came in rx.items()}


_STEP = {Port.N: (0, -1), Port.E: (1, 0), Port.S: (0, 1), Port.W: (-1, 0)}
# rx mask of a PE entered by a step in a direction -> (that step, the tx bit sending it)
_UPSTREAM = {_FROM[port]: (*_STEP[port], _TO[port]) for port in MESH_PORTS}


def _via_tree(src: PE, via: PE, dsts: Sequence[PE], x_first: bool) -> _Tree | None:
    """The multicast tree that runs straight from `src` to `via` (on its row or column),
    then on XY (`x_first`) or YX paths to every PE of `dsts`; None when two of those paths
    enter a PE from different sides (the union is then no tree)."""
    rx: dict[PE, int] = {src: _TO[Port.RAMP]}
    # The paths to the destinations share their first legs. A straight run that repeats
    # (part of) one already taken from the same PE the same way changes nothing, so each
    # run starts where the farthest one so far from there ended: (start, along the row,
    # step) -> that end's coordinate. This keeps a tree's cost to its size, not its
    # destinations x path lengths.
    reach: dict[tuple[int, int, bool, int], int] = {}
    for dst in dsts:
        x, y = src
        corner = (dst[0], via[1]) if x_first else (via[0], dst[1])
        for to_x, to_y in (via, corner, dst):  # each leg: along the row, then the column
            if not (_straight(rx, reach, x, y, to_x, True)
                    and _straight(rx, reach, to_x, y, to_y, False)):
                return None
            x, y = to_x, to_y
    return _Tree.of(rx, dsts)


def _straight(rx: dict[PE, int], reach: dict[tuple[int, int, bool, int], int], x: int, y: int,
              to: int, along_row: bool) -> bool:
    """Extend `rx` straight from (x, y) to coordinate `to` along the row (x) or the column
    (y), from where the farthest run from (x, y) that way ended (`reach`, `_via_tree`);
    False when a PE of the run is already entered from another side."""
    here = x if along_row else y
    if here == to:
        return True
    step = 1 if to > here else -1
    key = (x, y, along_row, step)
    done = reach.get(key, here)
    if (to - done) * step > 0:
        ahead = range(done + step, to + step, step)
        run = [(n, y) for n in ahead] if along_row else [(x, n) for n in ahead]
        came = _FROM[(Port.E if step > 0 else Port.W) if along_row
                     else (Port.S if step > 0 else Port.N)]
        if not _extend(rx, run, came):
            return False
        reach[key] = to
    return True


def _extend(rx: dict[PE, int], run: list[PE], came: int) -> bool:
    """Add the PEs of a straight `run`, each entered from side `came`, to `rx`; False when
    one is already entered from another side."""
    if rx.keys().isdisjoint(run):  # the usual case: a run onto new PEs, added at once
        rx.update(dict.fromkeys(run, came))
        return True
    return all(rx.setdefault(pe, came) == came for pe in run)


def _candidates(src: PE, dsts: Sequence[PE], box: tuple[int, int, int, int],
                margin: int | None) -> list[_Tree]:
    """The distinct via trees of a stream (module docstring), smallest first (ties: XY
    before YX), their turns at most `margin` PEs beyond the endpoints' bounding box and
    inside `box` = (x0, y0, x1, y1), exclusive ends; only the plain XY and YX trees when
    `margin` is None."""
    vias = [(src, True), (src, False)]
    if margin is not None:
        x0, y0, x1, y1 = box
        xs = [src[0], *(d[0] for d in dsts)]
        ys = [src[1], *(d[1] for d in dsts)]
        vias += [((src[0], ym), True) for ym in
                 range(max(y0, min(ys) - margin), min(y1 - 1, max(ys) + margin) + 1)]
        vias += [((xm, src[1]), False) for xm in
                 range(max(x0, min(xs) - margin), min(x1 - 1, max(xs) + margin) + 1)]
    trees: dict[bytes, _Tree] = {}  # by PE set (its sorted (y, x) keys), the first of each
    for via, x_first in vias:
        tree = _via_tree(src, via, dsts, x_first)
        if tree is not None:
            pes = np.sort(tree.y.astype(np.int64) << 32 | tree.x)
            trees.setdefault(pes.tobytes(), tree)
    return sorted(trees.values(), key=lambda t: t.size)


def plain_tree(src: PE, dsts: Sequence[PE]) -> frozenset[PE]:
    """The PEs of a stream's smaller plain tree (XY or YX): the route it takes when
    nothing is in its way, for passes that estimate routes before routing."""
    return frozenset(_candidates(src, dsts, (0, 0, 0, 0), None)[0].pes())


@dataclass
class LaneEnds:
    """One lane of a tensor: its producer's end and every consumer's end."""

    tensor: str
    lane: int
    producer: tuple[Kernel, int, LocalPE]  # (kernel, symbolic id, the sending PE)
    consumers: list[tuple[Kernel, int, tuple[LocalPE, ...]]]  # (kernel, id, receiving PEs)


def match_lanes(kernels: list[Kernel]) -> list[LaneEnds]:
    """Every lane's producer and consumers, sorted by (tensor, lane); a lane without a
    producer or a consumer, with two producers, or whose ends disagree on its columns or
    row order, is a compiler bug (ValueError)."""
    producers: dict[tuple[str, int], tuple[Kernel, int, LocalPE]] = {}
    consumers: dict[tuple[str, int], list[tuple[Kernel, int, tuple[LocalPE, ...]]]] = (
        defaultdict(list))
    shapes: dict[tuple[str, int], tuple[tuple[int, int], str, str]] = {}
    for kernel in kernels:
        for end in kernel.outputs:
            key = (end.tensor, end.lane)
            if key in producers:
                raise ValueError(f"lane {end.lane} of {end.tensor!r} has two producers: "
                                 f"{producers[key][0].name} and {kernel.name}")
            if len(end.pes) != 1:
                raise ValueError(f"{kernel.name}: output lane {end.lane} of {end.tensor!r} "
                                 f"must have one producer PE, has {len(end.pes)}")
            producers[key] = (kernel, end.stream, end.pes[0])
        for end in kernel.inputs:
            consumers[(end.tensor, end.lane)].append((kernel, end.stream, end.pes))
        for end in kernel.inputs + kernel.outputs:
            shape = shapes.setdefault((end.tensor, end.lane), (end.cols, end.order, kernel.name))
            if shape[:2] != (end.cols, end.order):
                raise ValueError(f"lane {end.lane} of {end.tensor!r}: {kernel.name} has columns "
                                 f"{end.cols} in {end.order} order, {shape[2]} has {shape[0]} "
                                 f"in {shape[1]} order")
    lanes = []
    for key in sorted(set(producers) | set(consumers)):
        tensor, lane = key
        if key not in producers:
            users = ", ".join(sorted({k.name for k, _, _ in consumers[key]}))
            raise ValueError(f"lane {lane} of {tensor!r} (read by {users}) has no producer")
        if key not in consumers:
            raise ValueError(f"lane {lane} of {tensor!r} (sent by {producers[key][0].name}) "
                             f"has no consumer: its producer would block")
        lanes.append(LaneEnds(tensor, lane, producers[key], consumers[key]))
    return lanes


def _collect_streams(kernels: list[Kernel], positions: dict[str, PE]) -> list[RoutedStream]:
    """Tensor lanes and kernel-local streams, in wafer coordinates."""

    def at(kernel: Kernel, pe: LocalPE) -> PE:
        kx, ky = positions[kernel.name]
        return kx + pe[0], ky + pe[1]

    sent = {(kernel.name, pe): program_elements(program, Kind.FABOUT)
            for kernel in kernels for pe, program in kernel.programs.items()}
    streams = []
    for lane in match_lanes(kernels):
        kernel, sid, pe = lane.producer
        dsts = sorted({at(k, p) for k, _, pes in lane.consumers for p in pes})
        # a forward stream can hand its colors on only if one task sends it: the control
        # wavelet goes after that task's last send
        phase = (BACKWARD if is_gradient(lane.tensor) else
                 FORWARD if sum(sid in fabric_elements(task.instrs, Kind.FABOUT)
                                for task in kernel.programs[pe].tasks) == 1 else WHOLE)
        streams.append(RoutedStream(
            name=f"{lane.tensor}[lane {lane.lane}]", src=at(kernel, pe), dsts=tuple(dsts),
            ends=[(kernel.name, sid)] + [(k.name, s) for k, s, _ in lane.consumers],
            wavelets=sent[(kernel.name, pe)][sid], phase=phase))
    for kernel in kernels:
        for i, local in enumerate(kernel.local_streams):
            streams.append(RoutedStream(
                name=f"{kernel.name}/local {i}", src=at(kernel, local.src),
                dsts=tuple(at(kernel, p) for p in local.dsts),
                ends=[(kernel.name, local.stream)],
                wavelets=sent[(kernel.name, local.src)][local.stream], local=True))
    return streams


# Negotiation layers (module docstring, step 4): without phases one, the PEs; with phases
# the forward's PEs and the backward's.
_FORWARD_LAYER, _BACKWARD_LAYER = 0, 1
_PHASE_LAYERS = {FORWARD: (_FORWARD_LAYER,), BACKWARD: (_BACKWARD_LAYER,),
                 WHOLE: (_FORWARD_LAYER, _BACKWARD_LAYER)}


def _resources(tree: _Tree, stream: RoutedStream, box: tuple[int, int, int, int],
               phased: bool) -> np.ndarray:
    """The negotiation resources (layer x PEs of `box` + the PE's row-major index in it)
    a stream holds with `tree`. Without phases, its PEs. With phases, its PEs in the layers
    of its phase, and for a stream of one phase its ends in the other layer too, so a PE
    sends or takes in at most one stream per color (module docstring, step 4)."""
    x0, y0, x1, y1 = box
    width, pes = x1 - x0, (x1 - x0) * (y1 - y0)
    index = (tree.y - y0).astype(np.int64) * width + (tree.x - x0)
    if not phased:
        return index
    held = [layer * pes + index for layer in _PHASE_LAYERS[stream.phase]]
    if stream.phase != WHOLE:
        ends = np.array([(y - y0) * width + x - x0 for x, y in {stream.src, *stream.dsts}],
                        dtype=np.int64)
        held.append(_PHASE_LAYERS[WHOLE ^ stream.phase][0] * pes + ends)
    return np.concatenate(held)


def _run_bounds(tree: np.ndarray, layer: np.ndarray, line: np.ndarray,
                along: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last positions of the straight runs in resources sorted by (tree, layer,
    line, along): a run goes on while the tree, layer and line stay and `along` steps by
    one."""
    new = np.ones(tree.size, dtype=bool)
    new[1:] = ((tree[1:] != tree[:-1]) | (layer[1:] != layer[:-1]) | (line[1:] != line[:-1])
               | (along[1:] != along[:-1] + 1))
    first = np.flatnonzero(new)
    return first, np.append(first[1:], tree.size)[:first.size] - 1


class _TreeRuns:
    """A stream's candidate trees as straight runs of resources, so that a tree's cost is
    a sum of run sums read off prefix sums of the cost table's window under the stream,
    instead of one gathered pair per resource: a wide multicast stream has up to ~180
    candidates of ~2,000 PEs each over a window of ~8,000, and gathering them was most of a
    fine-lane compile.

    The resources are a grid (layers, height, width) in row-major order (`_resources`). A
    tree's resources sorted by (layer, y, x) fall into row runs; those left alone in their
    row are grouped into column runs. The window is the rows and columns the stream's
    candidates touch, in every layer; its cost is prefix-summed twice per color, along its
    rows (row-major) and along its columns (column-major), each with a leading zero, and a
    run [a, b] of either order sums to prefix[b + 1] - prefix[a].

    Same totals as the gather, to the bit: every cost is a multiple of 1 / `scale`, so
    while the window's costs in a color add up to less than 2^52 / `scale`, every partial
    sum either way is exact, whatever its order. `totals` returns None when they do not
    (early rounds of a crowded negotiation may not), and the caller gathers."""

    def __init__(self, candidates: list[np.ndarray], grid: tuple[int, int, int]) -> None:
        self.grid = grid
        layers, height, width = grid
        flat = np.concatenate(candidates)
        tree = np.repeat(np.arange(len(candidates)), [c.size for c in candidates])
        layer, pe = np.divmod(flat, height * width)
        y, x = np.divmod(pe, width)
        self.y0, self.y1, self.x0, self.x1 = y.min(), y.max() + 1, x.min(), x.max() + 1
        h, w = self.y1 - self.y0, self.x1 - self.x0
        y, x = y - self.y0, x - self.x0
        self.cells = layers * h * w
        self.gathered = flat.size  # pairs per color the gather reads
        order = np.lexsort((x, y, layer, tree))
        t, ly, yy, xx = tree[order], layer[order], y[order], x[order]
        first, last = _run_bounds(t, ly, yy, xx)
        alone = first == last
        row_cell = (ly * h + yy) * w + xx  # row-major index in the window
        runs = [(t[first[~alone]], row_cell[first[~alone]], row_cell[last[~alone]] + 1)]
        # column runs of the rest, in the column-major prefix after the row-major one
        t, ly, yy, xx = t[first[alone]], ly[first[alone]], yy[first[alone]], xx[first[alone]]
        order = np.lexsort((yy, xx, ly, t))
        t, ly, yy, xx = t[order], ly[order], yy[order], xx[order]
        first, last = _run_bounds(t, ly, xx, yy)
        col_cell = self.cells + 1 + (ly * w + xx) * h + yy
        runs.append((t[first], col_cell[first], col_cell[last] + 1))
        tree_of, self.lo, self.hi = (np.concatenate(part) for part in zip(*runs, strict=True))
        order = np.argsort(tree_of, kind="stable")
        tree_of, self.lo, self.hi = tree_of[order], self.lo[order], self.hi[order]
        self.tree_starts = np.searchsorted(tree_of, np.arange(len(candidates)))

    def pays(self) -> bool:
        """Whether the two prefix sums over the window cost less than the gather: timed
        on gpt_small's streams at 8,000 PEs, they broke even at about 7 gathered pairs a
        cell of the window."""
        return 8 * self.cells < self.gathered

    def totals(self, cost: np.ndarray, scale: int) -> np.ndarray | None:
        """Per [tree, color] the sum of the tree's pair costs, or None outside the exact
        range (class docstring)."""
        colors = cost.shape[1]
        window = cost.reshape(*self.grid, colors)[:, self.y0:self.y1, self.x0:self.x1]
        n = self.cells
        prefix = np.empty((2 * (n + 1), colors))
        prefix[0] = prefix[n + 1] = 0.0
        np.cumsum(window.reshape(n, colors), axis=0, out=prefix[1:n + 1])
        if prefix[n].max() * scale >= 2.0 ** 52:
            return None
        np.cumsum(window.transpose(0, 2, 1, 3).reshape(n, colors), axis=0,
                  out=prefix[n + 2:])
        return np.add.reduceat(prefix[self.hi] - prefix[self.lo], self.tree_starts, axis=0)


class _Negotiation:
    """PathFinder state over the (resource, color) pairs (module docstring): per stream
    its candidate trees as the resources each holds (`_resources`), the chosen (tree,
    color), and the occupancy, history and cost of every pair."""

    def __init__(self, trees: list[list[np.ndarray]], grid: tuple[int, int, int], colors: int,
                 earlier: _Negotiation | None = None) -> None:
        """Fresh, or going on from the history and pressure of an `earlier` negotiation
        over the same box (going on to phases, its PEs' history copied to both layers).
        The resources are the `grid` (layers, height, width) of the box, row-major."""
        self.trees = trees
        self.grid = grid
        resources = int(np.prod(grid))
        self.flat = [np.concatenate(candidates) for candidates in trees]
        self.starts = [np.cumsum([0] + [t.size for t in candidates[:-1]]) for candidates in trees]
        # per stream: its trees as runs where summing them pays, None where it does not, or
        # not worked out yet (absent)
        self.runs: dict[int, _TreeRuns | None] = {}
        # per wide stream: its groups' resources and tree starts in them (`_gathered`)
        self.groups: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        # per (resource, color): resource-major, so a stream's are contiguous rows to gather
        self.occupancy = np.zeros((resources, colors), dtype=np.int64)
        self.history = (np.zeros(self.occupancy.shape) if earlier is None else
                        np.tile(earlier.history, (resources // len(earlier.history), 1)))
        # the streams on each (color, resource) pair
        self.users: list[defaultdict[int, set[int]]] = [defaultdict(set) for _ in range(colors)]
        self.pressure = PRESSURE_START if earlier is None else earlier.pressure
        self._price()
        self.choice: list[tuple[int, int]] = [(0, 0)] * len(trees)
        self.rounds = 0
        self.reroutes = 0

    def _price(self) -> None:
        """Every pair's cost to a stream that takes it, (1 + history) x (1 + pressure x
        streams there), kept in a table: a stream's choice gathers its candidates' costs
        from it, and `place` and `unplace` reprice only the pairs they change."""
        self.cost = (1.0 + self.history) * (1.0 + self.pressure * self.occupancy)

    def _reprice(self, held: np.ndarray, color: int) -> None:
        self.cost[held, color] = ((1.0 + self.history[held, color])
                                  * (1.0 + self.pressure * self.occupancy[held, color]))

    def place(self, i: int, choice: tuple[int, int] | None = None) -> None:
        """Give stream i `choice` (tree, color), by default its cheapest given everyone
        else's."""
        if choice is None:
            # [color, tree]: the sum of the tree's pair costs in that color
            totals = self._tree_costs(i).T
            color, tree = divmod(int(np.argmin(totals)), totals.shape[1])
            choice = (tree, color)
        self.choice[i] = tree, color = choice
        held = self.trees[i][tree]
        self.occupancy[held, color] += 1
        self._reprice(held, color)
        for r in held.tolist():
            self.users[color][r].add(i)

    def _tree_costs(self, i: int) -> np.ndarray:
        """Per [tree, color] the sum of stream i's pair costs with that tree: from runs
        where they pay (`_TreeRuns`, the same sums), else gathered."""
        if i not in self.runs:
            runs = (_TreeRuns(self.trees[i], self.grid)
                    if self.flat[i].size >= RUNS_MIN_PAIRS else None)
            self.runs[i] = runs if runs is not None and runs.pays() else None
        if (runs := self.runs[i]) is not None:
            # every cost is (1 + history) x (1 + pressure x streams): a multiple of 1 over
            # the product of their denominators (powers of two, as of every float)
            scale = (self.pressure.as_integer_ratio()[1]
                     * float(HISTORY_STEP).as_integer_ratio()[1])
            totals = runs.totals(self.cost, scale)
            if totals is not None:
                return totals
        return self._gathered(i)

    def _gathered(self, i: int) -> np.ndarray:
        """Per [tree, color] the sum of stream i's pair costs with that tree, gathered a
        group of trees at a time (at most `GATHER_ROWS` pairs, or one tree): a group's
        gather stays in the cache while it is summed, 3x faster than the whole at 50,000
        pairs, in the same order."""
        flat, starts = self.flat[i], self.starts[i]
        if flat.size <= GATHER_ROWS:
            return np.add.reduceat(self.cost[flat], starts, axis=0)
        if i not in self.groups:  # trees first .. t - 1, t where tree t no longer fits
            ends = np.append(starts[1:], flat.size)
            cuts = [0]
            for t in range(1, len(starts)):
                if ends[t] - starts[cuts[-1]] > GATHER_ROWS:
                    cuts.append(t)
            self.groups[i] = [(flat[starts[a]:ends[b - 1]], starts[a:b] - starts[a])
                              for a, b in zip(cuts, [*cuts[1:], len(starts)], strict=True)]
        return np.concatenate([np.add.reduceat(self.cost[pairs], local_starts, axis=0)
                               for pairs, local_starts in self.groups[i]])

    def unplace(self, i: int) -> None:
        tree, color = self.choice[i]
        held = self.trees[i][tree]
        self.occupancy[held, color] -= 1
        self._reprice(held, color)
        for r in held.tolist():
            self.users[color][r].discard(i)

    def shared(self) -> list[int]:
        """The streams on a (resource, color) pair that another stream uses too, in index
        order."""
        held, colors = np.nonzero(self.occupancy > 1)
        return sorted({i for c, r in zip(colors.tolist(), held.tolist(), strict=True)
                       for i in self.users[c][r]})

    def run(self, start: dict[int, tuple[int, int]], stage: str) -> list[int]:
        """Negotiate until no pair is shared, or for at most `MAX_ROUNDS` rounds and
        `REROUTES_PER_STREAM` reroutes per stream (a feasible layout needs far fewer: at
        most 2 per stream for gpt_small's placements); returns the streams still sharing a
        pair (empty on success). Streams in `start` begin at its (tree, color) (those of
        an earlier negotiation), the others at their cheapest, largest tree first. Each
        round reroutes the sharing streams in an order shuffled from a fixed seed, so the
        result is deterministic; it is logged, under `stage`."""
        for i in start:
            self.place(i, start[i])
        order = sorted(range(len(self.trees)), key=lambda i: -self.trees[i][0].size)
        for i in order:
            if i not in start:
                self.place(i)
        rng = np.random.default_rng(0)
        budget = REROUTES_PER_STREAM * len(self.trees)
        fewest, since = len(self.trees), 0  # fewest streams sharing yet, rounds since
        while ((shared := self.shared()) and self.rounds < MAX_ROUNDS
               and self.reroutes < budget and since < STALLED_ROUNDS):
            fewest, since = (len(shared), 0) if len(shared) < fewest else (fewest, since + 1)
            self.rounds += 1
            _log.info("routing, %s: round %d, %d of %d streams share a (PE, color)", stage,
                      self.rounds, len(shared), len(self.trees))
            self.history += HISTORY_STEP * (self.occupancy > 1)
            self.pressure = min(self.pressure * PRESSURE_GROWTH, PRESSURE_MAX)
            self._price()
            rng.shuffle(shared)
            for i in shared:
                self.unplace(i)
                self.place(i)
            self.reroutes += len(shared)
        return shared

    def colors_in_use(self, pes: int) -> np.ndarray:
        """Per PE (flat index of `pes`), the colors some stream holds there."""
        return (self.occupancy > 0).reshape(-1, pes, self.occupancy.shape[1]).any(
            axis=0).sum(axis=1)


def _check_ends(streams: list[RoutedStream], wafer: WaferConfig) -> None:
    """A PE where more streams start or end than the wafer has colors cannot be routed."""
    ends: dict[PE, list[RoutedStream]] = defaultdict(list)
    for stream in streams:
        for pe in {stream.src, *stream.dsts}:
            ends[pe].append(stream)
    pe, users = max(ends.items(), key=lambda item: len(item[1]), default=((0, 0), []))
    if len(users) > wafer.colors:
        raise UserError(
            f"routing: stream {users[-1].name} could not get a color: PE {pe} is an end of "
            f"{len(users)} streams and the wafer has {wafer.colors} colors")


def _route(streams: list[RoutedStream], box: tuple[int, int, int, int], wafer: WaferConfig,
           kernel_pes: set[PE]) -> tuple[list[RoutedStream], int]:
    """Choose every stream's tree and color (module docstring, steps 3 to 5): negotiation,
    then colors shared in two phases, then relays, each only where the one before fails;
    returns the streams (a split one replaced by its segments) and the number of colors
    used."""
    _check_ends(streams, wafer)
    x0, y0, x1, y1 = box
    width, pes = x1 - x0, (x1 - x0) * (y1 - y0)
    earlier: dict[int, tuple[int, int]] = {}  # id(stream) -> its (tree, color) last pass
    # A stream's candidate trees and the resources each holds, by its ends (and phase): a
    # pass after a split at relays has new streams for the split ones only.
    trees_of: dict[tuple, list[_Tree]] = {}
    held_of: dict[tuple, list[np.ndarray]] = {}
    negotiation = None
    phased, splits = False, 0
    while True:
        candidates, held = [], []
        for s in streams:
            ends = (s.src, tuple(s.dsts), s.local)
            if ends not in trees_of:
                trees_of[ends] = _candidates(s.src, s.dsts, box,
                                             None if s.local else ROUTE_MARGIN)
            key = (*ends, s.phase, phased)
            if key not in held_of:
                held_of[key] = [_resources(tree, s, box, phased)
                                for tree in trees_of[ends]]
            candidates.append(trees_of[ends])
            held.append(held_of[key])
        negotiation = _Negotiation(held, (len(_PHASE_LAYERS[WHOLE]) if phased else 1,
                                          y1 - y0, width), wafer.colors, negotiation)
        stage = (f"relay pass {splits} ({len(_relays(streams))} relays)" if splits else
                 "colors shared in two phases" if phased else "negotiation")
        stuck = negotiation.run({i: earlier[id(s)] for i, s in enumerate(streams)
                                 if id(s) in earlier}, stage)
        earlier = {id(s): choice for s, choice in zip(streams, negotiation.choice, strict=True)}
        for stream, trees, (tree, color) in zip(streams, candidates, negotiation.choice,
                                                strict=True):
            stream.entries, stream.color = trees[tree].entries(), color
        if not stuck:
            return streams, max((s.color for s in streams), default=-1) + 1
        if not phased and _can_phase(streams, wafer):
            phased = True
            held_of.clear()  # (the resources without phases: never held again)
            continue
        if splits < RELAY_PASSES:
            splits += 1
            # colors in use per PE: a relay where few are adds least to the crowding
            load = negotiation.colors_in_use(pes).reshape(y1 - y0, width)
            split = _split_at_relays(streams, set(stuck), box, kernel_pes | _relays(streams),
                                     load)
            if len(split) > len(streams):
                streams = split
                continue
        break
    by_pair: dict[tuple[int, int], list[RoutedStream]] = defaultdict(list)
    for i in stuck:
        tree, color = negotiation.choice[i]
        for r in negotiation.trees[i][tree].tolist():
            by_pair[(color, r)].append(streams[i])
    (color, r), users = max(by_pair.items(), key=lambda item: len(item[1]))
    pe = (x0 + r % pes % width, y0 + r % pes // width)
    load = sum(pe in s.entries for s in streams)
    phases = " with colors shared in two phases" if phased else ""
    raise UserError(
        f"routing: stream {users[0].name} could not get a color: after "
        f"{negotiation.rounds} rounds of negotiation{phases} and {len(_relays(streams))} "
        f"relays it still shares color {color} at PE {pe} with {users[1].name} ({load} "
        f"streams pass that PE) and the wafer has {wafer.colors} colors")


def _can_phase(streams: list[RoutedStream], wafer: WaferConfig) -> bool:
    """Whether colors can be shared in time: streams of both phases, and a switch with the
    positions a shared pair needs (`_switched_route`)."""
    phases = {s.phase for s in streams}
    return FORWARD in phases and BACKWARD in phases and wafer.switch_positions >= 3


def _switched_route(first: Route, then: Route) -> Route:
    """The route of a (PE, color) that carries one stream (`first`), then another (`then`):
    it starts at position 1 = `first`, and the control wavelet that follows the first
    stream's last wavelet advances it to position 2 = `then`, where it stays. The base is
    (first's rx, then's tx), which no wavelet ever uses: each position then differs from it
    in one side only, as a WSE-2 switch position must (`wafer.switch_both_sides`), however
    the two streams cross the PE."""
    return Route(first.rx, then.tx, positions=((first.rx, first.tx), (then.rx, then.tx)),
                 start=1)


def _after_last_send(instrs: list[Instr], color: int) -> int | None:
    """The index just after the instruction that sends a task's last wavelet on `color`
    (after the REPEAT block holding it), None if the task sends none."""
    after, repeat_end = None, 0
    for i, instr in enumerate(instrs):
        if instr.op is Op.REPEAT:
            repeat_end = i + 1 + instr.body
        elif any(o.kind is Kind.FABOUT and o.color == color
                 for o in (instr.dst, instr.a, instr.b, instr.c)):
            after = max(i + 1, repeat_end)
    return after


def with_advances(task: Task, switched: frozenset[int]) -> Task:
    """`task` with a control wavelet after its last wavelet on each stream of `switched`
    (symbolic ids, or colors once bound) it sends on (module docstring, step 4)."""
    instrs = task.instrs
    for color in sorted(switched):
        at = _after_last_send(instrs, color)
        if at is not None:
            instrs = [*instrs[:at], advance(color), *instrs[at:]]
    if instrs is task.instrs:
        return task
    return Task(task.id, task.trigger, instrs, task.color)


def _relays(streams: list[RoutedStream]) -> set[PE]:
    """The relay PEs: where a segment fed by another starts."""
    return {s.src for s in streams if s.upstream is not None}


def _manhattan(xs: np.ndarray, ys: np.ndarray, pe: PE) -> np.ndarray:
    return np.abs(xs - pe[0]) + np.abs(ys - pe[1])


def _split_at_relays(streams: list[RoutedStream], stuck: set[int],
                     box: tuple[int, int, int, int], taken: set[PE],
                     load: np.ndarray) -> list[RoutedStream]:
    """`streams` with each stuck stream that can be split replaced by two segments that
    meet at a relay PE (module docstring, step 5): a PE of `box` outside every kernel and
    not yet a relay (`taken`), near the midpoint of the way from the source to the
    farthest destination and off it by as little as possible."""
    x0, y0, x1, y1 = box
    free = np.ones((y1 - y0, x1 - x0), dtype=bool)
    for x, y in taken:
        free[y - y0, x - x0] = False
    out: list[RoutedStream] = []
    replaced: dict[int, RoutedStream] = {}  # id(split stream) -> its segment from the relay
    for i, stream in enumerate(streams):
        relay = None
        if i in stuck and not stream.local and stream.wavelets > 0:
            relay = _relay_site(stream, free, box, load)
        if relay is None:
            out.append(stream)
            continue
        free[relay[1] - y0, relay[0] - x0] = False
        produced = stream.upstream is None  # ends[0] is then the producer's end
        # names say where a segment starts and ends: "t[lane 0] from relay A to relay B"
        lane = stream.name.split(" from relay ")[0].split(" to relay ")[0]
        start = "" if produced else f" from relay {stream.src}"
        end = stream.name[stream.name.find(" to relay "):] if " to relay " in stream.name else ""
        to_relay = RoutedStream(
            name=f"{lane}{start} to relay {relay}", src=stream.src, dsts=(relay,),
            ends=stream.ends[:1] if produced else [], wavelets=stream.wavelets,
            upstream=stream.upstream, phase=stream.phase)
        from_relay = RoutedStream(
            name=f"{lane} from relay {relay}{end}", src=relay, dsts=stream.dsts,
            ends=stream.ends[1:] if produced else stream.ends, wavelets=stream.wavelets,
            upstream=to_relay, phase=stream.phase)
        out += [to_relay, from_relay]
        replaced[id(stream)] = from_relay  # what now reaches the stream's destinations
    for stream in out:  # a segment fed by a split one is fed by its second part
        if stream.upstream is not None and id(stream.upstream) in replaced:
            stream.upstream = replaced[id(stream.upstream)]
    return out


def _relay_site(stream: RoutedStream, free: np.ndarray,
                box: tuple[int, int, int, int], load: np.ndarray) -> PE | None:
    x0, y0, x1, y1 = box
    src = stream.src
    far = max(stream.dsts, key=lambda d: abs(d[0] - src[0]) + abs(d[1] - src[1]))
    length = abs(far[0] - src[0]) + abs(far[1] - src[1])
    if length < MIN_RELAYED_HOPS:
        return None
    lo_x, hi_x = max(x0, min(src[0], far[0]) - 1), min(x1, max(src[0], far[0]) + 2)
    lo_y, hi_y = max(y0, min(src[1], far[1]) - 1), min(y1, max(src[1], far[1]) + 2)
    ys, xs = np.nonzero(free[lo_y - y0:hi_y - y0, lo_x - x0:hi_x - x0])
    if not len(xs):
        return None
    xs, ys = xs + lo_x, ys + lo_y
    to_site, from_site = _manhattan(xs, ys, src), _manhattan(xs, ys, far)
    # a detour costs twice (both segments' extra hops load the fabric); balance splits the
    # stream into halves that each need a color along half the way
    cost = (2 * (to_site + from_site - length) + np.abs(to_site - from_site)
            + load[ys - y0, xs - x0])
    best = int(np.argmin(cost))  # first of equals: row-major, so deterministic
    return int(xs[best]), int(ys[best])


def _check_sram(kernel: Kernel, origin: PE, wafer: WaferConfig) -> None:
    for pe, prog in kernel.programs.items():
        if prog.sram_words > wafer.sram_words_per_pe:
            x, y = origin[0] + pe[0], origin[1] + pe[1]
            largest = max(kernel.allocations.get(pe, [("?", 0, 0)]), key=lambda a: a[2])
            raise UserError(
                f"op {kernel.name} ({kernel.op}): PE ({x}, {y}) needs "
                f"{BYTES_PER_WORD * prog.sram_words} bytes of SRAM, has {wafer.sram_bytes_per_pe} "
                f"(largest buffer: "
                f"{largest[0]!r}, {BYTES_PER_WORD * largest[2]} bytes)")


def bound_task(task: Task, colors: dict[int, int], where: str,
               switched: frozenset[int] = frozenset()) -> Task:
    """A copy of `task` with a control wavelet after its last send on each symbolic stream
    id of `switched` (`Linked.switched`), and its symbolic ids replaced by real colors."""
    task = with_advances(task, switched)
    return Task(task.id, task.trigger, bind_colors(task.instrs, colors, where),
                colors.get(task.color, task.color) if task.trigger is Trigger.COLOR
                else task.color)


def bound_program(prog: PEProgram, colors: dict[int, int], where: str,
                  switched: frozenset[int] = frozenset()) -> PEProgram:
    """A copy of `prog` bound as `bound_task` binds each task."""
    return PEProgram(sram_words=prog.sram_words,
                     tasks=[bound_task(task, colors, where, switched) for task in prog.tasks],
                     image=dict(prog.image))


def _add_relay(program: Program, stream: RoutedStream, pe: PE,
               switched: frozenset[int]) -> None:
    """The relay task at `pe` (program coordinates): every wavelet of the segment that
    ends there re-sent on the color of `stream`, the segment that starts there (then a
    control wavelet if its color is in `switched`)."""
    relay = vec(Op.MOV, stream.wavelets, FabOut(stream.color), FabIn(stream.upstream.color))
    program.pes[pe] = PEProgram(sram_words=0, tasks=[
        with_advances(Task(0, Trigger.RESET, [relay]), switched)])
    program.regions.append(Region(f"relay {stream.src}", "relay", *pe, 1, 1))


def link(kernels: list[Kernel], positions: dict[str, PE], wafer: WaferConfig) -> Linked:
    """Route and color the streams of placed kernels and build their Program.

    `positions[kernel.name]` is the wafer PE of the kernel's top-left corner."""
    names = [k.name for k in kernels]
    if len(set(names)) != len(names):
        raise ValueError(f"kernel names must be unique: {names}")
    for kernel in kernels:
        x, y = positions[kernel.name]
        if x < 0 or y < 0 or x + kernel.width > wafer.width or y + kernel.height > wafer.height:
            raise UserError(f"op {kernel.name}: rectangle {kernel.width}x{kernel.height} at "
                            f"({x}, {y}) is outside the {wafer.width}x{wafer.height} wafer")
        _check_sram(kernel, (x, y), wafer)
    x0 = min(positions[k.name][0] for k in kernels)
    y0 = min(positions[k.name][1] for k in kernels)
    x1 = max(positions[k.name][0] + k.width for k in kernels)
    y1 = max(positions[k.name][1] + k.height for k in kernels)

    kernel_pes = {(positions[k.name][0] + px, positions[k.name][1] + py)
                  for k in kernels for px in range(k.width) for py in range(k.height)}
    streams, colors_used = _route(_collect_streams(kernels, positions), (x0, y0, x1, y1),
                                  wafer, kernel_pes)

    program = Program(width=x1 - x0, height=y1 - y0)
    kernel_colors: dict[str, dict[int, int]] = defaultdict(dict)
    link_wavelets = np.zeros((4, y1 - y0, x1 - x0), dtype=np.int64)
    pairs: dict[tuple[int, int, int], list[tuple[RoutedStream, Route]]] = defaultdict(list)
    for stream in streams:
        for kernel_name, sid in stream.ends:
            kernel_colors[kernel_name][sid] = stream.color
        for (x, y), route in stream.entries.items():
            pairs[(x - x0, y - y0, stream.color)].append((stream, route))
    handing_on: set[int] = set()  # id() of the forward streams that hand a pair on
    for (x, y, color), users in pairs.items():
        if len(users) == 1:
            program.add_route(x, y, color, users[0][1].rx, users[0][1].tx)
            continue
        # negotiation left two streams here only in different phases, forward first
        (first, route), (_, then) = sorted(users, key=lambda user: user[0].phase)
        program.set_route(x, y, color, _switched_route(route, then))
        handing_on.add(id(first))
    switched: dict[str, set[int]] = defaultdict(set)
    for stream in streams:
        # the control wavelet crosses every link the stream's data does
        sent = stream.wavelets + (id(stream) in handing_on)
        for (x, y), port in stream.links():
            link_wavelets[int(port), y - y0, x - x0] += sent
        if stream.upstream is not None:
            _add_relay(program, stream, (stream.src[0] - x0, stream.src[1] - y0),
                       frozenset({stream.color}) if id(stream) in handing_on else frozenset())
        elif id(stream) in handing_on:
            kernel_name, sid = stream.ends[0]
            switched[kernel_name].add(sid)
    switched_sids = {name: frozenset(sids) for name, sids in switched.items()}
    for kernel in kernels:
        kx, ky = positions[kernel.name]
        for (px, py), prog in kernel.programs.items():
            pe = (kx + px - x0, ky + py - y0)
            if pe in program.pes:
                raise ValueError(f"kernel {kernel.name} overlaps another kernel at PE "
                                 f"({pe[0] + x0}, {pe[1] + y0})")
            program.pes[pe] = bound_program(prog, kernel_colors[kernel.name],
                                             f"kernel {kernel.name} PE {(px, py)}",
                                             switched_sids.get(kernel.name, frozenset()))
        program.regions.append(Region(kernel.name, kernel.op, kx - x0, ky - y0, kernel.width,
                                      kernel.height))
        for slot in kernel.results:
            layout = program.tensors.setdefault(slot.tensor,
                                                TensorLayout(kernel.shapes[slot.tensor]))
            program.tensors[slot.tensor].slots.append(TensorSlot(
                kx + slot.pe[0] - x0, ky + slot.pe[1] - y0, slot.offset, slot.rows,
                slot.cols, slot.row_stride, slot.col_stride))
            if layout.shape != kernel.shapes[slot.tensor]:
                raise ValueError(f"kernel {kernel.name}: tensor {slot.tensor!r} has shape "
                                 f"{kernel.shapes[slot.tensor]} here, {layout.shape} elsewhere")
    return Linked(program=program, origin=(x0, y0), kernels={k.name: k for k in kernels},
                  positions=dict(positions), streams=streams, link_wavelets=link_wavelets,
                  colors_used=colors_used, switched=switched_sids)
