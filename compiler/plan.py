"""Sizing: how wide each streamed tensor's lanes are and how many PEs each attention head
group gets, decided once for the whole step before any kernel is built.

A tensor's lanes set the shape of both kernels at its ends: a matmul's grid has one PE row
per lane of its input and one PE column per lane of its output, a strip kernel one PE per
lane. With one lane width w for every activation, every matmul PE holds a w x w weight
block and does w^2 multiply-adds per row and pass, so the matmuls of a model are balanced
whatever their shapes, and the number of PEs they take is (matmul weights) / w^2.

The attention kernel groups heads by the lanes they share (`compiler.ops.attention`), so
the lanes of its q, k, v input (the fused QKV output, cut per q, k, v section) and of its
output are `attention_width(w, d_head)`: w when it divides d_head or d_head divides it,
else the largest divisor of d_head below w, which keeps one group per head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from compiler.graph import TrainingGraph
from compiler.lowering.kernel import lane_cols

Lane = tuple[int, int]


def attention_width(width: int, d_head: int) -> int:
    """The lane width of attention's tensors for activation width `width` (see above)."""
    if d_head % width == 0 or width % d_head == 0:
        return width
    return max(w for w in range(1, width) if d_head % w == 0)


def forward_tensor(tensor: str) -> str:
    """The activation whose lanes a gradient (or gradient share) tensor shares."""
    return tensor.removeprefix("grad:").split("@", 1)[0]


@dataclass
class Plan:
    """Lane widths per streamed activation (gradients share their activation's lanes),
    the sections of fused tensors, and the PEs per attention head group."""

    width: int  # the default lane width
    widths: dict[str, int] = field(default_factory=dict)
    sections: dict[str, int] = field(default_factory=dict)  # fused tensor -> section cols
    key_pes: dict[str, int] = field(default_factory=dict)  # attention block -> G

    def lanes(self, tensor: str, cols: int) -> list[Lane]:
        """The lanes of `tensor` ([rows, cols]); a fused tensor's lanes never cross its
        sections."""
        base = forward_tensor(tensor)
        width = self.widths.get(base, self.width)
        section = self.sections.get(base, cols)
        return [(s + c0, s + c1) for s in range(0, cols, section)
                for c0, c1 in lane_cols(section, width)]


def plan_step(graph: TrainingGraph, width: int) -> Plan:
    """Lanes of width `width` everywhere but attention's tensors (see the docstring)."""
    model = graph.cfg.model
    plan = Plan(width)
    attn = attention_width(width, model.d_head)
    for op in graph.ops.values():
        if op.kind in ("attn_scores", "kv_attention"):  # kv_attention: compiler.ops.kv_attention
            block = op.name.rsplit(".", 1)[0]
            plan.widths[f"{block}.qkv.out"] = attn
            plan.sections[f"{block}.qkv.out"] = model.d_model
        if op.kind in ("attn_values", "kv_attention"):
            plan.widths[op.outputs[0]] = attn
    return plan
