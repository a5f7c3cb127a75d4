"""Worker threads and memory: results do not depend on how many host threads share the
fabric, and a program placed anywhere on the wafer costs memory for the PEs it uses."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from programs import assert_same_run, outer_product_matmul, route_east

from compiler.config import load_config
from wse_sim import threads
from wse_sim.engine import simulate
from wse_sim.errors import DeadlockError
from wse_sim.hardware import WaferConfig
from wse_sim.pipeline import compile_config
from wse_sim.program import (
    FabIn,
    FabOut,
    Mem,
    Op,
    Port,
    Program,
    Task,
    Trigger,
    port_mask,
    vec,
)
from wse_sim.traffic import run_traffic


def test_program_bit_identical_for_any_thread_count(all_workers):
    # Multicast rows and columns cross every stripe boundary, wavelets back up (fp32 at a
    # quarter rate), and PEs sleep on full RAMP FIFOs and empty queues.
    rng = np.random.default_rng(5)
    a = rng.standard_normal((16, 12)).astype(np.float32)
    b = rng.standard_normal((12, 16)).astype(np.float32)
    program = outer_product_matmul(a, b, 8)
    wafer = WaferConfig(width=8, height=8, fp32_ops_per_cycle=0.25, queue_depth=2)
    runs = {k: simulate(program, wafer, threads=k) for k in (1, 2, 4)}
    assert [len(r._asm.workers.stripe) for r in runs.values()] == [1, 2, 4]
    assert len(runs[4]._asm.fabric.xfifo) > 0  # wavelets do cross stripes
    for k in (2, 4):
        assert_same_run(runs[1], runs[k])
        for y in range(8):
            for x in range(8):
                np.testing.assert_array_equal(runs[1].sram(x, y), runs[k].sram(x, y))
                np.testing.assert_array_equal(runs[1].registers(x, y),
                                              runs[k].registers(x, y))
    c = np.block([[runs[4].sram(x, y)[:4].reshape(2, 2) for x in range(8)] for y in range(8)])
    np.testing.assert_allclose(c, a.astype(np.float64) @ b, rtol=1e-5, atol=1e-5)


def test_a_training_step_bit_identical_for_any_thread_count(all_workers, tmp_path):
    # A GPT block's step: PEs compute in bulk runs beside threads that wait for wavelets,
    # while words cross stripes. (A push into another stripe lists its router only at the
    # start of the next cycle: once, every other router idle and every PE computing, the
    # run skipped that cycle and the word never moved.)
    path = tmp_path / "micro.yaml"
    path.write_text("model: {vocab_size: 16, n_ctx: 16, d_model: 16, n_layers: 1, n_heads: 1,"
                    " d_ffn: 32}\ntraining: {batch_size: 1, seq_len: 16, lr: 0.1}\n"
                    "wafer: {preset: wse2, width: 64, height: 64}\n")
    program = compile_config(str(path)).linked.program
    wafer = load_config(path).wafer
    runs = {k: simulate(program, wafer, threads=k) for k in (1, 2)}
    assert len(runs[2]._asm.fabric.xfifo) > 0
    assert_same_run(runs[1], runs[2])


def test_deadlock_reported_alike_for_any_thread_count(all_workers):
    # PE (0, 0) sends down a column to PE (0, 5), which first waits for a color nobody
    # sends: the column backs up across every stripe boundary.
    n, h = 30, 6
    p = Program(1, h)
    src = p.pe(0, 0, n)
    src.tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, n, FabOut(1), Mem(0))]))
    p.pe(0, h - 1, n).tasks.append(Task(0, Trigger.RESET, [
        vec(Op.MOV, 1, Mem(0), FabIn(2)), vec(Op.MOV, n, Mem(0), FabIn(1))]))
    p.add_route(0, 0, 1, port_mask(Port.RAMP), port_mask(Port.S))
    for y in range(1, h - 1):
        p.add_route(0, y, 1, port_mask(Port.N), port_mask(Port.S))
    p.add_route(0, h - 1, 1, port_mask(Port.N), port_mask(Port.RAMP))
    p.add_route(0, h - 1, 2, 0, port_mask(Port.RAMP))
    messages = set()
    for k in (1, 3):
        with pytest.raises(DeadlockError) as info:
            simulate(p, WaferConfig(width=1, height=h, deadlock_cycles=40), threads=k)
        messages.add(str(info.value))
    assert len(messages) == 1
    assert "full buffers: PE (0, 0) RAMP color 1" in messages.pop()


@pytest.mark.parametrize("pattern", ["uniform", "hotspot"])
def test_traffic_bit_identical_for_any_thread_count(pattern, all_workers):
    runs = [run_traffic(12, 12, pattern, 0.3, 300, warmup=50, drain=100, threads=k)
            for k in (1, 2, 4)]
    for r in runs[1:]:
        assert r.to_json() == runs[0].to_json()
        for name, value in vars(r.stats).items():
            np.testing.assert_array_equal(value, getattr(runs[0].stats, name), err_msg=name)
    assert runs[0].unfinished_packets > 0  # past saturation: FIFOs full on every boundary


def test_memory_follows_the_pes_used():
    # Two PEs in opposite corners of a whole WSE-2 fabric, one sending to the other along
    # the edge: the engine holds state for the routers on that path, not for 745,500 PEs.
    wafer = WaferConfig()
    p = Program(wafer.width, wafer.height)
    n, x1, y = 4, wafer.width - 1, wafer.height - 1
    src = p.pe(0, y, n)
    src.load(0, np.arange(n, dtype=np.float32))
    src.tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, n, FabOut(1), Mem(0))]))
    p.pe(x1, y, n).tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, n, Mem(0), FabIn(1))]))
    route_east(p, 1, 0, x1, y)
    r = simulate(p, wafer)
    np.testing.assert_array_equal(r.sram(x1, y), np.arange(n, dtype=np.float32))
    assert r.cycles == n - 1 + x1 + 2 + 1
    asm = r._asm
    state = sum(a.nbytes for bundle in (asm.fabric, asm.cores) for a in bundle)
    assert len(asm.fabric.router) == wafer.width
    assert state < 1000 * wafer.width  # bytes: about one router's worth per PE on the path


def test_cli_threads_option_gives_identical_reports(all_workers, tmp_path, monkeypatch):
    # `simulate --threads N`, every stripe on its own thread: the JSON reports (host time
    # aside) and the final SRAM of every named tensor are equal for 1, 2 and 4 threads.
    from wse_sim import pipeline
    from wse_sim.cli import main
    from wse_sim.program import TensorLayout, TensorSlot, save_program

    stripes = []

    def counted(*args, **kwargs):
        result = simulate(*args, **kwargs)
        stripes.append(len(result._asm.workers.stripe))
        return result

    monkeypatch.setattr(pipeline, "simulate", counted)

    rng = np.random.default_rng(7)
    a = rng.standard_normal((16, 12)).astype(np.float32)
    b = rng.standard_normal((12, 16)).astype(np.float32)
    program = outer_product_matmul(a, b, 8)
    program.tensors["c"] = TensorLayout((16, 16), [
        TensorSlot(x, y, 0, (2 * y, 2 * y + 2), (2 * x, 2 * x + 2), 2)
        for y in range(8) for x in range(8)])
    wafer = WaferConfig(width=8, height=8, fp32_ops_per_cycle=0.25, queue_depth=2)
    path = tmp_path / "step.npz"
    save_program(program, path, wafer)
    reports, tensors = [], []
    for k in (1, 2, 4):
        out, dump = tmp_path / f"r{k}.json", tmp_path / f"t{k}.npz"
        assert main(["simulate", str(path), "--threads", str(k), "--quiet", "--json", str(out),
                     "--tensors", str(dump)]) == 0
        report = json.loads(out.read_text())
        assert report.pop("host_simulation_seconds") >= 0
        assert report.pop("host_engine_seconds") >= 0
        reports.append(report)
        with np.load(dump) as z:
            tensors.append(z["c"])
    assert stripes == [1, 2, 4]
    assert reports[0]["cycles"] > 0
    for report, c in zip(reports[1:], tensors[1:], strict=True):
        assert report == reports[0]
        np.testing.assert_array_equal(c, tensors[0])
    np.testing.assert_allclose(tensors[0], a.astype(np.float64) @ b, rtol=1e-5, atol=1e-5)


def _plan_run(ns_per_visit: dict[int, float], cycles: int = 2_000_000) -> dict[int, int]:
    """Cycles a ChunkPlan gives each thread count over a run of 100 visits a cycle on two
    stripes, a visit taking ns_per_visit[workers] of a fake clock."""
    wk = SimpleNamespace(stripe=np.zeros(2, [("visits", np.int64)]))
    now = [0.0]
    plan = threads.ChunkPlan(wk, 1024, 256, 1 << 22, clock=lambda: now[0])
    ran = {1: 0, 2: 0}
    while sum(ran.values()) < cycles:
        workers, chunk = plan.next()
        wk.stripe["visits"][0] += 100 * chunk
        now[0] += 100 * chunk * ns_per_visit[workers] * 1e-9
        plan.ran(chunk)
        ran[workers] += chunk
    return ran


def test_chunk_plan_keeps_the_faster_thread_count():
    # An idle machine: two threads are faster; one runs only short timing chunks.
    idle = _plan_run({1: 100.0, 2: 57.0})
    assert idle[1] < 0.02 * (idle[1] + idle[2])
    # Other processes busy on every core: the barrier makes two threads 10x slower.
    busy = _plan_run({1: 100.0, 2: 1000.0})
    assert busy[2] < 0.05 * (busy[1] + busy[2])


def test_chunk_plan_follows_a_change_of_load():
    # Busy for the first half of the run, then idle: the plan moves back to two threads.
    wk = SimpleNamespace(stripe=np.zeros(2, [("visits", np.int64)]))
    now = [0.0]
    plan = threads.ChunkPlan(wk, 1024, 256, 1 << 22, clock=lambda: now[0])
    late = {1: 0, 2: 0}
    t = 0
    while t < 4_000_000:
        workers, chunk = plan.next()
        ns = {1: 100.0, 2: 1000.0 if t < 2_000_000 else 57.0}[workers]
        wk.stripe["visits"][0] += 100 * chunk
        now[0] += 100 * chunk * ns * 1e-9
        plan.ran(chunk)
        t += chunk
        if t > 3_000_000:
            late[workers] += chunk
    assert late[2] > 0.9 * (late[1] + late[2])
