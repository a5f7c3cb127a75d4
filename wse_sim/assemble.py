"""Flatten a validated Program into the engine's record arrays (`wse_sim.state`).

Memory operands carry absolute addresses into one float32 SRAM pool in which slot s owns
`sram_base[s] : sram_base[s + 1]` (the program's `sram_words`, not the wafer's capacity);
an fp16 (half) memory operand carries the absolute address of its half, 2 * word + (0
low, 1 high); register operands carry absolute indices into the register pool (slot s owns
`s * registers : (s + 1) * registers`). Fabric operands and COLOR tasks carry the FIFO
they use: the route's receive queue (FABIN, trigger) or its RAMP input FIFO (FABOUT).

`Assembler(program, wafer)` flattens a program once; each `state(pes)` is fresh engine state
at cycle 0 of that program with the programs `pes` in place of some PEs' (the same SRAM
sizes): only their code and SRAM words are flattened again, so a program run many times
with new data and new code on a few PEs (a training step's batch) costs little to assemble.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from wse_sim.errors import UserError
from wse_sim.hardware import WaferConfig
from wse_sim.program import (
    ARITHMETIC_OPS,
    SOURCES_OF,
    Kind,
    Op,
    PEProgram,
    Port,
    Program,
    Task,
    Trigger,
    half_words,
    kept_tasks,
    simd_width,
)
from wse_sim.router import FabricSpec, PortTable, RouteTable, SwitchTable, build_fabric
from wse_sim.state import (
    BULK,
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
MAX_THREADS = 63  # SLOT.running
_VECTOR_OPS = frozenset(int(op) for op in SOURCES_OF)
_FLOPS = {int(op): 2 if op == Op.FMA else int(op in ARITHMETIC_OPS) for op in Op}  # per element


@dataclass
class Assembled:
    fabric: Fabric
    cores: Cores
    workers: Workers
    task_ids: np.ndarray  # [tasks]: the Task.id of each global task
    sram_base: np.ndarray  # [slots + 1]
    slot_pe: np.ndarray  # [slots]: PE index of each slot
    registers: int
    port_names: list[str] = field(default_factory=list)  # the edge ports, program order

    def slot_of(self, pe: int) -> int:
        """The slot of PE index `pe`, -1 if it has no program."""
        s = int(np.searchsorted(self.slot_pe, pe))
        return s if s < len(self.slot_pe) and self.slot_pe[s] == pe else -1


@dataclass(frozen=True)
class _TaskCode:
    """One task flattened. Its instruction indices count from its first instruction, the
    task indices of its instructions from its PE's first task (`_cores` moves both to their
    place among all PEs')."""

    task: tuple  # TASK fields
    ins: np.ndarray  # INSTR
    opnd: np.ndarray  # OPERAND
    id: int  # Task.id


