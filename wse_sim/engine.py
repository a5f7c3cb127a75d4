"""The cycle-level engine: `simulate(program, wafer)` runs a Program on the fabric model;
`Loaded(program, wafer).run(pes)` runs one again and again, some PEs' programs replaced.

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

fp16 (`wse_sim.program`, "fp16"). An fp16 instruction advances a *step* of up to g
elements per cycle instead of one: g is its class's SIMD width (`fp16_simd_width`,
`mixed_simd_width`, `fp16_convert_simd_width`) lowered to what the budgets above allow
for a whole step (`wse_sim.program.simd_width`: a unit-stride half vector reads or writes
one 32-bit word per pair of elements, any other strided operand a word per element; a
half fabric operand moves two elements per wavelet, an fp32 one one) and made even, so
steps start at even elements and a pair is one word. A step is one element as above for
every budget: it needs the SRAM words of its elements, one fp32 credit if arithmetic (the
FPU issues one vector step a cycle, SIMD or not), at most one wavelet per FABIN (a half
FABIN pops at even elements) and one per FABOUT (a half FABOUT sends at odd elements and
at the last). Its elements run in order, each computed in float32 and rounded to fp16
(round to nearest even) where written to a half destination. Programs without fp16 run
exactly as before.

Register sources are read when the element executes, so `ADD dst=Reg r, a=Mem, b=Reg r`
accumulates. An instruction finishes with its n-th element; the thread's next instruction
starts the next cycle. REPEAT, ACTIVATE, BLOCK, UNBLOCK and HALT take one cycle each
(REPEAT only when it is reached: jumping back to the body's start is free, a zero-overhead
loop). HALT stops new tasks from starting on the PE; running tasks finish. SWITCH_ADV
sends one control wavelet on its color (`wse_sim.router`: it advances the switch position
of each router it leaves): one cycle and one ramp slot, waiting for RAMP FIFO room like a
FABOUT element (class send). A relay, a MOV from a FABIN source to a FABOUT destination,
costs what any MOV element costs; each element counts one relayed wavelet.

Cycle classes, one per PE per cycle, first that applies: compute (an arithmetic element
advanced, or a thread of an arithmetic op waited only for its PE's own fp32 credit, SRAM
ports or ramp slot), send (an element produced a wavelet), receive (an element consumed a
wavelet), move (a MOV element between memory/registers, a control op, or a MOV waiting
only for the PE's own budgets), then the two stalls, a thread waited for the fabric:
wait_output (a FABOUT destination's RAMP FIFO was full: waiting for output room), then
wait_input (a FABIN operand's receive queue held no ready wavelet: waiting for input);
idle (the rest, including PEs without a program). `stalled` is the sum of the two stalls.
The PE's own budgets (SRAM ports, fp32 credit, ramp slot, read debt) never stall: such a
wait counts as compute or move, the work it delays. A thread short of a wavelet or of RAMP
FIFO room waits for the fabric whatever its budgets (the fabric is checked first).

Bulk execution (speed, not semantics). When one running thread of a PE is at a vector
instruction without fabric operands and every other running thread waits for a wavelet in an
empty receive queue or for room in a RAMP FIFO every slot of which holds a wavelet (such
waits use none of the PE's budgets), and no task can start (none is ready, or no
microthread is free), only a delivery to the PE or a pop of its RAMP FIFO can change what it
does until it reaches an instruction with a fabric operand or a control op, or its task
ends: no other thread moves, no wavelet is consumed or produced, no task starts (a LOCAL one
needs an ACTIVATE, which only the working thread could execute). The engine then finds the
cycles of the remaining elements of that instruction and of each next one without fabric
operands (REPEAT loop-backs are free) at once, with the same budgets and credit as above
(step by step, fp16), and does not look at the PE again until the cycle after the last of
them (a timer lists it); when no router and no other PE is listed, whole cycles are skipped.
A delivery in cycle t cuts the run short (so does a pop, if a thread waits for room): the
elements of cycles up to t are run, the rest go on cycle by cycle from t + 1, when the
wavelet may be consumed (the room used). The elements themselves run when the run is closed
(at its end, at the cut, or when the PE or the run next needs them): nothing else writes or
reads the PE's memory and registers meanwhile, so they compute what they would have. A
property test and the fuzzer check that results, cycles and every counter equal those of the
same run with `bulk_runs=False` (every cycle of every PE one by one).

Sleep (speed, not semantics). A PE all of whose running threads wait for the fabric (an
empty receive queue, or a full RAMP FIFO its router did not pop this cycle), with no task
to start, leaves the list of PEs to run: until a wavelet arrives in one of its receive
queues or its router pops one of its RAMP FIFOs, nothing it does can change. It is listed
again for the cycle after that event, and the cycles it slept count as the stall of the
cycle it fell asleep in (nothing it waits for changes while it sleeps). Routers
sleep the same way (`wse_sim.router`).

Edge ports (`wse_sim.program.EdgePort`: weight streaming's memory service). Programs
without ports run exactly as before. r = edge_bytes_per_s / clock_hz / 4 words per cycle
is the memory service's bandwidth each way: all inbound ports share one credit, all
outbound ports a second one, each growing by r a cycle up to max(r, 1) (full at cycle 0;
the fp32 credit's rule) and spent one per word. The ports act at the start of each cycle
t, before the routers, in one serial phase (`wse_sim.router.edge_phase`), so any number
of workers decides the same:

* Inbound, from cycle `edge_latency_cycles` on: the ports with words left are served least
  recently served first (ties: lower index in `Program.ports`); a served port puts one word
  (at most one a cycle: it is one link) into its route's input FIFO of its side if that
  FIFO has room judged on start-of-cycle occupancy (the routers' rule) and the credit
  holds a word. The word may move from t + hop_latency, as if a neighbour router had moved
  it across a link in cycle t, and its router is listed for t + 1. A port without room or
  credit waits (back-pressure stalls the memory service; nothing is dropped). So a word
  entering at cycle s is consumed by a PE h hops on at s + (h + 1) * hop_latency + 1.
* Outbound: a wavelet a router sends through the port's side goes into the port's own
  FIFO of `queue_depth` (room checked like any output, so back-pressure works unchanged),
  ready at t + hop_latency (it crossed the link off the wafer). The ports whose head is
  ready are served the same way within the outbound credit, one word a port a cycle; a
  word taken in cycle t frees its slot from t + 1 (its router is listed for t + 1) and
  reaches the memory service at t + edge_latency_cycles (`SimResult.port_last_cycle`;
  its words: `SimResult.port_words`). More words than the port's `expected` stops the run
  with a ProgramError naming the port, fewer at the end likewise. A control wavelet sent
  to an outbound port ends there (counted in `control_sunk`, as at a RAMP output).

The run does not end while an inbound port has words left or an outbound port's FIFO holds
one (they are wavelets in flight). For the deadlock rule a port that moved a word, or waited
only for its credit or for the latency of its first words, made progress; a deadlock
message names the ports with words left ("edge ports"). Whole cycles are skipped only up
to the first cycle the ports may act, and never right after a router put a word into an
outbound port's FIFO (the port phase has not seen it yet). Counters: `edge_in` /
`edge_out` per PE, the words its ports moved (they cross no mesh link: not in `link`); the
check at the end is sent + edge in = delivered + consumed by routers + edge out.

Workers (speed, not semantics). With `threads` > 1 the fabric's rows are split into
stripes, one per host thread, which run each cycle's router phase, then (after all have
finished it) their PE phase; since no PE or router decision depends on the order in which
others run (see `wse_sim.router`), results, cycles and counters are bit-identical for any
number of threads.

The run ends at the first cycle at which no thread runs, no task is ready and no wavelet
is in any FIFO or receive queue; `cycles` is that cycle's index. Then every wavelet sent
(plus every extra multicast copy) must have been delivered to a PE (checked). Deadlock:
`deadlock_cycles` cycles without progress (a wavelet moved or crossing a link, an element
or control op executed, a task started, a thread waited only for its own PE's budgets), or
no PE able to act (all done, or waiting on empty receive queues) and nothing moved for
hop_latency + 1 cycles (then nothing can ever change). Both raise DeadlockError naming the
waiting threads, the wavelets stranded at idle or halted PEs, the full FIFOs and the FIFOs
a switch position holds. A switch change that cuts off wavelets no later position accepts
stops the run at the end of its cycle with SwitchOrderError (`wse_sim.router`). Control
wavelets end at routers, not PEs: the check is sent = delivered + consumed by routers.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from wse_sim.assemble import Assembled, Assembler
from wse_sim.errors import (
    DeadlockError,
    ProgramError,
    SimulationStopped,
    SwitchOrderError,
    UserError,
)
from wse_sim.hardware import WaferConfig
from wse_sim.interrupt import sigint_flag
from wse_sim.jit import (
    barrier,
    bits_float,
    float_bits,
    hot,
    hot_inline,
    trailing_zeros,
)
from wse_sim.program import (
    FabIn,
    FabOut,
    Kind,
    Mem,
    Op,
    PEProgram,
    Port,
    Program,
    Task,
    Trigger,
    validate,
    validate_replacement,
    vec,
)
from wse_sim.router import (
    WOKEN_DELIVERY,
    U,
    edge_phase,
    exchange,
    has_room,
    head_ready,
    inject,
    list_pushed,
    pop_recv,
    route_phase,
    send,
)
from wse_sim.state import CONTROL, EDGE_OUT, GATE_OFF, NEVER, OPERANDS, RECV
from wse_sim.stats import Stats
from wse_sim.threads import ChunkPlan, cores, run_workers

_log = logging.getLogger(__name__)

# Plain ints for numba.
MEM, FABIN, FABOUT, REG, IMM = (int(k) for k in (Kind.MEM, Kind.FABIN, Kind.FABOUT, Kind.REG,
                                                 Kind.IMM))
(MOV, NEG, EXP, RSQRT, RECIP, TANH, ERF, SQRT, ADD, SUB, MUL, DIV, MAX, MIN, FMA, REPEAT,
 ACTIVATE, BLOCK, UNBLOCK, HALT) = (int(op) for op in Op if op is not Op.SWITCH_ADV)
SWITCH_ADV = int(Op.SWITCH_ADV)
COLOR_TRIGGER = int(Trigger.COLOR)
FIRST_CONTROL = REPEAT

RUNNING, DONE, DEADLOCK, FROZEN, FAULT, EDGE_FAULT = range(6)
# Thread step outcomes (bit flags, merged per PE per cycle).
# F_BUSY_*: the thread waited only for its own PE's SRAM ports, fp32 credit or ramp slot.
# F_NOSLEEP: a fabric stall that ends without an event that wakes the PE (a wavelet in the
# receive queue not ready yet, a RAMP FIFO its router popped this cycle).
# F_FULL: a stall on a full RAMP FIFO, i.e. waiting for output room (a PE asleep on one
# still counts as able to act).
F_ARITH, F_SEND, F_RECV, F_MOVE, F_STALL, F_BUSY_ARITH, F_BUSY_MOVE = 1, 2, 4, 8, 16, 32, 64
F_NOSLEEP, F_FULL = 128, 256
F_WORK = F_ARITH | F_SEND | F_RECV | F_MOVE
# Progress for the deadlock rule: a wait for the PE's own budgets ends within a few cycles
# (and a bulk run counts those cycles as progress too).
F_PROGRESS = F_WORK | F_BUSY_ARITH | F_BUSY_MOVE


@hot_inline
def i64(x):
    """x as a (non-literal) int64. numba compiles a called, not inlined, function once per
    distinct argument types, a literal constant (NEVER, True) or an int32 slot index
    included; so the big ones are called with their arguments typed alike everywhere."""
    return np.int64(x)


@hot
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
def _successor(pc, it, rcount, rfirst, rlast):
    """The instruction after pc (REPEAT loop-back is free) and the loop state then:
    (pc, iter, rcount)."""
    if rcount > 0 and pc == rlast:
        it += 1
        if it < rcount:
            return rfirst, it, rcount
        return pc + 1, 0, 0
    return pc + 1, it, rcount


@hot_inline
def _end_instr(cs, sidx, thr, i):
    """Thread thr of slot sidx finished instruction i: step to the next one; free the
    thread after the task's last instruction."""
    th = cs.th[U(thr)]
    pc, th.iter, th.rcount = _successor(i, th.iter, th.rcount, th.rfirst, th.rlast)
    th.e = 0
    task = cs.task[U(th.task)]
    if pc == task.end:
        th.task = -1
        task.run = 0
        sl = cs.slot[U(sidx)]
        sl.running &= ~(1 << (thr - sidx * cs.params[0].threads))
        sl.wake = 1  # the task may be ready again, or another may take the thread
    else:
        th.pc = pc


