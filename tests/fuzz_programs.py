"""Random but valid Programs for fuzzing the engine (tests/test_fuzz.py, tests/fuzz_campaign.py).

`cases()` is a Hypothesis strategy of `Case`s: a Program, the wafer it runs on and a
cycle limit. Every program it draws passes `wse_sim.program.validate` by construction
(the fuzz test asserts so: a ProgramError is a bug of this generator). A case is built in
this order:

* the wafer: a 1..4 x 1..4 mesh, 2..6 colors, small FIFOs (depth 1..4), hop latency 1..3,
  1..3 microthreads, 1..3 SRAM reads and 1..2 writes per cycle, fp32 rates 0.25..2,
  fp16 SIMD widths 1..4 (all-fp16), 1..2 (mixed, conversions), 1..2 ramp slots each way,
  1..6 registers, deadlock_cycles 1..400;
* routes: per color, multicast trees grown from a root PE (rx RAMP at the root, each edge
  an output port of the parent and the opposite input of the child, RAMP in tx where the
  stream is delivered, mostly leaves; trees of one color merge, which makes routes with
  several inputs and loops), plus a few route entries with random masks, repaired so
  that every output port leads to a neighbour that accepts from it and every route that
  accepts has an output (RAMP if it had none: validate refuses a dead end); then 0..3
  routes get 1..3 switch positions (each replacing the base's rx by any ports, or its tx
  by some of its outputs and RAMP), a start position and maybe ring mode;
* edge ports (before the switch positions): 0..2 on routes of border PEs, an inbound one
  (0..12 words) adding its off-wafer side to the route's rx, an outbound one (0..12
  words expected) to its tx; the wafer's edge carries 1/4..44 words a cycle each way with
  a latency of 0..40 cycles. A random program seldom sends an outbound port exactly what
  it expects: such a run ends in "edge_count", the one-line error naming the port;
* streams: some trees get a matched sender (a task producing n wavelets at the root) and
  receivers (a task consuming n, or a COLOR task consuming one per run) at every PE the
  tree delivers to, so that a fair share of programs run to the end; a quarter of them
  carry fp16, two halves a wavelet, at both ends;
* tasks: 0..4 more per PE (RESET, LOCAL, COLOR on a delivered color), each 1..5
  instructions: vector ops of every opcode with MEM (strides -2..2, loop strides,
  stride-0 scalars), FABIN, FABOUT, REG and IMM (NaN and infinities included) operands,
  REPEAT (count 0..3), ACTIVATE / BLOCK / UNBLOCK / HALT of any task of the PE, and
  SWITCH_ADV (a control wavelet) on a color the PE may send on; a quarter of the vector
  ops with an fp16 form get fp16 memory and fabric operands (all-fp16, mixed and
  conversions, `wse_sim.program`'s "fp16").

`run_case` runs one case on the engine (`wse_sim.engine.Loaded`) and classifies how it ended
("done", "deadlock", "switch_fault", "edge_count" or "max_cycles"), asserting the
invariants each ending promises; any other exception is a crash and propagates.

Engine bugs the fuzzer finds are listed in KNOWN_BUGS (none open), each with an
xfail(strict=True) reproducer in tests/test_fuzz.py. While a bug is listed, the strategy
does not draw it (or `run_case` tolerates it and says so); when the engine is fixed, the
reproducer XPASSes, and its entry here is to be deleted with the xfail marker.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field, replace

import numpy as np
from hypothesis import strategies as st

from wse_sim.engine import Loaded, SimResult
from wse_sim.errors import (
    DeadlockError,
    ProgramError,
    SimulationStopped,
    SwitchOrderError,
    UserError,
)
from wse_sim.hardware import WaferConfig
from wse_sim.program import (
    HALF_OPS,
    OPPOSITE,
    PORT_OFFSET,
    SOURCES_OF,
    EdgePort,
    FabIn,
    FabOut,
    Imm,
    Instr,
    Kind,
    Mem,
    Op,
    Operand,
    PEProgram,
    Port,
    Program,
    Reg,
    Route,
    Task,
    Trigger,
    advance,
    port_mask,
    repeat,
    validate,
    vec,
)

# Engine bugs found by this fuzzer (see the module docstring and tests/test_fuzz.py): none
# open; the reproducers of those fixed are regular tests there.
KNOWN_BUGS: frozenset[str] = frozenset()
# Stripes of rows of a case's first run (its twin runs on one): the cross-stripe pushes
# and pops (`wse_sim.router.exchange`) must change nothing.
STRIPES = 3

MAX_SIDE = 4
MAX_TASKS_PER_PE = 6
VECTOR_OPS = tuple(SOURCES_OF)
HALF_VECTOR_OPS = tuple(op for op in VECTOR_OPS if op in HALF_OPS)
TYPED = (Kind.MEM, Kind.FABIN, Kind.FABOUT, Kind.REG)  # validate's operands with a float type
CONTROL_OPS = (Op.ACTIVATE, Op.BLOCK, Op.UNBLOCK, Op.HALT)
MESH_PORTS = (Port.N, Port.E, Port.S, Port.W)
WALL_SECONDS = 60.0  # one case may take this long after its first chunk of cycles
TASK_IDS = 16  # the wafer's max_tasks: at most 6 random tasks and 2 per stream fit

# wse2's fields, read once (a WaferConfig with a preset reads its YAML file each time).
WSE2 = {**WaferConfig().model_dump(), "preset": None}
# Strategies drawn from often, built once (a strategy built per draw costs more to check
# than to draw from; `pick` draws from a sequence through a cached st.integers).
VECTOR_LENGTHS = st.one_of(st.integers(1, 6), st.integers(20, 70))  # short, or bulk-run
IMMEDIATES = st.one_of(st.floats(-3, 3, width=32),
                       st.sampled_from([0.0, math.inf, -math.inf, math.nan]))

# What a simulation may end in, besides a result.
SWITCH_LINE = re.compile(r"switch order error at cycle \d+: PE \(\d+, \d+\) color \d+: ")
DEADLOCK_LINE = re.compile(r"deadlock at cycle \d+ \((no progress|the fabric is stuck)\)")
EDGE_COUNT_LINE = re.compile(r"port '[^']*' at PE \(\d+, \d+\) side [NESW] color \d+ "
                             r"\(outbound\): the memory service received ")


@dataclass
class Case:
    program: Program
    wafer: WaferConfig
    max_cycles: int
    # One PE's program to put in place of its own for a run of the same load (the twin's):
    # a new image, its tasks kept (the same list) or made again (equal, not the same).
    replaced: dict[tuple[int, int], PEProgram] = field(default_factory=dict)

    def __repr__(self) -> str:
        return describe(self)

    def _repr_pretty_(self, printer, cycle) -> None:  # what hypothesis prints for it
        printer.text(describe(self))


# -- the strategy ---------------------------------------------------------------------------


def wafers(width: int, height: int) -> st.SearchStrategy[WaferConfig]:
    """A small wafer of exactly width x height PEs with random hardware numbers."""
    return st.fixed_dictionaries(dict(
        colors=st.integers(2, 6),
        queue_depth=st.integers(1, 4),
        hop_latency=st.integers(1, 3),
        microthreads=st.integers(1, 3),
        sram_reads_per_cycle=st.integers(1, 3),
        sram_writes_per_cycle=st.integers(1, 2),
        fp32_ops_per_cycle=st.sampled_from([0.25, 0.5, 1.0, 2.0]),
        ramp_in_per_cycle=st.integers(1, 2),
        ramp_out_per_cycle=st.integers(1, 2),
        registers=st.integers(1, 6),
        max_tasks=st.just(TASK_IDS),
        deadlock_cycles=st.sampled_from([1, 3, 20, 100, 400]),
        switch_latency=st.integers(0, 2),
        fp16_simd_width=st.sampled_from([1, 2, 4]),
        mixed_simd_width=st.integers(1, 2),
        fp16_convert_simd_width=st.integers(1, 2),
        edge_bytes_per_s=st.sampled_from([0.25, 1.0, 2.0, 44.0]).map(
            lambda words: 4 * WSE2["clock_hz"] * words),
        edge_latency_cycles=st.sampled_from([0, 1, 5, 40]),
    )).map(lambda fields: WaferConfig(**{**WSE2, "width": width, "height": height, **fields}))


@st.composite
def cases(draw) -> Case:
    """A valid Program on a small wafer and a cycle limit (see the module docstring)."""
    width, height = draw(st.integers(1, MAX_SIDE)), draw(st.integers(1, MAX_SIDE))
    wafer = draw(wafers(width, height))
    program = Program(width, height)
    trees = [_tree(draw, program, wafer) for _ in range(draw(st.integers(0, 4)))]
    for _ in range(draw(st.integers(0, 3))):
        _random_route(draw, program, wafer)
    _deliver_dead_ends(program)
    _edge_ports(draw, program, wafer)
    for _ in range(draw(st.integers(0, 3))):
        _switches(draw, program, wafer)
    ids: dict[tuple[int, int], list[int]] = {}
    for x in range(width):
        for y in range(height):
            if draw(st.integers(0, 9)) < 8:  # most PEs hold a program
                words = pick(draw, [0, 40, 48, 64])
                pe = program.pe(x, y, words)
                if words and draw(st.booleans()):
                    pe.load(0, draw(_images(words)))
                ids[(x, y)] = []
    for color, root, delivered in trees:
        if draw(st.integers(0, 9)) < 6:
            _stream(draw, program, wafer, ids, color, root, delivered)
    for (x, y), taken in ids.items():
        for _ in range(draw(st.integers(0, 4))):
            if len(taken) < MAX_TASKS_PER_PE:
                _random_task(draw, program, wafer, ids, x, y)
    _targets(draw, program, ids)
    max_cycles = pick(draw, [1, 7, 60, 3000, 3000, 3000, 3000, 3000])
    return Case(program, wafer, max_cycles, _replaced(draw, program))


def _replaced(draw, program: Program) -> dict[tuple[int, int], PEProgram]:
    """A replacement for one PE's program (`Case.replaced`), or none."""
    if not program.pes or draw(st.booleans()):
        return {}
    key = pick(draw, sorted(program.pes))
    pe = program.pes[key]
    image = {0: draw(_images(pe.sram_words))} if pe.sram_words else {}
    tasks = pe.tasks if draw(st.booleans()) else [replace(task) for task in pe.tasks]
    return {key: PEProgram(pe.sram_words, tasks, image)}


