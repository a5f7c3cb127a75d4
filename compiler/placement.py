"""Placement: kernel rectangles -> top-left positions on the fabric.

Pure geometry over an abstract kernel graph (no lowering code): `place(boxes, traffic,
region, strategy, seed)` takes the kernels' rectangles in op (topological) order, the words
each kernel sends each other kernel, and the fabric region; it returns every kernel's
top-left (x, y). Every strategy is deterministic for a given seed and its answer passes
`check_placement`, the one legality check (inside the region, no overlaps).

Compactness matters as much as distance: the simulator simulates the bounding box of the
placement, so every strategy keeps that box close to the kernels' total area and within
about 2:1 (`_compactness`), never spread over the whole wafer.

Distance proxy (`hop_words`): words x Manhattan hops between the kernels' centre PEs
(x + w // 2, y + h // 2). A stream really starts at one PE of the producer and fans out to
several PEs of the consumer; without the lowering's PE assignment the centre is the
unbiased guess, and it is what every strategy below minimises.

Strategies (n kernels, E traffic edges, A total kernel area, S = sqrt(A) shelf width):

* `linear`: op order into row-major shelves. A shelf is a row of stacks: each kernel goes
  under the previous one while the stack stays within a stack height, else starts the next
  stack to the right, or the next shelf. Plain shelves (one kernel per stack) waste a
  shelf's height under every short kernel; a GPT layer mixes 4 x 16 and 16 x 1 kernels, and
  stacking raised gpt_small's fill from 24% to 47% of the bounding box. The shelf width
  and stack height are chosen from 24 x 4 candidates for the most compact box (the
  smallest area within 2:1, `_compactness`). O(n) each.
* `snake`: the same shelves, alternate shelves filled right to left and alternate stacks
  bottom up (boustrophedon at both levels), so consecutive kernels touch (except where a
  shelf or a short stack ends): the pipelined layout, where op order is the data flow.
* `random`: a seeded shuffle of the op order into the same shelves: a compact baseline
  whose only difference from `linear` is that it ignores the data flow.
* `greedy`: communication-aware constructive placement. Kernels are taken heaviest-first by
  words exchanged with the already placed ones; each goes to the free spot (every top-left
  in a band of snake's width, found with a summed-area table of the occupancy) minimising
  words x hops to its placed partners plus one hop per partner word for every row the
  placement would grow, ten more per row past snake's height (without that, kernels with
  far partners grew the box 40% taller than snake's for 4% fewer hops).
  O(n x S x height) vectorised: about 0.5 s at n = 300.
* `anneal`: simulated annealing started from `greedy`, moves (swap two kernels, or move one
  next to a partner) confined to greedy's bounding box so the result stays as compact. The
  cost is words x hops plus a link-congestion term: each traffic edge is an XY route
  (along the source's row, then the destination's column) between kernel centres, link
  loads are summed per direction, and the term is sum(load^2) / (largest edge's words), so
  a link carrying one heavy stream costs double and shared links cost more. That is an
  estimate (real lanes start and end at different PEs of a kernel and routing may pick
  other paths), used only to rank placements. Moves are bounded (40 per kernel, at most
  4000); each re-routes only the edges of the moved kernels, vectorised. The first tenth
  only descends and measures uphill steps; then Metropolis from 5% of the median uphill
  step, cooled geometrically 1000x (greedy is already a good start: on 300-kernel chain and
  GPT-like graphs, starting at the full median uphill step ended 3-4% worse in the same
  budget). The best state seen is returned, so its cost never exceeds greedy's. It buys
  2-11% fewer words x hops than greedy; 0.3-0.5 ms per move, 1-2 s at 300 kernels.
* `partition`: min-cut recursive bisection (Breuer): the traffic-weighted kernel graph is
  split by Kernighan-Lin (networkx), starting from the op-order split at half the area so
  halves stay area-balanced (KL swaps keep the counts), down to single kernels, so heavily
  connected kernels share a subtree. The bisection tree is a slicing floorplan sized with
  Stockmeyer's shape curves: bottom-up, each node keeps the non-dominated (width, height)
  of its halves side by side or stacked (thinned to `_SHAPES`), and the root takes the
  most compact that fits. Laying out top-down, each half is mirrored in x and/or y to bring
  the kernels joined by cut edges face to face. KL is O(E log E) per pass per level;
  about 0.3 s at n = 300.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import networkx as nx
import numpy as np

from wse_sim.errors import UserError

Positions = dict[str, tuple[int, int]]
Traffic = Sequence[tuple[str, str, int]]

STRATEGIES: tuple[str, ...] = ("linear", "snake", "random", "greedy", "anneal", "partition")

_MOVES_PER_KERNEL = 40  # annealing budget: 40 proposed moves per kernel ...
_MAX_MOVES = 4000  # ... at most 4000 (about 2 s at 300 kernels)
_START_HEAT = 0.05  # start temperature / median uphill step: greedy is already good
_PAST_TARGET = 10  # greedy: extra hops per partner word per row grown past snake's height
_SHAPES = 24  # shapes kept per node of the partition floorplan
_WIDTH_TRIES = 24  # shelf widths tried between sqrt(area) / 2 and 2 sqrt(area)
_STACK_HEIGHTS = (1, 1.5, 2, 3)  # stack heights tried, in units of the tallest kernel


@dataclass(frozen=True)
class Box:
    """One kernel's rectangle of PEs."""

    name: str
    width: int
    height: int