@hot
def _control(cs, sidx, thr, i):
    """Execute control instruction i (one cycle)."""
    ins = cs.ins[U(i)]
    th = cs.th[U(thr)]
    op = ins.op
    if op == REPEAT:
        if ins.count == 0:
            th.rcount = 0
            _end_instr(cs, sidx, thr, i + ins.body)  # skip the body
            return
        th.rcount = ins.count
        th.iter = 0
        th.rfirst = i + 1
        th.rlast = i + ins.body
    elif op == ACTIVATE:
        cs.task[U(cs.slot[U(sidx)].tk_lo + ins.task)].act = 1
        cs.slot[U(sidx)].wake = 1
    elif op == BLOCK:
        cs.task[U(cs.slot[U(sidx)].tk_lo + ins.task)].blk = 1
    elif op == UNBLOCK:
        cs.task[U(cs.slot[U(sidx)].tk_lo + ins.task)].blk = 0
        cs.slot[U(sidx)].wake = 1
    else:  # HALT
        cs.slot[U(sidx)].halted = 1
    _end_instr(cs, sidx, thr, i)


@hot_inline
def _execute(fb, cs, s, thr, i, e, t):
    """Element e of instruction i on thread thr in cycle t (stripe s): read every source
    (consuming FABIN wavelets), then write the destination (they may alias)."""
    th = cs.th[U(thr)]
    it = th.iter
    a = b = c = np.float32(0.0)
    for k in range(1, OPERANDS):
        o = cs.opnd[U(i * OPERANDS + k)]
        kind = o.kind
        if kind == MEM:
            addr = o.addr + it * o.loop_stride
            if o.stride == 0:
                if e == 0:
                    th.scal[k] = cs.sram[U(addr)]
                v = th.scal[k]
            else:
                v = cs.sram[U(addr + e * o.stride)]
        elif kind == FABIN:
            v = pop_recv(fb, s, o.fifo, t)
        elif kind == REG:
            v = cs.regs[U(o.reg)]
        elif kind == IMM:
            v = o.imm
        else:
            continue
        if k == 1:
            a = v
        elif k == 2:
            b = v
        else:
            c = v
    res = _apply(cs.ins[U(i)].op, a, b, c)
    d = cs.opnd[U(i * OPERANDS)]
    if d.kind == MEM:
        cs.sram[U(d.addr + it * d.loop_stride + e * d.stride)] = res
    elif d.kind == REG:
        cs.regs[U(d.reg)] = res
    else:  # FABOUT
        send(fb, s, d.fifo, res, t)


@hot_inline
def _fabric_step(fb, cs, i, e, m, n, t):
    """The fabric side of a step of m elements from element e of instruction i (n elements)
    in cycle t: F_STALL flags if a FABIN it pops has no ready wavelet or the FABOUT it sends
    to has no room, else its F_RECV and F_SEND flags (a half FABIN pops at even elements, a
    half FABOUT sends at odd ones and at the last). Checked before the PE's own budgets: a
    thread that lacks a wavelet or room waits for the fabric, whatever its budgets (the
    cycle class and the bulk-run rule both say so)."""
    flags = 0
    for k in range(1, OPERANDS):
        o = cs.opnd[U(i * OPERANDS + k)]
        if o.kind == FABIN and (o.half == 0 or e & 1 == 0):
            if not head_ready(fb, o.fifo, t):
                f = fb.fifo[U(o.fifo)]
                # An empty queue can only fill through a delivery, which wakes the PE.
                return F_STALL if f.pushed == f.popped else F_STALL | F_NOSLEEP
            flags |= F_RECV
    d = cs.opnd[U(i * OPERANDS)]
    if d.kind == FABOUT and (d.half == 0 or (e + m - 1) & 1 == 1 or e + m == n):
        if not has_room(fb, d.fifo, t, fb.params[0].depth):
            # A full RAMP FIFO gets room through a pop, which wakes the PE (one this
            # cycle gives room next cycle).
            return F_STALL | F_FULL | (F_NOSLEEP if fb.fifo[U(d.fifo)].last_grant == t else 0)
        flags |= F_SEND
    return flags


@hot_inline
def _budgets_allow(cs, s, sidx, reads, writes, flops, flags):
    """The PE's budgets left this cycle hold a step's SRAM reads and writes, its fp32
    credit if arithmetic and a ramp slot if it sends (a step needing more reads than a whole
    cycle's budget proceeds when the budget is untouched: the excess becomes read debt)."""
    full = cs.params[0].reads
    if reads > s.rd_left and not (reads > full and s.rd_left == full):
        return False
    if writes > s.wr_left:
        return False
    if flops > 0 and cs.slot[U(sidx)].fpc < 1.0:
        return False
    return not (flags & F_SEND and s.ramp_left == 0)