def pick(draw, items):
    """One of `items` (a sequence), shrinking towards the first."""
    return items[draw(st.integers(0, len(items) - 1))]


def _neighbour(x: int, y: int, port: Port, program: Program) -> tuple[int, int] | None:
    dx, dy = PORT_OFFSET[port]
    nx, ny = x + dx, y + dy
    return (nx, ny) if 0 <= nx < program.width and 0 <= ny < program.height else None


def _tree(draw, program: Program, wafer: WaferConfig
          ) -> tuple[int, tuple[int, int], list[tuple[int, int]]]:
    """A multicast tree of a color grown from a root: its color, root and the PEs it
    delivers to (RAMP in tx)."""
    color = draw(st.integers(0, wafer.colors - 1))
    root = (draw(st.integers(0, program.width - 1)), draw(st.integers(0, program.height - 1)))
    children: dict[tuple[int, int], list[Port]] = {root: []}
    parent_port: dict[tuple[int, int], Port] = {root: Port.RAMP}
    for _ in range(draw(st.integers(0, 5))):
        node = pick(draw, sorted(children))
        port = pick(draw, MESH_PORTS)
        nbr = _neighbour(*node, port, program)
        if nbr is None or nbr in children:
            continue
        children[node].append(port)
        children[nbr] = []
        parent_port[nbr] = OPPOSITE[port]
    delivered = []
    for node, ports in children.items():
        # a leaf mostly delivers (else its wavelets have nowhere to go), an inner node may
        deliver = draw(st.integers(0, 3)) == 0 or (not ports and draw(st.integers(0, 5)) > 0)
        if deliver:
            delivered.append(node)
        tx = port_mask(*ports, *([Port.RAMP] if deliver else []))
        program.add_route(*node, color, port_mask(parent_port[node]), tx)
    return color, root, delivered


