"""The optimizers' numpy reference: SGD and AdamW as pure functions over parameter dicts.

Parameters, gradients and moments are dicts of arrays keyed by the parameter names of
`compiler.graph` (`wte.weight`, `h0.attn.qkv.bias`, ...). Nothing is updated in place:
each step returns new parameters and a new `OptimizerState`, so a training loop can keep,
compare or checkpoint any step's state. Everything is computed in `dtype`: float64 (the
default) for the golden model, float32 to match the wafer (the moments are then float32
too, and numpy rounds the scalar hyperparameters to float32 as the wafer would).

SGD: `p - lr * g`, the update `compiler.reference.reference_step` applies.

AdamW: torch.optim.AdamW's documented algorithm (amsgrad off, no maximize), with its
order of operations; with t the step counter after this step:

    p = p * (1 - lr * weight_decay)          decoupled decay, before the moment update
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    p = p - (lr / (1 - beta1**t)) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

i.e. p -= lr * m_hat / (sqrt(v_hat) + eps) with the bias-corrected moments m_hat, v_hat.
(torch writes the first line as `m.lerp_(g, 1 - beta1)`, equal up to rounding.) The
learning rate is whatever the caller passes: schedules and gradient clipping belong to the
training loop.

Weight decay applies to the parameters `decays(name)` accepts: every weight matrix and
both embeddings (`wte`, `wpe`, untied `lm_head`), but no bias and no LayerNorm parameter
(`h{i}.ln1`, `h{i}.ln2`, `ln_f`). This is Cerebras-GPT's rule: the Cerebras model zoo
(`modelzoo/common/pytorch/utils.py`, `trainable_named_parameters` and
`group_optimizer_params`) puts every parameter whose name contains "bias" or that belongs
to a LayerNorm module in a group with weight decay 0, all others in the group with
`weight_decay_rate` (0.1 in the Cerebras-GPT configs). GPT-2 style code bases (minGPT)
agree on biases and LayerNorm. The rule is a function of the name alone, so the wafer's
update kernels can apply the same one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import DTypeLike

from compiler.config import TrainingConfig

Arrays = dict[str, np.ndarray]

# The LayerNorm modules of compiler.graph: h{i}.ln1, h{i}.ln2 and the final ln_f.
_LAYERNORM_MODULE = re.compile(r"ln(\d+|_f)")


def decays(name: str) -> bool:
    """Whether AdamW's weight decay applies to parameter `name` (see the module docstring):
    not to a bias, not to a LayerNorm weight or bias, to everything else."""
    module, _, leaf = name.rpartition(".")
    if leaf == "bias":
        return False
    return not _LAYERNORM_MODULE.fullmatch(module.rpartition(".")[2])


@dataclass(frozen=True)
class OptimizerState:
    """What an optimizer carries between steps. `step` counts the updates applied so far
    (AdamW's t of the last step); `m` and `v` are AdamW's first and second moments by
    parameter name (empty for SGD, which keeps nothing)."""

    step: int = 0
    m: Arrays = field(default_factory=dict)
    v: Arrays = field(default_factory=dict)


def init_state(optimizer: str, params: Arrays, dtype: DTypeLike = np.float64) -> OptimizerState:
    """The state before the first step: AdamW's moments are zero, SGD has none."""
    if optimizer == "sgd":
        return OptimizerState()
    if optimizer == "adamw":
        zeros = {name: np.zeros(np.shape(p), dtype) for name, p in params.items()}
        return OptimizerState(m=zeros, v={name: z.copy() for name, z in zeros.items()})
    raise ValueError(f"unknown optimizer {optimizer!r}")


def sgd_update(params: Arrays, grads: Arrays, lr: float, dtype: DTypeLike = np.float64) -> Arrays:
    """New parameters `p - lr * g`, in `dtype`."""
    return {name: sgd_tensor(p, grads[name], lr, dtype) for name, p in params.items()}


def sgd_tensor(p: np.ndarray, g: np.ndarray, lr: float, dtype: DTypeLike = np.float64
               ) -> np.ndarray:
    """One parameter's SGD step `p - lr * g`, in `dtype`."""
    return np.asarray(p, dtype) - lr * np.asarray(g, dtype)


def adamw_update(
    params: Arrays,
    grads: Arrays,
    state: OptimizerState,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    dtype: DTypeLike = np.float64,
) -> tuple[Arrays, OptimizerState]:
    """One AdamW step (torch.optim.AdamW, see the module docstring): the new parameters
    and the new state (moments and step counter), all in `dtype`."""
    t = state.step + 1
    new_params: Arrays = {}
    new_m: Arrays = {}
    new_v: Arrays = {}
    for name, p in params.items():
        new_params[name], new_m[name], new_v[name] = adamw_tensor(
            p, grads[name], state.m[name], state.v[name], step=t, lr=lr, beta1=beta1,
            beta2=beta2, eps=eps, weight_decay=weight_decay if decays(name) else 0.0,
            dtype=dtype)
    return new_params, OptimizerState(step=t, m=new_m, v=new_v)


def adamw_tensor(
    p: np.ndarray,
    g: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    dtype: DTypeLike = np.float64,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One parameter's AdamW step number `step` (t, from 1): its new value and moments, in
    `dtype`. `weight_decay` is the one this parameter gets (0 where `decays` says no)."""
    # Python floats, so numpy keeps the arrays' dtype (a numpy float64 scalar would not).
    step_size = lr / (1 - beta1**step)
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    p = np.asarray(p, dtype)
    g = np.asarray(g, dtype)
    if weight_decay:
        p = p * (1 - lr * weight_decay)
    m = beta1 * np.asarray(m, dtype) + (1 - beta1) * g
    v = beta2 * np.asarray(v, dtype) + (1 - beta2) * g * g
    denom = np.sqrt(v) / bias_correction2_sqrt + eps
    return p - step_size * m / denom, m, v


def optimizer_step(
    training: TrainingConfig,
    params: Arrays,
    grads: Arrays,
    state: OptimizerState,
    dtype: DTypeLike = np.float64,
) -> tuple[Arrays, OptimizerState]:
    """One step of the optimizer `training.optimizer` with the config's hyperparameters."""
    if training.optimizer == "sgd":
        return sgd_update(params, grads, training.lr, dtype), OptimizerState(step=state.step + 1)
    return adamw_update(
        params,
        grads,
        state,
        lr=training.lr,
        beta1=training.beta1,
        beta2=training.beta2,
        eps=training.eps,
        weight_decay=training.weight_decay,
        dtype=dtype,
    )