@hot_inline
def _element(fb, cs, s, sidx, thr, t):
    """Try to advance thread thr (of slot sidx) by one element in cycle t, within the
    budgets left this cycle (s.rd_left, s.wr_left, s.ramp_left). Returns F_* flags."""
    th = cs.th[U(thr)]
    i = th.pc
    ins = cs.ins[U(i)]
    if ins.op >= FIRST_CONTROL:
        if ins.op == SWITCH_ADV:
            return _advance(fb, cs, s, sidx, thr, i, t)
        _control(cs, sidx, thr, i)
        return F_MOVE
    if ins.simd > 0:
        return _step_half(fb, cs, s, sidx, thr, t)
    e = th.e
    flags = _fabric_step(fb, cs, i, e, 1, ins.n, t)
    if flags & F_STALL:
        return flags
    flops, writes = ins.flops, ins.wr
    reads = ins.nrd + (ins.nrd0 if e == 0 else 0)
    if not _budgets_allow(cs, s, sidx, reads, writes, flops, flags):
        return F_BUSY_ARITH if flops > 0 else F_BUSY_MOVE
    if flags & F_SEND:
        s.ramp_left -= 1
    _execute(fb, cs, s, thr, i, e, t)
    return _charge(cs, s, sidx, thr, i, 1, reads, writes, flops, flags)


@hot_inline
def _charge(cs, s, sidx, thr, i, m, reads, writes, flops, flags):
    """Thread thr ran m elements of instruction i (reading `reads` and writing `writes`
    SRAM words, `flops` each, fabric `flags`): debit the PE's budgets, count, move the
    thread on. Returns the cycle's F_* flags."""
    th = cs.th[U(thr)]
    sl = cs.slot[U(sidx)]
    if reads > s.rd_left:
        sl.rd_debt = reads - s.rd_left
        s.rd_left = 0
    else:
        s.rd_left -= reads
    s.wr_left -= writes
    ctr = cs.ctr[U(sidx)]
    ctr.sram_read += reads
    ctr.sram_write += writes
    if flops > 0:
        sl.fpc -= 1.0
        ctr.ops += m
        ctr.flops += flops * m
        flags |= F_ARITH
    elif flags == 0:
        flags = F_MOVE
    elif flags == F_SEND | F_RECV:  # a MOV from FABIN to FABOUT: a relay, one wavelet
        ctr.relayed += 1
    e = th.e + m
    if e == cs.ins[U(i)].n:
        _end_instr(cs, sidx, thr, i)
    else:
        th.e = e
    return flags


# -- fp16 ------------------------------------------------------------------------------------
# An fp16 instruction (INSTR.simd > 0) advances a step of up to `simd` elements per cycle;
# its elements run in order, each computed in float32 as `_apply` and rounded to fp16 where
# it is written to a half destination (`_to_half`: round to nearest even, numpy's float16).
# The two conversions are called, not inlined: inlined at each of their uses they made the
# engine's first compile 16% longer, and the calls cost an fp16 run nothing measurable.


@hot
def _to_half(x):
    """The binary16 bits of float32 x, rounded to nearest even (numpy's astype(float16),
    NaN payloads included)."""
    b = float_bits(x)
    sign = (b >> 16) & 0x8000
    e = (b >> 23) & 0xFF
    m = b & 0x7FFFFF
    if e == 0xFF:  # inf, NaN
        h = 0x7C00 + (m >> 13)
        if m != 0 and h == 0x7C00:
            h += 1
        return sign | h
    ex = e - 127
    if ex > 15:
        return sign | 0x7C00
    if ex >= -14:  # a normal half (a carry out of the mantissa rounds up to inf exactly)
        h = ((ex + 15) << 10) | (m >> 13)
        rem = m & 0x1FFF
        if rem > 0x1000 or (rem == 0x1000 and (h & 1) != 0):
            h += 1
        return sign | h
    if ex < -25:
        return sign
    full = m | 0x800000  # a subnormal half: units of 2^-24
    sh = -(ex + 1)
    q = full >> sh
    rem = full & ((1 << sh) - 1)
    tie = 1 << (sh - 1)
    if rem > tie or (rem == tie and (q & 1) != 0):
        q += 1
    return sign | q


@hot
def _from_half(h):
    """The float32 value (exact) of binary16 bits h."""
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = np.float32(m) * np.float32(5.9604644775390625e-08)  # 2^-24
        return -v if sign else v
    if e == 0x1F:
        return bits_float(sign | 0x7F800000 | (m << 13))
    return bits_float(sign | ((e + 112) << 23) | (m << 13))


@hot_inline
def _load_half(cs, a):
    """The value of half a of the SRAM pool (low half of word a >> 1 if a is even)."""
    w = float_bits(cs.sram[U(a >> 1)])
    return _from_half((w >> ((a & 1) << 4)) & 0xFFFF)


@hot_inline
def _store_half(cs, a, x):
    """Write x, rounded to fp16, to half a of the SRAM pool (the other half unchanged)."""
    sh = (a & 1) << 4
    w = float_bits(cs.sram[U(a >> 1)])
    cs.sram[U(a >> 1)] = bits_float((w & ~(0xFFFF << sh)) | (_to_half(np.float32(x)) << sh))


@hot_inline
def _half_mem_source(cs, th, i, k, e):
    """Element e's source k (memory, register, immediate) of fp16 instruction i; element 0
    loads a stride-0 memory source."""
    o = cs.opnd[U(i * OPERANDS + k)]
    kind = o.kind
    if kind == MEM:
        if o.stride == 0:
            if e == 0:
                addr = o.addr + th.iter * o.loop_stride
                th.scal[k] = _load_half(cs, addr) if o.half else cs.sram[U(addr)]
            return th.scal[k]
        addr = o.addr + th.iter * o.loop_stride + e * o.stride
        return _load_half(cs, addr) if o.half else cs.sram[U(addr)]
    if kind == REG:
        return cs.regs[U(o.reg)]
    if kind == IMM:
        return o.imm
    return np.float32(0.0)


@hot_inline
def _half_mem_dest(cs, th, i, e, res):
    """Write element e's result to a memory or register destination of instruction i."""
    d = cs.opnd[U(i * OPERANDS)]
    if d.kind == MEM:
        addr = d.addr + th.iter * d.loop_stride + e * d.stride
        if d.half:
            _store_half(cs, addr, res)
        else:
            cs.sram[U(addr)] = res
    else:  # REG
        cs.regs[U(d.reg)] = res


@hot_inline
def _half_element(fb, cs, s, th, i, e, n, t):
    """Element e of fp16 instruction i (n elements) in cycle t: a half FABIN source pops
    its wavelet at even e (keeping the high half for e + 1), a half FABOUT destination
    sends at odd e or at the last element (a lone last element in the low half)."""
    a = b = c = np.float32(0.0)
    for k in range(1, OPERANDS):
        o = cs.opnd[U(i * OPERANDS + k)]
        if o.kind == FABIN:
            if not o.half:
                v = pop_recv(fb, s, o.fifo, t)
            elif e & 1:
                v = th.scal[k]
            else:
                bits = float_bits(pop_recv(fb, s, o.fifo, t))
                th.scal[k] = _from_half((bits >> 16) & 0xFFFF)
                v = _from_half(bits & 0xFFFF)
        else:
            v = _half_mem_source(cs, th, i, k, e)
        if k == 1:
            a = v
        elif k == 2:
            b = v
        else:
            c = v
    res = np.float32(_apply(cs.ins[U(i)].op, a, b, c))
    d = cs.opnd[U(i * OPERANDS)]
    if d.kind != FABOUT:
        _half_mem_dest(cs, th, i, e, res)
    elif not d.half:
        send(fb, s, d.fifo, res, t)
    elif e & 1:
        send(fb, s, d.fifo, bits_float(_to_half(th.scal[0]) | (_to_half(res) << 16)), t)
    elif e + 1 == n:
        send(fb, s, d.fifo, bits_float(_to_half(res)), t)
    else:
        th.scal[0] = res


@hot_inline
def _step_words(per_elem, per_pair, m):
    """SRAM words of a step of m elements (from an even element)."""
    return per_elem * m + per_pair * ((m + 1) >> 1)


@hot_inline
def _words_over(per_elem, per_pair, g, done):
    """SRAM words of `done` elements run in steps of g from a multiple of g."""
    steps = done // g
    rem = done - steps * g
    return steps * _step_words(per_elem, per_pair, g) + _step_words(per_elem, per_pair, rem)


@hot
def _step_half(fb, cs, s, sidx, thr, t):
    """`_element` for an fp16 instruction: try to advance thread thr by a step of up to
    `simd` elements in cycle t, within the budgets left; a step reads and writes the
    words of its elements (a unit-stride half vector: one per pair), takes one fp32
    credit if arithmetic, pops at most one wavelet per FABIN and sends at most one per
    FABOUT. Returns F_* flags."""
    th = cs.th[U(thr)]
    i = th.pc
    ins = cs.ins[U(i)]
    e = th.e
    n = ins.n
    m = min(ins.simd, n - e)
    flags = _fabric_step(fb, cs, i, e, m, n, t)
    if flags & F_STALL:
        return flags
    flops = ins.flops
    reads = _step_words(ins.nrd, ins.nrdh, m) + (ins.nrd0 if e == 0 else 0)
    writes = _step_words(ins.wr, ins.wrh, m)
    if not _budgets_allow(cs, s, sidx, reads, writes, flops, flags):
        return F_BUSY_ARITH if flops > 0 else F_BUSY_MOVE
    if flags & F_SEND:
        s.ramp_left -= 1
    for j in range(m):
        _half_element(fb, cs, s, th, i, e + j, n, t)
    return _charge(cs, s, sidx, thr, i, m, reads, writes, flops, flags)


