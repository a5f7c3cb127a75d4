"""Attention softmax: P = softmax over each head's T key columns of S [M, H*T], and its
backward dS = P * (dP - rowsum(dP * P)).

Graph: kind `softmax`, input the masked scores, output P (saved for the backward, which
needs only P). FLOPs per element: forward 5 (max, subtract, exp, sum, divide), backward 4
(product, sum, subtract, product).

Kernel: none of its own. The attention kernel (`compiler.ops.attention`) computes the
softmax where the scores are, one row and one head at a time over the keys a PE holds,
with `partial_softmax` below; the partial softmaxes of a row combine as in flash
attention, and the backward recomputes P from the row's statistics.

`partial_softmax` over n scores in SRAM: the max into a register accumulator (one MOV to
seed it, n MAX, one MOV out), the scores minus the max and their exp in place (2 n), their
sum (1 + n + 1): 4 n + 4 cycles.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from compiler.graph import GraphBuilder, OpSpec
from compiler.lowering.ir import Imm, Instr, Mem, Op, Reg, vec
from compiler.ops.base import OpFamily, Tensors

FORWARD_FLOPS = 5  # per element
BACKWARD_FLOPS = 4


def add_softmax(b: GraphBuilder, name: str, scores: str, heads: dict[str, Any]) -> str:
    """The softmax op over masked `scores`; `heads` are the attention attributes."""
    return b.elementwise(name, "softmax", (scores,), (FORWARD_FLOPS, BACKWARD_FLOPS),
                         saved=(f"{name}.out",), attrs=heads)


# -- numpy ------------------------------------------------------------------------------------


def softmax_forward(s: np.ndarray, heads: int) -> np.ndarray:
    """P [M, H*T]: softmax of each head's T columns of s (-inf entries give exactly 0)."""
    rows = s.shape[0]
    s3 = s.reshape(rows, heads, -1)
    p = np.exp(s3 - s3.max(axis=2, keepdims=True))
    p /= p.sum(axis=2, keepdims=True)
    return p.reshape(s.shape)


def softmax_backward(dp: np.ndarray, p: np.ndarray, heads: int) -> np.ndarray:
    """dS = P * (dP - rowsum(dP * P)) per head."""
    rows = p.shape[0]
    p3, dp3 = p.reshape(rows, heads, -1), dp.reshape(rows, heads, -1)
    return (p3 * (dp3 - (dp3 * p3).sum(axis=2, keepdims=True))).reshape(p.shape)


# -- the per-row softmax the attention kernel runs ---------------------------------------------


def partial_softmax(n: int, scores: int, *, mu: int, total: int, acc: int) -> list[Instr]:
    """Over the n scores at word `scores`: mu = their max, scores = exp(scores - mu) in
    place, total = their sum (see the module docstring); register `acc` is scratch."""
    return [
        vec(Op.MOV, 1, Reg(acc), Imm(float("-inf"))),
        vec(Op.MAX, n, Reg(acc), Mem(scores), Reg(acc)),
        vec(Op.MOV, 1, Mem(mu), Reg(acc)),
        vec(Op.SUB, n, Mem(scores), Mem(scores), Mem(mu, 0)),
        vec(Op.EXP, n, Mem(scores), Mem(scores)),
        vec(Op.MOV, 1, Reg(acc), Imm(0.0)),
        vec(Op.ADD, n, Reg(acc), Mem(scores), Reg(acc)),
        vec(Op.MOV, 1, Mem(total), Reg(acc)),
    ]


def partial_softmax_cycles(n: int) -> int:
    return 4 * n + 4


class Softmax(OpFamily):
    kinds = ("softmax",)

    def forward(self, op: OpSpec, t: Tensors) -> None:
        (s,) = op.inputs
        t[op.outputs[0]] = softmax_forward(t[s], op.attrs["heads"])

    def backward(self, op: OpSpec, t: Tensors) -> None:
        dp, p = op.inputs
        t[op.outputs[0]] = softmax_backward(t[dp], t[p], op.attrs["heads"])



FAMILY = Softmax()
