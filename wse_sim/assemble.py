"""Flatten a validated Program into structure-of-arrays numpy state for the numba engine.

Indices: a *slot* is a PE that has a program (slots are ordered by PE index); tasks and
instructions are numbered globally, each slot's tasks contiguous, each task's instructions
contiguous. Memory operands carry absolute addresses into one float32 SRAM pool in which
slot s owns `sram_base[s] : sram_base[s] + sram_words`; register operands carry absolute
indices into the register pool (slot s owns `s * registers : (s + 1) * registers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from wse_sim.hardware import WaferConfig
from wse_sim.program import ARITHMETIC_OPS, Kind, Op, Program, Trigger
from wse_sim.router import RAMP, Fabric, build_fabric

# Cores.params indices (int64)
(
    C_THREADS,
    C_READS,
    C_WRITES,
    C_RAMP_OUT,
    C_DEADLOCK,
) = range(5)
# Cores.sc indices (int64 scalars)
CS_NACT, CS_LAST_PROGRESS, CS_LAST_MOVE, CS_CONSUMED = range(4)
N_CS = 4
# Cycle classes, in priority order (a PE-cycle gets the first that applies).
CLASSES = ("compute", "send", "receive", "move", "stalled")
K_COMPUTE, K_SEND, K_RECV, K_MOVE, K_STALL = range(5)


class Cores(NamedTuple):
    """PE state and code as flat arrays (a numba-friendly named tuple)."""

    params: np.ndarray  # int64, C_* indices
    fp_rate: np.ndarray  # float64 [2]: fp32 elements per cycle, credit cap
    sc: np.ndarray  # int64 [N_CS]
    slot_pe: np.ndarray  # int64 [slots]
    pe_slot: np.ndarray  # int64 [pes]: slot of a PE, -1 if it has no program
    tk_lo: np.ndarray  # int64 [slots + 1]: tasks of slot s are tk_lo[s]:tk_lo[s+1]
    task_trig: np.ndarray  # int64 [tasks]
    task_recv: np.ndarray  # int64 [tasks]: receive queue of a COLOR trigger, else -1
    task_first: np.ndarray  # int64 [tasks]
    task_end: np.ndarray  # int64 [tasks]
    task_act: np.ndarray  # int64 [tasks]: activated (RESET: set at cycle 0)
    task_blk: np.ndarray  # int64 [tasks]
    task_run: np.ndarray  # int64 [tasks]
    i_op: np.ndarray  # int64 [instrs]
    i_n: np.ndarray
    i_count: np.ndarray
    i_body: np.ndarray
    i_task: np.ndarray  # global task index of ACTIVATE/BLOCK/UNBLOCK
    i_nrd: np.ndarray  # SRAM reads per element (strided memory sources)
    i_nrd0: np.ndarray  # extra reads at element 0 (stride-0 memory sources)
    i_wr: np.ndarray  # SRAM writes per element
    i_flops: np.ndarray  # FLOPs per element (FMA 2, other arithmetic 1, MOV 0)
    o_kind: np.ndarray  # int64 [instrs, 4] (dst, a, b, c)
    o_addr: np.ndarray  # absolute SRAM address of element 0, iteration 0
    o_stride: np.ndarray
    o_lstride: np.ndarray
    o_buf: np.ndarray  # FABIN: receive queue; FABOUT: router RAMP FIFO
    o_reg: np.ndarray  # absolute register index
    o_imm: np.ndarray  # float32 [instrs, 4]
    sram: np.ndarray  # float32 pool
    regs: np.ndarray  # float32 [slots * registers]
    th_task: np.ndarray  # int64 [slots * threads], -1 free
    th_pc: np.ndarray
    th_e: np.ndarray  # element index within the current instruction
    th_iter: np.ndarray  # REPEAT iteration
    th_rfirst: np.ndarray
    th_rlast: np.ndarray
    th_rcount: np.ndarray  # 0: not in a REPEAT body
    th_scal: np.ndarray  # float32 [slots * threads, 4]: stride-0 operands loaded at element 0
    halted: np.ndarray  # int64 [slots]
    wake: np.ndarray  # int64 [slots]: a task may have become ready; rescan
    th_rr: np.ndarray  # round-robin pointer over microthreads
    tk_rr: np.ndarray  # round-robin pointer over tasks
    rd_debt: np.ndarray  # SRAM reads owed by an element that needed more than one cycle's
    fp: np.ndarray  # float64 [slots]: fp32 credit
    fp_t: np.ndarray  # int64 [slots]: cycle the credit was last topped up
    nrun: np.ndarray  # int64 [slots]: running threads
    act: np.ndarray  # int64 [slots]: active slots (running or ready)
    in_act: np.ndarray  # uint8 [slots]
    # counters
    cls: np.ndarray  # int64 [5, pes]: cycles per class (CLASSES order)
    sram_rd: np.ndarray  # int64 [pes]
    sram_wr: np.ndarray
    ops: np.ndarray  # arithmetic element-ops
    flops: np.ndarray
    first: np.ndarray  # first cycle with work, -1 never
    last: np.ndarray  # last cycle with work, -1 never


@dataclass
class Assembled:
    fabric: Fabric
    cores: Cores
    task_ids: np.ndarray  # [tasks]: the Task.id of each global task
    task_pc0: np.ndarray  # [tasks]: first global instruction (to print task-relative pcs)
    sram_base: np.ndarray  # [slots + 1]
    registers: int


def assemble(program: Program, wafer: WaferConfig) -> Assembled:
    """Flat engine state of a (validated) program at cycle 0."""
    width, height = program.width, program.height
    npe = width * height
    colors = wafer.colors
    rkeys = sorted(((y * width + x), c) for (x, y, c) in program.routes)
    route_pe = np.array([k[0] for k in rkeys], np.int64)
    route_color = np.array([k[1] for k in rkeys], np.int64)
    route_rx = np.array([program.routes[(p % width, p // width, c)].rx for p, c in rkeys],
                        np.int64)
    route_tx = np.array([program.routes[(p % width, p // width, c)].tx for p, c in rkeys],
                        np.int64)
    fb = build_fabric(width, height, route_pe, route_color, route_rx, route_tx, colors=colors,
                      depth=wafer.queue_depth, hop_latency=wafer.hop_latency,
                      ramp_in=wafer.ramp_in_per_cycle)
    route_of = {k: r for r, k in enumerate(rkeys)}
    n_router = int(fb.rb_lo[-1])
    ramp_fifo = np.full(len(rkeys), -1, np.int64)
    is_ramp = fb.buf_port[:n_router] == RAMP
    ramp_fifo[fb.buf_route[:n_router][is_ramp]] = np.nonzero(is_ramp)[0]

    def recv_queue(pe: int, color: int) -> int:
        return int(fb.dest[route_of[(pe, color)], RAMP])

    def ramp_buffer(pe: int, color: int) -> int:
        return int(ramp_fifo[route_of[(pe, color)]])

    slots = sorted(((y * width + x), (x, y)) for (x, y) in program.pes)
    nslot = len(slots)
    nreg = wafer.registers
    sram_base = np.zeros(nslot + 1, np.int64)
    for s, (_, key) in enumerate(slots):
        sram_base[s + 1] = sram_base[s] + program.pes[key].sram_words
    sram = np.zeros(int(sram_base[-1]), np.float32)
    tk_lo = [0]
    tasks: list[tuple] = []  # (id, trig, recv, first, end, act)
    instrs: list[tuple] = []  # (op, n, count, body, task, nrd, nrd0, wr, flops)
    opnds: list[list[tuple]] = []  # per instr 4 x (kind, addr, stride, lstride, buf, reg, imm)
    for s, (pe, key) in enumerate(slots):
        prog = program.pes[key]
        base = int(sram_base[s])
        for offset, data in prog.image.items():
            sram[base + offset: base + offset + len(data)] = data
        index_of = {task.id: tk_lo[-1] + k for k, task in enumerate(prog.tasks)}
        for task in prog.tasks:
            first = len(instrs)
            for ins in task.instrs:
                rows = []
                nrd = nrd0 = 0
                for k, o in enumerate((ins.dst, ins.a, ins.b, ins.c)):
                    buf = -1
                    if o.kind == Kind.FABIN:
                        buf = recv_queue(pe, o.color)
                    elif o.kind == Kind.FABOUT:
                        buf = ramp_buffer(pe, o.color)
                    elif o.kind == Kind.MEM and k > 0:
                        nrd += o.stride != 0
                        nrd0 += o.stride == 0
                    rows.append((int(o.kind), base + o.offset, o.stride, o.loop_stride, buf,
                                 s * nreg + o.reg, o.value))
                op = Op(ins.op)
                flops = 2 if op == Op.FMA else int(op in ARITHMETIC_OPS)
                wr = int(ins.dst.kind == Kind.MEM)
                instrs.append((int(op), ins.n, ins.count, ins.body, index_of.get(ins.task, -1),
                               nrd, nrd0, wr, flops))
                opnds.append(rows)
            recv = recv_queue(pe, task.color) if task.trigger == Trigger.COLOR else -1
            tasks.append((task.id, int(task.trigger), recv, first, len(instrs),
                          int(task.trigger == Trigger.RESET)))
        tk_lo.append(tk_lo[-1] + len(prog.tasks))

    def col(rows: list[tuple], j: int, dtype: type = np.int64) -> np.ndarray:
        return np.array([r[j] for r in rows], dtype)

    ops = np.array([[o[:6] for o in row] for row in opnds], np.int64).reshape(-1, 4, 6)
    imm = np.array([[o[6] for o in row] for row in opnds], np.float32).reshape(-1, 4)
    threads = wafer.microthreads
    nth = nslot * threads
    slot_pe = np.array([pe for pe, _ in slots], np.int64)
    pe_slot = np.full(npe, -1, np.int64)
    pe_slot[slot_pe] = np.arange(nslot)
    has_tasks = np.diff(np.array(tk_lo)) > 0
    act = np.nonzero(has_tasks)[0].astype(np.int64)
    in_act = np.zeros(nslot, np.uint8)
    in_act[act] = 1
    act_full = np.zeros(nslot, np.int64)
    act_full[: len(act)] = act
    sc = np.zeros(N_CS, np.int64)
    sc[CS_NACT] = len(act)
    sc[CS_LAST_PROGRESS] = sc[CS_LAST_MOVE] = -1
    rate = wafer.fp32_ops_per_cycle
    cores = Cores(
        params=np.array([threads, wafer.sram_reads_per_cycle, wafer.sram_writes_per_cycle,
                         wafer.ramp_out_per_cycle, wafer.deadlock_cycles], np.int64),
        fp_rate=np.array([rate, max(rate, 1.0)], np.float64),
        sc=sc,
        slot_pe=slot_pe,
        pe_slot=pe_slot,
        tk_lo=np.array(tk_lo, np.int64),
        task_trig=col(tasks, 1),
        task_recv=col(tasks, 2),
        task_first=col(tasks, 3),
        task_end=col(tasks, 4),
        task_act=col(tasks, 5),
        task_blk=np.zeros(len(tasks), np.int64),
        task_run=np.zeros(len(tasks), np.int64),
        i_op=col(instrs, 0),
        i_n=col(instrs, 1),
        i_count=col(instrs, 2),
        i_body=col(instrs, 3),
        i_task=col(instrs, 4),
        i_nrd=col(instrs, 5),
        i_nrd0=col(instrs, 6),
        i_wr=col(instrs, 7),
        i_flops=col(instrs, 8),
        o_kind=np.ascontiguousarray(ops[:, :, 0]),
        o_addr=np.ascontiguousarray(ops[:, :, 1]),
        o_stride=np.ascontiguousarray(ops[:, :, 2]),
        o_lstride=np.ascontiguousarray(ops[:, :, 3]),
        o_buf=np.ascontiguousarray(ops[:, :, 4]),
        o_reg=np.ascontiguousarray(ops[:, :, 5]),
        o_imm=imm,
        sram=sram,
        regs=np.zeros(nslot * nreg, np.float32),
        th_task=np.full(nth, -1, np.int64),
        th_pc=np.zeros(nth, np.int64),
        th_e=np.zeros(nth, np.int64),
        th_iter=np.zeros(nth, np.int64),
        th_rfirst=np.zeros(nth, np.int64),
        th_rlast=np.zeros(nth, np.int64),
        th_rcount=np.zeros(nth, np.int64),
        th_scal=np.zeros((nth, 4), np.float32),
        halted=np.zeros(nslot, np.int64),
        wake=has_tasks.astype(np.int64),
        th_rr=np.zeros(nslot, np.int64),
        tk_rr=np.zeros(nslot, np.int64),
        rd_debt=np.zeros(nslot, np.int64),
        fp=np.full(nslot, max(rate, 1.0), np.float64),  # full credit at cycle 0
        fp_t=np.zeros(nslot, np.int64),
        nrun=np.zeros(nslot, np.int64),
        act=act_full,
        in_act=in_act,
        cls=np.zeros((len(CLASSES), npe), np.int64),
        sram_rd=np.zeros(npe, np.int64),
        sram_wr=np.zeros(npe, np.int64),
        ops=np.zeros(npe, np.int64),
        flops=np.zeros(npe, np.int64),
        first=np.full(npe, -1, np.int64),
        last=np.full(npe, -1, np.int64),
    )
    return Assembled(fabric=fb, cores=cores, task_ids=col(tasks, 0),
                     task_pc0=col(tasks, 3), sram_base=sram_base, registers=nreg)