@hot_inline
def _run_half(cs, thr, i, e0, n):
    """Elements e0..n-1 of memory-only fp16 instruction i on thread thr, in order."""
    th = cs.th[U(thr)]
    op = cs.ins[U(i)].op
    for e in range(e0, n):
        a = _half_mem_source(cs, th, i, 1, e)
        b = _half_mem_source(cs, th, i, 2, e)
        c = _half_mem_source(cs, th, i, 3, e)
        _half_mem_dest(cs, th, i, e, _apply(op, a, b, c))


@hot_inline
def _load_scalars(cs, th, i):
    """Element 0 of instruction i loads its stride-0 memory sources (as `_execute`)."""
    for k in range(1, OPERANDS):
        o = cs.opnd[U(i * OPERANDS + k)]
        if o.kind == MEM and o.stride == 0:
            th.scal[k] = cs.sram[U(o.addr + th.iter * o.loop_stride)]


@hot_inline
def _source(cs, th, i, k, dest_reg):
    """How element e of instruction i reads source k, decoded once for a run of elements
    (stride-0 sources loaded): (mode, index, stride, value); mode 0: sram[index + e *
    stride], 1: value (an immediate, a stride-0 operand or a register the run does not
    write), 2: the previous element's result (the run's destination register `dest_reg`,
    whose value before the run is `value`)."""
    o = cs.opnd[U(i * OPERANDS + k)]
    if o.kind == MEM:
        if o.stride == 0:
            return 1, 0, 0, th.scal[k]
        return 0, o.addr + th.iter * o.loop_stride, o.stride, np.float32(0.0)
    if o.kind == REG:
        return 2 if o.reg == dest_reg else 1, 0, 0, cs.regs[U(o.reg)]
    return 1, 0, 0, o.imm  # IMM (NONE: 0.0)


@hot_inline
def _read(cs, mode, index, stride, value, e, last):
    if mode == 0:
        return cs.sram[U(index + e * stride)]
    if mode == 2:
        return last
    return value


@hot_inline
def _run_elements(cs, thr, i, e0, n):
    """Elements e0..n-1 of memory-only instruction i on thread thr, in order, each reading
    its sources after the previous one wrote (operands may alias): `_execute` with the
    operands decoded once. A destination register is written once, after the last element
    (a register it reads meanwhile holds the previous element's result: kept in a local,
    not a store and a load per element)."""
    th = cs.th[U(thr)]
    op = cs.ins[U(i)].op
    d = cs.opnd[U(i * OPERANDS)]
    to_reg = d.kind == REG
    dest_reg = d.reg if to_reg else -1
    ma, ia, sa, va = _source(cs, th, i, 1, dest_reg)
    mb, ib, sb, vb = _source(cs, th, i, 2, dest_reg)
    mc, ic, sc, vc = _source(cs, th, i, 3, dest_reg)
    di = d.addr + th.iter * d.loop_stride
    ds = d.stride
    last = cs.regs[U(dest_reg)] if to_reg else np.float32(0.0)
    for e in range(e0, n):
        a = _read(cs, ma, ia, sa, va, e, last)
        b = _read(cs, mb, ib, sb, vb, e, last)
        c = _read(cs, mc, ic, sc, vc, e, last)
        last = np.float32(_apply(op, a, b, c))
        if not to_reg:
            cs.sram[U(di + e * ds)] = last
    if to_reg and n > e0:
        cs.regs[U(dest_reg)] = last


