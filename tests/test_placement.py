"""Placement strategies: legality, compactness, determinism, errors, and that the
communication-aware strategies beat the random baseline on a chain."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compiler.placement import (
    STRATEGIES,
    Box,
    bounding_box,
    check_placement,
    hop_words,
    place,
)
from wse_sim.errors import UserError

WSE2 = (750, 994)


def random_boxes(n: int, seed: int, biggest: int = 16) -> list[Box]:
    rng = np.random.default_rng(seed)
    return [
        Box(f"k{i}", int(rng.integers(1, biggest + 1)), int(rng.integers(1, biggest + 1)))
        for i in range(n)
    ]


def chain(boxes: list[Box], words: int = 1000) -> list[tuple[str, str, int]]:
    return [(a.name, b.name, words) for a, b in zip(boxes, boxes[1:], strict=False)]


@st.composite
def problems(draw: st.DrawFn) -> tuple[list[Box], list[tuple[str, str, int]], tuple[int, int]]:
    sizes = draw(st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1,
                          max_size=25))
    boxes = [Box(f"op{i}", w, h) for i, (w, h) in enumerate(sizes)]
    names = [b.name for b in boxes]
    edges = draw(st.lists(st.tuples(st.sampled_from(names), st.sampled_from(names),
                                    st.integers(0, 500)), max_size=40))
    area = sum(w * h for w, h in sizes)
    side = max(9, int(2.5 * area**0.5) + 9)  # room for any strategy's packing slack
    region = (side + draw(st.integers(0, 7)), side + draw(st.integers(0, 7)))
    return boxes, edges, region


@pytest.mark.parametrize("strategy", STRATEGIES)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), seed=st.integers(0, 3))
def test_every_strategy_is_legal_and_compact(strategy, problem, seed):
    boxes, traffic, region = problem
    positions = place(boxes, traffic, region, strategy, seed=seed)
    assert set(positions) == {b.name for b in boxes}
    check_placement(boxes, positions, region)
    _, _, width, height = bounding_box(boxes, positions)
    area = sum(b.width * b.height for b in boxes)
    biggest = max(max(b.width, b.height) for b in boxes)
    # shelves waste at most a shelf's height per shelf; never spread over the region
    assert width * height <= 4 * area + 4 * biggest * (area**0.5 + biggest)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_compact_on_a_realistic_size(strategy):
    boxes = random_boxes(120, seed=5)
    positions = place(boxes, chain(boxes), WSE2, strategy, seed=1)
    _, _, width, height = bounding_box(boxes, positions)
    area = sum(b.width * b.height for b in boxes)
    assert width * height < 2.4 * area, (width, height, area)
    assert max(width, height) < 2.2 * min(width, height)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_deterministic_for_a_seed(strategy):
    boxes = random_boxes(40, seed=2)
    traffic = chain(boxes) + [(boxes[0].name, boxes[-1].name, 300)]
    first = place(boxes, traffic, WSE2, strategy, seed=7)
    assert place(boxes, traffic, WSE2, strategy, seed=7) == first


def test_random_depends_on_the_seed():
    boxes = random_boxes(40, seed=2)
    layouts = {tuple(sorted(place(boxes, [], WSE2, "random", seed=s).items())) for s in range(3)}
    assert len(layouts) == 3


def test_shelves_of_stacks_in_op_order():
    from compiler.placement import _problem, _shelves

    boxes = [Box("a", 4, 2), Box("b", 3, 2), Box("c", 2, 4), Box("d", 4, 4), Box("e", 2, 1)]
    problem = _problem(boxes, [], (64, 64), "linear", 0)
    linear = _shelves(problem, range(5), width=8, height=4, snake=False)
    # b stacks under a; c would overflow the stack: new stack; d overflows the shelf
    assert linear.tolist() == [[0, 0], [0, 2], [4, 0], [0, 4], [4, 4]]
    snake = _shelves(problem, range(5), width=8, height=4, snake=True)
    # the second shelf runs right to left, its second stack bottom up
    assert snake.tolist() == [[0, 0], [0, 2], [4, 0], [2, 4], [0, 7]]


def test_snake_keeps_consecutive_kernels_touching():
    boxes = [Box(f"k{i}", 4, 4) for i in range(30)]
    snake = place(boxes, [], (64, 64), "snake")
    linear = place(boxes, [], (64, 64), "linear")
    hops = [hop_words(boxes, snake, [(a.name, b.name, 1)]) for a, b in zip(boxes, boxes[1:],
                                                                           strict=False)]
    assert hops == [4] * len(hops)  # equal squares: the boustrophedon never breaks
    assert hop_words(boxes, snake, chain(boxes)) < hop_words(boxes, linear, chain(boxes))


@pytest.mark.parametrize("strategy", ["greedy", "anneal", "partition"])
def test_communication_aware_strategies_beat_random_on_a_chain(strategy):
    boxes = random_boxes(60, seed=11)
    traffic = chain(boxes)
    smart = hop_words(boxes, place(boxes, traffic, WSE2, strategy), traffic)
    for seed in range(3):
        baseline = hop_words(boxes, place(boxes, traffic, WSE2, "random", seed=seed), traffic)
        assert smart < 0.5 * baseline, (strategy, smart, baseline)


def test_anneal_never_worse_than_greedy_on_hops_it_routes():
    boxes = random_boxes(50, seed=3)
    rng = np.random.default_rng(3)
    traffic = chain(boxes) + [
        (boxes[int(a)].name, boxes[int(b)].name, int(w))
        for a, b, w in zip(rng.integers(0, 50, 30), rng.integers(0, 50, 30),
                           rng.integers(1, 2000, 30), strict=True)
    ]
    greedy = place(boxes, traffic, WSE2, "greedy")
    annealed = place(boxes, traffic, WSE2, "anneal")
    assert bounding_box(boxes, annealed)[2:] <= bounding_box(boxes, greedy)[2:]
    assert hop_words(boxes, annealed, traffic) <= 1.05 * hop_words(boxes, greedy, traffic)


def test_hop_words_is_centre_to_centre_manhattan():
    boxes = [Box("a", 3, 3), Box("b", 2, 4)]
    positions = {"a": (0, 0), "b": (10, 5)}
    # centres (1, 1) and (11, 7): 10 + 6 hops
    assert hop_words(boxes, positions, [("a", "b", 5), ("b", "a", 1)]) == 6 * 16


def test_check_placement_finds_overlap_and_out_of_bounds():
    boxes = [Box("a", 4, 4), Box("b", 4, 4)]
    check_placement(boxes, {"a": (0, 0), "b": (4, 0)}, (8, 4))
    with pytest.raises(UserError, match="'b'.*overlaps kernel 'a'"):
        check_placement(boxes, {"a": (0, 0), "b": (3, 3)}, (16, 16))
    with pytest.raises(UserError, match="'b'.*outside the 8 x 4 region"):
        check_placement(boxes, {"a": (0, 0), "b": (5, 0)}, (8, 4))
    with pytest.raises(UserError, match="'a'.*outside"):
        check_placement(boxes, {"a": (-1, 0), "b": (4, 0)}, (8, 4))
    with pytest.raises(UserError, match="'b' has no position"):
        check_placement(boxes, {"a": (0, 0)}, (8, 4))


def test_box_larger_than_region_is_a_user_error():
    boxes = [Box("small", 2, 2), Box("h0.mlp.fc", 20, 3)]
    for strategy in STRATEGIES:
        with pytest.raises(UserError, match=r"'h0.mlp.fc' \(20 x 3 PEs\).*16 x 16 region"):
            place(boxes, [], (16, 16), strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_too_many_kernels_for_the_region_is_a_user_error(strategy):
    boxes = [Box(f"k{i}", 3, 3) for i in range(8)]  # 72 PEs, the region has 64
    with pytest.raises(UserError, match=f"placement '{strategy}'.*8 x 8 region: .*'k"):
        place(boxes, [], (8, 8), strategy)  # the message names a kernel that does not fit


def test_unknown_strategy_lists_the_valid_ones():
    with pytest.raises(UserError, match="'spiral'.*linear, snake, random, greedy"):
        place([Box("a", 1, 1)], [], (4, 4), "spiral")


def test_duplicate_names_and_empty_input():
    with pytest.raises(UserError, match="two kernels are named 'a'"):
        place([Box("a", 1, 1), Box("a", 2, 2)], [], (4, 4), "linear")
    assert place([], [], (4, 4), "anneal") == {}


def test_fills_a_region_exactly_when_it_can():
    boxes = [Box(f"k{i}", 4, 4) for i in range(16)]
    for strategy in STRATEGIES:
        positions = place(boxes, chain(boxes), (16, 16), strategy)
        assert bounding_box(boxes, positions) == (0, 0, 16, 16), strategy


def test_anneal_link_loads_stay_exact_through_moves_and_undos():
    """The annealer updates link loads incrementally; after many applied and reverted moves
    they must equal a fresh routing of the same positions, and their sum words x hops."""
    from compiler.placement import _Annealer, _greedy, _problem

    boxes = random_boxes(30, seed=4, biggest=6)
    rng = np.random.default_rng(4)
    traffic = chain(boxes, 7) + [
        (boxes[int(a)].name, boxes[int(b)].name, int(w))
        for a, b, w in zip(rng.integers(0, 30, 25), rng.integers(0, 30, 25),
                           rng.integers(1, 90, 25), strict=True)
    ]
    problem = _problem(boxes, traffic, WSE2, "anneal", 0)
    state = _Annealer(problem, _greedy(problem))
    moved = 0
    for step in range(300):
        moves = state.propose(rng)
        if moves is None:
            continue
        undo = state.apply(moves)
        moved += 1
        if step % 2:
            state.revert(undo)
    assert moved > 50
    fresh = _Annealer(problem, state.xy)  # routes all edges anew
    assert np.isclose(state.links.squares, fresh.links.squares)
    assert np.isclose(state.cost(), fresh.cost())
    assert np.allclose(np.sort(state.links.loads[state.links.loads > 0]),
                       np.sort(fresh.links.loads[fresh.links.loads > 0]))
    positions = {b.name: (int(x), int(y)) for b, (x, y) in zip(boxes, state.xy, strict=True)}
    check_placement(boxes, positions, WSE2)
    assert state.links.total == hop_words(boxes, positions, traffic)
