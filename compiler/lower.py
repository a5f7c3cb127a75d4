"""Graph -> kernels: which graph ops share a kernel, and the builder call for each.

Every op of the training-step graph lands in exactly one kernel. A forward op, its backward
twin and the SGD updates of its parameters share one kernel (the backward needs the stored
activations and the weights; the update is local where weight and gradient sit). Fusions,
each exact:

* `embed` and `lm_head` (tied embeddings) are one kernel holding the single copy of
  `wte.weight`, so `wte.weight.grad_acc` (the sum of both uses' gradients) happens in place.
* `attn.mask` (and its backward, the identity on unmasked entries) is applied by the scores
  kernel, which writes exactly -inf above the diagonal.
* The three QKV outputs q, k, v are the column blocks of one [M, 3d] stream tensor
  `{op}.out` whose lanes the attention kernels pick (lane h of q is head h).

Other ops map one to one: matmul -> `build_linear`, layernorm, gelu, add (forward residuals
and backward `grad_acc` sums alike: `build_add`), softmax, attn_values, cross_entropy.
"""

from __future__ import annotations

import numpy as np

from compiler.graph import TrainingGraph
from compiler.lowering.attention import (
    attn_layout,
    build_attn_scores,
    build_attn_values,
    fit_row_groups,
)
from compiler.lowering.cross_entropy import build_cross_entropy
from compiler.lowering.elementwise import build_add, build_gelu
from compiler.lowering.embedding import build_embedding
from compiler.lowering.kernel import Kernel, StreamIds, sram_budget
from compiler.lowering.layernorm import build_layernorm
from compiler.lowering.matmul import build_linear
from compiler.lowering.softmax import build_softmax
from wse_sim.errors import UserError


def default_lane_width(graph: TrainingGraph) -> int:
    """One attention head per lane: the attention kernels need lanes of d_head columns."""
    return graph.cfg.model.d_head


