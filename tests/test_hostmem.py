"""Host-memory estimates (wse_sim.hostmem, compiler.footprint): lower bounds of what the
commands allocate (tracemalloc), and the field a refusal names."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import yaml

from compiler.config import load_config, parse_config
from compiler.footprint import graph_footprint, step_footprint
from compiler.gpt import build_graph
from wse_sim import hostmem
from wse_sim.engine import simulate
from wse_sim.errors import UserError
from wse_sim.hardware import WaferConfig
from wse_sim.hostmem import available_bytes, mesh_bytes, program_bytes, require
from wse_sim.pipeline import compile_config, run_step, simulate_program
from wse_sim.program import (
    EdgePort,
    FabIn,
    Mem,
    Op,
    Port,
    Program,
    Task,
    Trigger,
    port_mask,
    save_program,
    vec,
)
from wse_sim.traffic import LATENCY_BINS, RouterTiming, run_traffic

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "models" / "gpt_tiny.yaml"


def _peak(work) -> int:
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name", ["gpt_tiny", "gpt_small"])
def test_the_graph_estimate_is_what_the_graph_holds(name):
    cfg = load_config(ROOT / "models" / f"{name}.yaml")
    need = graph_footprint(cfg).need
    assert need <= _peak(lambda: build_graph(cfg)) <= 1.3 * need


MICRO = """# one small block on a small wafer: quick to compile under tracemalloc
model: {vocab_size: 16, n_ctx: 16, d_model: 16, n_layers: 1, n_heads: 1, d_ffn: 32}
training: {batch_size: 1, seq_len: 16, lr: 0.1}
wafer: {preset: wse2, width: 64, height: 64}
"""


def test_the_step_estimates_are_lower_bounds(tmp_path):
    path = tmp_path / "micro.yaml"
    path.write_text(MICRO)
    cfg = load_config(path)
    run_step(str(path))  # compiled numba code and warm caches are not the step's
    compiled = _peak(lambda: save_program(compile_config(str(path)).linked.program,
                                          tmp_path / "step.npz", cfg.wafer))
    assert step_footprint(cfg, reference=False).need <= compiled
    assert step_footprint(cfg, reference=True).need <= _peak(lambda: run_step(str(path)))
    program = compile_config(str(path)).linked.program
    assert program_bytes(program).need <= _peak(lambda: simulate_program(program, cfg.wafer))


def test_the_program_estimate_counts_code_and_the_memory_services_words():
    """An inbound port's words are copied into the fabric and a long program's code is read
    twice over: the estimate counts both, and stays below what simulating allocates."""
    n, color = 50_000, 3
    p = Program(2, 1)
    p.ports.append(EdgePort("w", 0, 0, Port.W, color, True, np.ones(n, np.float32)))
    p.add_route(0, 0, color, port_mask(Port.W), port_mask(Port.E))
    p.add_route(1, 0, color, port_mask(Port.W), port_mask(Port.RAMP))
    pe = p.pe(1, 0, 1)
    pe.tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, 1, Mem(0), FabIn(color))] * n))
    footprint = program_bytes(p)
    assert footprint.need > 4 * n + 480 * n  # the port's words and the instructions' code
    assert footprint.blame() == ("instructions", f"{n:,} instructions over 1 PEs")
    wafer = WaferConfig(width=2, height=1)
    simulate(p, wafer)  # compiled before measuring
    assert footprint.need <= _peak(lambda: simulate(p, wafer))


def test_the_mesh_estimate_counts_the_router_state():
    run_traffic(4, 4, "uniform", 0.1, 10, warmup=0)  # compiled before measuring
    need = mesh_bytes(128, 128, 16).need
    peak = _peak(lambda: run_traffic(128, 128, "uniform", 0.01, 2, warmup=0, drain=0,
                                     router=RouterTiming(queue_depth=16)))
    histogram = 8 * LATENCY_BINS  # fixed size, not counted
    assert need <= peak - histogram <= 1.3 * need


def _tiny(**changes) -> dict:
    data = yaml.safe_load(TINY.read_text())
    data["wafer"] = {"preset": "wse2"}
    for dotted, value in changes.items():
        section, field = dotted.split("__")
        data[section][field] = value
    return data


@pytest.mark.parametrize(("changes", "reference", "field"), [
    ({"model__vocab_size": 10**9}, False, "model.vocab_size"),
    ({"model__n_layers": 10**6}, False, "model.n_layers"),
    ({"model__d_ffn": 10**8}, False, "model.d_ffn"),
    ({"model__n_ctx": 10**5, "training__seq_len": 10**5}, True, "training.seq_len"),
    ({"training__batch_size": 10**7}, True, "training.batch_size"),
    ({"wafer__width": 10**6}, False, "wafer.width"),
])
def test_a_refusal_names_the_field_that_makes_it_large(monkeypatch, changes, reference, field):
    monkeypatch.setattr(hostmem, "available_bytes", lambda: 10**6)
    footprint = step_footprint(parse_config(_tiny(**changes)), reference=reference)
    with pytest.raises(UserError) as err:
        require(footprint, "x.yaml")
    assert str(err.value).startswith(f"x.yaml: {field}: too large for this machine's memory")
    assert str(err.value).endswith("977 KiB available")


def test_what_fits_passes(monkeypatch):
    footprint = step_footprint(load_config(TINY), reference=True)
    monkeypatch.setattr(hostmem, "available_bytes", lambda: footprint.need)
    require(footprint, "x.yaml")


def test_available_memory_is_memavailable_else_free_pages(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  9000 kB\nMemFree:  10 kB\nMemAvailable:  2000 kB\n")
    monkeypatch.setattr(hostmem, "MEMINFO", str(meminfo))
    assert available_bytes() == 2000 * 1024
    monkeypatch.setattr(hostmem, "MEMINFO", str(tmp_path / "absent"))
    assert available_bytes() > 0
