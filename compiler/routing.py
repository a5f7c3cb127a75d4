"""Routing: connect placed kernels' streams, route them on the mesh, give them real colors.

`link(kernels, positions, wafer)` turns placed `Kernel`s into one `wse_sim.program.Program`:

1. Streams. Every (tensor, lane) has exactly one producer (a `StreamEnd` in some kernel's
   `outputs`) and at least one consumer (`StreamEnd`s in `inputs`); the consumers' PEs are
   merged into one destination set. Each `LocalStream` of a kernel is a stream too.
2. Routes. A stream is a multicast tree of dimension-order paths from its source PE to
   each destination, all X-then-Y or all Y-then-X. The union of XY paths from one source is
   always a tree (every path runs along the source's row, then along a destination's
   column; YX symmetrically), so each PE on it receives from exactly one port: `RAMP` at
   the source, the upstream neighbour elsewhere; it transmits to the downstream
   neighbours and to `RAMP` at destinations. Per stream we take the order whose tree has
   fewer PEs (ties: XY): a lane multicast along one PE row of a kernel from a source
   above or below it then travels once down to that row and along it (YX), instead of
   down every column (XY), which would cost a color on every PE of those columns.
3. Colors. The hardware keeps one route per (PE, color), so two streams with a route entry
   on the same PE must differ in color. Coloring that conflict graph is graph coloring:
   DSATUR or networkx's smallest-last order, whichever needs fewer, then iterated greedy.
   A stream that cannot get one of `wafer.colors` colors is a `UserError` naming it and
   the most crowded PE on its route. Symbolic stream ids are mapped per kernel (ids of
   separately built kernels may coincide) and rewritten with `bind_colors`.
4. Program. Only the bounding box of the placed kernels is simulated (every XY route stays
   inside the bounding box of its endpoints); `Linked.origin` is that box's top-left PE on
   the wafer. Each PE's SRAM is checked against `wafer.sram_words_per_pe` at compile time.

Wavelet counts (for the link-load estimate) are read from the producer's program: the
number of FabOut elements it emits on the stream (rows x lane width for a tensor lane).
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import networkx as nx
import numpy as np

from compiler.lowering.kernel import SYMBOLIC_BASE, Kernel, LocalPE, bind_colors
from wse_sim.errors import UserError
from wse_sim.hardware import WaferConfig
from wse_sim.program import (
    OPPOSITE,
    PORT_OFFSET,
    Instr,
    Kind,
    Op,
    PEProgram,
    Port,
    Program,
    Route,
    Task,
    Trigger,
    port_mask,
)

PE = tuple[int, int]  # (x, y) on the wafer
MESH_PORTS = (Port.N, Port.E, Port.S, Port.W)


def fabric_elements(instrs: list[Instr], stream: int, kind: Kind) -> int:
    """Elements a straight-line task moves through `stream` as `kind` (FABIN: wavelets it
    receives, FABOUT: wavelets it sends), REPEAT bodies counted `count` times."""
    total = 0
    multiplier = [1] * len(instrs)
    for i, instr in enumerate(instrs):
        if instr.op is Op.REPEAT:
            for j in range(i + 1, min(len(instrs), i + 1 + instr.body)):
                multiplier[j] = instr.count
            continue
        for operand in (instr.dst, instr.a, instr.b, instr.c):
            if operand.kind is kind and operand.color == stream:
                total += instr.n * multiplier[i]
    return total


def program_elements(program: PEProgram, stream: int, kind: Kind) -> int:
    """`fabric_elements` summed over all tasks of a PE program."""
    return sum(fabric_elements(task.instrs, stream, kind) for task in program.tasks)


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

    def local(self, pe: PE) -> PE:
        """Program coordinates of wafer PE `pe`."""
        return pe[0] - self.origin[0], pe[1] - self.origin[1]

    def kernel_pe(self, kernel: str, pe: LocalPE) -> PE:
        """Program coordinates of PE `pe` of kernel `kernel`."""
        kx, ky = self.positions[kernel]
        return self.local((kx + pe[0], ky + pe[1]))

    def read_tensor(self, sim_result: FinalSram, tensor: str,
                    kernels: Iterable[str] | None = None) -> np.ndarray:
        """Assemble `tensor` from the ResultSlots of `kernels` (default: all) in the final
        SRAM of `sim_result` (`.sram(x, y)` in program coordinates)."""
        names = list(self.kernels) if kernels is None else list(kernels)
        slots = [(name, slot) for name in names for slot in self.kernels[name].results
                 if slot.tensor == tensor]
        if not slots:
            raise KeyError(f"no result slot holds tensor {tensor!r}")
        shape = self.kernels[slots[0][0]].shapes[tensor]
        out = np.zeros(shape, dtype=np.float32)
        covered = np.zeros(shape, dtype=bool)
        for name, slot in slots:
            sram = np.asarray(sim_result.sram(*self.kernel_pe(name, slot.pe)))
            r = np.arange(slot.rows[1] - slot.rows[0])[:, None]
            c = np.arange(slot.cols[1] - slot.cols[0])[None, :]
            words = slot.offset + r * slot.row_stride + c * slot.col_stride
            out[slot.rows[0]:slot.rows[1], slot.cols[0]:slot.cols[1]] = sram[words]
            covered[slot.rows[0]:slot.rows[1], slot.cols[0]:slot.cols[1]] = True
        if not covered.all():
            raise ValueError(f"result slots of {tensor!r} cover {covered.sum()} of "
                             f"{covered.size} elements")
        return out


def _tree(src: PE, dsts: Iterable[PE], x_first: bool) -> dict[PE, Route]:
    """Route entries of the multicast tree of XY (`x_first`) or YX paths from `src` to
    every PE of `dsts`."""
    rx: dict[PE, int] = {src: port_mask(Port.RAMP)}
    tx: dict[PE, int] = defaultdict(int)
    for dst in dsts:
        x, y = src
        while (x, y) != dst:
            if x != dst[0] and (x_first or y == dst[1]):
                port = Port.E if dst[0] > x else Port.W
            else:
                port = Port.S if dst[1] > y else Port.N
            dx, dy = PORT_OFFSET[port]
            tx[(x, y)] |= port_mask(port)
            x, y = x + dx, y + dy
            rx[(x, y)] = port_mask(OPPOSITE[port])
        tx[dst] |= port_mask(Port.RAMP)
    return {pe: Route(rx[pe], tx[pe]) for pe in rx}


def _collect_streams(kernels: list[Kernel], positions: dict[str, PE]) -> list[RoutedStream]:
    """Match producers with consumers and list kernel-local streams (wafer coordinates)."""

    def at(kernel: Kernel, pe: LocalPE) -> PE:
        kx, ky = positions[kernel.name]
        return kx + pe[0], ky + pe[1]

    producers: dict[tuple[str, int], tuple[Kernel, int, LocalPE]] = {}
    consumers: dict[tuple[str, int], list[tuple[Kernel, int, tuple[LocalPE, ...]]]] = (
        defaultdict(list))
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

    streams = []
    for key in sorted(set(producers) | set(consumers)):
        tensor, lane = key
        if key not in producers:
            users = ", ".join(sorted({k.name for k, _, _ in consumers[key]}))
            raise ValueError(f"lane {lane} of {tensor!r} (read by {users}) has no producer")
        if key not in consumers:
            raise ValueError(f"lane {lane} of {tensor!r} (sent by {producers[key][0].name}) "
                             f"has no consumer: its producer would block")
        kernel, sid, pe = producers[key]
        dsts = sorted({at(k, p) for k, _, pes in consumers[key] for p in pes})
        streams.append(RoutedStream(
            name=f"{tensor}[lane {lane}]", src=at(kernel, pe), dsts=tuple(dsts),
            ends=[(kernel.name, sid)] + [(k.name, s) for k, s, _ in consumers[key]],
            wavelets=program_elements(kernel.programs[pe], sid, Kind.FABOUT)))
    for kernel in kernels:
        for i, local in enumerate(kernel.local_streams):
            streams.append(RoutedStream(
                name=f"{kernel.name}/local {i}", src=at(kernel, local.src),
                dsts=tuple(at(kernel, p) for p in local.dsts),
                ends=[(kernel.name, local.stream)],
                wavelets=program_elements(kernel.programs[local.src], local.stream,
                                          Kind.FABOUT)))
    return streams


def _dsatur(adj: list[list[int]]) -> list[int]:
    """DSATUR greedy coloring (Brelaz): color next the vertex with the most distinct
    neighbour colors (ties: most neighbours), with the smallest color free. A lazy heap
    keeps it O(E log V); networkx's version is quadratic and takes a minute on a model."""
    color = [-1] * len(adj)
    seen: list[set[int]] = [set() for _ in adj]
    heap = [(0, -len(nbrs), v) for v, nbrs in enumerate(adj)]
    heapq.heapify(heap)
    while heap:
        neg_sat, _, v = heapq.heappop(heap)
        if color[v] >= 0 or -neg_sat != len(seen[v]):
            continue  # colored already, or a stale entry
        c = 0
        while c in seen[v]:
            c += 1
        color[v] = c
        for u in adj[v]:
            if color[u] < 0 and c not in seen[u]:
                seen[u].add(c)
                heapq.heappush(heap, (-len(seen[u]), -len(adj[u]), u))
    return color


