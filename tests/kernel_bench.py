"""Run one kernel alone on the simulator, fed from numpy arrays: the kernel test bench.

`run_kernel(kernel, inputs)` surrounds the kernel with 1x1 helper kernels and goes through
the same `routing.link` + `wse_sim.engine.simulate` path as a whole model:

* one *source* per input lane: its SRAM holds the lane's columns of every row, in the
  lane's row order (ascending or descending), and one `MOV FabOut <- Mem` instruction
  streams it (after `start[tensor]` cycles, spent on a MOV between scratch words, if
  given);
* one *sink* per output lane: one `MOV Mem <- FabIn` instruction stores it in arrival
  order, and a ResultSlot (with a negative row stride for a descending lane) says where,
  so the lane is read back like any other result.

Placement keeps every route short and on its own row or column (so a wide kernel does not
run out of colors on the harness's account): a lane read by PEs of one column is fed from
a source stacked north of that column, any other lane from a source stacked west of the
row of its first reader (XY routes run along that row, then down the columns); an output
lane leaves to a sink stacked east of its producer's row, or south of its column when the
producer is nearer the bottom edge than the east edge.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from compiler.lowering.kernel import Kernel, ResultSlot, StreamEnd, StreamIds
from compiler.routing import Linked, link
from wse_sim.engine import SimResult, simulate
from wse_sim.hardware import WaferConfig
from wse_sim.program import FabIn, FabOut, Mem, Op, vec
from wse_sim.stats import Stats

Edge = str  # "north", "west", "east", "south"


@dataclass
class KernelRun:
    """Outcome of `run_kernel`: output tensors from the sinks, result tensors from the
    kernel's ResultSlots, and the simulator's figures."""

    outputs: dict[str, np.ndarray]
    results: dict[str, np.ndarray]
    cycles: int
    stats: Stats
    linked: Linked
    sim: SimResult


def _source_edge(end_pes: list[tuple[int, int]]) -> tuple[Edge, int]:
    """Where the source of a lane read by `end_pes` goes: north of their column if they
    share one (vertical route), else west of the first reader's row."""
    columns = {x for x, _ in end_pes}
    if len(columns) == 1 and len({y for _, y in end_pes}) > 1:
        return "north", columns.pop()
    if len(end_pes) == 1 and end_pes[0][1] < end_pes[0][0]:
        return "north", end_pes[0][0]
    return "west", min(end_pes, key=lambda p: (p[1], p[0]))[1]


def _sink_edge(kernel: Kernel, pe: tuple[int, int]) -> tuple[Edge, int]:
    """East of the producer's row, or south of its column when that is nearer."""
    x, y = pe
    if kernel.height - y < kernel.width - x:
        return "south", x
    return "east", y


def run_kernel(kernel: Kernel, inputs: dict[str, np.ndarray], wafer: WaferConfig | None = None,
               *, max_cycles: int | None = None,
               start: dict[str, int] | None = None) -> KernelRun:
    """Simulate `kernel` fed with `inputs` (tensor -> [rows, cols] array) on `wafer`
    (default WSE-2; only the used region is simulated); the sources of the tensors in
    `start` begin sending that many cycles late."""
    wafer = wafer or WaferConfig()
    ids = StreamIds()
    helpers: list[tuple[Kernel, Edge, int]] = []

    readers: dict[tuple[str, int], list[StreamEnd]] = defaultdict(list)
    for end in kernel.inputs:
        readers[(end.tensor, end.lane)].append(end)
    for (tensor, lane), ends in sorted(readers.items()):
        if tensor not in inputs:
            raise ValueError(f"run_kernel: no input array for tensor {tensor!r}")
        data = np.asarray(inputs[tensor], dtype=np.float32)
        if data.shape != kernel.shapes[tensor]:
            raise ValueError(f"run_kernel: {tensor!r} has shape {data.shape}, kernel "
                             f"expects {kernel.shapes[tensor]}")
        c0, c1 = ends[0].cols
        block = data[:, c0:c1]
        if ends[0].order == "descending":
            block = block[::-1]
        source = Kernel(name=f"source:{tensor}[{lane}]", op="source", ops=[], width=1,
                        height=1, shapes={tensor: data.shape})
        sid = ids.new()
        offset = source.alloc((0, 0), block.size, f"lane {lane} of {tensor}")
        source.load((0, 0), offset, block)
        delay = (start or {}).get(tensor, 0)
        if delay:
            scratch = Mem(source.alloc((0, 0), 1, "delay"), 0)
            source.emit((0, 0), vec(Op.MOV, delay, scratch, scratch))
        source.emit((0, 0), vec(Op.MOV, block.size, FabOut(sid), Mem(offset)))
        source.outputs.append(StreamEnd(tensor, lane, ends[0].cols, ((0, 0),), sid,
                                        ends[0].order))
        helpers.append((source, *_source_edge([pe for end in ends for pe in end.pes])))

    for end in kernel.outputs:
        rows, cols = kernel.shapes[end.tensor]
        width = end.width
        sink = Kernel(name=f"sink:{end.tensor}[{end.lane}]", op="sink", ops=[], width=1,
                      height=1, shapes={end.tensor: (rows, cols)})
        sid = ids.new()
        offset = sink.alloc((0, 0), rows * width, f"lane {end.lane} of {end.tensor}")
        sink.emit((0, 0), vec(Op.MOV, rows * width, Mem(offset), FabIn(sid)))
        sink.inputs.append(StreamEnd(end.tensor, end.lane, end.cols, ((0, 0),), sid,
                                     end.order))
        if end.order == "descending":  # row rows-1 arrived first
            slot = ResultSlot(end.tensor, (0, 0), offset + (rows - 1) * width, (0, rows),
                              end.cols, -width)
        else:
            slot = ResultSlot(end.tensor, (0, 0), offset, (0, rows), end.cols, width)
        sink.results.append(slot)
        helpers.append((sink, *_sink_edge(kernel, end.pes[0])))

    # Stack helpers outward from the kernel's edges; the kernel sits at (west, north).
    depth: dict[tuple[Edge, int], int] = defaultdict(int)
    slots = []
    for helper, edge, index in helpers:
        slots.append((helper, edge, index, depth[(edge, index)]))
        depth[(edge, index)] += 1
    west = max((d for (e, _), d in depth.items() if e == "west"), default=0)
    north = max((d for (e, _), d in depth.items() if e == "north"), default=0)
    positions = {kernel.name: (west, north)}
    for helper, edge, index, k in slots:
        positions[helper.name] = {
            "west": (west - 1 - k, north + index),
            "north": (west + index, north - 1 - k),
            "east": (west + kernel.width + k, north + index),
            "south": (west + index, north + kernel.height + k),
        }[edge]

    linked = link([kernel, *(h for h, _, _ in helpers)], positions, wafer)
    sim = simulate(linked.program, wafer, max_cycles=max_cycles)
    outputs = {tensor: linked.read_tensor(sim, tensor)
               for tensor in {end.tensor for end in kernel.outputs}}
    results = {tensor: linked.read_tensor(sim, tensor)
               for tensor in {slot.tensor for slot in kernel.results}}
    return KernelRun(outputs=outputs, results=results, cycles=sim.cycles, stats=sim.stats,
                     linked=linked, sim=sim)
