"""Program validation (one-line ProgramErrors naming PE, task, instruction, field) and the
save/load round trip."""

import dataclasses

import numpy as np
import pytest
from fuzz_programs import cases
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from programs import outer_product_matmul, send_east, systolic_dot

import wse_sim.program as program_module
from wse_sim.errors import ProgramError, UserError
from wse_sim.hardware import WaferConfig
from wse_sim.program import (
    FabIn,
    FabOut,
    Imm,
    Instr,
    Kind,
    Mem,
    Op,
    Port,
    Program,
    Reg,
    Task,
    Trigger,
    load_program,
    port_mask,
    repeat,
    save_program,
    validate,
    vec,
)

WAFER = WaferConfig(width=8, height=8)


def receiver_with(*instrs: Instr, words: int = 10) -> Program:
    """send_east(10, 2) whose receiver (2, 0) runs `instrs` instead."""
    p = send_east(10, 2)
    p.pes[(2, 0)].sram_words = words
    p.pes[(2, 0)].tasks[0].instrs = list(instrs)
    return p


def test_valid_programs_pass():
    validate(send_east(10, 3), WAFER)
    a = np.ones(12, np.float32)
    validate(systolic_dot(a, a, 3), WAFER)
    validate(outer_product_matmul(np.ones((4, 3), np.float32), np.ones((3, 4), np.float32), 2),
             WAFER)


@pytest.mark.parametrize("instr, match", [
    (vec(Op.MOV, 11, Mem(0), FabIn(1)), r"field dst: .* reaches words 0..10"),
    (vec(Op.MOV, 6, Mem(0, 2), FabIn(1)), r"field dst: .* reaches words 0..10"),
    (vec(Op.ADD, 2, Mem(0), Mem(-1), FabIn(1)), r"field a: .* reaches words -1..0"),
    (vec(Op.MOV, 0, Mem(0), FabIn(1)), r"field n: a vector op needs n > 0"),
    (vec(Op.ADD, 1, Mem(0), FabIn(1)), r"field b: ADD takes 2 source"),
    (vec(Op.MOV, 1, Imm(1.0), FabIn(1)), r"field dst: IMM cannot be a destination"),
    (vec(Op.MOV, 1, FabIn(1), Mem(0)), r"field dst: FABIN cannot be a destination"),
    (vec(Op.MOV, 1, Mem(0), FabOut(1)), r"field a: FABOUT may only be a destination"),
    (vec(Op.MOV, 1, Mem(0), Reg(16)), r"field a: register 16 not in 0..15"),
    (vec(Op.MOV, 1, Mem(0), FabIn(24)), r"field a: color 24 not in 0..23"),
    (vec(Op.MOV, 1, Mem(0), FabIn(3)), r"field a: FABIN color 3 but .* does not deliver"),
    (vec(Op.MOV, 1, FabOut(1), Mem(0)), r"field dst: FABOUT color 1 .* does not accept from RAMP"),
    (vec(Op.FMA, 2, Mem(0), Mem(0), Mem(2), Mem(4)), r"3 strided memory sources per element"),
    (Instr(Op.ACTIVATE, task=9), r"field task: ACTIVATE names task 9"),
    (Instr(Op.REPEAT, count=2, body=1), r"field body: REPEAT body of 1 runs past"),
])
def test_rejects_bad_instruction(instr, match):
    with pytest.raises(ProgramError, match=r"^PE \(2, 0\) task 0 instr 0: " + match) as info:
        validate(receiver_with(instr), WAFER)
    assert "\n" not in str(info.value)


def test_repeat_bounds_cover_every_iteration():
    # 3 iterations of 2 elements with loop_stride 4: the last writes words 8 and 9.
    ok = repeat(3, [vec(Op.MOV, 2, Mem(0, 1, 4), Imm(1.0))])
    validate(receiver_with(*ok), WAFER)
    bad = repeat(4, [vec(Op.MOV, 2, Mem(0, 1, 4), Imm(1.0))])
    with pytest.raises(ProgramError, match=r"instr 1: field dst: .* reaches words 0..13"):
        validate(receiver_with(*bad), WAFER)
    nested = repeat(2, repeat(2, [vec(Op.MOV, 1, Mem(0), Imm(1.0))]))
    with pytest.raises(ProgramError, match=r"instr 1: field op: REPEAT inside a REPEAT"):
        validate(receiver_with(*nested), WAFER)


def test_rejects_bad_tasks_and_memory():
    p = send_east(10, 2)
    p.pes[(2, 0)].tasks.append(Task(0, Trigger.LOCAL, [Instr(Op.HALT)]))
    with pytest.raises(ProgramError, match=r"PE \(2, 0\) task 0: task id used twice"):
        validate(p, WAFER)
    p = send_east(10, 2)
    p.pes[(2, 0)].tasks[0].id = 64
    with pytest.raises(ProgramError, match=r"task 64: id must be in 0..63"):
        validate(p, WAFER)
    p = send_east(10, 2)
    p.pes[(2, 0)].tasks.append(Task(1, Trigger.COLOR, [Instr(Op.HALT)], color=5))
    with pytest.raises(ProgramError, match=r"task 1: triggered by color 5 .* not deliver"):
        validate(p, WAFER)
    p = send_east(10, 2)
    p.pes[(2, 0)].sram_words = WAFER.sram_words_per_pe + 1
    with pytest.raises(ProgramError, match=r"PE \(2, 0\): sram_words 12289 not in 0..12288"):
        validate(p, WAFER)
    p = send_east(10, 2)
    p.pes[(0, 0)].load(5, np.ones(6, np.float32))
    with pytest.raises(ProgramError, match=r"PE \(0, 0\): image at offset 5 \(6 words\)"):
        validate(p, WAFER)


