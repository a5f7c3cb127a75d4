"""The memory service of weight-streaming mode (Cerebras' MemoryX): it holds the weights and
the optimizer state off the wafer, streams each layer's weights to the wafer's edge, takes
the weight gradients back and applies the optimizer itself.

Arithmetic: `compiler.optim`'s optimizers in float32 (the service's numbers), on the
gradients the wafer sent; the check compares them with the same optimizer in float64.

Time (coarse, not simulated cycle by cycle). The service updates a layer once all of its
gradient words have arrived, at `wafer.optimizer_params_per_s` parameters a second, one
layer after another in the order their gradients complete (`update_queue`); it keeps pace
with the gradients as they come (its rate is at least the edge's word rate by default), so
what is exposed is mostly the update of the layer whose gradients arrive last, the first
layer (the backward runs from the last layer down), and it ends the step. MemoryX's
description says the same: weight fetches pipeline behind the previous layer's compute
"except at the boundary between training iterations, when weights are updated"
(cerebras.net/glossary/memoryx).
"""

from __future__ import annotations

import numpy as np

from compiler.config import TrainingConfig
from compiler.optim import OptimizerState, optimizer_step
from wse_sim.hardware import WaferConfig


def apply_update(training: TrainingConfig, params: dict[str, np.ndarray],
                 grads: dict[str, np.ndarray], state: OptimizerState
                 ) -> tuple[dict[str, np.ndarray], OptimizerState]:
    """The service's optimizer step, in float32."""
    return optimizer_step(training, params, grads, state, dtype=np.float32)


def update_seconds(parameters: int, wafer: WaferConfig) -> float:
    """Seconds the service takes to update `parameters` parameters."""
    return parameters / wafer.optimizer_params_per_s


def update_queue(completions: list[tuple[str, float, int]], wafer: WaferConfig
                 ) -> list[dict[str, object]]:
    """The service's updates, one after another: for each (what, second its gradients
    were complete, parameters), when its update starts and ends."""
    free, out = 0.0, []
    for what, ready, parameters in completions:
        start = max(free, ready)
        free = start + update_seconds(parameters, wafer)
        out.append({"what": what, "parameters": parameters, "gradients_complete_seconds": ready,
                    "start_seconds": start, "end_seconds": free})
    return out
