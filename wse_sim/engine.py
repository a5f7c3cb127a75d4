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
activated; a running task activated runs again after it ends), COLOR tasks whenever a
wavelet of their color is ready in the PE's receive queue. A task starts (at no cost) in
the first cycle it is ready, not blocked, not already running, the PE has not halted, and a
microthread is free (tasks are scanned round-robin). A running task executes its
instructions in order to completion; its microthread is free for another task from the next
cycle. Each cycle the running threads are served round-robin (starting after the thread
first served in the previous cycle) and each advances at most one element of its current
vector instruction, if the PE's per-cycle budgets allow it:

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
advanced, or a thread of an arithmetic op waited only for its PE's own fp32 credit, SRAM
ports or ramp slot), send (an element produced a wavelet), receive (an element consumed a
wavelet), move (a MOV element between memory/registers, a control op, or a MOV waiting
only for the PE's own budgets), stalled (a thread waited for the fabric: FABIN empty or
RAMP FIFO full), idle (the rest, including PEs without a program).

Bulk execution (speed, not semantics). When a PE runs one thread only, has no COLOR
task, and that thread is at a vector instruction without fabric operands, nothing outside
the PE can influence it until the instruction ends (no wavelet is consumed or produced,
no other task can start: RESET tasks started at cycle 0 or wait for this thread, LOCAL
ones need an ACTIVATE from it). The engine then runs the instruction's remaining elements
in one go, cycle by cycle with the same budgets and credit as above, and skips the PE until
the cycle after its last element; when every active PE is in such an instruction and the
routers are empty, whole cycles are skipped. A property test checks that results,
cycles and every counter equal the per-cycle path's.

The run ends at the first cycle at which no thread runs, no task is ready and no wavelet
is in any FIFO or receive queue; `cycles` is that cycle's index. Then every wavelet sent
(plus every extra multicast copy) must have been delivered to a PE (checked). Deadlock:
`deadlock_cycles` cycles without progress (a wavelet moved, an element or control op
executed, a task started), or no PE able to act (all done, or waiting on empty receive queues)
and nothing moved for hop_latency + 1 cycles (then nothing can ever change). Both raise
DeadlockError naming the waiting threads, the wavelets stranded at idle or halted PEs and
the full FIFOs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from wse_sim.assemble import (
    C_DEADLOCK,
    C_RAMP_OUT,
    C_READS,
    C_THREADS,
    C_WRITES,
    CS_BULK_END,
    CS_LAST_PROGRESS,
    CS_NACT,
    CS_NEXT_FREE,
    CS_NSLEEP,
    CT_FIRST,
    CT_FLOPS,
    CT_LAST,
    CT_OPS,
    CT_RD,
    CT_WR,
    I_BODY,
    I_BULK,
    I_COUNT,
    I_FLOPS,
    I_N,
    I_NRD,
    I_NRD0,
    I_OP,
    I_TASK,
    I_WR,
    K_COMPUTE,
    K_MOVE,
    K_RECV,
    K_SEND,
    K_STALL,
    O_ADDR,
    O_BASE,
    O_BUF,
    O_KIND,
    O_LSTRIDE,
    O_REG,
    O_STRIDE,
    S_BUSY,
    S_FP_T,
    S_HALTED,
    S_IN_ACT,
    S_NCOLOR,
    S_NRUN,
    S_PE,
    S_RD_DEBT,
    S_SLEEP,
    S_TH_RR,
    S_TK_HI,
    S_TK_LO,
    S_TK_RR,
    S_WAKE,
    T_ACT,
    T_BLK,
    T_END,
    T_FIRST,
    T_RECV,
    T_RUN,
    T_TRIG,
    TH_E,
    TH_ITER,
    TH_PC,
    TH_RCOUNT,
    TH_RFIRST,
    TH_RLAST,
    TH_TASK,
    Assembled,
    assemble,
)
from wse_sim.errors import DeadlockError, UserError
from wse_sim.hardware import WaferConfig
from wse_sim.program import Kind, Op, Port, Program, Trigger, validate
from wse_sim.router import (
    B_COUNT,
    B_PORT,
    B_ROUTE,
    CT_RAMP_IN,
    CT_RAMP_OUT,
    P_DEPTH,
    P_HOP,
    P_WIDTH,
    R_COLOR,
    R_PE,
    RECV,
    SC_COPIES,
    SC_INFLIGHT,
    SC_NACT,
    SC_NWOKEN,
    has_room,
    head_ready,
    hot,
    hot_inline,
    inject,
    pop_recv,
    route_cycle,
)
from wse_sim.stats import Stats