def _first_fit(adj: list[list[int]], order: list[int]) -> list[int]:
    color = [-1] * len(adj)
    for v in order:
        used = {color[u] for u in adj[v]}
        c = 0
        while c in used:
            c += 1
        color[v] = c
    return color


def _iterated_greedy(adj: list[list[int]], color: list[int], limit: int,
                     rounds: int = 40) -> list[int]:
    """Culberson's iterated greedy: re-run first-fit with the vertices grouped by color
    class (classes reversed, or largest first); never uses more colors than before."""
    best = color
    for i in range(rounds):
        if max(best, default=-1) < limit:
            break
        classes: dict[int, list[int]] = defaultdict(list)
        for v, c in enumerate(best):
            classes[c].append(v)
        keys = sorted(classes, reverse=True) if i % 2 == 0 else sorted(
            classes, key=lambda c: -len(classes[c]))
        new = _first_fit(adj, [v for c in keys for v in classes[c]])
        if max(new) <= max(best):
            best = new
    return best


def _assign_colors(streams: list[RoutedStream], wafer: WaferConfig) -> int:
    """Color the conflict graph (streams sharing a PE); returns the number of colors used.

    Bundles of lanes that cross form cliques larger than any one PE's stream count (every
    lane of one bundle crosses every lane of the other), so the colors needed can exceed
    the busiest PE's count; we take the better of DSATUR and networkx's smallest-last
    order, then improve it by iterated greedy."""
    by_pe: dict[PE, list[int]] = defaultdict(list)
    for i, stream in enumerate(streams):
        for pe in stream.entries:
            by_pe[pe].append(i)
    neighbours: list[set[int]] = [set() for _ in streams]
    for users in by_pe.values():
        for a in users:
            neighbours[a].update(users)
    adj = [sorted(nbrs - {v}) for v, nbrs in enumerate(neighbours)]
    graph = nx.Graph()
    graph.add_nodes_from(range(len(adj)))
    graph.add_edges_from((v, u) for v, nbrs in enumerate(adj) for u in nbrs if v < u)
    smallest_last = nx.greedy_color(graph, strategy="smallest_last")
    color = min(_dsatur(adj), [smallest_last[v] for v in range(len(adj))],
                key=lambda col: max(col, default=-1))
    color = _iterated_greedy(adj, color, wafer.colors)
    worst = max(range(len(streams)), key=color.__getitem__, default=None)
    if worst is not None and color[worst] >= wafer.colors:
        stream = streams[worst]
        crowded = max(stream.entries, key=lambda pe: len(by_pe[pe]))
        raise UserError(
            f"routing: stream {stream.name} could not get a color: its route crosses "
            f"{len(adj[worst])} other streams (the most at PE {crowded}: "
            f"{len(by_pe[crowded])} streams) and the wafer has {wafer.colors} colors")
    for i, stream in enumerate(streams):
        stream.color = color[i]
    return max(color, default=-1) + 1


