"""The compiler pipeline: config -> graph -> kernels -> placement -> orientation -> routing
-> Program.

`compile_step(cfg)` runs every stage once and keeps each stage's product in a `Compiled`,
so reports and benchmarks can look at any of them.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from compiler.config import RunConfig
from compiler.gpt import build_graph
from compiler.graph import TrainingGraph
from compiler.inputs import init_params, make_batch
from compiler.lower import choose_plan, lower
from compiler.lowering.kernel import Kernel
from compiler.orient import orient
from compiler.placement import Box, hop_words, place
from compiler.plan import Plan
from compiler.routing import Linked, link, program_elements
from wse_sim.program import Kind


@dataclass
class Compiled:
    cfg: RunConfig
    graph: TrainingGraph
    params: dict[str, np.ndarray]  # initial weights (float64, the reference's)
    tokens: np.ndarray  # (B, T) the batch baked into the program
    plan: Plan
    kernels: list[Kernel]
    placement: str
    boxes: list[Box]
    traffic: list[tuple[str, str, int]]  # (producer kernel, consumer kernel, words)
    linked: Linked
    seconds: float  # wall time of the whole compilation

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
        for key in {(end.tensor, end.lane) for end in kernel.inputs}:
            src, count = producers[key]
            words[(src, kernel.name)] += count
    return [(src, dst, n) for (src, dst), n in words.items()]


def compile_step(cfg: RunConfig, placement: str | None = None) -> Compiled:
    """Compile one training step of `cfg` (placement strategy from the config unless given)."""
    started = time.perf_counter()
    strategy = placement or cfg.compile.placement
    graph = build_graph(cfg)
    params = init_params(cfg)
    tokens = make_batch(cfg)
    plan = choose_plan(graph, tokens)
    kernels = lower(graph, params, tokens, plan)
    boxes = [Box(k.name, k.width, k.height) for k in kernels]
    traffic = kernel_traffic(kernels)
    positions = place(boxes, traffic, (cfg.wafer.width, cfg.wafer.height), strategy,
                      seed=cfg.compile.seed)
    kernels = orient(kernels, positions)  # mirror kernels so lane bundles cross less
    linked = link(kernels, positions, cfg.wafer)
    return Compiled(cfg, graph, params, tokens, plan, kernels, strategy, boxes, traffic,
                    linked, time.perf_counter() - started)