@hot
def _bulk_timing(p, ins, e, debt, credit, fp_t, tc, t_stop):
    """The cycles of a bulk-run instruction from element e, cycle tc, read debt, fp32 credit
    and its last update cycle fp_t, up to the end of the instruction or the start of cycle
    t_stop. Returns (elements done: next e, cycle after the last, SRAM words read, cycles of
    the first and the last element run or -1, debt, credit, fp_t). It runs in steps of one
    element (fp32), or of up to `simd` elements (fp16; a step's words: `_step_words`)."""
    n = ins.n
    g = max(ins.simd, 1)
    flops = ins.flops
    full = p.reads
    first = last = -1
    reads_total = 0
    # Once no read debt is left and element 0's scalar loads are behind, a step takes
    # exactly one cycle if a whole cycle's budgets cover it and the fp32 credit refills to
    # its cap every cycle (rate >= 1): then the rest needs no per-cycle bookkeeping.
    steady = (p.fp_rate >= 1.0 and _step_words(ins.nrd, ins.nrdh, g) <= full
              and _step_words(ins.wr, ins.wrh, g) <= p.writes)
    while e < n and tc < t_stop:
        if steady and debt == 0 and (e > 0 or ins.nrd0 == 0):
            steps = min((n - e + g - 1) // g, t_stop - tc)
            done = min(n - e, steps * g)
            if first < 0:
                first = tc
            reads_total += _words_over(ins.nrd, ins.nrdh, g, done)
            credit = p.fp_cap - 1.0 if flops > 0 else p.fp_cap
            fp_t = last = tc + steps - 1
            tc += steps
            e += done
            break
        avail = full - debt
        debt = 0
        if avail < 0:
            debt = -avail
            avail = 0
        credit = min(credit + p.fp_rate * (tc - fp_t), p.fp_cap)
        fp_t = tc
        m = min(g, n - e)
        reads = _step_words(ins.nrd, ins.nrdh, m) + (ins.nrd0 if e == 0 else 0)
        if ((reads <= avail or (reads > full and avail == full))
                and _step_words(ins.wr, ins.wrh, m) <= p.writes
                and (flops == 0 or credit >= 1.0)):
            if reads > avail:
                debt = reads - avail
            if flops > 0:
                credit -= 1.0
            reads_total += reads
            if first < 0:
                first = tc
            last = tc
            e += m
        tc += 1
    return e, tc, reads_total, first, last, debt, credit, fp_t


@hot
def _advance(fb, cs, s, sidx, thr, i, t):
    """SWITCH_ADV on thread thr in cycle t: put a control wavelet into the RAMP FIFO of the
    instruction's color (a FABOUT element's room and ramp slot; one cycle, class send)."""
    d = cs.opnd[U(i * OPERANDS)]
    if not has_room(fb, d.fifo, t, fb.params[0].depth):
        return F_STALL | F_FULL | (F_NOSLEEP if fb.fifo[U(d.fifo)].last_grant == t else 0)
    if s.ramp_left == 0:
        return F_BUSY_MOVE
    s.ramp_left -= 1
    inject(fb, s, d.fifo, CONTROL, t)
    cs.ctr[U(sidx)].control += 1
    _end_instr(cs, sidx, thr, i)
    return F_SEND


@hot_inline
def _count_bulk(ctr, ins, e0, e, t0, tc, reads):
    """Count elements e0..e-1 of a bulk-run instruction run in cycles t0..tc-1: every
    cycle counts as compute (arithmetic) or move (MOV)."""
    done = e - e0
    if ins.flops > 0:
        ctr.compute += tc - t0
        ctr.ops += done
        ctr.flops += ins.flops * done
    else:
        ctr.move += tc - t0
    ctr.sram_read += reads
    if ins.simd > 0:
        ctr.sram_write += _words_over(ins.wr, ins.wrh, ins.simd, done)
    else:
        ctr.sram_write += ins.wr * done


WAITS_DELIVERY, WAITS_POP = 1, 2  # what a thread beside a bulk run waits for


@hot_inline
def _waits_for_fabric(fb, cs, i):
    """What instruction i (a thread's next element) waits for that only the fabric, which
    then wakes the PE, can bring (fp32; such an element uses no budget until then):
    WAITS_DELIVERY, a wavelet into a FABIN operand's empty receive queue; WAITS_POP, room
    in its FABOUT's RAMP FIFO, every slot of which holds a wavelet (one its router popped
    this cycle has room next cycle: not counted; an element needs both, so it waits for
    the room whatever its sources); else 0."""
    ins = cs.ins[U(i)]
    if ins.op >= FIRST_CONTROL or ins.simd > 0:
        return 0
    for k in range(1, OPERANDS):
        o = cs.opnd[U(i * OPERANDS + k)]
        if o.kind == FABIN and fb.fifo[U(o.fifo)].pushed == fb.fifo[U(o.fifo)].popped:
            return WAITS_DELIVERY
    d = cs.opnd[U(i * OPERANDS)]
    if d.kind == FABOUT:
        f = fb.fifo[U(d.fifo)]
        if f.pushed - f.popped == fb.params[0].depth:
            return WAITS_POP
    return 0


@hot_inline
def _bulk_next(cs, th):
    """Thread th's instruction after the one it is at is memory-only too (`_bulk_walk`)."""
    i = _successor(th.pc, th.iter, th.rcount, th.rfirst, th.rlast)[0]
    return i != cs.task[U(th.task)].end and cs.ins[U(i)].bulk


@hot
def _bulk_thread(fb, cs, sidx, running):
    """The running thread of slot sidx that may run the rest of its instruction in bulk,
    or -1: the only one at a memory-only vector instruction with more than one element
    left (or one, and a memory-only one next), every other running thread waiting for the
    fabric (`_waits_for_fabric`). Also returns 1 if one of those waits for a pop (then a
    pop must cut the run short), else 0."""
    threads = cs.params[0].threads
    found = -1
    pop = 0
    r = running
    while r:
        thr = sidx * threads + trailing_zeros(np.uint64(r))
        r &= r - 1
        th = cs.th[U(thr)]
        ins = cs.ins[U(th.pc)]
        if ins.bulk and (ins.n - th.e > 1 or _bulk_next(cs, th)):
            if found >= 0:
                return -1, 0
            found = thr
        else:
            waits = _waits_for_fabric(fb, cs, th.pc)
            if waits == 0:
                return -1, 0
            if waits == WAITS_POP:
                pop = 1
    return found, pop


@hot
def _bulk_walk(cs, sidx, run, t_stop):
    """Slot sidx's open bulk run (`cs.bulk`) from where it started, as the cycle-by-cycle
    path runs it up to the start of cycle t_stop: its instruction, then each next one of
    the thread's that has no fabric operand (`INSTR.bulk`), one after the other as long as
    the task goes on. Returns (the cycle after its last element, whether it went on to the
    task's end).

    `run` False: only the timing is found (the thread does not move). `run` True: the run
    is closed there: its elements run, its cycles count as compute (arithmetic op) or move
    (MOV) instruction by instruction, the PE's budgets and the thread move on. Nothing else
    touched the PE's memory or registers since it started (`_bulk_thread`), so running its
    elements now computes what running them then did; a delivery (or pop) that cuts it
    short wakes the PE, which closes it first."""
    p = cs.params[0]
    b = cs.bulk[U(sidx)]
    sl = cs.slot[U(sidx)]
    thr = b.thr
    th = cs.th[U(thr)]
    ctr = cs.ctr[U(sidx)]
    end = cs.task[U(th.task)].end
    i, e0, tc, debt, credit, fp_t = b.ins, b.e0, b.t0, b.debt, b.credit, b.fp_t
    it, rcount = th.iter, th.rcount
    worked = ended = False
    while True:
        ins = cs.ins[U(i)]
        t0 = tc
        e, tc, reads, first, last, debt, credit, fp_t = _bulk_timing(
            p, ins, e0, debt, credit, fp_t, tc, t_stop)
        if run:
            if ins.simd > 0:
                _run_half(cs, thr, i, e0, e)
            else:
                if e0 == 0 and e > 0:
                    _load_scalars(cs, th, i)
                _run_elements(cs, thr, i, e0, e)
            _count_bulk(ctr, ins, e0, e, t0, tc, reads)
            if last >= 0:
                if ctr.first_cycle < 0:
                    ctr.first_cycle = first
                ctr.last_cycle = last
                worked = True
        if e < ins.n:
            if run:
                th.e = e
            break
        if run:
            _end_instr(cs, sidx, thr, i)
        i, it, rcount = _successor(i, it, rcount, th.rfirst, th.rlast)
        e0 = 0
        if i == end:
            ended = True
            break
        if tc >= t_stop or not cs.ins[U(i)].bulk:
            break
    if run:
        sl.rd_debt, sl.fpc, sl.fp_t = debt, credit, fp_t
        sl.busy = tc
        if worked:
            k = thr - sidx * p.threads + 1  # the round-robin starts after the thread that worked
            sl.th_rr = k if k < p.threads else 0
    return tc, ended


@hot_inline
def _bulk_start(cs, sidx, thr, pop, t):
    """Start running thread thr's memory-only vector instructions in bulk in cycle t
    (`_bulk_thread` chose it; the module docstring says why that is exact). Only the
    timing is found now: the elements run and the cycles are counted when the run is
    closed (`_bulk_close`). Returns (the cycle after the last element, whether the run goes
    on to the task's end)."""
    sl = cs.slot[U(sidx)]
    th = cs.th[U(thr)]
    b = cs.bulk[U(sidx)]
    b.t0, b.fp_t, b.debt, b.credit = t, sl.fp_t, sl.rd_debt, sl.fpc
    b.ins, b.e0, b.thr, b.open, b.pop = th.pc, th.e, thr, 1, pop
    return _bulk_walk(cs, i64(sidx), np.bool_(False), i64(NEVER))


@hot_inline
def _bulk_close(cs, sidx, t_stop):
    """Close slot sidx's open bulk run at the start of cycle t_stop, or at its end if that
    comes first (`_bulk_walk`)."""
    cs.bulk[U(sidx)].open = 0
    _bulk_walk(cs, i64(sidx), np.bool_(True), i64(t_stop))


@hot
def _bulk_resumes(fb, cs, sidx, thr, resume, ended):
    """Whether the PE must run in cycle `resume`, after thread thr's bulk run: as the
    cycle-by-cycle path lists it after the run's last element, if the thread goes on
    (the run did not go on to the task's end), another thread runs, or a task may start
    then."""
    if not ended:
        return True
    sl = cs.slot[U(sidx)]
    if sl.running & ~(1 << (thr - sidx * cs.params[0].threads)):
        return True
    task = cs.task[U(cs.th[U(thr)].task)]
    task.run = 0  # as if ended
    pending = _scan_tasks(fb, cs, i64(sidx), i64(resume), np.bool_(False))[1]
    task.run = 1
    return pending


@hot
def _settle(cs, t):
    """Bring the PE state to the end of cycle t - 1 when a run ends or stops: open bulk runs
    closed at t (`_bulk_close`), a PE asleep since cycle s counted as stalled
    in cycles s+1..t-1."""
    for sidx in range(len(cs.slot)):
        sl = cs.slot[U(sidx)]
        if sl.sleep >= 0:
            _count_slept(cs.ctr[U(sidx)], sl, t - sl.sleep - 1)
        if cs.bulk[U(sidx)].open:
            _bulk_close(cs, sidx, t)


@hot
def _scan_tasks(fb, cs, sidx, t, start):
    """Start ready tasks of slot sidx on free microthreads (if `start`). Returns (tasks
    started, whether a ready task is left waiting or a COLOR task's wavelet is on its way)."""
    sl = cs.slot[U(sidx)]
    if sl.halted:
        return 0, False
    threads = cs.params[0].threads
    lo = sl.tk_lo
    ntask = sl.tk_hi - lo
    started = 0
    pending = False
    rr = sl.tk_rr
    for q in range(ntask):
        k = lo + (rr + q) % ntask
        task = cs.task[U(k)]
        if task.run or task.blk:
            continue
        ready = task.act != 0
        if not ready and task.trig == COLOR_TRIGGER:
            if head_ready(fb, task.recv, t):
                ready = True
            elif fb.fifo[U(task.recv)].pushed > fb.fifo[U(task.recv)].popped:
                pending = True
        if not ready:
            continue
        if not start or sl.running == (1 << threads) - 1:
            pending = True
            continue
        free = trailing_zeros(np.uint64(~sl.running & ((1 << threads) - 1)))
        thr = sidx * threads + free
        th = cs.th[U(thr)]
        th.task = k
        th.pc = task.first
        th.e = 0
        th.rcount = 0
        th.iter = 0
        task.run = 1
        task.act = 0
        sl.running |= 1 << free
        sl.tk_rr = (k - lo + 1) % ntask
        started += 1
    return started, pending


@hot_inline
def _count_cycle(ctr, flags, t):
    """Class of a PE's cycle t (first that applies) and its first/last working cycle."""
    if flags & (F_ARITH | F_BUSY_ARITH):
        ctr.compute += 1
    elif flags & F_SEND:
        ctr.send += 1
    elif flags & F_RECV:
        ctr.receive += 1
    elif flags & (F_MOVE | F_BUSY_MOVE):
        ctr.move += 1
    elif flags & F_FULL:
        ctr.wait_output += 1
    elif flags & F_STALL:
        ctr.wait_input += 1
    if flags & F_WORK:
        if ctr.first_cycle < 0:
            ctr.first_cycle = t
        ctr.last_cycle = t


@hot_inline
def _count_slept(ctr, sl, slept):
    """A PE asleep stalled in each of `slept` cycles as in the cycle it fell asleep in:
    waiting for output room if a thread waited on a full RAMP FIFO (`_count_cycle`'s
    order), else for input."""
    if sl.full:
        ctr.wait_output += slept
    else:
        ctr.wait_input += slept


@hot_inline
def _list_pe(cs, s, sidx, t):
    """List slot sidx (of stripe s) to run in cycle t + 1."""
    sl = cs.slot[U(sidx)]
    if sl.queued != t + 1:
        sl.queued = t + 1
        cs.active[U(1 - s.pcur), U(s.s_lo + s.p_nnext)] = sidx
        s.p_nnext += 1


@hot_inline
def _timer_put(cs, lo, j, when, sidx):
    cs.timer_t[U(lo + j)] = when
    cs.timer_s[U(lo + j)] = sidx
    cs.timer_at[U(sidx)] = j


@hot
def _timer_sift(cs, s, j, when, sidx):
    """Put (when, sidx) into the free position j of stripe s's min-heap of bulk-run PEs'
    resume cycles (each slot at most once; `timer_at` finds it): up past later parents,
    then down past earlier children."""
    lo = s.s_lo
    while j > 0:
        parent = (j - 1) >> 1
        if cs.timer_t[U(lo + parent)] <= when:
            break
        _timer_put(cs, lo, j, cs.timer_t[U(lo + parent)], cs.timer_s[U(lo + parent)])
        j = parent
    n = s.timers
    while True:
        child = 2 * j + 1
        if child >= n:
            break
        if child + 1 < n and cs.timer_t[U(lo + child + 1)] < cs.timer_t[U(lo + child)]:
            child += 1
        if cs.timer_t[U(lo + child)] >= when:
            break
        _timer_put(cs, lo, j, cs.timer_t[U(lo + child)], cs.timer_s[U(lo + child)])
        j = child
    _timer_put(cs, lo, j, when, sidx)


@hot_inline
def _timer_push(cs, s, when, sidx):
    """A bulk-run PE resumes in cycle `when`."""
    s.timers += 1
    _timer_sift(cs, s, i64(s.timers - 1), i64(when), i64(sidx))


@hot_inline
def _timer_remove(cs, s, sidx):
    """Take slot sidx's entry out of stripe s's heap."""
    j = cs.timer_at[U(sidx)]
    cs.timer_at[U(sidx)] = -1
    s.timers -= 1
    n = s.timers
    if j < n:
        lo = s.s_lo
        _timer_sift(cs, s, i64(j), i64(cs.timer_t[U(lo + n)]), i64(cs.timer_s[U(lo + n)]))


@hot_inline
def _timer_pop(cs, s):
    """Remove and return the slot that resumes first."""
    top = cs.timer_s[U(s.s_lo)]
    _timer_remove(cs, s, top)
    return top


@hot_inline
def _pe_one(fb, cs, s, sidx, t):
    """Cycle t of slot sidx (stripe s). Returns the progress made (elements, control ops,
    tasks started and threads waiting only for the PE's own budgets)."""
    p = cs.params[0]
    sl = cs.slot[U(sidx)]
    if sl.busy > t:  # inside a bulk run: its timer lists it
        return 0
    if cs.bulk[U(sidx)].open:  # one that ended before t, woken since
        _bulk_close(cs, sidx, t)
    threads = p.threads
    if sl.sleep >= 0:
        # It stalled in every cycle it slept through, and paid its read debt.
        slept = t - sl.sleep - 1
        _count_slept(cs.ctr[U(sidx)], sl, slept)
        sl.rd_debt = max(0, sl.rd_debt - slept * p.reads)
        sl.sleep = -1
        s.nsleep -= 1
        s.nfull -= sl.full
        sl.full = 0
    progress = 0
    if sl.wake:
        started, pending = _scan_tasks(fb, cs, i64(sidx), i64(t), np.bool_(True))
        progress += started
        sl.wake = 1 if pending else 0
    running = sl.running
    # No task may start before a thread ends: none is ready, or no microthread is free.
    if running != 0 and p.bulk and (sl.wake == 0 or running == (1 << threads) - 1):
        thr, pop = _bulk_thread(fb, cs, sidx, running)
        if thr >= 0:
            resume, ended = _bulk_start(cs, sidx, thr, pop, t)
            sl.busy = resume
            s.bulk_end = max(s.bulk_end, resume)
            if _bulk_resumes(fb, cs, sidx, thr, resume, ended):
                _timer_push(cs, s, resume, sidx)
            return progress + 1
    if running != 0:
        s.rd_left = p.reads - sl.rd_debt
        sl.rd_debt = 0
        if s.rd_left < 0:
            sl.rd_debt = -s.rd_left
            s.rd_left = 0
        s.wr_left = p.writes
        s.ramp_left = p.ramp_out
        sl.fpc = min(sl.fpc + p.fp_rate * (t - sl.fp_t), p.fp_cap)
        sl.fp_t = t
        start = sl.th_rr
        first = -1
        flags = 0
        # The running threads from th_rr on, round the ring (an element ends at most its
        # own thread's task and starts none: the mask read now holds for the whole loop).
        order = ((running >> start) | (running << (threads - start))) & ((1 << threads) - 1)
        while order:
            k = start + trailing_zeros(np.uint64(order))
            order &= order - 1
            if k >= threads:
                k -= threads
            thr = sidx * threads + k
            f = _element(fb, cs, s, sidx, thr, t)
            flags |= f
            if f & F_PROGRESS:
                progress += 1
            if f & F_WORK and first < 0:
                first = k
        if first >= 0:
            sl.th_rr = first + 1 if first + 1 < threads else 0
        _count_cycle(cs.ctr[U(sidx)], flags, t)
        if flags & ~F_FULL == F_STALL and sl.wake == 0:
            # Every thread waits for a delivery or a pop: sleep until one happens.
            sl.sleep = t
            sl.full = 1 if flags & F_FULL else 0
            s.nsleep += 1
            s.nfull += sl.full
            return progress
    if sl.running == 0 and sl.wake:
        # Keep the PE listed only if some task can start next cycle.
        sl.wake = 1 if _scan_tasks(fb, cs, i64(sidx), i64(t + 1), np.bool_(False))[1] else 0
    if sl.running != 0 or sl.wake:
        _list_pe(cs, s, sidx, t)
    return progress


@hot
def pe_phase(fb, cs, stripes, w, t):
    """Cycle t of worker w's listed PEs (after its routers): the PEs woken by the routers
    are listed for t + 1, bulk-run PEs whose run ended run. Returns the progress."""
    s = stripes[w]
    s.pcur = 1 - s.pcur
    s.p_ncur = s.p_nnext
    s.p_nnext = 0
    for j in range(s.w_lo, s.w_lo + s.nwoken):
        entry = fb.woken[U(j)]
        sidx = entry >> 1
        sl = cs.slot[U(sidx)]
        running_in_bulk = sl.busy > t + 1
        if entry & 1 == WOKEN_DELIVERY:
            sl.wake = 1
        elif sl.sleep < 0 and not (running_in_bulk and cs.bulk[U(sidx)].pop):
            continue  # a pop matters to a PE asleep on a full RAMP FIFO, or beside one
        if running_in_bulk:
            # The wavelet may be consumed (the room used) from t + 1, by a waiting thread
            # or a task it starts: the bulk run ends after cycle t and the PE runs cycle by
            # cycle.
            _bulk_close(cs, sidx, t + 1)
            if cs.timer_at[U(sidx)] >= 0:
                _timer_remove(cs, s, sidx)
        # (a PE whose timer is set runs when it fires)
        if sl.busy <= t or (sl.busy == t + 1 and cs.timer_at[U(sidx)] < 0):
            _list_pe(cs, s, sidx, t)
    s.nwoken = 0
    s.visits += s.p_ncur
    progress = 0
    while s.timers > 0 and cs.timer_t[U(s.s_lo)] <= t:
        progress += _pe_one(fb, cs, s, _timer_pop(cs, s), t)
    for j in range(s.s_lo, s.s_lo + s.p_ncur):
        progress += _pe_one(fb, cs, s, cs.active[U(s.pcur), U(j)], t)
    return progress


@hot
def _publish(cs, s, t, work):
    """What every worker needs to decide the next step identically."""
    s.pub_inflight = s.inflight
    s.pub_active = s.p_nnext + s.timers
    s.pub_routers = s.r_nnext
    s.pub_out_pushed = s.out_pushed
    s.pub_nsleep = s.nsleep
    s.pub_full = s.nfull
    s.pub_work = work
    s.pub_fault = s.fault
    s.pub_bulk_end = s.bulk_end
    if s.p_nnext > 0:
        s.pub_next_free = t + 1
    elif s.timers > 0:
        s.pub_next_free = cs.timer_t[U(s.s_lo)]
    else:
        s.pub_next_free = NEVER


@hot
def run_worker(fb, cs, wk, t, t_end, workers, w):
    """Cycles t.. of stripes w, w + workers, ... until done, a deadlock, or t_end; every
    worker takes the same decisions from what all stripes published. Returns (cycle,
    status)."""
    stripes = wk.stripe
    n = len(stripes)
    deadlock = cs.params[0].deadlock
    hop = fb.params[0].hop
    edge = fb.edge[0]
    ports = edge.nports > 0
    # Port phases run so far: read before the first barrier (no worker has run one in this
    # call yet), then counted by every worker alike.
    seq = edge.seq
    last_progress = stripes[w].last_progress
    status = RUNNING
    first = True
    while True:
        barrier(wk.barrier, workers)
        inflight = active = routers = nsleep = full = work = faults = 0
        bulk_end = -1
        next_free = NEVER
        for k in range(n):
            o = stripes[k]
            inflight += o.pub_inflight
            active += o.pub_active
            # (a push into another stripe lists its router only at the start of the next
            # cycle: `wse_sim.router.list_pushed`; a word put into an outbound port's FIFO
            # is taken by the port phase, which publishes it only once it has seen it)
            routers += o.pub_routers + o.pub_xpush + o.pub_out_pushed
            nsleep += o.pub_nsleep
            full += o.pub_full
            work += o.pub_work
            faults += o.pub_fault >= 0
            bulk_end = max(bulk_end, o.pub_bulk_end)
            next_free = min(next_free, o.pub_next_free)
        # what the last port phase published (`wse_sim.router.edge_phase`)
        q = (seq - 1) & 1
        e_left, e_next = edge.pub_left[q], edge.pub_next[q]
        e_work, e_fault = edge.pub_work[q], edge.pub_fault[q]
        if faults > 0:  # a switch change cut wavelets off (`wse_sim.router._switch`)
            status = FAULT
            break
        if e_fault >= 0:  # an outbound port received more than expected
            status = EDGE_FAULT
            break
        if inflight == 0 and active == 0 and e_left == 0:
            # Nothing runs, nothing is ready, the fabric is empty: the end, whatever the
            # no-progress rule below would say. A PE whose task ends at the end of a
            # bulk run (no longer listed) computes until bulk_end: then the run ends, or
            # sleeping threads wait for wavelets nobody can send.
            t = max(t, bulk_end)
            status = FROZEN if nsleep > 0 else DONE
            break
        if not first:  # the checks after cycle t - 1
            if work > 0 or e_work > 0:
                last_progress = t - 1
            if routers == 0 and (active > 0 or e_next < NEVER):
                # Nothing in the routers can move, every listed PE is inside a bulk
                # run: nothing happens until the first of them resumes or the edge
                # ports may act (`e_next`: NEVER without ports).
                t = max(t, min(next_free, t_end, e_next))
            if e_left > 0 and t <= edge.latency:
                last_progress = t - 1  # the memory service's first words are on their way
            # A bulk run makes progress every cycle until it ends.
            progressed = max(last_progress, bulk_end - 1)
            if t - progressed > deadlock:
                status = DEADLOCK
                break
            if active + full == 0 and inflight > 0 and t - progressed > hop + 1:
                status = FROZEN
                break
        first = False
        if t >= t_end:
            break
        if ports:  # the edge ports' cycle t, on one worker, before the routers'
            if w == 0:
                edge_phase(fb, stripes, t)
            seq += 1
            barrier(wk.barrier, workers)
        for k in range(w, n, workers):
            if n > 1:
                list_pushed(fb, stripes, k, t - 1)
            stripes[k].moved = route_phase(fb, stripes, k, t)
        barrier(wk.barrier, workers)
        for k in range(w, n, workers):
            if n > 1:
                exchange(fb, stripes, k, t)
            progress = pe_phase(fb, cs, stripes, k, t)
            _publish(cs, stripes[k], t, stripes[k].moved + progress)
        t += 1
    for k in range(w, n, workers):
        stripes[k].last_progress = last_progress
    return t, status


@dataclass
class SimResult:
    """The outcome of one run: cycle count, counters, final PE memories, and what the edge
    ports moved: `port_words` (outbound port name -> float32 words the memory service
    received, in order), `port_last_cycle` (port name -> the cycle its last word reached
    the memory service, latency included (outbound), or entered the fabric (inbound); -1 if
    none did) and `port_marks` (port name -> the same cycle for each of its marks)."""

    cycles: int
    stats: Stats
    _asm: Assembled
    port_words: dict[str, np.ndarray] = field(default_factory=dict)
    port_last_cycle: dict[str, int] = field(default_factory=dict)
    port_marks: dict[str, np.ndarray] = field(default_factory=dict)

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

    def running(self) -> np.ndarray:
        """PEs with a task running at the end, (height, width) bool: none after a finished
        run, those a stopped run left in the middle of a task."""
        w, h = self.stats.width, self.stats.height
        out = np.zeros(w * h, bool)
        slot = self._asm.cores.slot
        out[self._asm.slot_pe] = slot["running"] != 0
        return out.reshape(h, w)

    def _slot(self, x: int, y: int) -> int:
        w, h = self.stats.width, self.stats.height
        if not (0 <= x < w and 0 <= y < h):
            raise UserError(f"PE ({x}, {y}) is outside the {w} x {h} fabric")
        return self._asm.slot_of(y * w + x)


class Loaded:
    """`program` validated and assembled once, to run any number of times, each run from
    cycle 0 with fresh state; a run may put other programs in place of some PEs' (new SRAM
    contents, new code: `wse_sim.assemble.Assembler`), and only those are validated
    (`wse_sim.program.validate_replacement`) and assembled again, unless a PE's task list
    is the one the run before gave it (the same list: a step's micro-batches reuse their
    code). `program`, and a task list while it is given, must not change while loaded."""

    def __init__(self, program: Program, wafer: WaferConfig, *,
                 threads: int | None = None, bulk_runs: bool = True) -> None:
        code = validate(program, wafer)
        self.program, self.wafer = program, wafer
        self._assembler = Assembler(program, wafer, threads or cores(), bulk_runs, code)
        self._validated: dict[tuple[int, int], list[Task]] = {}  # the last run's replacements

    def run(self, pes: Mapping[tuple[int, int], PEProgram] | None = None, *,
            max_cycles: int | None = None, progress: Callable[[int], None] | None = None,
            interruptible: bool = False) -> SimResult:
        """Run the program with the PE programs `pes` (keys (x, y)) in place of its own, as
        `simulate` runs a program."""
        program, arrays = self.program, None
        if pes:
            arrays = validate_replacement(program, self.wafer, pes, self._validated)
            self._validated = {pe: prog.tasks for pe, prog in pes.items()}
            program = replace(program, pes={**program.pes, **pes})
        asm = self._assembler.state(pes, arrays)
        if not interruptible:
            return _run(program, asm, max_cycles, progress, lambda: False)
        with sigint_flag() as interrupted:
            return _run(program, asm, max_cycles, progress, interrupted)


def simulate(
    program: Program,
    wafer: WaferConfig,
    *,
    max_cycles: int | None = None,
    progress: Callable[[int], None] | None = None,
    threads: int | None = None,
    interruptible: bool = False,
    bulk_runs: bool = True,
) -> SimResult:
    """Validate and run `program` to completion; see the module docstring for the model.

    The fabric's rows are split into `threads` stripes (default: one per core), run by as
    many host threads as the work per cycle pays for and the machine's load allows
    (`wse_sim.threads.ChunkPlan`); the results do not depend on either.
    Raises ProgramError (invalid program), DeadlockError, or SimulationStopped (a UserError
    holding the partial result) if the run needs more than `max_cycles` cycles or, with
    `interruptible`, Ctrl-C is pressed (`wse_sim.interrupt`; the run stops within a chunk
    of cycles). `progress(cycle)` is called between chunks of cycles. `bulk_runs` False
    runs every cycle of every PE one by one: slower, and the same in every figure (module
    docstring, "Bulk execution"; the tests compare the two)."""
    return Loaded(program, wafer, threads=threads, bulk_runs=bulk_runs).run(
        max_cycles=max_cycles, progress=progress, interruptible=interruptible)


def prepare_engine(wafer: WaferConfig) -> float:
    """Have the cycle loop's machine code ready, and return the seconds that took: numba
    compiles it on a machine's first run (about 45 s on 2 cores) and caches it, and later
    processes load it in a fraction of a second. It runs a program that fits any wafer (one
    PE, one task, color 0: a word sent to itself, then an FMA that receives it), announced
    on the `wse_sim.engine` logger (INFO), which a terminal's progress line shows."""
    _log.info("preparing the simulator engine (numba compiles it on a first run, about a "
              "minute; then cached)")
    started = time.perf_counter()
    program = Program(1, 1)
    pe = program.pe(0, 0, 1)
    pe.load(0, np.ones(1, np.float32))
    pe.tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, 1, FabOut(0), Mem(0)),
                                            vec(Op.FMA, 1, Mem(0), FabIn(0), Mem(0), Mem(0))]))
    program.add_route(0, 0, 0, 1 << Port.RAMP, 1 << Port.RAMP)
    simulate(program, wafer, threads=1)
    return time.perf_counter() - started


