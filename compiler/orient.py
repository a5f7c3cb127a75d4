"""Orientation: mirror placed kernels in x and/or y so the lane bundles between them cross less.

Why. Lanes of a tensor travel as parallel bundles, e.g. the 16 lanes of a GELU strip (one
PE row) to the 16 PE rows of the next matmul. Lane j leaves strip PE j and turns a corner
to reach row j. If the order of the sources along the strip runs the same way as the rows
along the turn, lane j's horizontal run passes every later lane's vertical run: all pairs
meet on some PE, so the bundle is a clique of the routes' conflict graph and needs one
color per lane (two such bundles, forward and backward, need 2L colors, above the wafer's
24). With the order reversed the bundle is a crossing-free staircase and one color can
carry all of it. Placement fixes only where a kernel sits, not which way it faces.

What is free. A kernel's programs name only its local PEs and symbolic streams, and the
router derives every route from the endpoints, so mirroring a kernel inside its rectangle
(local PE (x, y) -> (W-1-x, y), (x, H-1-y) or both) is exact: the same programs run on
mirrored PEs and compute the same numbers (`flip_kernel`; tests check it on the
simulator). Only routes change.

Algorithm: local search over the four mirrorings of every kernel. The cost is the number
of pairs of lanes that share a kernel (same producer or a common consumer: the bundles a
mirroring reorders) whose plain routes (`routing.plain_tree`, the route with nothing in
the way) share a PE. Kernels are visited in order; each takes the mirroring of least cost
given the others; passes repeat until one changes nothing (at most `PASSES`). Pairs of
unrelated lanes are left out: mirroring cannot untangle them, and counting them let the
busy parts of a layout outvote the bundle crossings. Cost: a pass evaluates 4 mirrorings
per kernel over its lanes L_k and their related lanes R, O(sum_k 4 L_k R) route
intersections (memoised routes as bit masks, one AND each): ~0.1 s a pass for gpt_small's
59 kernels and 736 lanes.
"""

from __future__ import annotations

from dataclasses import replace

from compiler.lowering.kernel import Kernel, LocalPE
from compiler.routing import PE, match_lanes, plain_tree

Flip = tuple[bool, bool]  # (mirror x, mirror y)
FLIPS: tuple[Flip, ...] = ((False, False), (True, False), (False, True), (True, True))
PASSES = 6

End = tuple[int, LocalPE]  # (kernel index, local PE)


def flip_kernel(kernel: Kernel, flip: Flip) -> Kernel:
    """`kernel` mirrored inside its rectangle (a new Kernel; the PE programs are shared)."""
    if not any(flip):
        return kernel

    def mirror(pe: LocalPE) -> LocalPE:
        x, y = pe
        return (kernel.width - 1 - x if flip[0] else x,
                kernel.height - 1 - y if flip[1] else y)

    def pes(ends: tuple[LocalPE, ...]) -> tuple[LocalPE, ...]:
        return tuple(mirror(pe) for pe in ends)

    return replace(
        kernel,
        programs={mirror(pe): prog for pe, prog in kernel.programs.items()},
        inputs=[replace(end, pes=pes(end.pes)) for end in kernel.inputs],
        outputs=[replace(end, pes=pes(end.pes)) for end in kernel.outputs],
        local_streams=[replace(s, src=mirror(s.src), dsts=pes(s.dsts))
                       for s in kernel.local_streams],
        results=[replace(slot, pe=mirror(slot.pe)) for slot in kernel.results],
        allocations={mirror(pe): a for pe, a in kernel.allocations.items()},
    )