def _check_sram(kernel: Kernel, origin: PE, wafer: WaferConfig) -> None:
    for pe, prog in kernel.programs.items():
        if prog.sram_words > wafer.sram_words_per_pe:
            x, y = origin[0] + pe[0], origin[1] + pe[1]
            largest = max(kernel.allocations.get(pe, [("?", 0, 0)]), key=lambda a: a[2])
            raise UserError(
                f"op {kernel.name} ({kernel.op}): PE ({x}, {y}) needs {4 * prog.sram_words} "
                f"bytes of SRAM, has {wafer.sram_bytes_per_pe} (largest buffer: "
                f"{largest[0]!r}, {4 * largest[2]} bytes)")


def _bound_program(prog: PEProgram, colors: dict[int, int], where: str) -> PEProgram:
    """A copy of `prog` with its symbolic stream ids replaced by real colors."""
    for task in prog.tasks:
        for instr in task.instrs:
            for operand in (instr.dst, instr.a, instr.b, instr.c):
                if (operand.kind in (Kind.FABIN, Kind.FABOUT)
                        and operand.color >= SYMBOLIC_BASE and operand.color not in colors):
                    raise ValueError(f"{where}: stream id {operand.color} is not declared in "
                                     f"the kernel's inputs, outputs or local streams")
    tasks = [Task(task.id, task.trigger, bind_colors(task.instrs, colors),
                  colors.get(task.color, task.color) if task.trigger is Trigger.COLOR
                  else task.color)
             for task in prog.tasks]
    return PEProgram(sram_words=prog.sram_words, tasks=tasks, image=dict(prog.image))


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

    streams = _collect_streams(kernels, positions)
    for stream in streams:
        xy, yx = (_tree(stream.src, stream.dsts, x_first) for x_first in (True, False))
        stream.entries = yx if len(yx) < len(xy) else xy
    colors_used = _assign_colors(streams, wafer)

    program = Program(width=x1 - x0, height=y1 - y0)
    kernel_colors: dict[str, dict[int, int]] = defaultdict(dict)
    link_wavelets = np.zeros((4, y1 - y0, x1 - x0), dtype=np.int64)
    for stream in streams:
        for kernel_name, sid in stream.ends:
            kernel_colors[kernel_name][sid] = stream.color
        for (x, y), route in stream.entries.items():
            program.add_route(x - x0, y - y0, stream.color, route.rx, route.tx)
        for (x, y), port in stream.links():
            link_wavelets[int(port), y - y0, x - x0] += stream.wavelets
    for kernel in kernels:
        kx, ky = positions[kernel.name]
        for (px, py), prog in kernel.programs.items():
            pe = (kx + px - x0, ky + py - y0)
            if pe in program.pes:
                raise ValueError(f"kernel {kernel.name} overlaps another kernel at PE "
                                 f"({pe[0] + x0}, {pe[1] + y0})")
            program.pes[pe] = _bound_program(prog, kernel_colors[kernel.name],
                                             f"kernel {kernel.name} PE {(px, py)}")
    return Linked(program=program, origin=(x0, y0), kernels={k.name: k for k in kernels},
                  positions=dict(positions), streams=streams, link_wavelets=link_wavelets,
                  colors_used=colors_used)
