"""Flatten a validated Program into structure-of-arrays numpy state for the numba engine.

Indices: a *slot* is a PE that has a program (slots are ordered by PE index); tasks and
instructions are numbered globally, each slot's tasks contiguous, each task's instructions
contiguous. Memory operands carry absolute addresses into one float32 SRAM pool in which
slot s owns `sram_base[s] : sram_base[s] + sram_words`; register operands carry absolute
indices into the register pool (slot s owns `s * registers : (s + 1) * registers`).

State is grouped into 2D int64 arrays with one row per item (slot, task, instruction,
thread, PE) and named columns, so one item's fields share cache lines and the numba
functions take few arrays (see `wse_sim.router` on why hot loops avoid tuple attributes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from wse_sim.hardware import WaferConfig
from wse_sim.program import ARITHMETIC_OPS, SOURCES_OF, Kind, Op, Program, Trigger
from wse_sim.router import B_PORT, B_ROUTE, RAMP, Fabric, build_fabric

# params entries
C_THREADS, C_READS, C_WRITES, C_RAMP_OUT, C_DEADLOCK = range(5)
# sc entries
CS_NACT, CS_LAST_PROGRESS, CS_BULK_END, CS_NEXT_FREE, CS_NSLEEP = range(5)
# slot columns
(S_PE, S_TK_LO, S_TK_HI, S_HALTED, S_WAKE, S_TH_RR, S_TK_RR, S_RD_DEBT, S_FP_T, S_NRUN,
 S_IN_ACT, S_NCOLOR, S_BUSY, S_SLEEP) = range(14)
N_SLOT_COLS = 14
# task columns
T_TRIG, T_RECV, T_FIRST, T_END, T_ACT, T_BLK, T_RUN = range(7)
# ins columns: the instruction, then 6 columns per operand k (dst, a, b, c) at O_BASE + 6k
I_OP, I_N, I_COUNT, I_BODY, I_TASK, I_NRD, I_NRD0, I_WR, I_FLOPS, I_BULK = range(10)
O_BASE = 10
O_KIND, O_ADDR, O_STRIDE, O_LSTRIDE, O_BUF, O_REG = range(6)  # + O_BASE + 6 * k
# th columns
TH_TASK, TH_PC, TH_E, TH_ITER, TH_RFIRST, TH_RLAST, TH_RCOUNT = range(7)
# ctr columns (per PE): cycles by class (CLASSES order), then the other counters
CLASSES = ("compute", "send", "receive", "move", "stalled")
K_COMPUTE, K_SEND, K_RECV, K_MOVE, K_STALL = range(5)
CT_RD, CT_WR, CT_OPS, CT_FLOPS, CT_FIRST, CT_LAST = range(5, 11)


class Cores(NamedTuple):
    """PE state and code as grouped flat arrays (a numba-friendly named tuple)."""

    params: np.ndarray  # int64, C_* entries
    fp_rate: np.ndarray  # float64 [2]: fp32 elements per cycle, credit cap
    sc: np.ndarray  # int64, CS_* entries
    slot: np.ndarray  # int64 [slots, N_SLOT_COLS]
    act: np.ndarray  # int64 [slots]: active slots (running or ready), first sc[CS_NACT]
    fpc: np.ndarray  # float64 [slots]: fp32 credit
    pe_slot: np.ndarray  # int64 [pes]: slot of a PE, -1 if it has no program
    task: np.ndarray  # int64 [tasks, 7]
    ins: np.ndarray  # int64 [instrs, O_BASE + 24]
    imm: np.ndarray  # float32 [instrs, 4]
    sram: np.ndarray  # float32 pool
    regs: np.ndarray  # float32 [slots * registers]
    th: np.ndarray  # int64 [slots * threads, 7]; TH_TASK -1: free
    th_scal: np.ndarray  # float32 [slots * threads, 4]: stride-0 operands loaded at element 0
    ctr: np.ndarray  # int64 [pes, 11]
    budget: np.ndarray  # int64 [3] scratch: SRAM reads, writes, ramp slots left this cycle


@dataclass
class Assembled:
    fabric: Fabric
    cores: Cores
    task_ids: np.ndarray  # [tasks]: the Task.id of each global task
    sram_base: np.ndarray  # [slots + 1]
    registers: int


def assemble(program: Program, wafer: WaferConfig) -> Assembled:
    """Flat engine state of a (validated) program at cycle 0."""
    width, height = program.width, program.height
    npe = width * height
    rkeys = sorted(((y * width + x), c) for (x, y, c) in program.routes)
    routes = [program.routes[(p % width, p // width, c)] for p, c in rkeys]
    fb = build_fabric(width, height, np.array([k[0] for k in rkeys], np.int64),
                      np.array([k[1] for k in rkeys], np.int64),
                      np.array([r.rx for r in routes], np.int64),
                      np.array([r.tx for r in routes], np.int64), colors=wafer.colors,
                      depth=wafer.queue_depth, hop_latency=wafer.hop_latency,
                      ramp_in=wafer.ramp_in_per_cycle)
    route_of = {k: r for r, k in enumerate(rkeys)}
    n_router = int(fb.rb_lo[-1])
    ramp_fifo = np.full(len(rkeys), -1, np.int64)
    is_ramp = fb.buf[:n_router, B_PORT] == RAMP
    ramp_fifo[fb.buf[:n_router, B_ROUTE][is_ramp]] = np.nonzero(is_ramp)[0]

    def fabric_buffer(pe: int, kind: Kind, color: int) -> int:
        r = route_of[(pe, color)]
        return int(fb.dest[r, RAMP] if kind == Kind.FABIN else ramp_fifo[r])

    slots = sorted(((y * width + x), (x, y)) for (x, y) in program.pes)
    nslot = len(slots)
    nreg = wafer.registers
    threads = wafer.microthreads
    sram_base = np.zeros(nslot + 1, np.int64)
    for s, (_, key) in enumerate(slots):
        sram_base[s + 1] = sram_base[s] + program.pes[key].sram_words
    sram = np.zeros(int(sram_base[-1]), np.float32)
    slot = np.zeros((nslot, N_SLOT_COLS), np.int64)
    tasks: list[list[int]] = []
    task_ids: list[int] = []
    ins: list[list[int]] = []
    imm: list[list[float]] = []
    for s, (pe, key) in enumerate(slots):
        prog = program.pes[key]
        base = int(sram_base[s])
        for offset, data in prog.image.items():
            sram[base + offset: base + offset + len(data)] = data
        slot[s, S_PE], slot[s, S_TK_LO] = pe, len(tasks)
        index_of = {task.id: len(tasks) + k for k, task in enumerate(prog.tasks)}
        for task in prog.tasks:
            first = len(ins)
            for instr in task.instrs:
                op = Op(instr.op)
                opnds = (instr.dst, instr.a, instr.b, instr.c)
                sources = [o for o in opnds[1:] if o.kind == Kind.MEM]
                row = [int(op), instr.n, instr.count, instr.body, index_of.get(instr.task, -1),
                       sum(o.stride != 0 for o in sources), sum(o.stride == 0 for o in sources),
                       int(instr.dst.kind == Kind.MEM),
                       2 if op == Op.FMA else int(op in ARITHMETIC_OPS),
                       int(op in SOURCES_OF and not any(o.kind in (Kind.FABIN, Kind.FABOUT)
                                                        for o in opnds))]
                for o in opnds:
                    fab = o.kind in (Kind.FABIN, Kind.FABOUT)
                    row += [int(o.kind), base + o.offset, o.stride, o.loop_stride,
                            fabric_buffer(pe, o.kind, o.color) if fab else -1, s * nreg + o.reg]
                ins.append(row)
                imm.append([o.value for o in opnds])
            recv = (fabric_buffer(pe, Kind.FABIN, task.color)
                    if task.trigger == Trigger.COLOR else -1)
            tasks.append([int(task.trigger), recv, first, len(ins),
                          int(task.trigger == Trigger.RESET), 0, 0])
            task_ids.append(task.id)
        slot[s, S_TK_HI] = len(tasks)
        slot[s, S_NCOLOR] = sum(task.trigger == Trigger.COLOR for task in prog.tasks)
    has_tasks = slot[:, S_TK_HI] > slot[:, S_TK_LO]
    slot[:, S_WAKE] = slot[:, S_IN_ACT] = has_tasks
    slot[:, S_SLEEP] = -1  # cycle after which it sleeps waiting for a delivery
    act = np.zeros(nslot, np.int64)
    active = np.nonzero(has_tasks)[0]
    act[: len(active)] = active
    sc = np.zeros(5, np.int64)
    sc[CS_NACT] = len(active)
    sc[CS_LAST_PROGRESS] = sc[CS_BULK_END] = -1
    rate = wafer.fp32_ops_per_cycle
    th = np.zeros((nslot * threads, 7), np.int64)
    th[:, TH_TASK] = -1
    ctr = np.zeros((npe, 11), np.int64)
    ctr[:, CT_FIRST] = ctr[:, CT_LAST] = -1
    cores = Cores(
        params=np.array([threads, wafer.sram_reads_per_cycle, wafer.sram_writes_per_cycle,
                         wafer.ramp_out_per_cycle, wafer.deadlock_cycles], np.int64),
        fp_rate=np.array([rate, max(rate, 1.0)], np.float64),
        sc=sc,
        slot=slot,
        act=act,
        fpc=np.full(nslot, max(rate, 1.0), np.float64),  # full credit at cycle 0
        pe_slot=np.full(npe, -1, np.int64),
        task=np.array(tasks, np.int64).reshape(-1, 7),
        ins=np.array(ins, np.int64).reshape(-1, O_BASE + 24),
        imm=np.array(imm, np.float32).reshape(-1, 4),
        sram=sram,
        regs=np.zeros(nslot * nreg, np.float32),
        th=th,
        th_scal=np.zeros((nslot * threads, 4), np.float32),
        ctr=ctr,
        budget=np.zeros(3, np.int64),
    )
    cores.pe_slot[slot[:, S_PE]] = np.arange(nslot)
    return Assembled(fabric=fb, cores=cores, task_ids=np.array(task_ids, np.int64),
                     sram_base=sram_base, registers=nreg)
