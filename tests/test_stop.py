"""Stopping a simulation through the CLI: --max-cycles and Ctrl-C end it at a cycle boundary
with one line `stopped at cycle N: ...`, the report of what ran (marked partial, also as
--json) and exit 2 (the limit) or 130 (Ctrl-C); a deadlock ends in one line and exit 2."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from programs import deadlock_pair

from wse_sim.cli import main
from wse_sim.hardware import WaferConfig
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
    save_program,
    vec,
)

ROOT = Path(__file__).resolve().parent.parent
WAFER = WaferConfig(width=4, height=1)


def stream_east(n: int) -> Program:
    """PE (0, 0) sends n wavelets to PE (2, 0), one a cycle: about n cycles, every one of
    them simulated (fabric operands: no bulk run)."""
    p = Program(4, 1)
    src = p.pe(0, 0, 1)
    src.load(0, np.ones(1, np.float32))
    src.tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, n, FabOut(1), Mem(0, 0))]))
    p.pe(2, 0, 1).tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, n, Mem(0, 0), FabIn(1))]))
    p.add_route(0, 0, 1, port_mask(Port.RAMP), port_mask(Port.E))
    p.add_route(1, 0, 1, port_mask(Port.W), port_mask(Port.E))
    p.add_route(2, 0, 1, port_mask(Port.W), port_mask(Port.RAMP))
    return p


def assert_partial(report: dict, cycle: int, reason: str) -> None:
    """A partial report of the first `cycle` cycles: every used PE's cycles are classed."""
    assert report["partial"] is True
    assert report["stopped"]["cycle"] == report["cycles"] == cycle
    assert report["stopped"]["reason"] == reason
    assert report["stopped"]["message"].startswith(f"stopped at cycle {cycle:,}: ")
    assert sum(report["pe_cycles"].values()) == report["pes_used"] * cycle
    assert min(report["pe_cycles"].values()) >= 0
    assert report["critical_path"] is None and "critical_path" in report["null_reasons"]


def test_max_cycles_stops_with_a_partial_report(tmp_path, capsys):
    program = tmp_path / "stream.npz"
    save_program(stream_east(1000), program, WAFER)
    out = tmp_path / "r.json"
    assert main(["simulate", str(program), "--max-cycles", "300", "--json", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "stopped at cycle 300: reached max_cycles=300; 2 PEs still running a task, "
        "4 wavelets in flight"]
    assert captured.out.startswith("PARTIAL REPORT (stopped at cycle 300: ")
    report = json.loads(out.read_text())
    assert_partial(report, 300, "max_cycles")
    # The sender sent one wavelet a cycle from cycle 0; one sent in cycle t over 2 hops is
    # consumed in t + 4: the 4 sent in cycles 296..299 are still in flight.
    assert report["pe_cycles"]["send"] == 300
    assert report["pe_cycles"]["receive"] == 300 - 4
    assert report["wavelets_injected"] == 300


def test_run_stops_at_max_cycles_without_a_check(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["run", str(ROOT / "models" / "gpt_tiny.yaml"), "--max-cycles", "2000",
                 "--quiet", "--json", str(out), "--plot", str(tmp_path / "plots")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("stopped at cycle 2,000: reached max_cycles")
    report = json.loads(out.read_text())
    assert_partial(report, 2000, "max_cycles")
    assert "check" not in report
    assert report["tokens_per_second"] is None and "tokens_per_second" in report["null_reasons"]
    assert all("running_pes" in k for k in report["kernels"])
    assert sum(k["running_pes"] for k in report["kernels"]) > 0
    assert not (tmp_path / "plots").exists()  # plots need a finished run


def test_a_step_of_micro_batches_stops_at_max_cycles_in_its_second(tmp_path, capsys):
    """The limit counts the step's cycles: gpt_tiny's first micro-batch of 2 takes about
    39,000, so 50,000 stops the second, and the partial report covers both."""
    config = tmp_path / "cfg.yaml"
    config.write_text((ROOT / "models" / "gpt_tiny.yaml").read_text().replace(
        "batch_size: 2", "batch_size: 4\n  micro_batch_size: 2"))
    out = tmp_path / "r.json"
    assert main(["run", str(config), "--max-cycles", "50000", "--quiet", "--json",
                 str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(
        "stopped at cycle 50,000: reached max_cycles=50000 in micro-batch 2 of 2 (its cycle "), err
    report = json.loads(out.read_text())
    assert_partial(report, 50000, "max_cycles")
    assert report["micro_batches"] == {"count": 2, "sequences": 2}


def test_a_deadlock_through_the_cli_is_one_line(tmp_path, capsys):
    program = tmp_path / "deadlock.npz"
    save_program(deadlock_pair(), program, WaferConfig(width=16, height=16))
    assert main(["simulate", str(program), "--json", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: deadlock")
    assert not (tmp_path / "r.json").exists()


def test_ctrl_c_in_a_real_process_stops_at_a_cycle_boundary(tmp_path):
    program = tmp_path / "stream.npz"
    save_program(stream_east(10**9), program, WAFER)
    out = tmp_path / "r.json"
    # stderr on a terminal, so that the progress line says when the cycle loop runs.
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "wse_sim", "simulate", str(program),
                             "--json", str(out)], stdout=subprocess.PIPE, stderr=follower,
                            stdin=subprocess.DEVNULL, cwd=tmp_path)
    os.close(follower)
    err = b""
    try:
        deadline = time.monotonic() + 120
        while b"simulating:" not in err:
            assert time.monotonic() < deadline, err
            if select.select([leader], [], [], 1.0)[0]:
                err += os.read(leader, 4096)
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=120)
        while select.select([leader], [], [], 0.5)[0]:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            err += chunk
    finally:
        proc.kill()
        os.close(leader)
    text = err.decode().replace("\r", "\n")
    assert proc.returncode == 130, text
    assert "Traceback" not in text
    stopped = [line for line in text.splitlines() if line.startswith("stopped at cycle ")]
    assert len(stopped) == 1 and ": interrupted (Ctrl-C); " in stopped[0], text
    cycle = int(stopped[0].split()[3].rstrip(":").replace(",", ""))
    assert 0 < cycle < 10**9
    assert stdout.decode().startswith(f"PARTIAL REPORT (stopped at cycle {cycle:,}: ")
    report = json.loads(out.read_text())
    assert_partial(report, cycle, "interrupted")
    assert report["pe_cycles"]["send"] == cycle