def _random_route(draw, program: Program, wafer: WaferConfig) -> None:
    """A route entry with random masks; each mesh output gets a neighbour that accepts."""
    x, y = draw(st.integers(0, program.width - 1)), draw(st.integers(0, program.height - 1))
    color = draw(st.integers(0, wafer.colors - 1))
    rx, tx = draw(st.integers(0, 31)), draw(st.integers(0, 31))
    for port in MESH_PORTS:
        if tx >> port & 1:
            nbr = _neighbour(x, y, port, program)
            if nbr is None:
                tx &= ~(1 << port)
            else:
                program.add_route(*nbr, color, port_mask(OPPOSITE[port]), 0)
    program.add_route(x, y, color, rx, tx)


def _deliver_dead_ends(program: Program) -> None:
    """Give every route that accepts wavelets but has no output RAMP as its output."""
    for (x, y, color), route in list(program.routes.items()):
        if route.rx and not route.tx:
            program.add_route(x, y, color, 0, port_mask(Port.RAMP))


def _edge_ports(draw, program: Program, wafer: WaferConfig) -> None:
    """0..2 edge ports on static routes of border PEs (module docstring)."""
    for k in range(draw(st.integers(0, 2))):
        if not program.routes:
            return
        x, y, color = key = pick(draw, sorted(program.routes))
        sides = [p for p in MESH_PORTS if _neighbour(x, y, p, program) is None]
        route = program.routes[key]
        if not sides or route.positions:
            continue
        side = pick(draw, sides)
        if any((p.x, p.y, p.side, p.color) == (x, y, side, color) for p in program.ports):
            continue
        words = draw(st.integers(0, 12))
        if draw(st.booleans()):
            data = (np.arange(words, dtype=np.float32) + 10 * k) * np.float32(0.5)
            program.ports.append(EdgePort(f"in{k}", x, y, side, color, True, data))
            tx = route.tx or port_mask(Port.RAMP)  # (validate refuses a dead end)
            program.routes[key] = Route(route.rx | port_mask(side), tx)
        else:
            program.ports.append(EdgePort(f"out{k}", x, y, side, color, False,
                                          np.zeros(0, np.float32), words))
            program.routes[key] = Route(route.rx, route.tx | port_mask(side))