def _run(program: Program, asm: Assembled, max_cycles: int | None,
         progress: Callable[[int], None] | None, interrupted: Callable[[], bool]) -> SimResult:
    """`simulate`'s loop over chunks of cycles."""
    fb, cs, wk = asm.fabric, asm.cores, asm.workers
    t = 0
    plan = ChunkPlan(wk, 1024, 256, 1 << 22)
    while True:
        workers, chunk = plan.next()
        end = t + chunk if max_cycles is None else min(t + chunk, max_cycles)
        t0 = t
        t, status = run_workers(run_worker, workers, fb, cs, wk, t, end, workers)
        plan.ran(t - t0)
        if progress is not None:
            progress(t)
        if status != RUNNING and max_cycles is not None and t > max_cycles:
            # The last work was bulk runs ending after the limit.
            raise _stopped(program, asm, max_cycles, "max_cycles",
                           f"reached max_cycles={max_cycles}")
        if status == DONE:
            break
        if status in (DEADLOCK, FROZEN):
            _settle(cs, t)
            raise DeadlockError(_deadlock_message(asm, t, status))
        if status == FAULT:
            raise SwitchOrderError(_fault_message(program, asm, t))
        if status == EDGE_FAULT:
            k = int(fb.edge["fault"][0])
            pt = fb.port[k]
            raise ProgramError(f"{_port_name(program, k)}: the memory service received more "
                               f"than the {int(pt['n'])} words expected (one more by cycle "
                               f"{int(pt['cycle'])})")
        if max_cycles is not None and t >= max_cycles:
            raise _stopped(program, asm, t, "max_cycles", f"reached max_cycles={max_cycles}")
        if interrupted():
            raise _stopped(program, asm, t, "interrupted", "interrupted (Ctrl-C)")
    _settle(cs, t)
    # The fabric is empty: every wavelet sent (and every multicast copy) reached a PE.
    stats = Stats.from_state(program.width, program.height, t, fb, wk, cs)
    consumed = int(fb.fifo["popped"][fb.fifo["port"] == RECV].sum())
    sunk = int(stats.control_sunk.sum())  # control wavelets end at routers, not PEs
    edge_in, edge_out = int(stats.edge_in.sum()), int(stats.edge_out.sum())
    if not (stats.injected + edge_in - sunk == stats.delivered + edge_out
            and stats.delivered == consumed):
        raise AssertionError(f"fabric lost wavelets: {stats.injected} sent (with multicast "
                             f"copies), {edge_in} in through edge ports, {sunk} control "
                             f"wavelets consumed by routers, {stats.delivered} delivered, "
                             f"{consumed} consumed, {edge_out} out through edge ports")
    for k in np.nonzero(fb.port["done"] < fb.port["n"])[0]:  # (inbound: all sent, run ended)
        pt = fb.port[k]
        raise ProgramError(f"{_port_name(program, int(k))}: the memory service received "
                           f"{int(pt['done'])} of the {int(pt['n'])} words expected by the end "
                           f"of the run (cycle {t})")
    return SimResult(cycles=t, stats=stats, _asm=asm, **_port_results(program, fb))


