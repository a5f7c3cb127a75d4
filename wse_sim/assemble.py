"""Flatten a validated Program into the engine's record arrays (`wse_sim.state`).

Memory operands carry absolute addresses into one float32 SRAM pool in which slot s owns
`sram_base[s] : sram_base[s + 1]` (the program's `sram_words`, not the wafer's capacity);
register operands carry absolute indices into the register pool (slot s owns
`s * registers : (s + 1) * registers`). Fabric operands and COLOR tasks carry the FIFO
they use: the route's receive queue (FABIN, trigger) or its RAMP input FIFO (FABOUT).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wse_sim.hardware import WaferConfig
from wse_sim.program import ARITHMETIC_OPS, SOURCES_OF, Kind, Op, Port, Program, Trigger
from wse_sim.router import FabricSpec, RouteTable, build_fabric
from wse_sim.state import (
    CORE_PARAMS,
    INSTR,
    OPERAND,
    OPERANDS,
    PE_COUNTERS,
    RECV,
    SLOT,
    TASK,
    THREAD,
    Cores,
    Fabric,
    Workers,
)

FABRIC_KINDS = (Kind.FABIN, Kind.FABOUT)


@dataclass
class Assembled:
    fabric: Fabric
    cores: Cores
    workers: Workers
    task_ids: np.ndarray  # [tasks]: the Task.id of each global task
    sram_base: np.ndarray  # [slots + 1]
    slot_pe: np.ndarray  # [slots]: PE index of each slot
    registers: int

    def slot_of(self, pe: int) -> int:
        """The slot of PE index `pe`, -1 if it has no program."""
        s = int(np.searchsorted(self.slot_pe, pe))
        return s if s < len(self.slot_pe) and self.slot_pe[s] == pe else -1


def assemble(program: Program, wafer: WaferConfig, stripes: int = 1) -> Assembled:
    """Engine state of a (validated) program at cycle 0, its rows split into `stripes`."""
    width = program.width
    rkeys = sorted(((y * width + x), c) for (x, y, c) in program.routes)
    routes = [program.routes[(p % width, p // width, c)] for p, c in rkeys]
    slots = sorted(((y * width + x), (x, y)) for (x, y) in program.pes)
    slot_pe = np.array([pe for pe, _ in slots], np.int64)
    spec = FabricSpec(width, program.height, colors=wafer.colors, depth=wafer.queue_depth,
                      hop_latency=wafer.hop_latency, ramp_in=wafer.ramp_in_per_cycle)
    table = RouteTable(*(np.array(col, np.int64).reshape(-1) for col in (
        [k[0] for k in rkeys], [k[1] for k in rkeys], [r.rx for r in routes],
        [r.tx for r in routes])))
    fb, wk = build_fabric(spec, table, slot_pe, stripes)
    route_of = {k: r for r, k in enumerate(rkeys)}
    fifo = fb.info
    ramp_fifo = np.full(len(rkeys), -1, np.int64)
    recv_fifo = np.full(len(rkeys), -1, np.int64)
    for port, out in ((Port.RAMP, ramp_fifo), (RECV, recv_fifo)):
        sel = np.nonzero(fifo["port"] == port)[0]
        out[fifo["route"][sel]] = sel

    def fabric_fifo(pe: int, kind: Kind, color: int) -> int:
        r = route_of[(pe, color)]
        return int(recv_fifo[r] if kind == Kind.FABIN else ramp_fifo[r])

    nslot = len(slots)
    nreg = wafer.registers
    threads = wafer.microthreads
    sram_base = np.zeros(nslot + 1, np.int64)
    for s, (_, key) in enumerate(slots):
        sram_base[s + 1] = sram_base[s] + program.pes[key].sram_words
    sram = np.zeros(int(sram_base[-1]), np.float32)
    slot = SLOT.new(nslot)
    tasks: list[tuple] = []
    task_ids: list[int] = []
    ins: list[tuple] = []
    opnd: list[tuple] = []
    for s, (pe, key) in enumerate(slots):
        prog = program.pes[key]
        base = int(sram_base[s])
        for offset, data in prog.image.items():
            sram[base + offset: base + offset + len(data)] = data
        slot["tk_lo"][s] = len(tasks)
        index_of = {task.id: len(tasks) + k for k, task in enumerate(prog.tasks)}
        for task in prog.tasks:
            first = len(ins)
            for instr in task.instrs:
                op = Op(instr.op)
                opnds = (instr.dst, instr.a, instr.b, instr.c)
                sources = [o for o in opnds[1:] if o.kind == Kind.MEM]
                # INSTR field order
                ins.append((int(op), instr.n, instr.count, instr.body,
                            index_of.get(instr.task, -1),
                            sum(o.stride != 0 for o in sources),
                            sum(o.stride == 0 for o in sources),
                            int(instr.dst.kind == Kind.MEM),
                            2 if op == Op.FMA else int(op in ARITHMETIC_OPS),
                            int(op in SOURCES_OF
                                and not any(o.kind in FABRIC_KINDS for o in opnds))))
                for o in opnds:  # OPERAND field order
                    fab = fabric_fifo(pe, o.kind, o.color) if o.kind in FABRIC_KINDS else -1
                    opnd.append((base + o.offset, o.stride, o.loop_stride, int(o.kind), fab,
                                 s * nreg + o.reg, o.value))
            recv = (fabric_fifo(pe, Kind.FABIN, task.color)
                    if task.trigger == Trigger.COLOR else -1)
            # TASK field order
            tasks.append((int(task.trigger), recv, first, len(ins),
                          int(task.trigger == Trigger.RESET), 0, 0))
            task_ids.append(task.id)
        slot["tk_hi"][s] = len(tasks)
        slot["ncolor"][s] = sum(task.trigger == Trigger.COLOR for task in prog.tasks)
    slot["router"] = np.searchsorted(fb.router_pe, slot_pe)
    rate = wafer.fp32_ops_per_cycle
    slot["fpc"] = max(rate, 1.0)  # full credit at cycle 0
    params = CORE_PARAMS.new(1)
    for name, value in (("threads", threads), ("reads", wafer.sram_reads_per_cycle),
                        ("writes", wafer.sram_writes_per_cycle),
                        ("ramp_out", wafer.ramp_out_per_cycle),
                        ("deadlock", wafer.deadlock_cycles), ("fp_rate", rate),
                        ("fp_cap", max(rate, 1.0))):
        params[name] = value
    cores = Cores(
        params=params,
        slot=slot,
        ctr=PE_COUNTERS.new(nslot),
        task=np.array(tasks, TASK.dtype),
        ins=np.array(ins, INSTR.dtype),
        opnd=np.array(opnd, OPERAND.dtype),
        th=THREAD.new(nslot * threads),
        sram=sram,
        regs=np.zeros(nslot * nreg, np.float32),
        active=np.zeros((2, max(nslot, 1)), np.int32),
        timer_t=np.zeros(max(nslot, 1), np.int64),
        timer_s=np.zeros(max(nslot, 1), np.int32),
    )
    assert len(cores.opnd) == OPERANDS * len(cores.ins)
    # Cycle 0 runs the PEs that have tasks (the first `pe_phase` swaps the lists).
    has_tasks = slot["tk_hi"] > slot["tk_lo"]
    slot["wake"] = has_tasks
    slot["queued"][has_tasks] = 0
    for k, (lo, hi) in enumerate(zip(wk.stripe["s_lo"], wk.stripe["s_hi"], strict=True)):
        listed = np.nonzero(has_tasks[lo:hi])[0] + lo
        cores.active[1, lo: lo + len(listed)] = listed
        wk.stripe["p_nnext"][k] = wk.stripe["pub_active"][k] = len(listed)
    return Assembled(fabric=fb, cores=cores, workers=wk, task_ids=np.array(task_ids, np.int64),
                     sram_base=sram_base, slot_pe=slot_pe, registers=nreg)