# wse_sim.router's helpers (has_room, head_ready, inject, pop_recv, route_cycle) are
# inlined here: see the note there on numba's cache.

# Plain ints for numba.
MEM, FABIN, FABOUT, REG, IMM = (int(k) for k in (Kind.MEM, Kind.FABIN, Kind.FABOUT, Kind.REG,
                                                 Kind.IMM))
(MOV, NEG, EXP, RSQRT, RECIP, TANH, ERF, SQRT, ADD, SUB, MUL, DIV, MAX, MIN, FMA, REPEAT,
 ACTIVATE, BLOCK, UNBLOCK, HALT) = (int(op) for op in Op)
COLOR_TRIGGER = int(Trigger.COLOR)
FIRST_CONTROL = REPEAT

RUNNING, DONE, DEADLOCK, FROZEN = range(4)
NEVER = 1 << 62
# Thread step outcomes (bit flags, merged per PE per cycle).
# F_BUSY_*: the thread waited only for its own PE's SRAM ports, fp32 credit or ramp slot.
# F_NOSLEEP: a stall that can end without a delivery to the PE (FIFO full, wavelet in transit).
F_ARITH, F_SEND, F_RECV, F_MOVE, F_STALL, F_BUSY_ARITH, F_BUSY_MOVE = 1, 2, 4, 8, 16, 32, 64
F_NOSLEEP = 128
F_WORK = F_ARITH | F_SEND | F_RECV | F_MOVE


@hot_inline
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


@hot_inline
def _end_instr(slot, task, th, s, thr, i):
    """Thread thr of slot s finished instruction i: step to the next one (REPEAT loop-back
    is free); free the thread after the task's last instruction."""
    pc = i + 1
    if th[thr, TH_RCOUNT] > 0 and i == th[thr, TH_RLAST]:
        th[thr, TH_ITER] += 1
        if th[thr, TH_ITER] < th[thr, TH_RCOUNT]:
            pc = th[thr, TH_RFIRST]
        else:
            th[thr, TH_RCOUNT] = 0
            th[thr, TH_ITER] = 0
    th[thr, TH_E] = 0
    k = th[thr, TH_TASK]
    if pc == task[k, T_END]:
        th[thr, TH_TASK] = -1
        task[k, T_RUN] = 0
        slot[s, S_NRUN] -= 1
        slot[s, S_WAKE] = 1  # the task may be ready again, or another may take the thread
    else:
        th[thr, TH_PC] = pc


@hot_inline
def _control(slot, task, ins, th, s, thr, i):
    """Execute control instruction i (one cycle)."""
    op = ins[i, I_OP]
    if op == REPEAT:
        count = ins[i, I_COUNT]
        if count == 0:
            th[thr, TH_RCOUNT] = 0
            _end_instr(slot, task, th, s, thr, i + ins[i, I_BODY])  # skip the body
            return
        th[thr, TH_RCOUNT] = count
        th[thr, TH_ITER] = 0
        th[thr, TH_RFIRST] = i + 1
        th[thr, TH_RLAST] = i + ins[i, I_BODY]
    elif op == ACTIVATE:
        task[ins[i, I_TASK], T_ACT] = 1
        slot[s, S_WAKE] = 1
    elif op == BLOCK:
        task[ins[i, I_TASK], T_BLK] = 1
    elif op == UNBLOCK:
        task[ins[i, I_TASK], T_BLK] = 0
        slot[s, S_WAKE] = 1
    else:  # HALT
        slot[s, S_HALTED] = 1
    _end_instr(slot, task, th, s, thr, i)


