"""The cycle-level engine: `simulate(program, wafer)` runs a Program on the fabric model.

Timing model (every cycle below is counted by the loop, none estimated)
-----------------------------------------------------------------------

A cycle `t` is two phases, both judged on start-of-cycle state: first every router
(`wse_sim.router`: FIFOs per (route, input port), ready heads, least-recently-served
arbitration, one wavelet per output link per cycle, room judged on start-of-cycle
occupancy so a freed slot is reusable from t + 1), then every PE.

Latency. A FABOUT element executed in cycle t puts its wavelet in the router's RAMP FIFO;
it may leave the router at t + 1, crosses each mesh link in `hop_latency` (L) cycles, and is
put into the destination PE's receive queue in the cycle its last router moves it; the
PE may consume it (a FABIN element) one cycle later. Unloaded, a wavelet sent over h hops
in cycle t is consumed in cycle t + h * L + 2 (h = 0: a PE sending to itself, t + 2).

PE. Tasks: RESET tasks are ready at cycle 0, LOCAL tasks when ACTIVATEd (any task may be
activated), COLOR tasks whenever a wavelet of their color is ready in the PE's receive
queue. A task starts (at no cost) in the first cycle it is ready, not blocked, not already
running, the PE has not halted, and a microthread is free (tasks are scanned round-robin).
A running task executes its instructions in order to completion; its microthread is free
for another task from the next cycle. Each cycle the running threads are served
round-robin (starting after the thread first served in the previous cycle) and each
advances at most one element of its current vector instruction, if the PE's per-cycle
budgets allow it:

* SRAM reads: `sram_reads_per_cycle` words; an element reads one word per strided memory
  source, and element 0 also loads the stride-0 (scalar) memory sources. An element needing
  more words than a whole cycle's budget proceeds when the budget is untouched and the
  excess is owed by the following cycle(s).
* SRAM writes: `sram_writes_per_cycle` words (a memory destination writes one per element).
* fp32: every op but MOV takes one element of `fp32_ops_per_cycle`, kept as a credit that
  grows by the rate each cycle up to max(rate, 1): a rate of 0.5 gives one element every
  two cycles.
* fabric: each FABIN operand needs a ready wavelet of its color in the receive queue (it
  is consumed); a FABOUT destination needs room in the router's RAMP FIFO of its color
  (start-of-cycle occupancy) and one of the PE's `ramp_out_per_cycle` slots.

Register sources are read when the element executes, so `ADD dst=Reg r, a=Mem, b=Reg r`
accumulates. An instruction finishes with its n-th element; the thread's next instruction
starts the next cycle. REPEAT, ACTIVATE, BLOCK, UNBLOCK and HALT take one cycle each
(REPEAT only when it is reached: jumping back to the body's start is free, a zero-overhead
loop). HALT stops new tasks from starting on the PE; running tasks finish.

Cycle classes, one per PE per cycle, first that applies: compute (an arithmetic element
advanced, or a thread waited only for fp32 credit), send (an element produced a
wavelet), receive (an element consumed a wavelet), move (a MOV between memory/registers or
a control op), stalled (a thread waited for the fabric: FABIN empty or RAMP FIFO full),
idle (the rest, including PEs without a program).

The run ends at the first cycle at which no thread runs, no task is ready and no wavelet
is in any FIFO or receive queue; `cycles` is that cycle's index. Deadlock: `deadlock_cycles`
cycles without progress (a wavelet moved, an element or control op executed, a task
started), or a fabric with no PE left able to act whose routers moved nothing for
hop_latency + 1 cycles (then nothing can ever change). Both raise DeadlockError naming the
waiting threads and the full FIFOs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numba import njit

from wse_sim.assemble import (
    C_DEADLOCK,
    C_RAMP_OUT,
    C_READS,
    C_THREADS,
    C_WRITES,
    CS_CONSUMED,
    CS_LAST_MOVE,
    CS_LAST_PROGRESS,
    CS_NACT,
    K_COMPUTE,
    K_MOVE,
    K_RECV,
    K_SEND,
    K_STALL,
    Assembled,
    assemble,
)
from wse_sim.errors import DeadlockError, UserError
from wse_sim.hardware import WaferConfig
from wse_sim.program import Kind, Op, Port, Program, Trigger, validate
from wse_sim.router import (
    P_DEPTH,
    P_HOP,
    RECV,
    SC_COPIES,
    SC_INFLIGHT,
    SC_NWOKEN,
    has_room,
    inject,
    pop_recv,
    router_step,
)
from wse_sim.stats import Stats

# Plain ints for numba.
MEM, FABIN, FABOUT, REG, IMM = (int(k) for k in (Kind.MEM, Kind.FABIN, Kind.FABOUT, Kind.REG,
                                                 Kind.IMM))
(MOV, NEG, EXP, RSQRT, RECIP, TANH, ERF, SQRT, ADD, SUB, MUL, DIV, MAX, MIN, FMA, REPEAT,
 ACTIVATE, BLOCK, UNBLOCK, HALT) = (int(op) for op in Op)
COLOR_TRIGGER = int(Trigger.COLOR)
FIRST_CONTROL = REPEAT

RUNNING, DONE, DEADLOCK, FROZEN = range(4)
# Thread step outcomes (bit flags, merged per PE per cycle).
F_ARITH, F_SEND, F_RECV, F_MOVE, F_STALL, F_FPWAIT = 1, 2, 4, 8, 16, 32


@njit(cache=True, error_model="numpy")
def _apply(op, a, b, c):
    """dst = OP(a, b, c) in float32."""
    if op == MOV:
        return a
    if op == ADD:
        return a + b
    if op == MUL:
        return a * b
    if op == FMA:
        return a * b + c
    if op == SUB:
        return a - b
    if op == NEG:
        return -a
    if op == DIV:
        return a / b
    if op == MAX:
        return a if a >= b else b
    if op == MIN:
        return a if a <= b else b
    if op == EXP:
        return math.exp(a)
    if op == RSQRT:
        return np.float32(1.0) / math.sqrt(a)
    if op == RECIP:
        return np.float32(1.0) / a
    if op == TANH:
        return math.tanh(a)
    if op == ERF:
        return math.erf(a)
    return math.sqrt(a)  # SQRT


@njit(cache=True)
def _end_instr(cs, th, i):
    """Thread th finished instruction i: step to the next one (REPEAT loop-back is free)."""
    pc = i + 1
    if cs.th_rcount[th] > 0 and i == cs.th_rlast[th]:
        cs.th_iter[th] += 1
        if cs.th_iter[th] < cs.th_rcount[th]:
            pc = cs.th_rfirst[th]
        else:
            cs.th_rcount[th] = 0
            cs.th_iter[th] = 0
    cs.th_e[th] = 0
    task = cs.th_task[th]
    if pc == cs.task_end[task]:
        cs.th_task[th] = -1
        cs.task_run[task] = 0
        s = th // cs.params[C_THREADS]
        cs.nrun[s] -= 1
        cs.wake[s] = 1  # the task may be ready again, or another may take the thread
    else:
        cs.th_pc[th] = pc


@njit(cache=True)
def _control(cs, s, th, i):
    op = cs.i_op[i]
    if op == REPEAT:
        count = cs.i_count[i]
        if count == 0:
            cs.th_rcount[th] = 0
            _end_instr(cs, th, i + cs.i_body[i])  # skip the body
            return
        cs.th_rcount[th] = count
        cs.th_iter[th] = 0
        cs.th_rfirst[th] = i + 1
        cs.th_rlast[th] = i + cs.i_body[i]
    elif op == ACTIVATE:
        cs.task_act[cs.i_task[i]] = 1
        cs.wake[s] = 1
    elif op == BLOCK:
        cs.task_blk[cs.i_task[i]] = 1
    elif op == UNBLOCK:
        cs.task_blk[cs.i_task[i]] = 0
        cs.wake[s] = 1
    else:  # HALT
        cs.halted[s] = 1
    _end_instr(cs, th, i)


@njit(cache=True, error_model="numpy")
def _element(fb, cs, s, pe, th, t, budget):
    """Try to advance thread th by one element in cycle t. budget = [reads, writes, ramp
    out] left this cycle. Returns F_* flags (0: blocked by a budget another thread used)."""
    i = cs.th_pc[th]
    op = cs.i_op[i]
    if op >= FIRST_CONTROL:
        _control(cs, s, th, i)
        return F_MOVE
    e = cs.th_e[th]
    reads = cs.i_nrd[i]
    if e == 0:
        reads += cs.i_nrd0[i]
    full = cs.params[C_READS]
    if reads > budget[0] and not (reads > full and budget[0] == full):
        return 0
    if cs.i_wr[i] > budget[1]:
        return 0
    flops = cs.i_flops[i]
    if flops > 0 and cs.fp[s] < 1.0:
        return F_FPWAIT
    depth = fb.params[P_DEPTH]
    flags = 0
    for k in range(1, 4):
        if cs.o_kind[i, k] == FABIN:
            b = cs.o_buf[i, k]
            if fb.count[b] == 0 or fb.ready[b * depth + fb.head[b]] > t:
                return F_STALL
            flags |= F_RECV
    if cs.o_kind[i, 0] == FABOUT:
        if budget[2] == 0:
            return 0
        if not has_room(fb, cs.o_buf[i, 0], t):
            return F_STALL
        flags |= F_SEND
    # Execute: read every source before writing the destination (they may alias).
    it = cs.th_iter[th]
    a = b_ = c = np.float32(0.0)
    for k in range(1, 4):
        kind = cs.o_kind[i, k]
        if kind == MEM:
            addr = cs.o_addr[i, k] + it * cs.o_lstride[i, k]
            stride = cs.o_stride[i, k]
            if stride == 0:
                if e == 0:
                    cs.th_scal[th, k] = cs.sram[addr]
                v = cs.th_scal[th, k]
            else:
                v = cs.sram[addr + e * stride]
        elif kind == FABIN:
            v = pop_recv(fb, cs.o_buf[i, k])
            cs.sc[CS_CONSUMED] += 1
        elif kind == REG:
            v = cs.regs[cs.o_reg[i, k]]
        elif kind == IMM:
            v = cs.o_imm[i, k]
        else:
            continue
        if k == 1:
            a = v
        elif k == 2:
            b_ = v
        else:
            c = v
    res = _apply(op, a, b_, c)
    kind = cs.o_kind[i, 0]
    if kind == MEM:
        cs.sram[cs.o_addr[i, 0] + it * cs.o_lstride[i, 0] + e * cs.o_stride[i, 0]] = res
    elif kind == REG:
        cs.regs[cs.o_reg[i, 0]] = res
    else:  # FABOUT
        inject(fb, cs.o_buf[i, 0], pe, res, 0, t)
        budget[2] -= 1
    # Budgets and counters.
    if reads > budget[0]:
        cs.rd_debt[s] = reads - budget[0]
        budget[0] = 0
    else:
        budget[0] -= reads
    budget[1] -= cs.i_wr[i]
    cs.sram_rd[pe] += reads
    cs.sram_wr[pe] += cs.i_wr[i]
    if flops > 0:
        cs.fp[s] -= 1.0
        cs.ops[pe] += 1
        cs.flops[pe] += flops
        flags |= F_ARITH
    elif flags == 0:
        flags = F_MOVE
    e += 1
    if e == cs.i_n[i]:
        _end_instr(cs, th, i)
    else:
        cs.th_e[th] = e
    return flags


@njit(cache=True)
def _scan_tasks(fb, cs, s, t, start):
    """Start ready tasks on free microthreads (if `start`). Returns (tasks started, whether
    a ready task is left waiting, or a COLOR task's wavelet is still on its way)."""
    if cs.halted[s]:
        return 0, False
    threads = cs.params[C_THREADS]
    depth = fb.params[P_DEPTH]
    lo = cs.tk_lo[s]
    ntask = cs.tk_lo[s + 1] - lo
    started = 0
    pending = False
    rr = cs.tk_rr[s]
    for q in range(ntask):
        k = lo + (rr + q) % ntask
        if cs.task_run[k] or cs.task_blk[k]:
            continue
        ready = cs.task_act[k] != 0
        if not ready and cs.task_trig[k] == COLOR_TRIGGER:
            b = cs.task_recv[k]
            if fb.count[b] > 0:
                if fb.ready[b * depth + fb.head[b]] <= t:
                    ready = True
                else:
                    pending = True
        if not ready:
            continue
        if not start or cs.nrun[s] == threads:
            pending = True
            continue
        th = s * threads
        while cs.th_task[th] >= 0:
            th += 1
        cs.th_task[th] = k
        cs.th_pc[th] = cs.task_first[k]
        cs.th_e[th] = 0
        cs.th_rcount[th] = 0
        cs.th_iter[th] = 0
        cs.task_run[k] = 1
        cs.task_act[k] = 0
        cs.nrun[s] += 1
        cs.tk_rr[s] = (k - lo + 1) % ntask
        started += 1
    return started, pending


@njit(cache=True, error_model="numpy")
def _core_cycle(fb, cs, s, t, budget):
    """One cycle of the PE in slot s. Returns its progress (elements + tasks started)."""
    pe = cs.slot_pe[s]
    progress = 0
    if cs.wake[s]:
        started, pending = _scan_tasks(fb, cs, s, t, True)
        progress += started
        cs.wake[s] = 1 if pending else 0
    if cs.nrun[s] > 0:
        full = cs.params[C_READS]
        budget[0] = full - cs.rd_debt[s]
        cs.rd_debt[s] = 0
        if budget[0] < 0:
            cs.rd_debt[s] = -budget[0]
            budget[0] = 0
        budget[1] = cs.params[C_WRITES]
        budget[2] = cs.params[C_RAMP_OUT]
        rate = cs.fp_rate[0]
        cs.fp[s] = min(cs.fp[s] + rate * (t - cs.fp_t[s]), cs.fp_rate[1])
        cs.fp_t[s] = t
        threads = cs.params[C_THREADS]
        base = s * threads
        start = cs.th_rr[s]
        first = -1
        flags = 0
        for q in range(threads):
            k = (start + q) % threads
            th = base + k
            if cs.th_task[th] < 0:
                continue
            f = _element(fb, cs, s, pe, th, t, budget)
            flags |= f
            if f & (F_ARITH | F_SEND | F_RECV | F_MOVE):
                progress += 1
                if first < 0:
                    first = k
        if first >= 0:
            cs.th_rr[s] = (first + 1) % threads
        if flags & (F_ARITH | F_FPWAIT):
            cs.cls[K_COMPUTE, pe] += 1
        elif flags & F_SEND:
            cs.cls[K_SEND, pe] += 1
        elif flags & F_RECV:
            cs.cls[K_RECV, pe] += 1
        elif flags & F_MOVE:
            cs.cls[K_MOVE, pe] += 1
        elif flags & F_STALL:
            cs.cls[K_STALL, pe] += 1
        if flags & (F_ARITH | F_SEND | F_RECV | F_MOVE):
            if cs.first[pe] < 0:
                cs.first[pe] = t
            cs.last[pe] = t
    if cs.nrun[s] == 0 and cs.wake[s]:
        # Keep the PE active only if some task can start next cycle.
        cs.wake[s] = 1 if _scan_tasks(fb, cs, s, t + 1, False)[1] else 0
    return progress


@njit(cache=True)
def _pe_step(fb, cs, t, budget):
    """Cycle t of every active PE. Returns the progress made."""
    for j in range(fb.sc[SC_NWOKEN]):
        s = cs.pe_slot[fb.woken[j]]
        if s < 0:
            continue
        cs.wake[s] = 1
        if cs.in_act[s] == 0:
            cs.in_act[s] = 1
            cs.act[cs.sc[CS_NACT]] = s
            cs.sc[CS_NACT] += 1
    fb.sc[SC_NWOKEN] = 0
    progress = 0
    n = 0
    for j in range(cs.sc[CS_NACT]):
        s = cs.act[j]
        progress += _core_cycle(fb, cs, s, t, budget)
        if cs.nrun[s] > 0 or cs.wake[s]:
            cs.act[n] = s
            n += 1
        else:
            cs.in_act[s] = 0
    cs.sc[CS_NACT] = n
    return progress


@njit(cache=True)
def run_chunk(fb, cs, t, t_end):
    """Run cycles t.. until done, a deadlock, or t_end. Returns (cycle, status)."""
    budget = np.zeros(3, np.int64)
    deadlock = cs.params[C_DEADLOCK]
    hop = fb.params[P_HOP]
    last_progress = cs.sc[CS_LAST_PROGRESS]
    last_move = cs.sc[CS_LAST_MOVE]
    status = RUNNING
    while True:
        if fb.sc[SC_INFLIGHT] == 0 and cs.sc[CS_NACT] == 0:
            status = DONE
            break
        if t >= t_end:
            break
        moved = router_step(fb, t)
        progress = _pe_step(fb, cs, t, budget)
        if moved > 0:
            last_move = t
        if moved + progress > 0:
            last_progress = t
        t += 1
        if t - last_progress > deadlock:
            status = DEADLOCK
            break
        if cs.sc[CS_NACT] == 0 and fb.sc[SC_INFLIGHT] > 0 and t - last_move > hop + 1:
            status = FROZEN
            break
    cs.sc[CS_LAST_PROGRESS] = last_progress
    cs.sc[CS_LAST_MOVE] = last_move
    return t, status


@dataclass
class SimResult:
    """The outcome of one run: cycle count, counters, final PE memories."""

    cycles: int
    stats: Stats
    _asm: Assembled

    def sram(self, x: int, y: int) -> np.ndarray:
        """Final SRAM of PE (x, y) (float32 view; empty if it has no program)."""
        s = self._slot(x, y)
        if s < 0:
            return np.zeros(0, np.float32)
        base = self._asm.sram_base
        return self._asm.cores.sram[base[s]: base[s + 1]]

    def registers(self, x: int, y: int) -> np.ndarray:
        """Final registers of PE (x, y) (float32 view; zeros if it has no program)."""
        s = self._slot(x, y)
        nreg = self._asm.registers
        if s < 0:
            return np.zeros(nreg, np.float32)
        return self._asm.cores.regs[s * nreg: (s + 1) * nreg]

    def _slot(self, x: int, y: int) -> int:
        w, h = self.stats.width, self.stats.height
        if not (0 <= x < w and 0 <= y < h):
            raise UserError(f"PE ({x}, {y}) is outside the {w} x {h} fabric")
        return int(self._asm.cores.pe_slot[y * w + x])


def simulate(
    program: Program,
    wafer: WaferConfig,
    *,
    max_cycles: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> SimResult:
    """Validate and run `program` to completion; see the module docstring for the model.

    Raises ProgramError (invalid program), DeadlockError, or UserError if the run needs more
    than `max_cycles` cycles. `progress(cycle)` is called between chunks of cycles."""
    validate(program, wafer)
    asm = assemble(program, wafer)
    fb, cs = asm.fabric, asm.cores
    t = 0
    chunk = 1024
    while True:
        end = t + chunk if max_cycles is None else min(t + chunk, max_cycles)
        started = time.perf_counter()
        t, status = run_chunk(fb, cs, t, end)
        elapsed = time.perf_counter() - started
        if progress is not None:
            progress(t)
        if status == DONE:
            break
        if status in (DEADLOCK, FROZEN):
            raise DeadlockError(_deadlock_message(asm, t, status))
        if max_cycles is not None and t >= max_cycles:
            raise UserError(
                f"simulation exceeded max_cycles={max_cycles}: {int(cs.nrun.sum())} tasks "
                f"still running, {int(fb.sc[SC_INFLIGHT])} wavelets in flight"
            )
        # Aim for ~0.2 s between progress calls.
        chunk = int(min(max(chunk * min(0.2 / max(elapsed, 1e-4), 4.0), 256), 1 << 22))
    injected = int(fb.ramp_out.sum()) + int(fb.sc[SC_COPIES])
    delivered = int(cs.sc[CS_CONSUMED])
    if injected != delivered:
        raise AssertionError(f"fabric lost wavelets: {injected} sent (with multicast copies), "
                             f"{delivered} consumed")
    stats = Stats.from_state(program.width, program.height, t, fb, cs,
                             injected=injected, delivered=delivered)
    return SimResult(cycles=t, stats=stats, _asm=asm)


def _deadlock_message(asm: Assembled, t: int, status: int, limit: int = 8) -> str:
    """One line: the waiting threads (PE, task, pc, op, what they wait for), the full FIFOs,
    and wavelets stranded at PEs that will not consume them."""
    fb, cs = asm.fabric, asm.cores
    width = int(fb.params[0])
    depth = int(fb.params[P_DEPTH])
    threads = int(cs.params[C_THREADS])
    waiting: list[str] = []
    for th in np.nonzero(cs.th_task >= 0)[0]:
        s, task, i = th // threads, cs.th_task[th], cs.th_pc[th]
        pe = int(cs.slot_pe[s])
        op = Op(int(cs.i_op[i]))
        what = "budget"
        for k in range(4):
            kind, b = int(cs.o_kind[i, k]), int(cs.o_buf[i, k])
            color = int(fb.route_color[fb.buf_route[b]]) if b >= 0 else -1
            if kind == FABIN and fb.count[b] == 0:
                what = f"FABIN color {color} empty"
            elif kind == FABOUT and fb.count[b] >= depth:
                what = f"FABOUT color {color}: ramp buffer full"
        waiting.append(f"PE ({pe % width}, {pe // width}) task {int(asm.task_ids[task])} "
                       f"pc {int(i - asm.task_pc0[task])} {op.name} waits: {what}")
    full, stranded = [], []
    for b in np.nonzero(fb.count > 0)[0]:
        r = fb.buf_route[b]
        pe, color, port = int(fb.route_pe[r]), int(fb.route_color[r]), int(fb.buf_port[b])
        where = f"({pe % width}, {pe // width})"
        if port == RECV:
            s = cs.pe_slot[pe]
            if s < 0 or cs.halted[s] or not (cs.th_task[s * threads:(s + 1) * threads] >= 0).any():
                state = "halted" if s >= 0 and cs.halted[s] else "idle"
                stranded.append(f"PE {where} color {color}: {int(fb.count[b])} wavelets "
                                f"at a {state} PE")
        elif fb.count[b] >= depth:
            full.append(f"PE {where} {Port(port).name} color {color}")
    kind = "no progress" if status == DEADLOCK else "the fabric is stuck"
    parts = [f"deadlock at cycle {t} ({kind})"]
    for label, items in (("waiting", waiting), ("stranded", stranded), ("full buffers", full)):
        if items:
            more = f"; ... and {len(items) - limit} more" if len(items) > limit else ""
            parts.append(f"{label}: " + "; ".join(items[:limit]) + more)
    return " | ".join(parts)