def _port_name(program: Program, k: int) -> str:
    """Edge port k as an error names it: name, PE, side, color, direction."""
    p = program.ports[k]
    return (f"port {p.name!r} at PE ({p.x}, {p.y}) side {Port(p.side).name} color {p.color} "
            f"({'inbound' if p.inbound else 'outbound'})")


def _port_results(program: Program, fb) -> dict[str, dict]:
    """SimResult's port_words and port_last_cycle (what arrived so far); the words are
    views of the run's own fabric, which the result keeps (111M's step: 0.44 GB)."""
    port, data = fb.port, fb.edge_data
    words = {p.name: data[port["data"][k]: port["data"][k] + min(port["done"][k], port["n"][k])]
             for k, p in enumerate(program.ports) if not p.inbound}
    starts = port["mark_hi"] - [len(p.marks) for p in program.ports]
    return {"port_words": words,
            "port_last_cycle": {p.name: int(port["cycle"][k])
                                for k, p in enumerate(program.ports)},
            "port_marks": {p.name: fb.edge_mark_cycle[starts[k]: port["mark_hi"][k]].copy()
                           for k, p in enumerate(program.ports)}}


def _stopped(program: Program, asm: Assembled, t: int, reason: str,
             why: str) -> SimulationStopped:
    """The run stops after cycle t - 1: its counters settled to cycles 0..t-1 (`_settle`)
    in a partial result, and the one-line message."""
    cs, wk = asm.cores, asm.workers
    _settle(cs, t)
    running = int((cs.slot["running"] != 0).sum())
    inflight = int(wk.stripe["inflight"].sum())
    stats = Stats.from_state(program.width, program.height, t, asm.fabric, wk, cs)
    result = SimResult(cycles=t, stats=stats, _asm=asm, **_port_results(program, asm.fabric))
    return SimulationStopped(f"stopped at cycle {t:,}: {why}; {running} PEs still running a "
                             f"task, {inflight} wavelets in flight", cycle=t, reason=reason,
                             result=result)


