"""The numpy golden model of one training step: the graph, op by op, in float64.

`reference_step` walks the step's graph (`compiler.gpt`) in topological order and computes
every op with its family's numpy function (`compiler.ops`): forward, backward and update,
without autograd, like llm.c's pairs of forward and backward calls. Every value is stored
under its graph name and in its graph shape, so a simulated tensor can be compared with its
reference by name. The computation runs in the `dtype` given (float64 for the check,
float32 to see what the wafer's arithmetic alone should give).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import DTypeLike

from compiler.config import RunConfig
from compiler.gpt import build_graph
from compiler.graph import TrainingGraph, grad_name, updated_name
from compiler.ops import family_of

Arrays = dict[str, np.ndarray]


@dataclass
class ReferenceResult:
    """One step's results. `logits` is `(B*T, vocab)`; `grads` and `updated` are keyed by
    parameter name; `tensors` holds every tensor of the graph (inputs, parameters,
    activations, gradients and their shares, updated parameters) by graph name."""

    loss: float
    logits: np.ndarray
    grads: Arrays
    updated: Arrays
    tensors: Arrays


def _run(graph: TrainingGraph, params: Arrays, tokens: np.ndarray, dtype: DTypeLike,
         phases: tuple[str, ...]) -> Arrays:
    t: Arrays = {name: np.asarray(value, dtype=dtype) for name, value in params.items()}
    t["tokens"] = tokens.reshape(-1, 1).astype(np.int32)
    for name in graph.ops_in_order():
        op = graph.ops[name]
        if op.phase in phases:
            family_of(op).evaluate(op, t)
    return t


def forward(cfg: RunConfig, params: Arrays, tokens: np.ndarray,
            dtype: DTypeLike = np.float64) -> Arrays:
    """The forward pass in `dtype`: the tokens `(M, 1)`, the parameters and every forward
    activation by graph name (`lm_head.out` are the logits, `loss.out` the loss)."""
    return _run(build_graph(cfg), params, tokens, dtype, ("forward",))


def reference_step(cfg: RunConfig, params: Arrays, tokens: np.ndarray,
                   dtype: DTypeLike = np.float64) -> ReferenceResult:
    """Forward, backward and SGD update of `params` on `tokens (B, T)`, computed in `dtype`."""
    graph = build_graph(cfg)
    t = _run(graph, params, tokens, dtype, ("forward", "backward", "update"))
    return ReferenceResult(
        loss=float(t["loss.out"][0, 0]),
        logits=t["lm_head.out"],
        grads={p: t[grad_name(p)] for p in graph.parameters},
        updated={p: t[updated_name(p)] for p in graph.parameters},
        tensors=t,
    )
