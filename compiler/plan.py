"""Sizing: how wide each streamed tensor's lanes are and how many PEs each attention head
group gets, decided once for the whole step before any kernel is built.

A tensor's lanes set the shape of both kernels at its ends: a matmul's grid has one PE row
per lane of its input and one PE column per lane of its output, a strip kernel one PE per
lane. With one lane width w for every activation, every matmul PE holds a w x w weight
block and does w^2 multiply-adds per row and pass, so the matmuls of a model are balanced
whatever their shapes, and the number of PEs they take is (matmul weights) / w^2.

The attention kernel groups heads by the lanes they share (`compiler.ops.attention`), so
the lanes of its q, k, v input (the fused QKV output, cut per q, k, v section) and of its
output are `attention_width(w, d_head)`: whole heads, as many as fit in w (at least one).
A head split over several lanes works, but its receiving thread then reads the lanes one
after the other while their producers run side by side.

The attention kernel's PEs per head group (G) are the fewest with which its slowest row
takes no longer than a matmul's row with w x w blocks (`balanced_key_pes`): the matmuls
set the pipeline's pace, and a slower attention would stall every kernel around it.

For the same reason a matmul whose lanes are wider than w on one side (the QKV and output
projections, against whole heads when w < d_head) holds its weights in blocks of fewer
rows than its input lanes (`k_blocks`, `compiler.ops.matmul.balanced_k_block`): the widest
that keep the w x w pace, so that its PEs grow with its work instead of its rows slowing
the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from compiler.graph import TrainingGraph
from compiler.lowering.kernel import lane_cols
from compiler.ops.attention import AttnShape, balanced_key_pes
from compiler.ops.matmul import (
    backward_row_cycles,
    balanced_k_block,
    forward_row_cycles,
    is_mixed,
    output_tensor,
)

Lane = tuple[int, int]


def attention_width(width: int, d_head: int) -> int:
    """The lane width of attention's tensors for activation width `width` (see above)."""
    return d_head * max(1, width // d_head)


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
    k_blocks: dict[str, int] = field(default_factory=dict)  # matmul -> K block (narrow)

    def lanes(self, tensor: str, cols: int) -> list[Lane]:
        """The lanes of `tensor` ([rows, cols]); a fused tensor's lanes never cross its
        sections."""
        base = forward_tensor(tensor)
        width = self.widths.get(base, self.width)
        section = self.sections.get(base, cols)
        return [(s + c0, s + c1) for s in range(0, cols, section)
                for c0, c1 in lane_cols(section, width)]


def plan_step(graph: TrainingGraph, width: int) -> Plan:
    """Lanes of width `width` everywhere but attention's tensors, each attention kernel's
    PEs per head group and each matmul's K blocks (see the docstring)."""
    model = graph.cfg.model
    plan = Plan(width)
    attn = attention_width(width, model.d_head)
    pace = (forward_row_cycles(width, width, top_row_bias=False),
            backward_row_cycles(width, width, dx=True, top_row_bias=False))
    for op in graph.ops.values():
        if op.kind not in ("attn_scores", "kv_attention"):  # (compiler.ops.kv_attention)
            continue
        block = op.name.rsplit(".", 1)[0]
        out = (op.outputs[0] if op.kind == "kv_attention"
               else graph.ops[f"{block}.values"].outputs[0])
        qkv = f"{block}.qkv.out"
        plan.widths[qkv] = plan.widths[out] = attn
        plan.sections[qkv] = model.d_model
        if op.kind == "attn_scores":
            a = op.attrs
            shape = AttnShape(a["batch"], a["seq_len"], a["heads"], a["d_head"],
                              plan.lanes(qkv, 3 * model.d_model), plan.lanes(out, model.d_model),
                              1)
            plan.key_pes[block] = balanced_key_pes(block, shape, pace)
    for op in graph.ops.values():
        if op.kind != "matmul":
            continue
        x, y = op.inputs[0], output_tensor(op)
        k_cols = graph.tensors[x].shape[1]
        n_cols = sum(graph.tensors[o].shape[1] for o in op.outputs)
        k_block = balanced_k_block(max(b - a for a, b in plan.lanes(x, k_cols)),
                                   max(b - a for a, b in plan.lanes(y, n_cols)), pace)
        if k_block is not None:  # fp16 x rows: blocks start at even columns
            plan.k_blocks[op.name] = max(2, k_block - k_block % 2) if is_mixed(op) else k_block
    return plan
