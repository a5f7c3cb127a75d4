"""The optimizer update of every parameter: SGD or AdamW, one op per parameter, applied on
the PEs that hold the parameter, its gradient and (AdamW) its moments.

Graph (`add_updates`): op `P.update`, kind `update`, attribute `rule` (an `UpdateRule`) and
`parameter`. SGD reads (P, grad:P) and writes updated:P. AdamW also reads its moments
`adam.m:P`, `adam.v:P` and the step count `optimizer.step` (the updates applied so far),
and writes updated:adam.m:P and updated:adam.v:P. Every update is in place: on the wafer
updated:X occupies the words that held X, so the words the check reads after a step are
the ones the next step starts from (`compiler.state`). FLOPs per element: SGD 2 (one FMA),
AdamW `ADAMW_FLOPS` plus one for the weight decay where `compiler.optim.decays` applies it.

Numpy: `compiler.optim` (`sgd_tensor`, `adamw_tensor`), the same functions the training
loop's float64 reference uses: one implementation of each optimizer.

Kernel: there is none of its own. `emit_update` is the one update emitter every kernel that
holds a parameter calls, after its backward, on the thread that accumulated the gradient
(thread 0), for each block of a parameter it holds (a contiguous run of words of the
parameter, and of its gradient at another offset, with the same layout); it also declares
the block's result slots: grad:P, updated:P and, for AdamW, the updated moments, which it
allocates next to the weights (2 words per parameter word). The code of a micro-batch
before a step's last (`UpdateRule.deferred`, `compiler.batch`) allocates and declares the
same words but emits no update: its gradients only accumulate.

SGD: one vector FMA, p = g * (-lr) + p: n cycles for n words.

AdamW (torch.optim.AdamW's order, see `compiler.optim`). Once per PE, before its first
block, the step scalars, from a per-PE step count t kept in SRAM (state `optimizer.step`,
one copy per PE, all equal): t += 1; c1 = 1 - beta1^t and c2 = 1 - beta2^t as
1 - exp(t ln beta) (beta = 0 gives 1); s1 = -lr / c1; s2 = 1 / sqrt(c2): 9 cycles. Then per
element, a REPEAT over the block with a body of single-element instructions whose
temporaries live in one register (`UPDATE_REG`), so the update needs no scratch SRAM:

    p *= 1 - lr wd                       (parameters that decay)
    m = m * beta1;  m = g (1 - beta1) + m
    r = g g;  v = v * beta2;  v = r (1 - beta2) + v
    r = sqrt(v);  r = r s2 + eps;  r = m / r;  p = r s1 + p

i.e. p -= lr m_hat / (sqrt(v_hat) + eps): 9 cycles per word, 10 with the decay. The update
runs last on thread 0, when every other thread of the PE has finished (their work is what
thread 0 waited for), so the register is free.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from compiler.graph import GraphBuilder, OpSpec, grad_name, updated_name
from compiler.lowering.ir import Imm, Instr, Mem, Op, Reg, repeat, vec
from compiler.lowering.kernel import TOKEN_REG, Kernel, LocalPE, ResultSlot
from compiler.ops.base import OpFamily, Tensors
from compiler.optim import adamw_tensor, decays, sgd_tensor

if TYPE_CHECKING:
    from compiler.config import TrainingConfig

STEP_TENSOR = "optimizer.step"  # AdamW: the number of updates applied before this step
SGD_FLOPS = 2  # per parameter element
ADAMW_FLOPS = 13  # per element: moments 6, sqrt, scale and eps 3, divide 1, step 2 (+1 decay)
UPDATE_REG = TOKEN_REG - 1  # AdamW's per-element temporary


def moment_names(parameter: str) -> tuple[str, str]:
    """AdamW's first and second moment of `parameter`."""
    return f"adam.m:{parameter}", f"adam.v:{parameter}"


def state_names(tensors: Collection[str], parameters: list[str]) -> list[str]:
    """The tensors a step leaves for the next one, as named after the step: every updated
    parameter and, where `tensors` (a graph's or a program's) has them, AdamW's updated
    moments and step count."""
    names = [updated_name(p) for p in parameters]
    names += [updated_name(m) for p in parameters for m in moment_names(p)
              if updated_name(m) in tensors]
    return names + [name for name in (updated_name(STEP_TENSOR),) if name in tensors]