@hot_inline
def _execute(t, pe, thr, i, e, buf, wl, wval, node, fsc, fctr, depth, ins, imm, sram, regs, th,
             th_scal):
    """Element e of instruction i on thread thr in cycle t: read every source (consuming
    FABIN wavelets), then write the destination (they may alias)."""
    it = th[thr, TH_ITER]
    a = b = c = np.float32(0.0)
    for k in range(1, 4):
        col = O_BASE + 6 * k
        kind = ins[i, col + O_KIND]
        if kind == MEM:
            addr = ins[i, col + O_ADDR] + it * ins[i, col + O_LSTRIDE]
            stride = ins[i, col + O_STRIDE]
            if stride == 0:
                if e == 0:
                    th_scal[thr, k] = sram[addr]
                v = th_scal[thr, k]
            else:
                v = sram[addr + e * stride]
        elif kind == FABIN:
            v = pop_recv(buf, wval, fsc, ins[i, col + O_BUF], depth)
        elif kind == REG:
            v = regs[ins[i, col + O_REG]]
        elif kind == IMM:
            v = imm[i, k]
        else:
            continue
        if k == 1:
            a = v
        elif k == 2:
            b = v
        else:
            c = v
    res = _apply(ins[i, I_OP], a, b, c)
    kind = ins[i, O_BASE + O_KIND]
    if kind == MEM:
        sram[ins[i, O_BASE + O_ADDR] + it * ins[i, O_BASE + O_LSTRIDE]
             + e * ins[i, O_BASE + O_STRIDE]] = res
    elif kind == REG:
        regs[ins[i, O_BASE + O_REG]] = res
    else:  # FABOUT
        inject(buf, wl, wval, node, fsc, fctr, ins[i, O_BASE + O_BUF], pe, res, 0, t, depth)


@hot_inline
def _element(t, s, pe, thr, buf, wl, wval, node, fsc, fctr, depth, cparams, slot, fpc, task,
             ins, imm, sram, regs, th, th_scal, ctr, budget):
    """Try to advance thread thr by one element in cycle t. budget = [reads, writes, ramp
    out] left this cycle. Returns F_* flags."""
    i = th[thr, TH_PC]
    if ins[i, I_OP] >= FIRST_CONTROL:
        _control(slot, task, ins, th, s, thr, i)
        return F_MOVE
    e = th[thr, TH_E]
    flops = ins[i, I_FLOPS]
    waiting = F_BUSY_ARITH if flops > 0 else F_BUSY_MOVE
    reads = ins[i, I_NRD]
    if e == 0:
        reads += ins[i, I_NRD0]
    full = cparams[C_READS]
    if reads > budget[0] and not (reads > full and budget[0] == full):
        return waiting
    writes = ins[i, I_WR]
    if writes > budget[1]:
        return waiting
    if flops > 0 and fpc[s] < 1.0:
        return waiting
    flags = 0
    for k in range(1, 4):
        if ins[i, O_BASE + 6 * k + O_KIND] == FABIN:
            b = ins[i, O_BASE + 6 * k + O_BUF]
            if not head_ready(buf, wl, b, t, depth):
                # An empty queue can only fill through a delivery, which wakes the PE.
                return F_STALL if buf[b, B_COUNT] == 0 else F_STALL | F_NOSLEEP
            flags |= F_RECV
    if ins[i, O_BASE + O_KIND] == FABOUT:
        if budget[2] == 0:
            return waiting
        if not has_room(buf, ins[i, O_BASE + O_BUF], t, depth):
            return F_STALL | F_NOSLEEP
        flags |= F_SEND
        budget[2] -= 1
    _execute(t, pe, thr, i, e, buf, wl, wval, node, fsc, fctr, depth, ins, imm, sram, regs, th,
             th_scal)
    if reads > budget[0]:
        slot[s, S_RD_DEBT] = reads - budget[0]
        budget[0] = 0
    else:
        budget[0] -= reads
    budget[1] -= writes
    ctr[pe, CT_RD] += reads
    ctr[pe, CT_WR] += writes
    if flops > 0:
        fpc[s] -= 1.0
        ctr[pe, CT_OPS] += 1
        ctr[pe, CT_FLOPS] += flops
        flags |= F_ARITH
    elif flags == 0:
        flags = F_MOVE
    e += 1
    if e == ins[i, I_N]:
        _end_instr(slot, task, th, s, thr, i)
    else:
        th[thr, TH_E] = e
    return flags


