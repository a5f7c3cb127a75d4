"""Sizing: the lanes and attention PEs chosen for a step, and the PE budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from compiler.config import load_config, parse_config
from compiler.gpt import build_graph
from compiler.inputs import init_params, make_batch
from compiler.lower import choose_plan, lower, size_step, step_pes
from compiler.ops.attention import AttnShape, slowest_row
from compiler.ops.matmul import (
    backward_row_cycles,
    forward_row_cycles,
    grid_pes,
    output_tensor,
)
from compiler.plan import plan_step
from wse_sim.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "models" / "gpt_tiny.yaml"


def tiny():
    cfg = load_config(TINY)
    return cfg, build_graph(cfg), make_batch(cfg)


@pytest.mark.parametrize("width", [4, 6, 16])
def test_counted_pes_are_the_kernels(width):
    """The families count their rectangles without building them; the built kernels
    agree, PE for PE."""
    cfg, graph, tokens = tiny()
    plan = plan_step(graph, width)
    kernels = lower(graph, init_params(cfg), tokens, plan)
    assert sum(k.width * k.height for k in kernels) == step_pes(graph, tokens, plan)


def test_attention_keeps_the_matmuls_pace():
    cfg, graph, _ = tiny()
    plan = plan_step(graph, 8)
    pace = (forward_row_cycles(8, 8, top_row_bias=False),
            backward_row_cycles(8, 8, dx=True, top_row_bias=False))
    m, t = cfg.model, cfg.training
    for block, g in plan.key_pes.items():
        qkv, out = f"{block}.qkv.out", f"{block}.values.out"
        shape = AttnShape(t.batch_size, t.seq_len, m.n_heads, m.d_head,
                          plan.lanes(qkv, 3 * m.d_model), plan.lanes(out, m.d_model), g)
        fwd, bwd = slowest_row(shape)
        assert (fwd <= pace[0] and bwd <= pace[1]) or g == t.seq_len


@pytest.mark.parametrize("width", [4, 8, 12])
def test_matmuls_keep_one_pace(width):
    """Against attention's whole heads (d_head 16), QKV's and the output projection's
    blocks take fewer rows of W than their lanes: no row of theirs is slower than a
    width x width block's, unless a block of one row is (the receiving alone)."""
    _, graph, _ = tiny()
    plan = plan_step(graph, width)
    pace = (forward_row_cycles(width, width, top_row_bias=False),
            backward_row_cycles(width, width, dx=True, top_row_bias=False))
    assert set(plan.k_blocks) == {f"h{i}.attn.{op}" for i in (0, 1) for op in ("qkv", "proj")}
    for op in graph.ops.values():
        if op.kind != "matmul":
            continue
        k_cols = graph.tensors[op.inputs[0]].shape[1]
        n_cols = sum(graph.tensors[o].shape[1] for o in op.outputs)
        k_lanes, n_lanes = plan.lanes(op.inputs[0], k_cols), plan.lanes(output_tensor(op), n_cols)
        last = len(n_lanes) - 1
        rows = [(forward_row_cycles(p.kb, p.nb, top_row_bias=False, lane=p.lane),
                 backward_row_cycles(p.kb, p.nb, dx=True, top_row_bias=False,
                                     last_column=p.c == last, below=p.below,
                                     buffered=p.offset > 0))
                for p in grid_pes(k_lanes, n_lanes, plan.k_blocks.get(op.name))]
        slowest = tuple(max(r[i] for r in rows) for i in (0, 1))
        assert (slowest[0] <= pace[0] and slowest[1] <= pace[1]) or plan.k_blocks[op.name] == 1


@pytest.mark.parametrize("budget", [300, 900, 4000])
def test_budget_gets_the_narrowest_lanes_that_fit(budget):
    _, graph, tokens = tiny()
    plan = size_step(graph, tokens, budget)
    assert step_pes(graph, tokens, plan) <= budget
    if plan.width > 1:
        assert step_pes(graph, tokens, plan_step(graph, plan.width - 1)) > budget


def test_too_small_a_budget_names_the_field():
    _, graph, tokens = tiny()
    with pytest.raises(UserError, match=r"compile.pes: the step needs at least [\d,]+ PEs"):
        size_step(graph, tokens, 10)


def test_the_config_budget_sizes_the_compiled_step():
    data = yaml.safe_load(TINY.read_text())
    data["compile"] = {"pes": 900}
    cfg = parse_config(data)
    graph, tokens = build_graph(cfg), make_batch(cfg)
    plan = choose_plan(graph, tokens)
    assert plan.width == size_step(graph, tokens, 900).width
    kernels = lower(graph, init_params(cfg), tokens, plan)
    assert sum(k.width * k.height for k in kernels) <= 900