@dataclass
class _Problem:
    """The placement input as arrays indexed by op order."""

    boxes: list[Box]
    w: np.ndarray  # (n,) widths
    h: np.ndarray  # (n,) heights
    src: np.ndarray  # (E,) directed edges with words > 0, aggregated per (src, dst)
    dst: np.ndarray
    words: np.ndarray
    region: tuple[int, int]
    strategy: str
    seed: int

    @property
    def n(self) -> int:
        return len(self.boxes)

    def incident(self) -> list[list[int]]:
        """Edge indices touching each kernel (edges never loop: `_problem` drops those)."""
        out: list[list[int]] = [[] for _ in range(self.n)]
        for e, (a, b) in enumerate(zip(self.src.tolist(), self.dst.tolist(), strict=True)):
            out[a].append(e)
            out[b].append(e)
        return out

    def neighbours(self) -> list[list[tuple[int, float]]]:
        """(other kernel, words) of every edge touching each kernel, either direction."""
        out: list[list[tuple[int, float]]] = [[] for _ in range(self.n)]
        for a, b, w in zip(self.src.tolist(), self.dst.tolist(), self.words.tolist(),
                           strict=True):
            out[a].append((b, w))
            out[b].append((a, w))
        return out

    def no_room(self, detail: str) -> UserError:
        width, height = self.region
        area = int((self.w * self.h).sum())
        return UserError(
            f"placement {self.strategy!r}: {self.n} kernels ({area:,} PEs) cannot be placed in "
            f"the {width} x {height} region: {detail}"
        )


def place(
    boxes: list[Box],
    traffic: Traffic,
    region: tuple[int, int],
    strategy: str,
    seed: int = 0,
) -> Positions:
    """Top-left (x, y) of every kernel. `boxes` in op order; `traffic` (src, dst, words)."""
    if strategy not in _PLACERS:
        raise UserError(
            f"unknown placement strategy {strategy!r}; valid: {', '.join(STRATEGIES)}"
        )
    problem = _problem(boxes, traffic, region, strategy, seed)
    if problem.n == 0:
        return {}
    xy = _PLACERS[strategy](problem)
    positions = {b.name: (int(x), int(y)) for b, (x, y) in zip(boxes, xy.tolist(), strict=True)}
    check_placement(boxes, positions, region)
    return positions


def check_placement(boxes: list[Box], positions: Positions, region: tuple[int, int]) -> None:
    """Raise UserError naming the first kernel that is unplaced, outside the region or
    overlapping another kernel."""
    width, height = region
    owner = np.full((height, width), -1, dtype=np.int32)
    for i, box in enumerate(boxes):
        if box.name not in positions:
            raise UserError(f"placement: kernel {box.name!r} has no position")
        x, y = positions[box.name]
        if x < 0 or y < 0 or x + box.width > width or y + box.height > height:
            raise UserError(
                f"placement: kernel {box.name!r} ({box.width} x {box.height} PEs at ({x}, {y}))"
                f" is outside the {width} x {height} region"
            )
        block = owner[y : y + box.height, x : x + box.width]
        taken = block[block >= 0]
        if taken.size:
            other = boxes[int(taken[0])]
            ox, oy = positions[other.name]
            raise UserError(
                f"placement: kernel {box.name!r} ({box.width} x {box.height} at ({x}, {y})) "
                f"overlaps kernel {other.name!r} ({other.width} x {other.height} at "
                f"({ox}, {oy}))"
            )
        block[...] = i