@hot_inline
def _bulk(t, s, pe, thr, buf, wl, wval, node, fsc, fctr, depth, cparams, fp_rate, slot, fpc,
          task, ins, imm, sram, regs, th, th_scal, ctr):
    """Run the rest of thread thr's memory-only vector instruction at once, from cycle t.

    Only called when the thread is the PE's only one and no COLOR task exists there: then
    nothing outside the PE can change what it does until the instruction ends, so looping
    the cycles of this one thread (the same budgets and credit as `_element` meets with
    every cycle) is exact. Returns the cycle the thread resumes in (after the last
    element). Every cycle spent counts as compute (arithmetic op) or move (MOV)."""
    i = th[thr, TH_PC]
    n = ins[i, I_N]
    flops = ins[i, I_FLOPS]
    writes = ins[i, I_WR]
    full = cparams[C_READS]
    debt = slot[s, S_RD_DEBT]
    credit = fpc[s]
    tc = t
    first = -1
    reads_total = 0
    e = th[thr, TH_E]
    while e < n:
        avail = full - debt
        debt = 0
        if avail < 0:
            debt = -avail
            avail = 0
        credit = min(credit + fp_rate[0] * (tc - slot[s, S_FP_T]), fp_rate[1])
        slot[s, S_FP_T] = tc
        reads = ins[i, I_NRD] + (ins[i, I_NRD0] if e == 0 else 0)
        if ((reads <= avail or (reads > full and avail == full))
                and writes <= cparams[C_WRITES] and (flops == 0 or credit >= 1.0)):
            if reads > avail:
                debt = reads - avail
            if flops > 0:
                credit -= 1.0
            reads_total += reads
            _execute(tc, pe, thr, i, e, buf, wl, wval, node, fsc, fctr, depth, ins, imm, sram,
                     regs, th, th_scal)
            if first < 0:
                first = tc
            e += 1
        tc += 1
    done = n - th[thr, TH_E]
    slot[s, S_RD_DEBT] = debt
    fpc[s] = credit
    ctr[pe, K_COMPUTE if flops > 0 else K_MOVE] += tc - t
    ctr[pe, CT_RD] += reads_total
    ctr[pe, CT_WR] += writes * done
    if flops > 0:
        ctr[pe, CT_OPS] += done
        ctr[pe, CT_FLOPS] += flops * done
    if ctr[pe, CT_FIRST] < 0:
        ctr[pe, CT_FIRST] = first
    ctr[pe, CT_LAST] = tc - 1
    _end_instr(slot, task, th, s, thr, i)
    return tc


@hot
def _scan_tasks(t, s, start, buf, wl, depth, threads, slot, task, th):
    """Start ready tasks of slot s on free microthreads (if `start`). Returns (tasks
    started, whether a ready task is left waiting or a COLOR task's wavelet is on its way)."""
    if slot[s, S_HALTED]:
        return 0, False
    lo = slot[s, S_TK_LO]
    ntask = slot[s, S_TK_HI] - lo
    started = 0
    pending = False
    rr = slot[s, S_TK_RR]
    for q in range(ntask):
        k = lo + (rr + q) % ntask
        if task[k, T_RUN] or task[k, T_BLK]:
            continue
        ready = task[k, T_ACT] != 0
        if not ready and task[k, T_TRIG] == COLOR_TRIGGER:
            b = task[k, T_RECV]
            if head_ready(buf, wl, b, t, depth):
                ready = True
            elif buf[b, B_COUNT] > 0:
                pending = True
        if not ready:
            continue
        if not start or slot[s, S_NRUN] == threads:
            pending = True
            continue
        thr = s * threads
        while th[thr, TH_TASK] >= 0:
            thr += 1
        th[thr, TH_TASK] = k
        th[thr, TH_PC] = task[k, T_FIRST]
        th[thr, TH_E] = 0
        th[thr, TH_RCOUNT] = 0
        th[thr, TH_ITER] = 0
        task[k, T_RUN] = 1
        task[k, T_ACT] = 0
        slot[s, S_NRUN] += 1
        slot[s, S_TK_RR] = (k - lo + 1) % ntask
        started += 1
    return started, pending