@dataclass(frozen=True)
class UpdateRule:
    """The optimizer and its hyperparameters, as the graph and the kernels apply them.
    `weight_decay` is the optimizer's; a parameter gets it where `decays(name)`."""

    optimizer: Literal["sgd", "adamw"]
    lr: float
    beta1: float = 0.0
    beta2: float = 0.0
    eps: float = 0.0
    weight_decay: float = 0.0
    # The code of a micro-batch before a step's last: its gradient only accumulates, the
    # update waits for the last (same words allocated and declared, no instructions).
    deferred: bool = False

    @classmethod
    def of(cls, training: TrainingConfig) -> UpdateRule:
        if training.optimizer == "sgd":
            return cls("sgd", training.lr)
        return cls("adamw", training.lr, training.beta1, training.beta2, training.eps,
                    training.weight_decay)

    def decay_of(self, parameter: str) -> float:
        """The weight decay `parameter` gets (0 for a bias or a LayerNorm parameter)."""
        return self.weight_decay if decays(parameter) else 0.0


def add_updates(b: GraphBuilder) -> None:
    """One update op per parameter, after the backward (see the module docstring)."""
    rule = UpdateRule.of(b.cfg.training)
    adamw = rule.optimizer == "adamw"
    step = (b.tensor(STEP_TENSOR, (1, 1), "state"),) if adamw else ()
    for p in b.parameters:
        shape, numel = b.shape(p), b.tensors[p].numel
        moments = tuple(b.tensor(n, shape, "state") for n in moment_names(p)) if adamw else ()
        outputs = tuple(b.tensor(updated_name(t), shape, b.tensors[t].kind)
                        for t in (p, *moments))
        per_element = (ADAMW_FLOPS + (rule.decay_of(p) > 0)) if adamw else SGD_FLOPS
        b.op(f"{p}.update", "update", "update", (p, grad_name(p), *moments, *step), outputs,
             per_element * numel, attrs={"rule": rule, "parameter": p})


# -- kernel -----------------------------------------------------------------------------------


def emit_update(kernel: Kernel, pe: LocalPE, rule: UpdateRule, parameter: str,
                shape: tuple[int, int], *, weight: int, grad: int, rows: tuple[int, int],
                cols: tuple[int, int], row_stride: int, col_stride: int = 1) -> None:
    """Update the block of `parameter` (shape `shape`) that PE `pe` holds at word `weight`
    with its gradient at `grad`, and declare the block's result slots: element (r, c) of
    `parameter[rows[0]:rows[1], cols[0]:cols[1]]` is at `weight + (r - rows[0]) *
    row_stride + (c - cols[0]) * col_stride`, and the block fills its words exactly."""
    words = (rows[1] - rows[0]) * (cols[1] - cols[0])
    last = (rows[1] - rows[0] - 1) * row_stride + (cols[1] - cols[0] - 1) * col_stride
    if last != words - 1:
        raise ValueError(f"{kernel.name}: the block of {parameter} on PE {pe} is not "
                         f"contiguous ({words} elements reach word {last})")
    slots = {grad_name(parameter): grad, updated_name(parameter): weight}
    if rule.optimizer == "sgd":
        update = [vec(Op.FMA, words, Mem(weight), Mem(grad), Imm(-rule.lr), Mem(weight))]
    else:
        m = kernel.alloc(pe, words, f"AdamW first moment of {parameter}")
        v = kernel.alloc(pe, words, f"AdamW second moment of {parameter}")
        s1, s2 = _step_scalars(kernel, pe, rule)
        update = repeat(words, _adamw_element(rule, rule.decay_of(parameter), weight, grad, m,
                                              v, s1, s2))
        for name, offset in zip(moment_names(parameter), (m, v), strict=True):
            slots[updated_name(name)] = offset
    if not rule.deferred:
        kernel.emit(pe, *update)
    for tensor, offset in slots.items():
        kernel.results.append(ResultSlot(tensor, pe, offset, rows, cols, row_stride,
                                         col_stride))
        kernel.shapes[tensor] = shape


