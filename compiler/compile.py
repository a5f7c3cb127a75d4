"""The compiler pipeline: config -> graph -> kernels -> placement -> orientation -> routing
-> Program.

`compile_step(cfg)` runs every stage once and keeps each stage's product in a `Compiled`,
so reports and benchmarks can look at any of them.
"""

from __future__ import annotations

import gc
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from compiler.config import RunConfig
from compiler.gpt import build_graph
from compiler.graph import TrainingGraph
from compiler.inputs import Batch, init_params, make_batch
from compiler.lower import choose_plan, lower
from compiler.lowering.kernel import Kernel
from compiler.orient import Flip, flip_kernel, orientations
from compiler.placement import Box, hop_words, place
from compiler.plan import Plan
from compiler.routing import Linked, link, program_elements
from wse_sim.program import Kind


@dataclass
class Compiled:
    cfg: RunConfig
    graph: TrainingGraph
    params: dict[str, np.ndarray]  # initial weights (float64, the reference's)
    batch: Batch  # the step's batch; the program's code is built for its first micro-batch
    plan: Plan
    kernels: list[Kernel]
    placement: str
    boxes: list[Box]
    flips: dict[str, Flip]  # how each kernel is mirrored (compiler.orient)
    traffic: list[tuple[str, str, int]]  # (producer kernel, consumer kernel, words)
    linked: Linked
    seconds: float  # wall time of the whole compilation

    @property
    def code_batch(self) -> Batch:
        """The (micro-)batch the program's code is built for: the batch's first."""
        return self.batch.micro_batches(self.cfg.training.micro_batch)[0]

    @property
    def hop_words(self) -> int:
        """Words x Manhattan hops between kernel centres (the placement's own metric)."""
        return hop_words(self.boxes, self.linked.positions, self.traffic)


def kernel_traffic(kernels: list[Kernel]) -> list[tuple[str, str, int]]:
    """Words each kernel sends each other kernel: every output lane's wavelet count, once
    per consuming kernel (a multicast reaches each consumer)."""
    producers = {}
    for kernel in kernels:
        for end in kernel.outputs:
            words = program_elements(kernel.programs[end.pes[0]], Kind.FABOUT)[end.stream]
            producers[(end.tensor, end.lane)] = (kernel.name, words)
    words: dict[tuple[str, str], int] = defaultdict(int)
    for kernel in kernels:
        # each lane once, in declaration order (a set's order would vary by process)
        for key in dict.fromkeys((end.tensor, end.lane) for end in kernel.inputs):
            src, count = producers[key]
            words[(src, kernel.name)] += count
    return [(src, dst, n) for (src, dst), n in words.items()]


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cycle collector off for a compilation: lowering and routing build millions
    of small objects that live until the Program is built and form almost no cycles, so its
    full passes over them reclaimed nothing and took about a seventh of gpt_small's compile
    time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def compile_step(cfg: RunConfig, placement: str | None = None,
                 batch: Batch | None = None) -> Compiled:
    """Compile one training step of `cfg` (placement strategy from the config unless given)
    for `batch` (default: the synthetic batch of `make_batch`): the graph and the code of one
    micro-batch (`training.micro_batch_size`; the whole batch unless set)."""
    return compile_graph(cfg, build_graph(cfg, cfg.training.micro_batch), init_params(cfg),
                         batch or make_batch(cfg), placement)


def compile_graph(cfg: RunConfig, graph: TrainingGraph, params: dict[str, np.ndarray],
                  batch: Batch, placement: str | None = None) -> Compiled:
    """Lower, place, orient and route `graph` (a training step's, or a forward-only graph
    of `compiler.generate`) with the weights `params`, its code built for the first
    micro-batch of `batch`."""
    started = time.perf_counter()
    strategy = placement or cfg.compile.placement
    first = batch.micro_batches(cfg.training.micro_batch)[0]
    with _collector_paused():
        plan = choose_plan(graph, first)
        kernels = lower(graph, params, first, plan)
        boxes = [Box(k.name, k.width, k.height) for k in kernels]
        traffic = kernel_traffic(kernels)
        positions = place(boxes, traffic, (cfg.wafer.width, cfg.wafer.height), strategy,
                          seed=cfg.compile.seed)
        # mirror kernels so lane bundles cross less
        flips = dict(zip([k.name for k in kernels], orientations(kernels, positions),
                         strict=True))
        kernels = [flip_kernel(k, flips[k.name]) for k in kernels]
        linked = link(kernels, positions, cfg.wafer)
    return Compiled(cfg, graph, params, batch, plan, kernels, strategy, boxes, flips, traffic,
                    linked, time.perf_counter() - started)
