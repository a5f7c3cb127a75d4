"""The numpy golden model of one training step: the graph, op by op, in float64.

`reference_step` walks the step's graph (`compiler.gpt`) in topological order and computes
every op with its family's numpy function (`compiler.ops`): forward, backward and update
(SGD or AdamW, `compiler.optim`), without autograd, like llm.c's pairs of forward and
backward calls. Every value is stored
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
from compiler.inputs import Batch
from compiler.ops import family_of
from compiler.ops.update import STEP_TENSOR, moment_names
from compiler.optim import OptimizerState, init_state

Arrays = dict[str, np.ndarray]


@dataclass
class ReferenceResult:
    """One step's results. `logits` is `(B*T, vocab)`; `grads` and `updated` are keyed by
    parameter name; `state` is the optimizer's state after the step (AdamW's moments and
    step count); `tensors` holds every tensor of the graph (inputs, parameters,
    activations, gradients and their shares, updated parameters and state) by graph name."""

    loss: float
    logits: np.ndarray
    grads: Arrays
    updated: Arrays
    state: OptimizerState
    tensors: Arrays


def _run(graph: TrainingGraph, params: Arrays, batch: Batch, dtype: DTypeLike,
         phases: tuple[str, ...], state: OptimizerState | None = None) -> Arrays:
    t: Arrays = {name: np.asarray(value, dtype=dtype) for name, value in params.items()}
    t["tokens"] = batch.tokens.reshape(-1, 1).astype(np.int32)
    t["targets"] = batch.targets.reshape(-1, 1).astype(np.int32)
    if STEP_TENSOR in graph.tensors:  # AdamW
        state = state or init_state("adamw", params, dtype)
        t[STEP_TENSOR] = np.array([[state.step]], dtype)
        for p in graph.parameters:
            for name, moments in zip(moment_names(p), (state.m, state.v), strict=True):
                t[name] = np.asarray(moments[p], dtype)
    for name in graph.ops_in_order():
        op = graph.ops[name]
        if op.phase in phases:
            family_of(op).evaluate(op, t)
    return t


def forward(cfg: RunConfig, params: Arrays, batch: Batch,
            dtype: DTypeLike = np.float64) -> Arrays:
    """The forward pass in `dtype`: the inputs `tokens` and `targets` `(M, 1)`, the
    parameters and every forward activation by graph name (`lm_head.out` are the logits,
    `loss.out` the loss)."""
    return _run(build_graph(cfg), params, batch, dtype, ("forward",))


def reference_step(cfg: RunConfig, params: Arrays, batch: Batch,
                   dtype: DTypeLike = np.float64,
                   state: OptimizerState | None = None) -> ReferenceResult:
    """Forward, backward and optimizer update of `params` on `batch`, computed in `dtype`;
    `state` is the optimizer's state before the step (None: the first step's)."""
    graph = build_graph(cfg)
    t = _run(graph, params, batch, dtype, ("forward", "backward", "update"), state)
    step = 0 if state is None else state.step
    if STEP_TENSOR in graph.tensors:
        new_state = OptimizerState(
            step=step + 1,
            m={p: t[updated_name(moment_names(p)[0])] for p in graph.parameters},
            v={p: t[updated_name(moment_names(p)[1])] for p in graph.parameters})
    else:
        new_state = OptimizerState(step=step + 1)
    return ReferenceResult(
        loss=float(t["loss.out"][0, 0]),
        logits=t["lm_head.out"],
        grads={p: t[grad_name(p)] for p in graph.parameters},
        updated={p: t[updated_name(p)] for p in graph.parameters},
        state=new_state,
        tensors=t,
    )


def mean_loss(cfg: RunConfig, params: Arrays, windows: np.ndarray,
              dtype: DTypeLike = np.float64) -> float:
    """The mean cross-entropy of the model `params` over `windows` (N, T + 1): every
    window's T predictions, all windows in one forward pass of batch N."""
    training = cfg.training.model_copy(update={"batch_size": len(windows)})
    return float(forward(cfg.model_copy(update={"training": training}), params,
                         Batch.from_windows(windows), dtype)["loss.out"][0, 0])