def hop_words(boxes: list[Box], positions: Positions, traffic: Traffic) -> int:
    """Sum over traffic of words x Manhattan hops between the kernels' centre PEs."""
    size = {b.name: (b.width, b.height) for b in boxes}
    total = 0
    for src, dst, words in traffic:
        (sx, sy), (dx, dy) = _centre(positions[src], size[src]), _centre(positions[dst], size[dst])
        total += int(words) * (abs(sx - dx) + abs(sy - dy))
    return total


def bounding_box(boxes: list[Box], positions: Positions) -> tuple[int, int, int, int]:
    """(x0, y0, width, height) of the smallest rectangle holding every placed kernel."""
    x0 = min(positions[b.name][0] for b in boxes)
    y0 = min(positions[b.name][1] for b in boxes)
    x1 = max(positions[b.name][0] + b.width for b in boxes)
    y1 = max(positions[b.name][1] + b.height for b in boxes)
    return x0, y0, x1 - x0, y1 - y0


def _centre(xy: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    return xy[0] + size[0] // 2, xy[1] + size[1] // 2


def _problem(
    boxes: list[Box], traffic: Traffic, region: tuple[int, int], strategy: str, seed: int
) -> _Problem:
    width, height = region
    index: dict[str, int] = {}
    for i, box in enumerate(boxes):
        if box.name in index:
            raise UserError(f"placement: two kernels are named {box.name!r}")
        if box.width < 1 or box.height < 1:
            raise UserError(f"placement: kernel {box.name!r} has size {box.width} x {box.height}")
        if box.width > width or box.height > height:
            raise UserError(
                f"placement: kernel {box.name!r} ({box.width} x {box.height} PEs) cannot be "
                f"placed: it is larger than the {width} x {height} region"
            )
        index[box.name] = i
    words: dict[tuple[int, int], int] = {}
    for src, dst, count in traffic:
        for name in (src, dst):
            if name not in index:
                raise ValueError(f"traffic names kernel {name!r}, which is not a box")
        if count > 0 and src != dst:
            key = (index[src], index[dst])
            words[key] = words.get(key, 0) + int(count)
    pairs = np.array(sorted(words), dtype=np.int64).reshape(-1, 2)
    return _Problem(
        boxes=boxes,
        w=np.array([b.width for b in boxes], dtype=np.int64),
        h=np.array([b.height for b in boxes], dtype=np.int64),
        src=pairs[:, 0],
        dst=pairs[:, 1],
        words=np.array([words[k] for k in sorted(words)], dtype=np.float64),
        region=region,
        strategy=strategy,
        seed=seed,
    )


# --- shelves: linear, snake, random --------------------------------------------------------


def _shelves(p: _Problem, order: Sequence[int], width: int, height: int,
             snake: bool) -> np.ndarray:
    """Pack kernels in `order` into shelves `width` wide made of stacks at most `height`
    tall: a kernel goes under the previous one while its stack stays within `height` (the
    stack widens to its widest kernel), else it starts a stack to the right, or a new shelf
    below when the shelf is full. `snake`: alternate shelves run right to left and
    alternate stacks bottom up, so consecutive kernels touch. Returns (n, 2) top-lefts."""
    xy = np.zeros((p.n, 2), dtype=np.int64)  # y relative to the shelf until the end
    shelves: list[list[list[int]]] = []  # shelf -> stacks -> kernels
    stack_x = stack_w = stack_h = 0
    for i in order:
        w, h = int(p.w[i]), int(p.h[i])
        if shelves and stack_h + h <= height and stack_x + max(stack_w, w) <= width:
            shelves[-1][-1].append(i)
            xy[i] = (stack_x, stack_h)
            stack_w, stack_h = max(stack_w, w), stack_h + h
            continue
        stack_x += stack_w
        if not shelves or stack_x + w > width:
            shelves.append([])
            stack_x = 0
        shelves[-1].append([i])
        xy[i] = (stack_x, 0)
        stack_w, stack_h = w, h
    right = int((xy[:, 0] + p.w).max())
    top = 0
    for k, shelf in enumerate(shelves):
        tall = max(int((xy[st, 1] + p.h[st]).max()) for st in map(np.array, shelf))
        for j, stack in enumerate(map(np.array, shelf)):
            if snake and j % 2:
                xy[stack, 1] = tall - xy[stack, 1] - p.h[stack]
            if snake and k % 2:
                xy[stack, 0] = right - xy[stack, 0] - p.w[stack]
            xy[stack, 1] += top
        top += tall
    return xy


def _compactness(width: int, height: int) -> tuple[bool, int, int]:
    """Sort key of a bounding box: aspect within 2:1 first, then the smaller area, then the
    shorter long side. (A 2:1 box has mean distances only ~6% above a square's of the same
    area, while a squarer box can cost much more area.)"""
    long, short = max(width, height), min(width, height)
    return long > 2 * short, width * height, long


def _extent(p: _Problem, xy: np.ndarray) -> tuple[int, int]:
    return int((xy[:, 0] + p.w).max()), int((xy[:, 1] + p.h).max())


def _shelf_layout(p: _Problem, order: Sequence[int], snake: bool) -> np.ndarray:
    """Shelves at the width and stack height giving the most compact bounding box that
    fits the region (`_compactness`)."""
    region_w, region_h = p.region
    side = math.sqrt(float((p.w * p.h).sum()))
    low = max(int(p.w.max()), int(side / 2))
    high = max(low, min(region_w, int(2 * side) + 1))
    widths = set(np.geomspace(low, high, _WIDTH_TRIES).astype(int).tolist()) | {region_w}
    tallest = int(p.h.max())
    heights = {min(region_h, int(tallest * k)) for k in _STACK_HEIGHTS}
    best: tuple[tuple[bool, int, int], np.ndarray] | None = None
    for width, height in itertools.product(sorted(widths), sorted(heights)):
        xy = _shelves(p, order, width, height, snake)
        bw, bh = _extent(p, xy)
        key = _compactness(bw, bh)
        if bh <= region_h and (best is None or key < best[0]):
            best = (key, xy)
    if best is None:
        xy = _shelves(p, order, region_w, region_h, snake)
        first = next(i for i in order if xy[i, 1] + p.h[i] > region_h)
        raise p.no_room(f"kernel {p.boxes[first].name!r} falls below the last row even on "
                        "shelves the width of the region")
    return best[1]


def _linear(p: _Problem) -> np.ndarray:
    return _shelf_layout(p, range(p.n), snake=False)


def _snake(p: _Problem) -> np.ndarray:
    return _shelf_layout(p, range(p.n), snake=True)


def _random(p: _Problem) -> np.ndarray:
    order = np.random.default_rng(p.seed).permutation(p.n)
    return _shelf_layout(p, order.tolist(), snake=False)


def _window_sums(blocked: np.ndarray, w: int, h: int) -> np.ndarray:
    """Number of blocked cells under a w x h rectangle at every top-left of `blocked`
    (a summed-area table): shape (rows - h + 1, cols - w + 1)."""
    rows, cols = blocked.shape
    table = np.zeros((rows + 1, cols + 1), dtype=np.int64)
    table[1:, 1:] = blocked.cumsum(0).cumsum(1)
    return table[h:, w:] - table[: rows - h + 1, w:] - table[h:, : cols - w + 1] + table[
        : rows - h + 1, : cols - w + 1
    ]


# --- greedy --------------------------------------------------------------------------------


def _greedy_order(p: _Problem) -> list[int]:
    """Heaviest total traffic first, then repeatedly the kernel exchanging the most words
    with those already chosen (ties: op order); kernels without traffic come last."""
    total = np.zeros(p.n)
    np.add.at(total, p.src, p.words)
    np.add.at(total, p.dst, p.words)
    neighbours = p.neighbours()
    link = np.zeros(p.n)
    chosen = np.zeros(p.n, dtype=bool)
    order: list[int] = []
    for _ in range(p.n):
        # key: words to chosen kernels, then total words; argmax takes the first (op order)
        key = np.where(chosen, -1.0, link * (total.max() + 1.0) + total)
        i = int(np.argmax(key))
        chosen[i] = True
        order.append(i)
        for j, w in neighbours[i]:
            link[j] += w
    return order


def _greedy(p: _Problem) -> np.ndarray:
    region_w, region_h = p.region
    width, target = _extent(p, _snake(p))  # a compact box known to fit
    occupied = np.zeros((region_h, width), dtype=np.int64)
    xy = np.full((p.n, 2), -1, dtype=np.int64)
    placed = np.zeros(p.n, dtype=bool)
    partners = p.neighbours()
    bottom = 0
    for i in _greedy_order(p):
        wi, hi = int(p.w[i]), int(p.h[i])
        rows = min(bottom, region_h - hi) + 1  # candidate top rows 0..rows-1
        used = _window_sums(occupied[: rows + hi - 1], wi, hi)
        ys, xs = np.mgrid[0:rows, 0 : width - wi + 1]
        cx, cy = xs + wi // 2, ys + hi // 2
        cost = np.zeros(used.shape)
        weight = 1.0
        for j, w in partners[i]:
            if placed[j]:
                px, py = _centre((int(xy[j, 0]), int(xy[j, 1])), (int(p.w[j]), int(p.h[j])))
                cost += w * (np.abs(cx - px) + np.abs(cy - py))
                weight += w
        cost += weight * (np.maximum(0, ys + hi - bottom)
                          + _PAST_TARGET * np.maximum(0, ys + hi - max(bottom, target)))
        cost[used > 0] = np.inf
        flat = int(np.argmin(cost))
        if not np.isfinite(cost.flat[flat]):
            raise p.no_room(f"no free {wi} x {hi} spot left for kernel {p.boxes[i].name!r}")
        y, x = divmod(flat, width - wi + 1)
        occupied[y : y + hi, x : x + wi] = 1
        xy[i] = (x, y)
        placed[i] = True
        bottom = max(bottom, y + hi)
    return xy


# --- anneal --------------------------------------------------------------------------------


class _Links:
    """Estimated link loads: every traffic edge is an XY route between kernel centres (along
    the source's row, then the destination's column). Loads are words per link and
    direction, flat as [direction E/W/S/N, y, x] (link x -> x+1 for E, y -> y+1 for S),
    with running totals of sum(load) (= words x hops) and sum(load^2)."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.plane = width, width * height
        self.loads = np.zeros(4 * self.plane)
        self.total = 0.0
        self.squares = 0.0

    def _indices(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flat link indices on the XY routes a[k] -> b[k] (centres, shape (m, 2)), and the
        route k each index belongs to."""
        (ax, ay), (bx, by) = a.T, b.T
        m = len(a)
        base = np.concatenate([
            np.where(bx > ax, 0, self.plane) + ay * self.width + np.minimum(ax, bx),
            np.where(by > ay, 2 * self.plane, 3 * self.plane)
            + np.minimum(ay, by) * self.width + bx,
        ])
        length = np.concatenate([np.abs(bx - ax), np.abs(by - ay)])
        stride = np.repeat([1, self.width], m)
        segment = np.repeat(np.arange(2 * m), length)
        step = np.arange(int(length.sum())) - np.repeat(length.cumsum() - length, length)
        return base[segment] + step * stride[segment], segment % max(m, 1)

    def move(self, old: tuple[np.ndarray, np.ndarray], new: tuple[np.ndarray, np.ndarray],
             words: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
        """Re-route edges (`words` each) from endpoints `old` to `new`; returns the state
        `restore` needs to undo it."""
        old_links, old_route = self._indices(*old)
        new_links, new_route = self._indices(*new)
        touched, inverse = np.unique(
            np.concatenate([old_links, new_links]), return_inverse=True
        )
        change = np.concatenate([-words[old_route], words[new_route]])
        before = self.loads[touched]
        after = before + np.bincount(inverse, weights=change, minlength=touched.size)
        saved = (touched, before, self.total, self.squares)
        self.loads[touched] = after
        self.total += float(change.sum())
        self.squares += float((after * after - before * before).sum())
        return saved

    def restore(self, saved: tuple[np.ndarray, np.ndarray, float, float]) -> None:
        touched, before, self.total, self.squares = saved
        self.loads[touched] = before


Undo = tuple[dict[int, tuple[int, int]], tuple[np.ndarray, np.ndarray, float, float]]


class _Annealer:
    """State of one annealing run: positions, the owner grid (kernel index per PE, -1
    free) of the fixed bounding box, and the link loads."""

    def __init__(self, p: _Problem, xy: np.ndarray) -> None:
        self.p = p
        self.xy = xy.copy()
        self.width, self.height = _extent(p, xy)
        self.owner = np.full((self.height, self.width), -1, dtype=np.int64)
        for i in range(p.n):
            self._paint(i, i)
        self.incident = [np.array(edges, dtype=np.int64) for edges in p.incident()]
        by_size: dict[tuple[int, int], list[int]] = {}
        for i in range(p.n):
            by_size.setdefault((int(p.w[i]), int(p.h[i])), []).append(i)
        self.twins = [[j for j in by_size[(int(p.w[i]), int(p.h[i]))] if j != i]
                      for i in range(p.n)]
        self.links = _Links(self.width, self.height)
        self.scale = float(p.words.max()) if p.words.size else 1.0
        nowhere = np.zeros((0, 2), dtype=np.int64)
        self.links.move((nowhere, nowhere), self._ends(np.arange(p.words.size)), p.words)

    def cost(self) -> float:
        return self.links.total + self.links.squares / self.scale

    def _paint(self, i: int, value: int) -> None:
        x, y = self.xy[i]
        self.owner[y : y + self.p.h[i], x : x + self.p.w[i]] = value

    def _centre(self, i: int) -> tuple[int, int]:
        return int(self.xy[i, 0] + self.p.w[i] // 2), int(self.xy[i, 1] + self.p.h[i] // 2)

    def _ends(self, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Centres of the source and destination kernels of `edges`."""
        half = np.stack([self.p.w // 2, self.p.h // 2], axis=1)
        src, dst = self.p.src[edges], self.p.dst[edges]
        return self.xy[src] + half[src], self.xy[dst] + half[dst]

    def _free(self, i: int, x: int, y: int, movers: tuple[int, ...]) -> bool:
        """Whether kernel i fits at (x, y) once the kernels `movers` have left."""
        wi, hi = int(self.p.w[i]), int(self.p.h[i])
        if x < 0 or y < 0 or x + wi > self.width or y + hi > self.height:
            return False
        block = self.owner[y : y + hi, x : x + wi]
        free = block == -1
        for k in movers:
            free |= block == k
        return bool(free.all())

    def _nearest_free(self, i: int, target: tuple[int, int]) -> tuple[int, int] | None:
        """The free top-left for kernel i whose centre is nearest `target`, searched in a
        window around it (None: no free spot there, or i is already the nearest)."""
        wi, hi = int(self.p.w[i]), int(self.p.h[i])
        reach = max(wi, hi) + 8
        want_x, want_y = target[0] - wi // 2, target[1] - hi // 2
        x0, x1 = max(0, want_x - reach), min(self.width - wi, want_x + reach)
        y0, y1 = max(0, want_y - reach), min(self.height - hi, want_y + reach)
        if x0 > x1 or y0 > y1:
            return None
        window = self.owner[y0 : y1 + hi, x0 : x1 + wi]
        used = _window_sums((window != -1) & (window != i), wi, hi)
        xs, ys = np.arange(x0, x1 + 1), np.arange(y0, y1 + 1)
        distance = np.abs(xs - want_x)[None, :] + np.abs(ys - want_y)[:, None]
        distance = np.where(used == 0, distance, np.inf)
        flat = int(np.argmin(distance))
        row, col = divmod(flat, xs.size)
        spot = x0 + col, y0 + row
        if not np.isfinite(distance.flat[flat]) or spot == tuple(self.xy[i].tolist()):
            return None
        return spot

    def propose(self, rng: np.random.Generator) -> dict[int, tuple[int, int]] | None:
        """New top-lefts for one or two kernels, legal within the box, or None: a swap with
        a kernel of the same size when there is one (always legal), else with any kernel;
        or a move to the free spot nearest one of its partners."""
        p = self.p
        i = int(rng.integers(p.n))
        if rng.random() < 0.5:
            twins = self.twins[i]
            j = twins[int(rng.integers(len(twins)))] if twins else int(rng.integers(p.n))
            if j == i:
                return None
            moves = {i: (int(self.xy[j, 0]), int(self.xy[j, 1])),
                     j: (int(self.xy[i, 0]), int(self.xy[i, 1]))}
            return moves if self._legal(moves) else None
        edges = self.incident[i]
        if not edges.size:
            return None
        e = int(edges[int(rng.integers(edges.size))])
        partner = int(p.dst[e]) if int(p.src[e]) == i else int(p.src[e])
        spot = self._nearest_free(i, self._centre(partner))
        return None if spot is None else {i: spot}

    def _legal(self, moves: dict[int, tuple[int, int]]) -> bool:
        movers = tuple(moves)
        if not all(self._free(k, x, y, movers) for k, (x, y) in moves.items()):
            return False
        if len(moves) == 2:  # the two new rectangles must not overlap each other
            (a, (ax, ay)), (b, (bx, by)) = moves.items()
            p = self.p
            return bool(ax + p.w[a] <= bx or bx + p.w[b] <= ax
                        or ay + p.h[a] <= by or by + p.h[b] <= ay)
        return True

    def _place(self, moves: dict[int, tuple[int, int]]) -> None:
        for k in moves:
            self._paint(k, -1)
        for k, xy in moves.items():
            self.xy[k] = xy
        for k in moves:
            self._paint(k, k)

    def apply(self, moves: dict[int, tuple[int, int]]) -> Undo:
        edges = np.unique(np.concatenate([self.incident[k] for k in moves]))
        before = self._ends(edges)
        back = {k: (int(self.xy[k, 0]), int(self.xy[k, 1])) for k in moves}
        self._place(moves)
        return back, self.links.move(before, self._ends(edges), self.p.words[edges])

    def revert(self, undo: Undo) -> None:
        back, saved = undo
        self._place(back)
        self.links.restore(saved)


def _anneal(p: _Problem) -> np.ndarray:
    state = _Annealer(p, _greedy(p))
    if p.words.size == 0:
        return state.xy
    rng = np.random.default_rng(p.seed)
    cost = state.cost()
    best_cost, best = cost, state.xy.copy()
    uphill: list[float] = []
    temperature = 0.0
    total = min(_MAX_MOVES, _MOVES_PER_KERNEL * p.n)
    warm_up = total // 10
    cooling = 1e-3 ** (1.0 / (total - warm_up))  # the temperature falls 1000x
    for step in range(total):
        if step == warm_up:  # start warm enough to take a small uphill step
            temperature = _START_HEAT * float(np.median(uphill)) if uphill else 0.0
        moves = state.propose(rng)
        if moves is None:
            continue
        undo = state.apply(moves)
        new = state.cost()
        delta = new - cost
        if step < warm_up:  # downhill only, learning the size of uphill steps
            if delta > 0:
                uphill.append(delta)
            accept = delta <= 0
        else:
            temperature *= cooling
            accept = delta <= 0 or (
                temperature > 0 and rng.random() < math.exp(-delta / temperature)
            )
        if accept:
            cost = new
            if cost < best_cost:
                best_cost, best = cost, state.xy.copy()
        else:
            state.revert(undo)
    return best


# --- partition -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    """One way to lay out a subtree: its size, and how: the halves side by side (`across`)
    or stacked, each in its shape number `first` / `second`."""

    width: int
    height: int
    across: bool = False
    first: int = 0
    second: int = 0


@dataclass
class _Slice:
    """A node of the slicing floorplan: a kernel (leaf) or two halves, with the
    non-dominated shapes it can take (Stockmeyer's shape curve)."""

    shapes: list[_Shape]
    kernel: int = -1
    first: _Slice | None = None
    second: _Slice | None = None


def _combine(first: _Slice, second: _Slice, region: tuple[int, int]) -> list[_Shape]:
    """Shape curve of two halves: every pairing of their shapes in both orientations."""
    options = []
    for i, a in enumerate(first.shapes):
        for j, b in enumerate(second.shapes):
            options.append(_Shape(a.width + b.width, max(a.height, b.height), True, i, j))
            options.append(_Shape(max(a.width, b.width), a.height + b.height, False, i, j))
    return _curve(options, region)


def _curve(options: list[_Shape], region: tuple[int, int]) -> list[_Shape]:
    """The non-dominated shapes that fit the region, thinned to `_SHAPES` evenly."""
    options = [s for s in options if s.width <= region[0] and s.height <= region[1]]
    options.sort(key=lambda s: (s.width, s.height))
    curve: list[_Shape] = []
    for shape in options:  # widths ascending: keep those lower than every narrower one
        if not curve or shape.height < curve[-1].height:
            curve.append(shape)
    if len(curve) > _SHAPES:
        keep = np.linspace(0, len(curve) - 1, _SHAPES).round().astype(int)
        curve = [curve[k] for k in sorted(set(keep.tolist()))]
    return curve


def _bisect(p: _Problem, graph: nx.Graph, nodes: list[int]) -> _Slice:
    if len(nodes) == 1:
        i = nodes[0]
        return _Slice([_Shape(int(p.w[i]), int(p.h[i]))], kernel=i)
    area = (p.w * p.h)[nodes].cumsum()
    cut = int(np.argmin(np.abs(area[:-1] - area[-1] / 2))) + 1  # op-order split, half area
    halves = nx.algorithms.community.kernighan_lin_bisection(
        graph.subgraph(nodes), partition=(nodes[:cut], nodes[cut:]), seed=p.seed
    )
    first, second = (_bisect(p, graph, sorted(half)) for half in sorted(halves, key=min))
    shapes = _combine(first, second, p.region)
    if not shapes:
        raise p.no_room(f"kernels {p.boxes[nodes[0]].name!r}..{p.boxes[nodes[-1]].name!r} "
                        "do not fit side by side nor stacked")
    return _Slice(shapes, first=first, second=second)


def _lay_out(p: _Problem, node: _Slice, shape: int) -> tuple[np.ndarray, np.ndarray]:
    """Kernels of a subtree and their top-lefts relative to the subtree's corner. Each half
    is mirrored (in x, y, both or neither) to minimise words x hops of the edges between
    the halves, so the kernels a cut separates end up facing each other."""
    if node.first is None or node.second is None:
        return np.array([node.kernel]), np.zeros((1, 2), dtype=np.int64)
    chosen = node.shapes[shape]
    first, second = node.first.shapes[chosen.first], node.second.shapes[chosen.second]
    a, a_xy = _lay_out(p, node.first, chosen.first)
    b, b_xy = _lay_out(p, node.second, chosen.second)
    shift = np.array([first.width, 0] if chosen.across else [0, first.height])
    side = np.zeros(p.n, dtype=np.int64)
    side[a], side[b] = 1, 2
    cut = np.flatnonzero(side[p.src] * side[p.dst] == 2)  # edges between the halves
    local = np.zeros(p.n, dtype=np.int64)
    local[a], local[b] = np.arange(a.size), np.arange(b.size)
    end_a = np.where(side[p.src[cut]] == 1, p.src[cut], p.dst[cut])
    end_b = np.where(side[p.src[cut]] == 2, p.src[cut], p.dst[cut])
    half = np.stack([p.w // 2, p.h // 2], axis=1)

    def centres(ends: np.ndarray, xy: np.ndarray, box: _Shape, flip: tuple[bool, bool]):
        return _mirror(p, ends, xy[local[ends]], box, flip) + half[ends]

    a_options = [centres(end_a, a_xy, first, flip) for flip in _MIRRORS]
    b_options = [centres(end_b, b_xy, second, flip) + shift for flip in _MIRRORS]
    costs = [float((p.words[cut] * np.abs(ca - cb).sum(axis=1)).sum())
             for ca, cb in itertools.product(a_options, b_options)]
    flip_a, flip_b = divmod(int(np.argmin(costs)), len(_MIRRORS))
    return np.concatenate([a, b]), np.concatenate([
        _mirror(p, a, a_xy, first, _MIRRORS[flip_a]),
        _mirror(p, b, b_xy, second, _MIRRORS[flip_b]) + shift,
    ])


_MIRRORS = ((False, False), (True, False), (False, True), (True, True))


def _mirror(
    p: _Problem, kernels: np.ndarray, xy: np.ndarray, box: _Shape, flip: tuple[bool, bool]
) -> np.ndarray:
    """Top-lefts of `kernels` reflected inside their `box` (flip x, flip y)."""
    out = xy.copy()
    if flip[0]:
        out[:, 0] = box.width - xy[:, 0] - p.w[kernels]
    if flip[1]:
        out[:, 1] = box.height - xy[:, 1] - p.h[kernels]
    return out


def _partition(p: _Problem) -> np.ndarray:
    graph = nx.Graph()
    graph.add_nodes_from(range(p.n))
    for a, b, w in zip(p.src.tolist(), p.dst.tolist(), p.words.tolist(), strict=True):
        previous = graph.get_edge_data(a, b, {"weight": 0.0})["weight"]
        graph.add_edge(a, b, weight=previous + w)
    root = _bisect(p, graph, list(range(p.n)))
    best = min(range(len(root.shapes)),
               key=lambda k: _compactness(root.shapes[k].width, root.shapes[k].height))
    kernels, placed = _lay_out(p, root, best)
    xy = np.zeros((p.n, 2), dtype=np.int64)
    xy[kernels] = placed
    return xy


_PLACERS: dict[str, Callable[[_Problem], np.ndarray]] = {
    "linear": _linear,
    "snake": _snake,
    "random": _random,
    "greedy": _greedy,
    "anneal": _anneal,
    "partition": _partition,
}