def _switches(draw, program: Program, wafer: WaferConfig) -> None:
    """Give a route switch positions, each replacing one side of its base: rx by any ports
    (if the base has outputs), or tx by some of the base's outputs and RAMP (outputs that
    lead to a neighbour accepting them, or the PE), a start position and maybe ring mode."""
    if not program.routes:
        return
    key = pick(draw, sorted(program.routes))
    base = program.routes[key]
    positions = []
    for _ in range(draw(st.integers(1, wafer.switch_positions - 1))):
        if draw(st.booleans()):
            positions.append((draw(st.integers(0, 31)) if base.tx else 0, base.tx))
        else:
            tx = draw(st.integers(0, 31)) & (base.tx | port_mask(Port.RAMP))
            positions.append((base.rx, tx or (port_mask(Port.RAMP) if base.rx else 0)))
    program.routes[key] = Route(base.rx, base.tx, tuple(positions),
                                draw(st.integers(0, len(positions))), draw(st.booleans()))


SPECIAL_VALUES = np.array([0.0, -0.0, 1e30, -1e-30, np.inf, np.nan], np.float32)


def _images(words: int) -> st.SearchStrategy[np.ndarray]:
    """SRAM contents: normal numbers with a few zeros, huge, tiny, infinite and NaN ones,
    made from one drawn seed (drawing each word would make generating a case slow)."""
    def image(seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        data = rng.normal(0, 2, words).astype(np.float32)
        special = rng.random(words) < 0.1
        data[special] = rng.choice(SPECIAL_VALUES, int(special.sum()))
        return data
    return st.integers(0, 2**32 - 1).map(image)


def _colors(program: Program, x: int, y: int, side: str) -> list[int]:
    """Colors PE (x, y) may receive (side "tx": its route delivers) or send ("rx")."""
    return sorted(c for (rx, ry, c), route in program.routes.items()
                  if (rx, ry) == (x, y) and getattr(route, f"{side}_any") >> Port.RAMP & 1)


def _new_task(draw, ids: dict[tuple[int, int], list[int]], x: int, y: int) -> int:
    taken = ids[(x, y)]
    tid = pick(draw, [t for t in range(TASK_IDS) if t not in taken])
    taken.append(tid)
    return tid


def _stream(draw, program: Program, wafer: WaferConfig, ids: dict[tuple[int, int], list[int]],
            color: int, root: tuple[int, int], delivered: list[tuple[int, int]]) -> None:
    """A sender of n wavelets of `color` at the root and a receiver of n at every PE the
    tree delivers to (tasks on PEs that hold a program and have a free task id)."""
    pes = [root, *delivered]
    if any(pe not in ids or len(ids[pe]) >= MAX_TASKS_PER_PE for pe in pes):
        return
    n = draw(st.integers(1, 12))
    # An fp16 stream: the sender converts to two halves a wavelet (MOV), every receiver
    # takes them as fp16 sources, so both ends count the same wavelets.
    half = draw(st.integers(0, 3)) == 0
    op = Op.MOV if half else pick(draw, VECTOR_OPS)
    sender = vec(op, n, FabOut(color), *_sources(draw, program, wafer, *root, n, 1, op,
                                                 _colors(program, *root, "tx")))
    if half:
        sender = _fp16(draw, sender, stream=color)
    program.pes[root].tasks.append(Task(_new_task(draw, ids, *root), Trigger.RESET, [sender]))
    for pe in delivered:
        per_run = draw(st.booleans())
        op = pick(draw, HALF_VECTOR_OPS if half else VECTOR_OPS)
        m = 1 if per_run else n
        dst = _destination(draw, program, wafer, *pe, m, 1, _colors(program, *pe, "rx"))
        srcs = _sources(draw, program, wafer, *pe, m, 1, op, _colors(program, *pe, "tx"),
                        must=color)
        body = [vec(op, m, dst, *srcs)]
        if half:
            body = [_fp16(draw, body[0], stream=color)]
        if per_run:
            task = Task(_new_task(draw, ids, *pe), Trigger.COLOR, body, color=color)
        else:
            task = Task(_new_task(draw, ids, *pe), Trigger.RESET, body)
        program.pes[pe].tasks.append(task)


def _random_task(draw, program: Program, wafer: WaferConfig,
                 ids: dict[tuple[int, int], list[int]], x: int, y: int) -> None:
    fabin, fabout = _colors(program, x, y, "tx"), _colors(program, x, y, "rx")
    kinds = [Trigger.RESET, Trigger.LOCAL] + ([Trigger.COLOR] if fabin else [])
    trigger = pick(draw, kinds)
    color = pick(draw, fabin) if trigger == Trigger.COLOR else -1
    instrs: list[Instr] = []
    length = draw(st.integers(1, 5))
    while len(instrs) < length:
        if draw(st.integers(0, 4)) == 0:
            count = draw(st.integers(0, 3))
            body = [_instruction(draw, program, wafer, x, y, max(count, 1), fabin, fabout)
                    for _ in range(draw(st.integers(1, 2)))]
            instrs += repeat(count, body)
        else:
            instrs.append(_instruction(draw, program, wafer, x, y, 1, fabin, fabout))
    program.pes[(x, y)].tasks.append(Task(_new_task(draw, ids, x, y), trigger, instrs,
                                          color=color))


def _instruction(draw, program: Program, wafer: WaferConfig, x: int, y: int, loop_count: int,
                 fabin: list[int], fabout: list[int]) -> Instr:
    """A vector op (mostly) or a control op whose target task is filled in later."""
    if draw(st.integers(0, 5)) == 0:
        if fabout and draw(st.integers(0, 2)) == 0:
            return advance(pick(draw, fabout))
        return Instr(pick(draw, CONTROL_OPS))
    op = pick(draw, VECTOR_OPS)
    n = draw(VECTOR_LENGTHS)
    dst = _destination(draw, program, wafer, x, y, n, loop_count, fabout)
    instr = vec(op, n, dst, *_sources(draw, program, wafer, x, y, n, loop_count, op, fabin))
    return _fp16(draw, instr) if draw(st.integers(0, 3)) == 0 else instr


def _fp16(draw, instr: Instr, stream: int | None = None) -> Instr:
    """`instr` (if its op has an fp16 form) with fp16 operands: each memory and fabric
    operand by a coin, the fabric operands of color `stream` always (a stream's ends agree).
    An fp16 destination whose op is not MOV and whose typed sources are not all fp16 stays
    fp32 (validate's rule: convert with a MOV first)."""
    if instr.op not in HALF_OPS:
        return instr
    dst, *srcs = (_half(draw, o) if o.kind in (Kind.FABIN, Kind.FABOUT) and o.color == stream
                  or o.kind in (Kind.MEM, Kind.FABIN, Kind.FABOUT) and draw(st.booleans())
                  else o for o in (instr.dst, instr.a, instr.b, instr.c))
    if instr.op != Op.MOV and any(o.kind in TYPED and not o.half for o in srcs):
        dst = instr.dst
    return replace(instr, dst=dst, a=srcs[0], b=srcs[1], c=srcs[2])


def _half(draw, o: Operand) -> Operand:
    """Operand o as fp16. A fabric operand carries two elements a wavelet; a memory
    operand addresses halves of the words it addressed (a unit-stride one the pairs from
    the low half of its first word, any other the low or high half of each), so it stays
    within the PE's SRAM and a unit-stride vector starts at an even half."""
    if o.kind != Kind.MEM:
        return replace(o, half=True)
    if o.stride == 1:
        return Mem(2 * o.offset, 1, 2 * o.loop_stride, half=True)
    return Mem(2 * o.offset + draw(st.integers(0, 1)), 2 * o.stride, 2 * o.loop_stride,
               half=True)


def _destination(draw, program: Program, wafer: WaferConfig, x: int, y: int, n: int,
                 loop_count: int, fabout: list[int]) -> Operand:
    words = program.pes[(x, y)].sram_words
    kinds = ["reg"] + (["mem", "mem"] if words else []) + (["fabout"] if fabout else [])
    kind = pick(draw, kinds)
    if kind == "reg":
        return Reg(draw(st.integers(0, wafer.registers - 1)))
    if kind == "fabout":
        return FabOut(pick(draw, fabout))
    return _memory(draw, words, n, loop_count, strided=True)


def _sources(draw, program: Program, wafer: WaferConfig, x: int, y: int, n: int,
             loop_count: int, op: Op, fabin: list[int], must: int | None = None
             ) -> list[Operand]:
    """The sources of `op`: MEM (within the PE's read budget), REG, IMM or FABIN (each
    color at most once; `must`, if given, is one of them)."""
    words = program.pes[(x, y)].sram_words if (x, y) in program.pes else 0
    left = [color for color in fabin if color != must]
    strided = wafer.sram_reads_per_cycle
    count = SOURCES_OF[op]
    slot_of_must = draw(st.integers(0, count - 1)) if must is not None else -1
    out = []
    for k in range(count):
        if k == slot_of_must:
            out.append(FabIn(must))
            continue
        kinds = ["reg", "imm"] + (["mem", "mem"] if words else []) + (["fabin"] if left else [])
        kind = pick(draw, kinds)
        if kind == "reg":
            out.append(Reg(draw(st.integers(0, wafer.registers - 1))))
        elif kind == "imm":
            out.append(Imm(draw(IMMEDIATES)))
        elif kind == "fabin":
            color = pick(draw, left)
            left.remove(color)
            out.append(FabIn(color))
        else:
            operand = _memory(draw, words, n, loop_count, strided=strided > 0)
            strided -= operand.stride != 0
            out.append(operand)
    return out


def _memory(draw, words: int, n: int, loop_count: int, strided: bool) -> Operand:
    """A memory operand whose every element, in every REPEAT iteration, is in 0..words-1
    (strided=False: a stride-0 scalar)."""
    stride = pick(draw, [-2, -1, 1, 1, 1, 2]) if strided else 0
    loop_stride = pick(draw, [0, 0, -3, 1, 4])
    if abs((n - 1) * stride) + abs((loop_count - 1) * loop_stride) >= words:
        stride, loop_stride = (1 if strided else 0), 0  # a long vector: contiguous
        n_span = n - 1 if strided else 0
        if n_span >= words:
            return Mem(draw(st.integers(0, words - 1)), 0)
    corners = [de * stride + dk * loop_stride for de in (0, n - 1) for dk in (0, loop_count - 1)]
    low, high = -min(corners), words - 1 - max(corners)
    return Mem(draw(st.integers(low, high)), stride, loop_stride)


def _targets(draw, program: Program, ids: dict[tuple[int, int], list[int]]) -> None:
    """Give each ACTIVATE / BLOCK / UNBLOCK a task of its PE (HALT takes none)."""
    for key, pe in program.pes.items():
        for task in pe.tasks:
            for i, instr in enumerate(task.instrs):
                if instr.op in (Op.ACTIVATE, Op.BLOCK, Op.UNBLOCK):
                    task.instrs[i] = Instr(instr.op, task=pick(draw, ids[key]))


# -- running a case -------------------------------------------------------------------------


def is_cycle_limit(err: UserError) -> bool:
    """The engine's max-cycles stop (`stopped at cycle N: reached max_cycles=M; ...`)."""
    return isinstance(err, SimulationStopped) and err.reason == "max_cycles"


def run_case(case: Case, twin: bool = False) -> str:
    """Run `case`; return how it ended: "done", "deadlock" or "max_cycles". Asserts the
    invariants of each ending; any exception that is not a deadlock or the max-cycles stop
    propagates.
    `twin`: also run it again on the same load (`Loaded.run` starts from fresh state,
    whatever the run before left), and without bulk execution (`bulk_runs=False`) on one
    stripe of rows where the first run has up to three (`STRIPES`); each must end the same
    way (the same deadlock or stop line, or a finished run with the same cycles, counters,
    memories and registers). With `case.replaced`, the same load then runs with that PE
    program in its place, as the program that has it does, and then as at first again."""
    validate(case.program, case.wafer)  # a ProgramError here is a bug of the generator
    loaded = Loaded(case.program, case.wafer, threads=STRIPES)
    first = _simulate(case, loaded)
    if not twin:
        return first[0]
    _same_ending(case, first, _simulate(case, loaded), "a second run of the same load")
    _same_ending(case, first, _simulate(case, Loaded(case.program, case.wafer, threads=1,
                                                     bulk_runs=False)), "without bulk runs")
    if case.replaced:
        other = replace(case.program, pes={**case.program.pes, **case.replaced})
        _same_ending(case, _simulate(case, Loaded(other, case.wafer, threads=STRIPES)),
                     _simulate(case, loaded, case.replaced), "with a PE program replaced")
        _same_ending(case, first, _simulate(case, loaded), "after a replaced run")
    return first[0]


def _same_ending(case: Case, first: tuple[str, SimResult | None, str],
                 other: tuple[str, SimResult | None, str], how: str) -> None:
    (ending, result, line), (ending2, result2, line2) = first, other
    assert (ending2, line2) == (ending, line), f"{line or ending}, {how} {line2 or ending2}"
    if result is not None and result2 is not None:
        assert result2.cycles == result.cycles, f"cycles {how}"
        for name, value in vars(result.stats).items():
            np.testing.assert_array_equal(value, getattr(result2.stats, name),
                                          err_msg=f"{name} {how}")
        for x, y in case.program.pes:
            np.testing.assert_array_equal(result.sram(x, y), result2.sram(x, y), err_msg=how)
            np.testing.assert_array_equal(result.registers(x, y), result2.registers(x, y),
                                          err_msg=how)


def _simulate(case: Case, loaded: Loaded, pes: dict[tuple[int, int], PEProgram] | None = None
              ) -> tuple[str, SimResult | None, str]:
    """How `case` ended on `loaded` (its program and wafer; `pes` in place of their PEs'
    programs), its result if finished, and its deadlock or stop line."""
    first_chunk: list[float] = []  # when the first chunk ended: numba has compiled by then

    def watchdog(cycle: int) -> None:  # called between chunks of cycles
        now = time.monotonic()
        first_chunk[:] = first_chunk or [now]
        if now - first_chunk[0] > WALL_SECONDS:
            raise AssertionError(f"still running at cycle {cycle} after {WALL_SECONDS} s")

    try:
        result = loaded.run(pes, max_cycles=case.max_cycles, progress=watchdog)
    except SwitchOrderError as err:
        message = str(err)
        assert "\n" not in message and SWITCH_LINE.match(message), message
        assert int(message.split()[5].rstrip(":")) < case.max_cycles, message
        return "switch_fault", None, message
    except DeadlockError as err:
        message = str(err)
        assert "\n" not in message, message
        assert DEADLOCK_LINE.match(message), message
        # it names a waiting thread, a stranded wavelet or a full FIFO
        assert " | " in message, message
        assert int(message.split()[3]) <= case.max_cycles, message
        return "deadlock", None, message
    except ProgramError as err:  # an outbound port received more or fewer than expected
        message = str(err)
        assert "\n" not in message and EDGE_COUNT_LINE.match(message), message
        return "edge_count", None, message
    except UserError as err:
        if not is_cycle_limit(err):
            raise
        assert "\n" not in str(err) and f"max_cycles={case.max_cycles};" in str(err), str(err)
        assert err.cycle <= case.max_cycles, str(err)
        return "max_cycles", None, str(err)
    return check_result(result, case), result, ""


def check_result(result: SimResult, case: Case) -> str:
    """The invariants of a finished run (engine and stats docstrings): within the limit,
    cycle classes that add up, links counted once per color, every wavelet delivered,
    and no router that lets out fewer wavelets than it took in."""
    if result.cycles > case.max_cycles:
        raise AssertionError(f"finished at cycle {result.cycles}, past max_cycles="
                             f"{case.max_cycles}")
    s = result.stats
    program = case.program
    for name in ("compute", "send", "receive", "move", "wait_output", "wait_input", "idle"):
        assert (getattr(s, name) >= 0).all(), f"negative {name} cycles"
    assert ((s.first_cycle == -1) == (s.last_cycle == -1)).all()
    worked = s.first_cycle >= 0
    assert (s.first_cycle[worked] <= s.last_cycle[worked]).all()
    assert (s.last_cycle < result.cycles).all(), "work after the last cycle"
    assert s.link.sum() == s.color_hops.sum()
    # control wavelets end at routers (wse_sim.router), data at PEs
    # (edge ports: words in and out at the wafer's edge)
    assert (s.injected + s.edge_in.sum()
            == s.delivered + s.control_sunk.sum() + s.edge_out.sum())
    assert s.delivered == s.ramp_in.sum()
    assert s.control.sum() <= s.ramp_out.sum()
    into = s.ramp_out + s.edge_in  # into each router: its PE's, edge ports', neighbours'
    into[1:, :] += s.link[Port.S][:-1, :]
    into[:-1, :] += s.link[Port.N][1:, :]
    into[:, 1:] += s.link[Port.E][:, :-1]
    into[:, :-1] += s.link[Port.W][:, 1:]
    out_of = s.link.sum(axis=0) + s.ramp_in + s.control_sunk + s.edge_out
    assert (out_of >= into).all(), (f"a router let out fewer wavelets than it took in: "
                                     f"{np.argwhere(out_of < into).tolist()} (y, x)")
    for y in range(program.height):
        for x in range(program.width):
            if (x, y) not in program.pes:
                assert s.idle[y, x] == result.cycles and s.ramp_out[y, x] == 0
    return "done"


def describe(case: Case) -> str:
    """A case as text: the wafer numbers that differ from wse2, the routes, each PE's
    tasks (what a falsifying example prints)."""
    wafer = {k: v for k, v in case.wafer.model_dump().items() if v != WSE2[k]}
    lines = [f"Case(max_cycles={case.max_cycles}, wafer={wafer})"]
    for (x, y, color), route in sorted(case.program.routes.items()):
        lines.append(f"  route ({x}, {y}) color {color}: rx {_ports(route.rx)} "
                     f"tx {_ports(route.tx)}" + "".join(
                         f"; position {k} rx {_ports(rx)} tx {_ports(tx)}"
                         for k, (rx, tx) in enumerate(route.positions, 1))
                     + (f"; start {route.start}, ring {route.ring}" if route.positions
                        else ""))
    for p in case.program.ports:
        lines.append(f"  port {p.name} ({p.x}, {p.y}) {Port(p.side).name} color {p.color} "
                     + (f"inbound {p.data.tolist()}" if p.inbound
                        else f"outbound expected {p.expected}"))
    for (x, y), pe in sorted(case.program.pes.items()):
        image = {offset: data.tolist() for offset, data in pe.image.items()}
        lines.append(f"  PE ({x}, {y}) sram_words {pe.sram_words} image {image}")
        if (x, y) in case.replaced:
            new = case.replaced[(x, y)]
            how = "kept" if new.tasks is pe.tasks else "made again"
            image = {offset: data.tolist() for offset, data in new.image.items()}
            lines.append(f"    replaced for a run: its tasks {how}, image {image}")
        for task in pe.tasks:
            on = f" color {task.color}" if task.trigger == Trigger.COLOR else ""
            lines.append(f"    task {task.id} {task.trigger.name}{on}")
            lines += [f"      {_instr(instr)}" for instr in task.instrs]
    return "\n".join(lines)


def _ports(mask: int) -> str:
    return "|".join(p.name for p in Port if mask >> p & 1) or "-"


def _instr(instr: Instr) -> str:
    op = Op(instr.op)
    if op == Op.REPEAT:
        return f"REPEAT count {instr.count} body {instr.body}"
    if op == Op.HALT:
        return "HALT"
    if op == Op.SWITCH_ADV:
        return f"SWITCH_ADV {_operand(instr.dst)}"
    if op in (Op.ACTIVATE, Op.BLOCK, Op.UNBLOCK):
        return f"{op.name} task {instr.task}"
    operands = [instr.dst, instr.a, instr.b, instr.c][:1 + SOURCES_OF[op]]
    return f"{op.name} n={instr.n} " + ", ".join(map(_operand, operands))


def _operand(o: Operand) -> str:
    kind = o.kind.name
    half = ", half=True" if o.half else ""
    if kind == "MEM":
        return f"Mem({o.offset}, {o.stride}, {o.loop_stride}{half})"
    if kind in ("FABIN", "FABOUT"):
        return f"{'FabIn' if o.kind == Kind.FABIN else 'FabOut'}({o.color}{half})"
    if kind == "REG":
        return f"Reg({o.reg})"
    return f"Imm({o.value!r})"