class _Layout:
    """Lanes as kernel-relative ends, the current mirroring, and memoised plain routes."""

    def __init__(self, kernels: list[Kernel], positions: dict[str, PE]) -> None:
        index = {kernel.name: k for k, kernel in enumerate(kernels)}
        self.kernels = kernels
        self.origin = [positions[kernel.name] for kernel in kernels]
        self.flips: list[Flip] = [FLIPS[0]] * len(kernels)
        self.lanes: list[tuple[End, list[End]]] = []
        for lane in match_lanes(kernels):
            producer, _, pe = lane.producer
            dsts = [(index[k.name], p) for k, _, pes in lane.consumers for p in pes]
            self.lanes.append(((index[producer.name], pe), dsts))
        self.lanes_of: list[list[int]] = [[] for _ in kernels]
        for i, (src, dsts) in enumerate(self.lanes):
            for k in sorted({src[0], *(k for k, _ in dsts)}):
                self.lanes_of[k].append(i)
        related = [sorted({j for k in self._kernels_of(i) for j in self.lanes_of[k]} - {i})
                   for i in range(len(self.lanes))]
        # per kernel, the pairs of related lanes at least one of which is its own, each once:
        # what its mirroring can change
        self.pairs: list[list[tuple[int, int]]] = []
        for lanes in self.lanes_of:
            inside = set(lanes)
            self.pairs.append([(i, j) for i in lanes for j in related[i]
                               if not (j in inside and j < i)])
        # a route is a bit mask over the kernels' bounding box (bit (y - y0) * width + x -
        # x0), so two routes share a PE when their masks do: one big-int AND, not a set
        # intersection that hashes PEs
        self.x0 = min(x for x, _ in self.origin)
        self.y0 = min(y for _, y in self.origin)
        self.width = max(x + kernel.width for kernel, (x, _) in zip(kernels, self.origin,
                                                                     strict=True)) - self.x0
        self._memo: dict[tuple[PE, tuple[PE, ...]], int] = {}

    def _kernels_of(self, lane: int) -> set[int]:
        src, dsts = self.lanes[lane]
        return {src[0], *(k for k, _ in dsts)}

    def _at(self, end: End) -> PE:
        k, (x, y) = end
        kernel, (kx, ky), flip = self.kernels[k], self.origin[k], self.flips[k]
        return (kx + (kernel.width - 1 - x if flip[0] else x),
                ky + (kernel.height - 1 - y if flip[1] else y))

    def route(self, lane: int) -> int:
        """The PEs of the lane's plain route, as a bit mask."""
        src, dsts = self.lanes[lane]
        key = (self._at(src), tuple(sorted({self._at(d) for d in dsts})))
        if key not in self._memo:
            self._memo[key] = sum(1 << ((y - self.y0) * self.width + x - self.x0)
                                  for x, y in plain_tree(*key))
        return self._memo[key]

    def crossings(self, kernel: int, routes: list[int]) -> int:
        """Pairs of related lanes, at least one of them the kernel's, whose routes share a
        PE."""
        return sum(1 for i, j in self.pairs[kernel] if routes[i] & routes[j])


def orient(kernels: list[Kernel], positions: dict[str, PE]) -> list[Kernel]:
    """The kernels mirrored so their bundles cross least (module docstring); same order."""
    return [flip_kernel(kernel, flip)
            for kernel, flip in zip(kernels, orientations(kernels, positions), strict=True)]


def orientations(kernels: list[Kernel], positions: dict[str, PE]) -> list[Flip]:
    """The mirroring `orient` gives each kernel, in the kernels' order."""
    layout = _Layout(kernels, positions)
    routes = [layout.route(i) for i in range(len(layout.lanes))]
    for _ in range(PASSES):
        changed = False
        for k, lanes in enumerate(layout.lanes_of):
            if not lanes:
                continue
            current = layout.flips[k]
            best = (layout.crossings(k, routes), current)
            for flip in FLIPS:
                if flip == current:
                    continue
                layout.flips[k] = flip
                trial = list(routes)
                for i in lanes:
                    trial[i] = layout.route(i)
                best = min(best, (layout.crossings(k, trial), flip), key=lambda b: b[0])
            layout.flips[k] = best[1]
            if best[1] != current:
                changed = True
                for i in lanes:
                    routes[i] = layout.route(i)
        if not changed:
            break
    return layout.flips