class _Lowering:
    def __init__(self, graph: TrainingGraph, params: dict[str, np.ndarray],
                 tokens: np.ndarray, lane_width: int) -> None:
        self.graph = graph
        self.params = params
        self.tokens = tokens
        self.lw = lane_width
        self.ids = StreamIds()
        self.lr = graph.cfg.training.lr
        self.order = {name: i for i, name in enumerate(graph.ops)}

    # -- graph look-ups ---------------------------------------------------------------------

    def op(self, name: str):
        return self.graph.ops[name]

    def bwd(self, name: str):
        return self.graph.ops.get(f"{name}.bwd")

    def dy(self, name: str) -> str:
        """The gradient of op `name`'s (first) output, as its backward twin reads it (for an
        output that feeds an add, the add's output gradient)."""
        return self.graph.ops[f"{name}.bwd"].inputs[0]

    def dx(self, name: str) -> str:
        """The gradient of op `name`'s first input, as its backward twin writes it."""
        return self.graph.ops[f"{name}.bwd"].outputs[0]

    def param(self, name: str) -> np.ndarray:
        return np.asarray(self.params[name], dtype=np.float32)

    def ops_with_updates(self, name: str, *params: str) -> list[str]:
        ops = [name]
        if self.bwd(name) is not None:
            ops.append(f"{name}.bwd")
        return ops + [f"{p}.sgd" for p in params]

    def rows_cols(self, tensor: str) -> tuple[int, int]:
        rows, cols = self.graph.tensors[tensor].shape
        return rows, cols

    def earlier_first(self, a: str, b: str) -> tuple[str, str]:
        """The two tensors ordered by their producers' place in the graph (the add kernel
        reads the first one completely before streaming the second)."""
        rank = {t: self.order[self.graph.producer(t)] for t in (a, b)}
        return (a, b) if rank[a] <= rank[b] else (b, a)

    # -- kernels ------------------------------------------------------------------------------

    def linear(self, name: str) -> Kernel:
        op = self.op(name)
        x, weight, bias = op.inputs
        rows, k = self.rows_cols(x)
        # The fused QKV product streams one [M, 3d] tensor (see the module docstring).
        y, dy = (op.outputs[0], self.dy(name)) if len(op.outputs) == 1 else (
            f"{name}.out", f"grad:{name}.out")
        return build_linear(
            name, self.ops_with_updates(name, weight, bias), self.ids,
            rows=rows, k=k, n=op.attrs["n"], lane_width=self.lw,
            weight=self.param(weight), bias=self.param(bias), lr=self.lr,
            x_tensor=x, y_tensor=y, dy_tensor=dy, dx_tensor=self.dx(name),
            weight_name=weight, bias_name=bias,
        )

    def embedding(self) -> Kernel:
        if not self.graph.cfg.model.tie_embeddings:
            raise UserError("model.tie_embeddings: the lowering implements tied embeddings "
                            "only (the LM head is the embedding kernel); set it to true")
        lm_head = self.op("lm_head")
        final, _ = lm_head.inputs
        logits = lm_head.outputs[0]
        ops = ["embed", "embed.bwd", "lm_head", "lm_head.bwd", "wte.weight.grad_acc",
               "wte.weight.sgd", "wpe.weight.sgd"]
        return build_embedding(
            "embed", ops, self.ids, tokens=self.tokens, lane_width=self.lw,
            wte=self.param("wte.weight"), wpe=self.param("wpe.weight"), lr=self.lr,
            h0_tensor="embed.out", x_tensor=final, logits_tensor=logits,
            dlogits_tensor=self.dy("lm_head"), dx_tensor=self.dx("lm_head"),
            dh0_tensor=self.dy("embed"),
        )

    def attention_shape(self, name: str) -> dict[str, int]:
        """Shape arguments of both attention kernels, with the fewest query-row groups per
        head that fit SRAM. More groups divide the attention products over more PE rows:
        on gpt_small 4 groups cut the step from 7.0 M to 6.2 M cycles, but added 192 PEs,
        their relay streams (colors) and half again the host time, so fewest-that-fit is
        the default."""
        attrs = self.op(name).attrs
        shape = {"batch": attrs["batch"], "seq": attrs["seq_len"], "heads": attrs["heads"],
                 "d_head": attrs["d_head"], "lane_width": self.lw}
        layout = attn_layout(name, **shape)
        groups = fit_row_groups(name, layout, self.graph.cfg.wafer.sram_words_per_pe)
        return {**shape, "row_groups": groups}

    def scores(self, name: str) -> Kernel:
        block = name.removesuffix(".scores")
        mask = f"{block}.mask"
        return build_attn_scores(
            name, [name, mask, f"{mask}.bwd", f"{name}.bwd"], self.ids,
            **self.attention_shape(name), qkv=f"{block}.qkv.out",
            scores=self.op(mask).outputs[0], d_scores=self.dy(mask),
            d_qkv=f"grad:{block}.qkv.out",
        )

    def values(self, name: str) -> Kernel:
        block = name.removesuffix(".values")
        probs, _ = self.op(name).inputs
        out = self.op(name).outputs[0]
        return build_attn_values(
            name, self.ops_with_updates(name), self.ids, **self.attention_shape(name),
            qkv=f"{block}.qkv.out", probs=probs, out=out, d_out=self.dy(name),
            d_probs=self.dx(name), d_qkv=f"grad:{block}.qkv.out",
        )

    def softmax(self, name: str) -> Kernel:
        op = self.op(name)
        (s,) = op.inputs
        p = op.outputs[0]
        rows, _ = self.rows_cols(s)
        return build_softmax(
            name, self.ops_with_updates(name), self.ids, rows=rows, heads=op.attrs["heads"],
            seq_len=op.attrs["seq_len"], lane_width=self.lw, s_tensor=s, p_tensor=p,
            dp_tensor=self.dy(name), ds_tensor=self.dx(name),
        )

    def layernorm(self, name: str) -> Kernel:
        op = self.op(name)
        x, gamma, beta = op.inputs
        rows, cols = self.rows_cols(x)
        y = op.outputs[0]
        return build_layernorm(
            name, self.ops_with_updates(name, gamma, beta), self.ids, rows=rows, cols=cols,
            lane_width=self.lw, gamma=self.param(gamma), beta=self.param(beta),
            eps=op.attrs["eps"], lr=self.lr, x_tensor=x, y_tensor=y,
            dy_tensor=self.dy(name), dx_tensor=self.dx(name), gamma_name=gamma, beta_name=beta,
        )

    def gelu(self, name: str) -> Kernel:
        op = self.op(name)
        (x,) = op.inputs
        y = op.outputs[0]
        rows, cols = self.rows_cols(x)
        return build_gelu(
            name, self.ops_with_updates(name), self.ids, rows=rows, cols=cols,
            lane_width=self.lw, activation=op.attrs["activation"], x_tensor=x, y_tensor=y,
            dy_tensor=self.dy(name), dx_tensor=self.dx(name),
        )

    def add(self, name: str, inputs: tuple[str, ...], out: str) -> Kernel:
        if len(inputs) != 2:
            raise NotImplementedError(f"{name}: add of {len(inputs)} tensors")
        first, second = self.earlier_first(*inputs)
        rows, cols = self.rows_cols(out)
        return build_add(name, [name], self.ids, rows=rows, cols=cols, lane_width=self.lw,
                         first=first, second=second, out=out)

    def cross_entropy(self, name: str) -> Kernel:
        op = self.op(name)
        logits, _ = op.inputs
        return build_cross_entropy(
            name, self.ops_with_updates(name), self.ids, tokens=self.tokens,
            vocab=self.rows_cols(logits)[1], lane_width=self.lw, logits_tensor=logits,
            dlogits_tensor=self.dx(name), logits_result="logits",
            loss_result="loss",
        )

    def kernels(self) -> list[Kernel]:
        kernels = []
        for name, op in self.graph.ops.items():
            kernel = self.lower_op(name, op.kind)
            if kernel is not None:
                kernels.append(kernel)
        covered = [o for k in kernels for o in k.ops]
        missing = set(self.graph.ops) - set(covered)
        if missing or len(covered) != len(set(covered)):
            raise AssertionError(f"ops not lowered exactly once: missing {sorted(missing)}")
        return kernels

    def lower_op(self, name: str, kind: str) -> Kernel | None:
        """The kernel that an op starts, or None for ops that live in an earlier op's kernel
        (backward twins, updates, the fused mask and LM head)."""
        if kind == "embedding":
            return self.embedding()
        if kind == "matmul":
            return None if name == "lm_head" else self.linear(name)
        if kind == "grad_acc":
            op = self.op(name)
            if op.attrs["tensor"] == "wte.weight":
                return None
            return self.add(name, op.inputs, op.outputs[0])
        builders = {
            "layernorm": self.layernorm, "attn_scores": self.scores, "softmax": self.softmax,
            "attn_values": self.values, "gelu": self.gelu, "cross_entropy": self.cross_entropy,
        }
        if kind in builders:
            return builders[kind](name)
        if kind == "add":
            op = self.op(name)
            return self.add(name, op.inputs, op.outputs[0])
        return None


def lower(graph: TrainingGraph, params: dict[str, np.ndarray], tokens: np.ndarray,
          lane_width: int) -> list[Kernel]:
    """The kernels of one training step, in graph order; every graph op is in exactly one.
    A kernel that needs more SRAM on a PE than the wafer has is a UserError, raised as soon
    as its allocation passes the limit."""
    with sram_budget(graph.cfg.wafer.sram_words_per_pe):
        return _Lowering(graph, params, tokens, lane_width).kernels()
