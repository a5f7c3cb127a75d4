"""The training-step graph: parameter counts, FLOPs, structure of backward and update."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import networkx as nx
import pytest

from compiler.config import RunConfig, load_config
from compiler.gpt import build_graph
from compiler.graph import TrainingGraph, grad_name, updated_name

ROOT = Path(__file__).resolve().parents[1]
ZOO = sorted((ROOT / "models").glob("*.yaml"))

# Cerebras-GPT parameter counts (tied embeddings, learned positions, biases, 2 LN per block).
CEREBRAS_PARAMETERS = {
    "111m": 111_050_496,
    "256m": 255_977_024,
    "590m": 590_310_912,
    "1p3b": 1_315_723_264,
    "2p7b": 2_651_553_280,
    "6p7b": 6_658_404_352,
    "13b": 12_853_386_240,
}


def _variant(name: str, **model: object) -> RunConfig:
    cfg = load_config(ROOT / "models" / f"{name}.yaml")
    data = cfg.model_dump()
    data["model"].update(model)
    return RunConfig.model_validate(data)


SMALL_GRAPHS = {
    "tiny": lambda: build_graph(_variant("gpt_tiny")),
    "small": lambda: build_graph(_variant("gpt_small")),
    "tiny_untied": lambda: build_graph(_variant("gpt_tiny", tie_embeddings=False)),
}


@pytest.fixture(params=sorted(SMALL_GRAPHS))
def graph(request: pytest.FixtureRequest) -> TrainingGraph:
    return SMALL_GRAPHS[request.param]()


@pytest.mark.parametrize("size", sorted(CEREBRAS_PARAMETERS))
def test_cerebras_parameter_counts(size: str) -> None:
    cfg = load_config(ROOT / "models" / f"cerebras_gpt_{size}.yaml")
    assert build_graph(cfg).parameter_count() == CEREBRAS_PARAMETERS[size]


@pytest.mark.parametrize("path", ZOO, ids=lambda p: p.stem)
def test_matmul_flops_are_three_forward_passes(path: Path) -> None:
    cfg = load_config(path)
    m, tr = cfg.model, cfg.training
    b, s, h, f, v = tr.batch_size, tr.seq_len, m.d_model, m.d_ffn, m.vocab_size
    per_layer = 6 * b * s * h * h + 4 * b * s * s * h + 2 * b * s * h * h + 4 * b * s * h * f
    expected = m.n_layers * per_layer * 3 + 6 * b * s * h * v
    assert build_graph(cfg).summary()["flops"]["matmul"] == pytest.approx(expected, rel=0.01)


def test_13b_builds_fast() -> None:
    cfg = load_config(ROOT / "models" / "cerebras_gpt_13b.yaml")
    start = time.perf_counter()
    build_graph(cfg)
    assert time.perf_counter() - start < 2.0


def test_one_gradient_and_one_update_per_parameter(graph: TrainingGraph) -> None:
    writers: dict[str, list[str]] = {}
    for op in graph.ops.values():
        for t in op.outputs:
            writers.setdefault(t, []).append(op.name)
    updates = [op for op in graph.ops.values() if op.kind == "update"]
    assert sorted(op.attrs["parameter"] for op in updates) == sorted(graph.parameters)
    for p in graph.parameters:
        assert len(writers[grad_name(p)]) == 1
        assert writers[updated_name(p)] == [f"{p}.update"]
        assert graph.ops[f"{p}.update"].inputs == (p, grad_name(p))
    assert all(len(ops) == 1 for ops in writers.values())


def test_graph_is_a_dag_in_phase_order(graph: TrainingGraph) -> None:
    assert nx.is_directed_acyclic_graph(graph.g)
    order = graph.ops_in_order()
    assert order == graph.ops_in_order() and sorted(order) == sorted(graph.ops)
    phases = [graph.ops[name].phase for name in order]
    assert phases == sorted(phases, key=("forward", "backward", "update").index)


def test_every_input_exists_before_use(graph: TrainingGraph) -> None:
    available = {n for n, t in graph.tensors.items() if t.kind in ("parameter", "input")}
    available -= {n for n in graph.tensors if n.startswith("updated:")}
    for name in graph.ops_in_order():
        op = graph.ops[name]
        missing = [t for t in op.inputs if t not in available]
        assert not missing, f"{name} reads {missing} before they exist"
        available.update(op.outputs)
    assert available == set(graph.tensors)


def test_edges_carry_the_tensors_passed(graph: TrainingGraph) -> None:
    for src, dst, data in graph.g.edges(data=True):
        for t in data["tensors"]:
            assert t in graph.ops[src].outputs and t in graph.ops[dst].inputs
            assert graph.producer(t) == src and dst in graph.consumers(t)
    for op in graph.ops.values():
        for t in op.inputs:
            src = graph.producer(t)
            assert src is None or t in graph.g.edges[src, op.name]["tensors"]


def test_backward_twins_and_accumulations(graph: TrainingGraph) -> None:
    for op in graph.ops.values():
        if op.phase == "forward" and op.kind != "add":
            twin = graph.ops[f"{op.name}.bwd"]
            assert (twin.kind, twin.phase) == (f"{op.kind}.bwd", "backward")
            assert twin.attrs["forward"] == op.name
    accumulated = {op.attrs["tensor"] for op in graph.ops.values() if op.kind == "grad_acc"}
    blocks = graph.cfg.model.n_layers
    residual = {"embed.out"} | {f"h{i}.attn.res.out" for i in range(blocks)}
    residual |= {f"h{i}.mlp.res.out" for i in range(blocks - 1)}
    tied = {"wte.weight"} if graph.cfg.model.tie_embeddings else set()
    assert accumulated == residual | tied


def test_attention_covers_all_heads(graph: TrainingGraph) -> None:
    m, tr = graph.cfg.model, graph.cfg.training
    scores = graph.ops["h0.attn.scores"]
    assert scores.attrs["heads"] == m.n_heads and scores.attrs["d_head"] == m.d_head
    rows = tr.batch_size * tr.seq_len
    assert graph.tensors["h0.attn.softmax.out"].shape == (rows, m.n_heads * tr.seq_len)
    assert graph.tensors["h0.attn.qkv.q"].shape == (rows, m.d_model)


def test_summary_adds_up(graph: TrainingGraph) -> None:
    s = graph.summary()
    flops = s["flops"]
    assert flops["total"] == flops["forward"] + flops["backward"] + flops["update"]
    assert flops["update"] == 2 * s["parameters"]
    assert s["ops"] == graph.g.number_of_nodes() == sum(s["ops_by_kind"].values())


def test_graph_command_json() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "wse_sim", "graph", "models/cerebras_gpt_111m.yaml", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["parameters"] == CEREBRAS_PARAMETERS["111m"]
    assert {"forward", "backward", "update", "matmul", "total"} <= set(summary["flops"])
    assert isinstance(summary["ops"], int)
