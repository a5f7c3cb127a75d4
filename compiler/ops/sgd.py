"""The SGD update: updated:P = P - lr * grad:P, one op per parameter.

Graph: kind `sgd_update` (attributes lr, parameter), added by `GraphBuilder.updates`;
2 FLOPs per element. There is no kernel of its own: the update is a local vector FMA on the
PEs that hold the parameter and its gradient, emitted by the parameter's kernel (one
instruction of n elements: n cycles).
"""

from __future__ import annotations

import numpy as np

from compiler.graph import OpSpec
from compiler.ops.base import OpFamily, Tensors


def sgd_update(param: np.ndarray, grad: np.ndarray, lr: float) -> np.ndarray:
    return param - lr * grad


class Sgd(OpFamily):
    kinds = ("sgd_update",)

    def forward(self, op: OpSpec, t: Tensors) -> None:
        param, grad = op.inputs
        t[op.outputs[0]] = sgd_update(t[param], t[grad], op.attrs["lr"])


FAMILY = Sgd()