@hot_inline
def _pe_cycle(t, buf, wl, wval, node, fsc, fctr, woken, depth, cparams, fp_rate, csc, slot,
              act, fpc, pe_slot, task, ins, imm, sram, regs, th, th_scal, ctr, budget):
    """Cycle t of every active PE. Returns the progress made (elements, control ops and
    tasks started)."""
    threads = cparams[C_THREADS]
    for j in range(fsc[SC_NWOKEN]):
        s = pe_slot[woken[j]]
        if s < 0:
            continue
        slot[s, S_WAKE] = 1
        if slot[s, S_SLEEP] >= 0:
            # It stalled in every cycle it slept through, and paid its read debt.
            slept = t - slot[s, S_SLEEP] - 1
            ctr[slot[s, S_PE], K_STALL] += slept
            slot[s, S_RD_DEBT] = max(0, slot[s, S_RD_DEBT] - slept * cparams[C_READS])
            slot[s, S_SLEEP] = -1
            csc[CS_NSLEEP] -= 1
        if slot[s, S_IN_ACT] == 0:
            slot[s, S_IN_ACT] = 1
            act[csc[CS_NACT]] = s
            csc[CS_NACT] += 1
    fsc[SC_NWOKEN] = 0
    progress = 0
    n_keep = 0
    csc[CS_NEXT_FREE] = NEVER  # the first cycle a busy slot resumes, if all are busy
    for j in range(csc[CS_NACT]):
        s = act[j]
        if slot[s, S_BUSY] > t:  # inside a bulk-run instruction
            act[n_keep] = s
            n_keep += 1
            csc[CS_NEXT_FREE] = min(csc[CS_NEXT_FREE], slot[s, S_BUSY])
            continue
        pe = slot[s, S_PE]
        if slot[s, S_WAKE]:
            started, pending = _scan_tasks(t, s, True, buf, wl, depth, threads, slot, task, th)
            progress += started
            slot[s, S_WAKE] = 1 if pending else 0
        nrun = slot[s, S_NRUN]
        if nrun == 1 and slot[s, S_NCOLOR] == 0:
            thr = s * threads
            while th[thr, TH_TASK] < 0:
                thr += 1
            i = th[thr, TH_PC]
            if ins[i, I_BULK] and ins[i, I_N] - th[thr, TH_E] > 1:
                resume = _bulk(t, s, pe, thr, buf, wl, wval, node, fsc, fctr, depth, cparams,
                               fp_rate, slot, fpc, task, ins, imm, sram, regs, th, th_scal, ctr)
                slot[s, S_BUSY] = resume
                csc[CS_BULK_END] = max(csc[CS_BULK_END], resume)
                progress += 1
                if slot[s, S_NRUN] == 0:  # the task ended: as at the end of cycle resume - 1
                    pending = _scan_tasks(resume, s, False, buf, wl, depth, threads, slot, task,
                                          th)[1]
                    slot[s, S_WAKE] = 1 if pending else 0
                if slot[s, S_NRUN] > 0 or slot[s, S_WAKE]:
                    act[n_keep] = s
                    n_keep += 1
                    csc[CS_NEXT_FREE] = min(csc[CS_NEXT_FREE], resume)
                else:
                    slot[s, S_IN_ACT] = 0
                continue
        if nrun > 0:
            budget[0] = cparams[C_READS] - slot[s, S_RD_DEBT]
            slot[s, S_RD_DEBT] = 0
            if budget[0] < 0:
                slot[s, S_RD_DEBT] = -budget[0]
                budget[0] = 0
            budget[1] = cparams[C_WRITES]
            budget[2] = cparams[C_RAMP_OUT]
            fpc[s] = min(fpc[s] + fp_rate[0] * (t - slot[s, S_FP_T]), fp_rate[1])
            slot[s, S_FP_T] = t
            start = slot[s, S_TH_RR]
            first = -1
            flags = 0
            for q in range(threads):
                k = start + q
                if k >= threads:
                    k -= threads
                thr = s * threads + k
                if th[thr, TH_TASK] < 0:
                    continue
                f = _element(t, s, pe, thr, buf, wl, wval, node, fsc, fctr, depth, cparams,
                             slot, fpc, task, ins, imm, sram, regs, th, th_scal, ctr, budget)
                flags |= f
                if f & F_WORK:
                    progress += 1
                    if first < 0:
                        first = k
            if first >= 0:
                slot[s, S_TH_RR] = first + 1 if first + 1 < threads else 0
            _count_cycle(ctr, pe, flags, t)
            if flags == F_STALL and slot[s, S_WAKE] == 0:
                # Every thread waits on an empty receive queue: sleep until a delivery.
                slot[s, S_SLEEP] = t
                slot[s, S_IN_ACT] = 0
                csc[CS_NSLEEP] += 1
                continue
        if slot[s, S_NRUN] == 0 and slot[s, S_WAKE]:
            # Keep the PE active only if some task can start next cycle.
            pending = _scan_tasks(t + 1, s, False, buf, wl, depth, threads, slot, task, th)[1]
            slot[s, S_WAKE] = 1 if pending else 0
        if slot[s, S_NRUN] > 0 or slot[s, S_WAKE]:
            act[n_keep] = s
            n_keep += 1
            csc[CS_NEXT_FREE] = t + 1
        else:
            slot[s, S_IN_ACT] = 0
    csc[CS_NACT] = n_keep
    return progress


