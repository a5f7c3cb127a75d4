"""What an op family module provides, and how the rest of the compiler uses it.

A family module (one per kind of op, e.g. `compiler.ops.softmax`) holds everything about
its op in one place, in four parts:

1. the graph spec: a function that adds the forward op to a `GraphBuilder` with its shapes
   and FLOP counts (the backward twin and the update follow from it);
2. the numpy math: `<op>_forward` and `<op>_backward`, pure functions over arrays with the
   same argument names, the oracle the reference and the tests use;
3. the kernel builder: the dataflow program of the forward op, its backward twin and the
   updates of its parameters on a rectangle of PEs (and the rectangle's size without
   building it, `pes`);
4. the cost: executable `cycles(...)` and `sram_words(...)` of that kernel, which its
   docstring derives and its test checks against the simulator.

The module ends with its `OpFamily` object, which adapts parts 2 and 3 to graph ops: the
reference (`compiler.reference`) calls `evaluate` for every op in order, the lowering
(`compiler.lower`) calls `lower` for every op. `compiler.ops.FAMILIES` is the registry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from compiler.graph import BACKWARD_SUFFIX, OpSpec

if TYPE_CHECKING:
    from compiler.lower import LoweringContext
    from compiler.lowering.kernel import Kernel

Tensors = dict[str, np.ndarray]


class OpFamily:
    """Adapter of one family's numpy math and kernel builder to graph ops."""

    kinds: tuple[str, ...] = ()  # the forward op kinds of the family

    def forward(self, op: OpSpec, t: Tensors) -> None:
        """Compute the outputs of forward op `op` from its inputs, all by name in `t`."""
        raise NotImplementedError(f"{type(self).__name__}: no forward for {op.kind}")

    def backward(self, op: OpSpec, t: Tensors) -> None:
        """Compute the outputs (input gradients) of backward op `op` from its inputs (output
        gradients, then saved tensors)."""
        raise NotImplementedError(f"{type(self).__name__}: no backward for {op.kind}")

    def evaluate(self, op: OpSpec, t: Tensors) -> None:
        """`forward` or `backward`, whichever `op` is."""
        if op.kind.endswith(BACKWARD_SUFFIX):
            self.backward(op, t)
        else:
            self.forward(op, t)

    def lower(self, ctx: LoweringContext, op: OpSpec) -> Kernel | None:
        """The kernel that forward op `op` starts (with its backward twin and updates), or
        None when another family's kernel implements it (a fusion)."""
        return None

    def pes(self, ctx: LoweringContext, op: OpSpec) -> int:
        """The PEs of the kernel `lower` builds for `op` (0 for none), from the plan's lanes
        alone, without building it: what a sizer weighs against a PE budget."""
        return 0


def token_batch(op: OpSpec, tokens: np.ndarray) -> np.ndarray:
    """The graph's `tokens` [B T, 1] as the [B, T] batch (`op` has batch and seq_len)."""
    return tokens.reshape(op.attrs["batch"], op.attrs["seq_len"])