def test_rejects_bad_routes():
    p = send_east(1, 1)
    p.add_route(1, 0, 1, 0, port_mask(Port.E))
    with pytest.raises(ProgramError, match=r"route at PE \(1, 0\) color 1: tx E leads off"):
        validate(p, WAFER)
    p = send_east(1, 2)
    p.routes[(1, 0, 1)] = p.routes[(1, 0, 1)].__class__(port_mask(Port.W), port_mask(Port.S))
    p.height = 2
    with pytest.raises(ProgramError, match=r"color 1: tx S but the route of PE \(1, 1\)"):
        validate(p, WAFER)
    p = send_east(1, 2)
    p.routes[(2, 0, 1)] = p.routes[(2, 0, 1)].__class__(port_mask(Port.N), port_mask(Port.RAMP))
    with pytest.raises(ProgramError, match=r"PE \(2, 0\) color 1 does not accept from W"):
        validate(p, WAFER)
    with pytest.raises(ProgramError, match=r"program fabric 9 x 1 does not fit"):
        validate(send_east(1, 8), WAFER)


def assert_programs_equal(p: Program, q: Program) -> None:
    assert (p.width, p.height, p.routes) == (q.width, q.height, q.routes)
    assert list(p.pes) == list(q.pes)
    for key, pe in p.pes.items():
        other = q.pes[key]
        assert pe.sram_words == other.sram_words and pe.tasks == other.tasks
        assert list(pe.image) == list(other.image)
        for offset, data in pe.image.items():
            np.testing.assert_array_equal(data, other.image[offset])
            assert other.image[offset].dtype == np.float32


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    p = outer_product_matmul(rng.standard_normal((4, 3)).astype(np.float32),
                             rng.standard_normal((3, 4)).astype(np.float32), 2)
    p.pes[(1, 1)].tasks.append(Task(7, Trigger.COLOR, [
        Instr(Op.ACTIVATE, task=0), vec(Op.ADD, 1, Reg(3), Imm(0.1), Reg(3))], color=1))
    path = tmp_path / "prog.npz"
    save_program(p, path)
    assert_programs_equal(p, load_program(path))
    empty = Program(3, 2)
    save_program(empty, path)
    assert_programs_equal(empty, load_program(path))


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, a=np.zeros(3))
    with pytest.raises(UserError, match="not a saved program"):
        load_program(path)


# -- the array screen of validation --------------------------------------------------------
# `validate` checks instructions on arrays and looks one by one only at those that may be
# invalid: it must reject exactly what checking every instruction one by one rejects.

_EDGES = st.sampled_from([-(1 << 40), -2, -1, 0, 1, 2, 3, 7, 31, 32, 47, 48, 1 << 31, 1 << 40])
_OPERAND_EDITS = {"kind": st.sampled_from(list(Kind)), "offset": _EDGES, "stride": _EDGES,
                  "loop_stride": _EDGES, "color": _EDGES, "reg": _EDGES,
                  "half": st.booleans()}
_INSTR_EDITS = {"op": st.sampled_from(list(Op)), "n": _EDGES, "count": _EDGES,
                "body": _EDGES, "task": _EDGES}


@st.composite
def _edited(draw) -> tuple[Program, WaferConfig]:
    """A random valid program with one field of one instruction changed."""
    case = draw(cases())
    program = case.program
    tasks = [task for pe in program.pes.values() for task in pe.tasks]
    assume(tasks)
    task = draw(st.sampled_from(tasks))
    i = draw(st.integers(0, len(task.instrs) - 1))
    instr = task.instrs[i]
    if draw(st.booleans()):
        name = draw(st.sampled_from(sorted(_INSTR_EDITS)))
        instr = dataclasses.replace(instr, **{name: draw(_INSTR_EDITS[name])})
    else:
        which = draw(st.sampled_from(["dst", "a", "b", "c"]))
        name = draw(st.sampled_from(sorted(_OPERAND_EDITS)))
        operand = dataclasses.replace(getattr(instr, which),
                                      **{name: draw(_OPERAND_EDITS[name])})
        instr = dataclasses.replace(instr, **{which: operand})
    task.instrs = [*task.instrs[:i], instr, *task.instrs[i + 1:]]
    return program, case.wafer


def _verdict(program: Program, wafer: WaferConfig) -> str:
    try:
        validate(program, wafer)
    except ProgramError as err:
        return str(err)
    return "valid"


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(_edited())
def test_validation_on_arrays_rejects_what_one_by_one_checks_reject(monkeypatch, edited):
    program, wafer = edited
    on_arrays = _verdict(program, wafer)
    with monkeypatch.context() as m:
        m.setattr(program_module, "_read_code_or_none", lambda task_lists: None)
        one_by_one = _verdict(program, wafer)
    assert on_arrays == one_by_one