@hot_inline
def _count_cycle(ctr, pe, flags, t):
    """Class of PE pe's cycle t (first that applies) and its first/last working cycle."""
    if flags & (F_ARITH | F_BUSY_ARITH):
        ctr[pe, K_COMPUTE] += 1
    elif flags & F_SEND:
        ctr[pe, K_SEND] += 1
    elif flags & F_RECV:
        ctr[pe, K_RECV] += 1
    elif flags & (F_MOVE | F_BUSY_MOVE):
        ctr[pe, K_MOVE] += 1
    elif flags & F_STALL:
        ctr[pe, K_STALL] += 1
    if flags & F_WORK:
        if ctr[pe, CT_FIRST] < 0:
            ctr[pe, CT_FIRST] = t
        ctr[pe, CT_LAST] = t


@hot
def run_chunk(fb, cs, t, t_end):
    """Run cycles t.. until done, a deadlock, or t_end. Returns (cycle, status)."""
    fparams, fsc, route, dest, buf, rb_lo = fb.params, fb.sc, fb.route, fb.dest, fb.buf, fb.rb_lo
    wl, wval, node, woken, cand = fb.wl, fb.wval, fb.node, fb.woken, fb.cand
    lat_hist, fctr, color_hops = fb.lat_hist, fb.ctr, fb.color_hops
    cparams, fp_rate, csc, slot, act, fpc = cs.params, cs.fp_rate, cs.sc, cs.slot, cs.act, cs.fpc
    pe_slot, task, ins, imm, sram, regs = cs.pe_slot, cs.task, cs.ins, cs.imm, cs.sram, cs.regs
    th, th_scal, ctr, budget = cs.th, cs.th_scal, cs.ctr, cs.budget
    depth = fparams[P_DEPTH]
    hop = fparams[P_HOP]
    deadlock = cparams[C_DEADLOCK]
    last_progress = csc[CS_LAST_PROGRESS]
    status = RUNNING
    while True:
        if fsc[SC_INFLIGHT] == 0 and csc[CS_NACT] == 0:
            if csc[CS_NSLEEP] > 0:  # threads wait for wavelets nobody can send
                status = FROZEN
                break
            # A PE that ended inside a bulk-run instruction finished at CS_BULK_END.
            t = max(t, csc[CS_BULK_END])
            status = DONE
            break
        if t >= t_end:
            break
        moved = route_cycle(t, fparams, fsc, route, dest, buf, rb_lo, wl, wval, node, woken,
                            cand, lat_hist, fctr, color_hops)
        progress = _pe_cycle(t, buf, wl, wval, node, fsc, fctr, woken, depth, cparams, fp_rate,
                             csc, slot, act, fpc, pe_slot, task, ins, imm, sram, regs, th,
                             th_scal, ctr, budget)
        if moved + progress > 0:
            last_progress = t
        t += 1
        if fsc[SC_NACT] == 0 and fsc[SC_NWOKEN] == 0 and csc[CS_NACT] > 0:
            # Nothing in the routers, every active PE inside a bulk-run instruction: nothing
            # happens until the first of them resumes.
            t = max(t, min(csc[CS_NEXT_FREE], t_end))
        # A bulk-run instruction makes progress every cycle until it ends.
        if t - max(last_progress, csc[CS_BULK_END] - 1) > deadlock:
            status = DEADLOCK
            break
        if csc[CS_NACT] == 0 and fsc[SC_INFLIGHT] > 0 and t - last_progress > hop + 1:
            status = FROZEN
            break
    csc[CS_LAST_PROGRESS] = last_progress
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
                f"simulation exceeded max_cycles={max_cycles}: "
                f"{int(cs.slot[:, S_NRUN].sum())} tasks still running, "
                f"{int(fb.sc[SC_INFLIGHT])} wavelets in flight"
            )
        # Aim for ~0.2 s between progress calls.
        chunk = int(min(max(chunk * min(0.2 / max(elapsed, 1e-4), 4.0), 256), 1 << 22))
    # The fabric is empty: every wavelet sent (and every multicast copy) reached a PE.
    injected = int(fb.ctr[:, CT_RAMP_OUT].sum()) + int(fb.sc[SC_COPIES])
    delivered = int(fb.ctr[:, CT_RAMP_IN].sum())
    if injected != delivered:
        raise AssertionError(f"fabric lost wavelets: {injected} sent (with multicast copies), "
                             f"{delivered} delivered")
    stats = Stats.from_state(program.width, program.height, t, fb, cs,
                             injected=injected, delivered=delivered)
    return SimResult(cycles=t, stats=stats, _asm=asm)