def _deadlock_message(asm: Assembled, t: int, status: int, limit: int = 8) -> str:
    """One line: the waiting threads (PE, task, pc, op, what they wait for), the full FIFOs,
    and wavelets stranded at PEs that will not consume them."""
    fb, cs = asm.fabric, asm.cores
    width = int(fb.params["width"][0])
    depth = int(fb.params["depth"][0])
    threads = int(cs.params["threads"][0])
    count = fb.fifo["pushed"] - fb.fifo["popped"]

    def color_of(b: int) -> int:
        return int(fb.route["color"][fb.fifo["route"][b]])

    def where(router: int) -> str:
        pe = int(fb.router_pe[router])
        return f"({pe % width}, {pe // width})"

    waiting: list[str] = []
    for thr in np.nonzero(cs.th["task"] >= 0)[0]:
        s = thr // threads
        k, i = int(cs.th["task"][thr]), int(cs.th["pc"][thr])
        what = "budget"
        for o in cs.opnd[i * OPERANDS: (i + 1) * OPERANDS]:
            kind, b = int(o["kind"]), int(o["fifo"])
            if kind == FABIN and count[b] == 0:
                what = f"FABIN color {color_of(b)} empty"
            elif kind == FABOUT and count[b] >= depth:
                what = f"FABOUT color {color_of(b)}: ramp buffer full"
        waiting.append(f"PE {where(int(cs.slot['router'][s]))} task {int(asm.task_ids[k])} "
                       f"pc {i - int(cs.task['first'][k])} {Op(int(cs.ins['op'][i])).name} "
                       f"waits: {what}")
    full, stranded, held = [], [], []
    for b in np.nonzero(count > 0)[0]:
        router, port = int(fb.fifo["router"][b]), int(fb.fifo["port"][b])
        if fb.fifo["gate"][b] == GATE_OFF:
            sw = fb.switch[fb.route_sw[fb.fifo["route"][b]]]
            held.append(f"PE {where(router)} {Port(port).name} color {color_of(b)}: "
                        f"{int(count[b])} wavelets, switch position {int(sw['pos'])} does not "
                        f"accept {Port(port).name}")
        if port == EDGE_OUT:
            continue  # (named with its port below)
        if port == RECV:
            s = int(fb.router["slot"][router])
            halted = s >= 0 and bool(cs.slot["halted"][s])
            if halted or s < 0 or cs.slot["running"][s] == 0:
                stranded.append(f"PE {where(router)} color {color_of(b)}: {int(count[b])} "
                                f"wavelets at a {'halted' if halted else 'idle'} PE")
        elif count[b] >= depth:
            full.append(f"PE {where(router)} {Port(port).name} color {color_of(b)}")
    ports = []
    for k, pt in enumerate(fb.port):
        left = int(pt["n"] - pt["done"])
        queued = int(count[pt["fifo"]])
        if pt["inbound"] and left > 0:
            ports.append(f"{asm.port_names[k]!r} inbound {left} words left"
                         + (", its FIFO full" if queued >= depth else ""))
        elif not pt["inbound"] and queued > 0:
            ports.append(f"{asm.port_names[k]!r} outbound {queued} words queued")
    kind = "no progress" if status == DEADLOCK else "the fabric is stuck"
    parts = [f"deadlock at cycle {t} ({kind})"]
    for label, items in (("waiting", waiting), ("stranded", stranded), ("full buffers", full),
                         ("held by a switch position", held), ("edge ports", ports)):
        if items:
            more = f"; ... and {len(items) - limit} more" if len(items) > limit else ""
            parts.append(f"{label}: " + "; ".join(items[:limit]) + more)
    return " | ".join(parts)


def _ports(mask: int) -> str:
    return "+".join(p.name for p in Port if mask >> p & 1) or "none"


def _fault_message(program: Program, asm: Assembled, t: int) -> str:
    """One line: the switch change of cycle t - 1 that cut wavelets off (the lowest FIFO of
    any stripe, `wse_sim.router._switch`): PE, color, input port, the route's positions."""
    fb = asm.fabric
    faults = asm.workers.stripe["fault"]
    b = int(faults[faults >= 0].min())
    width = int(fb.params["width"][0])
    pe = int(fb.router_pe[fb.fifo["router"][b]])
    x, y = pe % width, pe // width
    ri = int(fb.fifo["route"][b])
    color = int(fb.route["color"][ri])
    port = Port(int(fb.fifo["port"][b])).name
    pos = int(fb.switch["pos"][fb.route_sw[ri]])
    route = program.routes[(x, y, color)]
    positions = ", ".join(f"{k}: rx {_ports(rx)} tx {_ports(tx)}"
                          for k, (rx, tx) in enumerate(route.position(k)
                                                       for k in range(route.count)))
    waiting = int(fb.fifo["pushed"][b] - fb.fifo["popped"][b])
    return (f"switch order error at cycle {t - 1}: PE ({x}, {y}) color {color}: a control "
            f"wavelet switched the route to position {pos} while {waiting} wavelets waited "
            f"at input {port}, which neither it nor a later position accepts (positions "
            f"{positions}; ring {'on' if route.ring else 'off'})")
