"""The critical path (wse_sim.critical) of a hand-made program whose every cycle is known,
and its place in the report."""

from __future__ import annotations

import numpy as np
from programs import route_east

from wse_sim.engine import simulate
from wse_sim.hardware import WaferConfig
from wse_sim.program import (
    FabIn,
    FabOut,
    Mem,
    Op,
    Port,
    Program,
    Region,
    Task,
    Trigger,
    port_mask,
    vec,
)
from wse_sim.report import format_report, run_report

WAFER = WaferConfig(width=8, height=8)


def relay() -> Program:
    """Kernels a (0, 0), b (1, 0), c (2, 0) and side (2, 1), one PE each: a sends 4 words
    to b, b takes them and sends 4 to c; side sends 2 to c, which takes those first, then
    b's, then sends 1 word back to a (2 hops west), which takes it last."""
    p = Program(3, 2)

    def code(x: int, y: int, *instrs) -> None:
        pe = p.pe(x, y, 4)
        pe.load(0, np.arange(4, dtype=np.float32))
        pe.tasks.append(Task(0, Trigger.RESET, list(instrs)))

    code(0, 0, vec(Op.MOV, 4, FabOut(1), Mem(0)), vec(Op.MOV, 1, Mem(0), FabIn(4)))
    code(1, 0, vec(Op.MOV, 4, Mem(0), FabIn(1)), vec(Op.MOV, 4, FabOut(2), Mem(0)))
    code(2, 0, vec(Op.MOV, 2, Mem(0), FabIn(3)), vec(Op.MOV, 4, Mem(0), FabIn(2)),
         vec(Op.MOV, 1, FabOut(4), Mem(0)))
    code(2, 1, vec(Op.MOV, 2, FabOut(3), Mem(0)))
    route_east(p, 1, 0, 1, 0)
    route_east(p, 2, 1, 2, 0)
    p.add_route(2, 1, 3, port_mask(Port.RAMP), port_mask(Port.N))
    p.add_route(2, 0, 3, port_mask(Port.S), port_mask(Port.RAMP))
    p.add_route(2, 0, 4, port_mask(Port.RAMP), port_mask(Port.W))
    p.add_route(1, 0, 4, port_mask(Port.E), port_mask(Port.W))
    p.add_route(0, 0, 4, port_mask(Port.E), port_mask(Port.RAMP))
    p.regions = [Region(name, "op", x, y, 1, 1)
                 for name, x, y in (("a", 0, 0), ("b", 1, 0), ("c", 2, 0), ("side", 2, 1))]
    return p


def test_the_path_follows_the_last_wavelets_back_from_the_end():
    # A wavelet sent in cycle t leaves its router in t + 1 and, over h hops, is consumed in
    # t + h + 2 at the earliest. a sends in 0..3 (they leave in 1..4), b takes them in 3..6
    # and sends in 7..10 (leaving in 8..11); c takes side's 2 (sent in 0..1) in 3..4 and
    # b's in 10..13, then sends in 14 (leaving in 15); a takes it in 14 + 2 + 2 = 18, the
    # run's last working cycle. Walking back from a at 18: c's word, consumed by 18, left
    # c in 15; of c's inputs consumed by 15, b's left last (11, side's in 2); b's input
    # from a left a in 4; by then a had consumed nothing: the path starts there.
    program = relay()
    result = simulate(program, WAFER)
    assert result.cycles == 19
    report = run_report(program, WAFER, result.stats, 0.0)
    assert [k["end_cycle"] for k in report["kernels"]] == [18, 10, 14, 1]
    assert report["critical_path"] == [
        {"kernel": "a", "op": "op", "input_from": None, "input_cycle": None, "output_cycle": 4},
        {"kernel": "b", "op": "op", "input_from": "a", "input_cycle": 6, "output_cycle": 11},
        {"kernel": "c", "op": "op", "input_from": "b", "input_cycle": 13, "output_cycle": 15},
        {"kernel": "a", "op": "op", "input_from": "c", "input_cycle": 18, "output_cycle": 18}]
    assert ("critical path 4 kernels, longest from input to output: b (5 cycles): "
            "a -> b -> c -> a") in format_report(report).splitlines()


def test_no_regions_no_path():
    program = relay()
    program.regions = []
    result = simulate(program, WAFER)
    report = run_report(program, WAFER, result.stats, 0.0)
    assert report["critical_path"] == []
    assert "critical path none: the program names no kernel that worked" in format_report(
        report).splitlines()