def _step_scalars(kernel: Kernel, pe: LocalPE, rule: UpdateRule) -> tuple[int, int]:
    """The words of s1 and s2 on `pe`; before the PE's first block, the step count and the
    instructions that advance it and compute the scalars (module docstring)."""
    step_slot = updated_name(STEP_TENSOR)
    for slot in kernel.results:
        if slot.tensor == step_slot and slot.pe == pe:
            return slot.offset + 1, slot.offset + 2
    step = kernel.alloc(pe, 3, "AdamW step count, -lr / (1 - beta1^t), 1 / sqrt(1 - beta2^t)")
    s1, s2 = step + 1, step + 2
    if not rule.deferred:
        kernel.emit(pe, vec(Op.ADD, 1, Mem(step), Mem(step), Imm(1.0)),
                    *_bias_correction(step, s1, rule.beta1),
                    vec(Op.DIV, 1, Mem(s1), Imm(-rule.lr), Mem(s1)),
                    *_bias_correction(step, s2, rule.beta2),
                    vec(Op.RSQRT, 1, Mem(s2), Mem(s2)))
    kernel.results.append(ResultSlot(step_slot, pe, step, (0, 1), (0, 1), 1))
    kernel.shapes[step_slot] = (1, 1)
    return s1, s2


def _bias_correction(step: int, dst: int, beta: float) -> list[Instr]:
    """dst = 1 - beta^t for the step count t at word `step`."""
    if beta == 0.0:
        return [vec(Op.MOV, 1, Mem(dst), Imm(1.0))]
    return [vec(Op.MUL, 1, Mem(dst), Mem(step), Imm(math.log(beta))),
            vec(Op.EXP, 1, Mem(dst), Mem(dst)),
            vec(Op.FMA, 1, Mem(dst), Mem(dst), Imm(-1.0), Imm(1.0))]


def _adamw_element(rule: UpdateRule, decay: float, weight: int, grad: int, m: int, v: int,
                   s1: int, s2: int) -> list[Instr]:
    """The REPEAT body that updates one element (module docstring)."""
    p, g, mm, vv = (Mem(offset, 1, 1) for offset in (weight, grad, m, v))
    r = Reg(UPDATE_REG)
    body = [vec(Op.MUL, 1, p, p, Imm(1.0 - rule.lr * decay))] if decay else []
    return body + [
        vec(Op.MUL, 1, mm, mm, Imm(rule.beta1)),
        vec(Op.FMA, 1, mm, g, Imm(1.0 - rule.beta1), mm),
        vec(Op.MUL, 1, r, g, g),
        vec(Op.MUL, 1, vv, vv, Imm(rule.beta2)),
        vec(Op.FMA, 1, vv, r, Imm(1.0 - rule.beta2), vv),
        vec(Op.SQRT, 1, r, vv),
        vec(Op.FMA, 1, r, r, Mem(s2, 0), Imm(rule.eps)),
        vec(Op.DIV, 1, r, mm, r),
        vec(Op.FMA, 1, p, r, Mem(s1, 0), p),
    ]


# -- cost -------------------------------------------------------------------------------------


def update_cycles(rule: UpdateRule, words: int, *, decay: bool, first_on_pe: bool) -> int:
    """Cycles of one block's update: n for SGD; for AdamW 9 n (10 n with the decay), plus
    the step scalars' 9 before a PE's first block."""
    if rule.optimizer == "sgd":
        return words
    return (10 if decay else 9) * words + (9 if first_on_pe else 0)


class Update(OpFamily):
    kinds = ("update",)

    def forward(self, op: OpSpec, t: Tensors) -> None:
        rule, p = op.attrs["rule"], op.attrs["parameter"]
        dtype = t[p].dtype
        if rule.optimizer == "sgd":
            t[op.outputs[0]] = sgd_tensor(t[p], t[grad_name(p)], rule.lr, dtype)
            return
        _, grad, m, v, step = op.inputs
        new = adamw_tensor(t[p], t[grad], t[m], t[v], step=int(t[step][0, 0]) + 1, lr=rule.lr,
                           beta1=rule.beta1, beta2=rule.beta2, eps=rule.eps,
                           weight_decay=rule.decay_of(p), dtype=dtype)
        for name, value in zip(op.outputs, new, strict=True):
            t[name] = value


FAMILY = Update()