def _deadlock_message(asm: Assembled, t: int, status: int, limit: int = 8) -> str:
    """One line: the waiting threads (PE, task, pc, op, what they wait for), the full FIFOs,
    and wavelets stranded at PEs that will not consume them."""
    fb, cs = asm.fabric, asm.cores
    width = int(fb.params[P_WIDTH])
    depth = int(fb.params[P_DEPTH])
    threads = int(cs.params[C_THREADS])
    count = fb.buf[:, B_COUNT]

    def color_of(b: int) -> int:
        return int(fb.route[R_COLOR, fb.buf[b, B_ROUTE]])

    waiting: list[str] = []
    for thr in np.nonzero(cs.th[:, TH_TASK] >= 0)[0]:
        s, k, i = thr // threads, int(cs.th[thr, TH_TASK]), int(cs.th[thr, TH_PC])
        pe = int(cs.slot[s, S_PE])
        what = "budget"
        for col in range(O_BASE, O_BASE + 24, 6):
            kind, b = int(cs.ins[i, col + O_KIND]), int(cs.ins[i, col + O_BUF])
            if kind == FABIN and count[b] == 0:
                what = f"FABIN color {color_of(b)} empty"
            elif kind == FABOUT and count[b] >= depth:
                what = f"FABOUT color {color_of(b)}: ramp buffer full"
        waiting.append(f"PE ({pe % width}, {pe // width}) task {int(asm.task_ids[k])} "
                       f"pc {i - int(cs.task[k, T_FIRST])} {Op(int(cs.ins[i, I_OP])).name} "
                       f"waits: {what}")
    full, stranded = [], []
    for b in np.nonzero(count > 0)[0]:
        r = fb.buf[b, B_ROUTE]
        pe, port = int(fb.route[R_PE, r]), int(fb.buf[b, B_PORT])
        where = f"({pe % width}, {pe // width})"
        if port == RECV:
            s = int(cs.pe_slot[pe])
            halted = s >= 0 and bool(cs.slot[s, S_HALTED])
            if halted or s < 0 or cs.slot[s, S_NRUN] == 0:
                stranded.append(f"PE {where} color {color_of(b)}: {int(count[b])} wavelets "
                                f"at a {'halted' if halted else 'idle'} PE")
        elif count[b] >= depth:
            full.append(f"PE {where} {Port(port).name} color {color_of(b)}")
    kind = "no progress" if status == DEADLOCK else "the fabric is stuck"
    parts = [f"deadlock at cycle {t} ({kind})"]
    for label, items in (("waiting", waiting), ("stranded", stranded), ("full buffers", full)):
        if items:
            more = f"; ... and {len(items) - limit} more" if len(items) > limit else ""
            parts.append(f"{label}: " + "; ".join(items[:limit]) + more)
    return " | ".join(parts)