class Assembler:
    """Engine state at cycle 0 of a validated `program`, its rows split into `stripes`,
    with any PEs' programs replaced (module docstring); `bulk_runs` False makes the engine
    run every cycle of every PE one by one (`wse_sim.engine`, "Bulk execution")."""

    def __init__(self, program: Program, wafer: WaferConfig, stripes: int = 1,
                 bulk_runs: bool = True) -> None:
        self.program, self.wafer, self.stripes = program, wafer, stripes
        self.bulk_runs = bulk_runs
        width = program.width
        rkeys = sorted(((y * width + x), c) for (x, y, c) in program.routes)
        routes = [program.routes[(p % width, p // width, c)] for p, c in rkeys]
        self.slots = {key: s for s, (_, key) in enumerate(
            sorted(((y * width + x), (x, y)) for (x, y) in program.pes))}
        self.slot_pe = np.array([y * width + x for x, y in self.slots], np.int64)
        self.spec = FabricSpec(width, program.height, colors=wafer.colors,
                               depth=wafer.queue_depth, hop_latency=wafer.hop_latency,
                               ramp_in=wafer.ramp_in_per_cycle,
                               switch_latency=wafer.switch_latency,
                               edge_rate=wafer.edge_words_per_cycle,
                               edge_latency=wafer.edge_latency_cycles)
        self.table = RouteTable(*(np.array(col, np.int64).reshape(-1) for col in (
            [k[0] for k in rkeys], [k[1] for k in rkeys], [r.rx_any for r in routes],
            [r.tx_any for r in routes])))
        switched = [(i, r) for i, r in enumerate(routes) if r.positions]
        self.switches = SwitchTable(*(np.array(col, np.int64).reshape(-1) for col in (
            [i for i, _ in switched], [r.start for _, r in switched],
            [int(r.ring) for _, r in switched], [r.count for _, r in switched],
            [r.position(k)[0] for _, r in switched for k in range(r.count)],
            [r.position(k)[1] for _, r in switched for k in range(r.count)])))
        self.route_of = {k: r for r, k in enumerate(rkeys)}
        edge = program.ports
        self.ports = PortTable(
            *(np.array(col, np.int64).reshape(-1) for col in (
                [self.route_of[(p.y * width + p.x, p.color)] for p in edge],
                [int(p.side) for p in edge], [int(p.inbound) for p in edge],
                [len(p.data) if p.inbound else p.expected for p in edge],
                [len(p.marks) for p in edge])),
            np.concatenate([p.data for p in edge if p.inbound] or [np.zeros(0, np.float32)]
                           ).astype(np.float32),
            np.array([m for p in edge for m in p.marks], np.int64))
        fifo = self._fabric()[0].info
        self.ramp_fifo = np.full(len(rkeys), -1, np.int64)
        self.recv_fifo = np.full(len(rkeys), -1, np.int64)
        for port, out in ((Port.RAMP, self.ramp_fifo), (RECV, self.recv_fifo)):
            sel = np.nonzero(fifo["port"] == port)[0]
            out[fifo["route"][sel]] = sel
        self.sram_base = np.zeros(len(self.slots) + 1, np.int64)
        for s, key in enumerate(self.slots):
            self.sram_base[s + 1] = self.sram_base[s] + program.pes[key].sram_words
        self.code = [self._code(s, key, program.pes[key]) for s, key in enumerate(self.slots)]
        # slot -> the task list the last `state` replaced its code with, and that code
        self._replaced: dict[int, tuple[list[Task], list[_TaskCode]]] = {}

    def _fabric(self) -> tuple[Fabric, Workers]:
        return build_fabric(self.spec, self.table, self.slot_pe, self.stripes, self.switches,
                            self.ports)

    def _fifo(self, x: int, y: int, kind: Kind, color: int) -> int:
        r = self.route_of[(y * self.spec.width + x, color)]
        return int(self.recv_fifo[r] if kind == Kind.FABIN else self.ramp_fifo[r])

    def _code(self, s: int, key: tuple[int, int], prog: PEProgram,
              kept: list[bool] | None = None) -> list[_TaskCode]:
        """Slot s's code: the tasks of PE `key`, the program's own flattening of those
        `kept` (`kept_tasks`)."""
        index_of = {task.id: k for k, task in enumerate(prog.tasks)}
        return [self.code[s][k] if kept and kept[k] else self._task(s, key, task, index_of)
                for k, task in enumerate(prog.tasks)]

    def _task(self, s: int, key: tuple[int, int], task: Task, index_of: dict[int, int]
              ) -> _TaskCode:
        """`task` of slot s (PE `key`, whose tasks are at `index_of` by id) flattened.
        (Plain loops and int opcodes: gpt_small has 333k instructions.)"""
        base = int(self.sram_base[s])
        reg0 = s * self.wafer.registers
        ins: list[tuple] = []
        opnd: list[tuple] = []
        for instr in task.instrs:
            op = int(instr.op)
            opnds = (instr.dst, instr.a, instr.b, instr.c)
            strided = scalar = 0  # memory sources
            half = fabric = False
            for k, o in enumerate(opnds):
                kind = o.kind
                if kind == Kind.MEM:
                    if k:
                        if o.stride:
                            strided += 1
                        else:
                            scalar += 1
                elif kind in FABRIC_KINDS:
                    fabric = True
                half = half or o.half
            vector = op in _VECTOR_OPS
            simd = simd_width(instr, self.wafer) if half and vector else 0
            dst_mem = int(instr.dst.kind == Kind.MEM)
            if simd:  # fp16: words per element and per pair (`wse_sim.program.simd_width`)
                nrd, nrdh = half_words(instr)
                wrh = int(dst_mem and instr.dst.half and instr.dst.stride == 1)
                wr = dst_mem - wrh
            else:
                nrd, nrdh, wr, wrh = strided, 0, dst_mem, 0
            # INSTR field order
            ins.append((op, instr.n, instr.count, instr.body, index_of.get(instr.task, -1),
                        nrd, scalar, wr, _FLOPS[op], int(vector and not fabric), simd, nrdh,
                        wrh))
            for o in opnds:  # OPERAND field order
                kind = o.kind
                fab = self._fifo(*key, kind, o.color) if kind in FABRIC_KINDS else -1
                # a half memory operand addresses halves: half h of word w is 2 w + h
                addr = 2 * base + o.offset if o.half else base + o.offset
                opnd.append((addr, o.stride, o.loop_stride, int(kind), fab, reg0 + o.reg,
                             o.value, int(o.half)))
        recv = (self._fifo(*key, Kind.FABIN, task.color)
                if task.trigger == Trigger.COLOR else -1)
        # TASK field order
        return _TaskCode((int(task.trigger), recv, 0, len(ins),
                          int(task.trigger == Trigger.RESET), 0, 0),
                         np.array(ins, INSTR.dtype), np.array(opnd, OPERAND.dtype), task.id)

    def state(self, pes: Mapping[tuple[int, int], PEProgram] | None = None) -> Assembled:
        """Engine state at cycle 0 with the PE programs `pes` (validated, of PEs of the
        program, their SRAM sizes unchanged) in place of the program's; only the tasks they
        do not keep (`kept_tasks`) are flattened again."""
        pes = pes or {}
        code = list(self.code)
        sram = np.zeros(int(self.sram_base[-1]), np.float32)
        replaced = {}
        for s, key in enumerate(self.slots):
            prog = pes.get(key, self.program.pes[key])
            base = int(self.sram_base[s])
            for offset, data in prog.image.items():
                sram[base + offset: base + offset + len(data)] = data
            kept = kept_tasks(self.program.pes[key], prog)
            if not all(kept):
                last = self._replaced.get(s)
                code[s] = (last[1] if last is not None and last[0] is prog.tasks
                           else self._code(s, key, prog, kept))
                replaced[s] = (prog.tasks, code[s])
        self._replaced = replaced
        fb, wk = self._fabric()
        cores, task_ids = self._cores(code, sram, fb, wk)
        return Assembled(fabric=fb, cores=cores, workers=wk, task_ids=task_ids,
                         sram_base=self.sram_base, slot_pe=self.slot_pe,
                         registers=self.wafer.registers,
                         port_names=[p.name for p in self.program.ports])

    def _cores(self, code: list[list[_TaskCode]], sram: np.ndarray, fb: Fabric, wk: Workers
               ) -> tuple[Cores, np.ndarray]:
        """The PEs' state at cycle 0 running `code` (slot by slot) from `sram`, listed for
        cycle 0 in `wk`'s stripes; and the Task.id of every task."""
        wafer = self.wafer
        nslot, nreg, threads = len(code), wafer.registers, wafer.microthreads
        if threads > MAX_THREADS:
            raise UserError(f"microthreads must be at most {MAX_THREADS} (got {threads}): the "
                            "engine keeps a PE's running threads as bits of one int64")
        tasks = [t for slot_code in code for t in slot_code]
        task_lo = np.concatenate(([0], np.cumsum([len(c) for c in code], dtype=np.int64)))
        nins = np.array([len(t.ins) for t in tasks], np.int64)
        first = np.concatenate(([0], np.cumsum(nins)))[:-1]
        task = np.array([t.task for t in tasks], TASK.dtype)
        task["first"] += first
        task["end"] += first
        ins, opnd = (_join([getattr(t, name) for t in tasks], dtype)
                     for name, dtype in (("ins", INSTR.dtype), ("opnd", OPERAND.dtype)))
        pe_first_task = np.repeat(task_lo[:-1], np.diff(task_lo))
        ins["task"] = np.where(ins["task"] >= 0, ins["task"] + np.repeat(pe_first_task, nins),
                               -1)
        slot = SLOT.new(nslot)
        slot["tk_lo"], slot["tk_hi"] = task_lo[:-1], task_lo[1:]
        slot["router"] = np.searchsorted(fb.router_pe, self.slot_pe)
        rate = wafer.fp32_ops_per_cycle
        slot["fpc"] = max(rate, 1.0)  # full credit at cycle 0
        params = CORE_PARAMS.new(1)
        for name, value in (("threads", threads), ("reads", wafer.sram_reads_per_cycle),
                            ("writes", wafer.sram_writes_per_cycle),
                            ("ramp_out", wafer.ramp_out_per_cycle),
                            ("deadlock", wafer.deadlock_cycles), ("fp_rate", rate),
                            ("fp_cap", max(rate, 1.0)), ("bulk", int(self.bulk_runs))):
            params[name] = value
        cores = Cores(
            params=params,
            slot=slot,
            ctr=PE_COUNTERS.new(nslot),
            bulk=BULK.new(nslot),
            task=task,
            ins=ins,
            opnd=opnd,
            th=THREAD.new(nslot * threads),
            sram=sram,
            regs=np.zeros(nslot * nreg, np.float32),
            active=np.zeros((2, max(nslot, 1)), np.int32),
            timer_t=np.zeros(max(nslot, 1), np.int64),
            timer_s=np.zeros(max(nslot, 1), np.int32),
            timer_at=np.full(max(nslot, 1), -1, np.int32),
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
        return cores, np.array([t.id for t in tasks], np.int64)


def _join(arrays: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    """The record arrays `arrays` (of `dtype`) end to end. Joined as bytes: numpy joins
    record arrays field by field, which costs more than the data for many small ones."""
    return np.concatenate([a.view(np.uint8) for a in arrays] or [np.zeros(0, np.uint8)]
                          ).view(dtype)
