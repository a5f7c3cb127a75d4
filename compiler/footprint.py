"""Host memory a run config needs, estimated from its shapes before anything is built, so a
model too large for this machine is refused in one line naming the field that makes it so
(`wse_sim.hostmem.require`), not left to die in a numpy allocation or to swap.

What is counted (the big items only: the estimate is a lower bound, so what it refuses
could not have run):

* the graph: `BYTES_PER_OP` per op, its OpSpec, tensor specs and networkx node (measured
  with tracemalloc on gpt_tiny and gpt_small at 1 to 64 layers: 2.1 to 2.8 kB per op);
* the placement's owner grid over the whole wafer, 4 bytes per wafer PE
  (`compiler.placement.check_placement`, whatever the strategy);
* compile: the initial weights in float64 (8 bytes per parameter), the kernels' SRAM
  images of them in float32 (4) and the program file's copy of those images (4);
* run: the reference's float64 value of every tensor of the graph (8 bytes per element;
  the weights among them are the initial ones, not a copy), the kernels' images (4 bytes
  per parameter) and the simulator's SRAM pool, where every weight sits in some PE (4).

Not counted: the kernels' instruction objects and the routing's tables, which scale
with the lowering's choices rather than with a shape (for gpt_small they are most of the
400 MB compile takes; for a model too large for the machine, the tensors above are).

Everything but the grid is linear in n_layers (the builder adds the same ops and tensors
per block), so a graph of one and of two blocks give the estimate of any depth exactly,
whatever n_layers is, without building it.

Blame: the estimate is a sum of three parts, the blocks (n_layers times one block's
share), the rest of the step, and the grid. Each part is taken as a product of sizes:
n_layers times the elements of the block's largest counted tensor (compile counts only
weights), the elements of the rest's largest counted tensor (a product of config sizes:
`wte.weight` is vocab_size x d_model, an attention matrix has seq_len**2 in it), width x
height. The field named is the largest factor of the largest part.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from compiler.config import RunConfig
from compiler.gpt import build_graph
from compiler.graph import TrainingGraph
from wse_sim.hostmem import Footprint

BYTES_PER_OP = 2100
SIZE_FIELDS = ("model.vocab_size", "model.n_ctx", "model.d_model", "model.n_heads",
               "model.d_ffn", "training.batch_size", "training.seq_len")
# Tensors of the first block: `h0.*`, and their gradients, shares and updates
# (`grad:h0.*`, `grad:X@h0.*`, `updated:h0.*`); see compiler/graph.py for the names.
_FIRST_BLOCK = re.compile(r"(^|[:@])h0\.")
_GRID_BYTES_PER_PE = 4


@dataclass(frozen=True)
class _Counts:
    """What a graph holds: ops, tensor elements and parameters."""

    ops: int
    elements: int
    parameters: int

    @classmethod
    def of(cls, graph: TrainingGraph) -> _Counts:
        return cls(len(graph.ops), sum(t.numel for t in graph.tensors.values()),
                   sum(graph.tensors[p].numel for p in graph.parameters))

    def bytes(self, *, reference: bool) -> int:
        if reference:  # run: float64 reference of every tensor, images and SRAM pool
            return BYTES_PER_OP * self.ops + 8 * self.elements + (4 + 4) * self.parameters
        return BYTES_PER_OP * self.ops + (8 + 4 + 4) * self.parameters  # compile


def _resized(cfg: RunConfig, sizes: dict[str, int]) -> RunConfig:
    """`cfg` with other sizes (dotted field names), unvalidated: only the shapes are
    wanted, not a runnable config."""
    sections: dict[str, dict[str, int]] = {}
    for name, value in sizes.items():
        section, field = name.split(".")
        sections.setdefault(section, {})[field] = value
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=fields)
                                  for section, fields in sections.items()})


def _value(cfg: RunConfig, field: str) -> int:
    section, name = field.split(".")
    return getattr(getattr(cfg, section), name)


def _block_graphs(cfg: RunConfig) -> tuple[TrainingGraph, _Counts, _Counts]:
    """The one-block graph, and the counts of the rest of the step and of one block."""
    one = build_graph(_resized(cfg, {"model.n_layers": 1}))
    c1, c2 = _Counts.of(one), _Counts.of(build_graph(_resized(cfg, {"model.n_layers": 2})))
    block = _Counts(c2.ops - c1.ops, c2.elements - c1.elements, c2.parameters - c1.parameters)
    rest = _Counts(c1.ops - block.ops, c1.elements - block.elements,
                   c1.parameters - block.parameters)
    return one, rest, block


def graph_footprint(cfg: RunConfig) -> Footprint:
    """What `build_graph(cfg)` holds: `BYTES_PER_OP` per op."""
    _, rest, block = _block_graphs(cfg)
    ops = rest.ops + cfg.model.n_layers * block.ops
    return Footprint("the graph", BYTES_PER_OP * ops, lambda: (
        "model.n_layers", f"{ops:,} ops, {block.ops} per block, at ~{BYTES_PER_OP:,} B each"))


def step_footprint(cfg: RunConfig, *, reference: bool) -> Footprint:
    """What compiling the step of `cfg` allocates (and, with `reference`, running and
    checking it); see the module docstring."""
    one, rest, block = _block_graphs(cfg)
    layers = cfg.model.n_layers
    grid = _GRID_BYTES_PER_PE * cfg.wafer.width * cfg.wafer.height
    parts = {"rest": rest.bytes(reference=reference),
             "blocks": layers * block.bytes(reference=reference), "grid": grid}
    what = "the step" if reference else "compiling the step"

    def blame() -> tuple[str, str]:
        part = max(parts, key=parts.__getitem__)
        if part == "grid":
            field = "wafer.width" if cfg.wafer.width >= cfg.wafer.height else "wafer.height"
            return field, (f"the placement grid of {cfg.wafer.width:,} x "
                           f"{cfg.wafer.height:,} PEs")
        in_block = part == "blocks"
        counted = one.tensors if reference else one.parameters  # compile keeps weights only
        name = max((n for n in counted if bool(_FIRST_BLOCK.search(n)) == in_block),
                   key=lambda n: one.tensors[n].numel)
        factors = _factors(cfg, one, name)
        if in_block:
            factors["model.n_layers"] = layers
        field = max(factors, key=factors.__getitem__)
        shape = " x ".join(f"{n:,}" for n in one.tensors[name].shape)
        count = f"{layers:,} blocks, " if in_block else ""
        return field, f"{count}largest tensor {name} {shape}"

    return Footprint(what, sum(parts.values()), blame)


def _factors(cfg: RunConfig, graph: TrainingGraph, tensor: str) -> dict[str, int]:
    """How much each size field multiplies `tensor`'s elements: value**k where doubling
    the field multiplies them by 2**k (k > 0)."""
    elements = graph.tensors[tensor].numel
    factors = {}
    for field in SIZE_FIELDS:
        value = _value(cfg, field)
        doubled = build_graph(_resized(cfg, {"model.n_layers": 1, field: 2 * value}))
        power = round(math.log2(doubled.tensors[tensor].numel / elements))
        if power > 0:
            factors[field] = value**power
    return factors
