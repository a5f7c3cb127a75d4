"""The code of one PE of a weight-streaming rectangle: its weight ring, its row and column
collectives and the linear layers' passes, which every weight-streaming program
(`compiler.streaming.linear`'s stacks, `compiler.streaming.gpt`'s training step) is built
from. The layout, the algorithms, their cost and why they cannot deadlock are in
`compiler.streaming.linear`'s docstring; this module is their code.

A `StreamPE` is written in program order by its compute thread: every weight vector it
takes (`take`) is recorded with the data its column's memory service sends (`fills`), and
every vector its column sends back to the service (`column_reduce`) with where the
service puts it (`sinks`); `emit` then writes its three threads: compute, receiving
(fills the ring) and sending (the column chains to the service, in program order), without
the ring's last FREE signals, which no fill waits for.

The sending thread lets a backward pass move weights in and dW out at once: the compute
thread hands it each dW, formed in its weight's ring slot, with a SEND token and goes on
to the next vector; the sending thread sends it up the column (at the column's share of
the edge, the pass's pace) and then frees the slot (FREE). Every other vector sent has a
buffer that is not written again (the small parameters' gradients, the embedding's rows,
the losses), except mixed precision's dW, formed in one buffer: for it the compute thread
waits (SENT) before the next vector.
FREE tokens still come in the order the vectors were taken: every forward vector is
freed by the compute thread, every backward one (each sends its dW) by the sending thread,
and a step takes all its forward vectors before its backward ones. No cycle of waits: the
compute thread waits for a vector the receiving thread fetched once the sending thread
freed an older slot, whose SEND the compute thread gave before it took anything newer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from compiler.lowering.dots import Walk, dots
from compiler.lowering.ir import FabIn, FabOut, Imm, Instr, Mem, Op, Operand, Reg, vec
from compiler.lowering.kernel import TOKEN_REG, Kernel
from wse_sim.errors import UserError
from wse_sim.hardware import WaferConfig
from wse_sim.program import EdgePort, Port, Program, Route, port_mask

if TYPE_CHECKING:
    from compiler.streaming.linear import LinearLayer

Span = tuple[int, int]
Precision = Literal["fp32", "mixed"]

# Colors: fixed roles, the same on every PE (the rectangle's routes are short and regular,
# so no negotiation is needed).
WEIGHTS = 0  # memory service -> down each column
EAST = (1, 2)  # row chains, by the sender's column parity
WEST = 3  # row multicast back from the east PE
NORTH = (4, 5)  # column chains, by the sender's row parity; NORTH[0] leaves the wafer
READY, FREE = 6, 7  # each PE's receiving thread <-> compute / sending thread (tokens)
SEND, SENT = 8, 9  # each PE's compute thread <-> sending thread (tokens)
COLORS = 10

ACC = 0  # the compute thread's accumulator register


def split(total: int, parts: int) -> list[Span]:
    """`total` items in `parts` contiguous ranges whose sizes differ by at most one."""
    return [(total * i // parts, total * (i + 1) // parts) for i in range(parts)]


@dataclass(frozen=True)
class Into:
    """Where the memory service adds a vector it receives: `param[index] += words`
    reshaped to `shape` (np.add.at, so repeated indices, e.g. a token seen twice, add)."""

    param: str
    index: tuple
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Pass:
    """One pass of a PE: the weight vectors it took, and the lengths and destinations of
    the vectors it sent up."""

    fills: list[np.ndarray]
    sent: list[int]
    sinks: list[Into]


def ring_depth(free: int, slot_words: int, wafer: WaferConfig, where: str, remedy: str) -> int:
    """The weight vectors a PE's ring holds (the prefetch depth) in `free` words of SRAM:
    at most 2 x queue_depth (`Tokens.capacity`, so that no token is ever held up); a
    UserError starting `where` and ending `remedy` when that is fewer than two."""
    slots = min(2 * wafer.queue_depth, free // slot_words)
    if slots < 2:
        raise UserError(f"{where} leave room for {max(slots, 0)} weight vectors of "
                        f"{slot_words} words per PE ({wafer.sram_bytes_per_pe:,} bytes of "
                        f"SRAM), need 2: {remedy}")
    return slots


def weight_into(layer: LinearLayer, param: str, offset: int = 0, transposed: bool = False
                ) -> Callable[[int], Into]:
    """Where the gradient of `layer`'s weight vector v goes: column v (column-parallel) or
    row v (row-parallel) of its [K, N] weight, stored in `param` from column (row) `offset`
    on, or (`transposed`) in `param` as [N, K], as the tied LM head's is."""
    column = layer.parallel == "column"

    def into(v: int) -> Into:
        index = (slice(None), offset + v) if column != transposed else (offset + v, slice(None))
        return Into(param, index, (layer.vector,))
    return into


@dataclass
class StreamPE:
    """The code of PE (c, r) of a `cols` x `rows` rectangle whose PE row holds `tokens`
    tokens; `ring`, `whole`, `partial` and `dw` are its buffers' word offsets (`dw`: None
    in fp32, where dW overwrites its weights' ring slot)."""

    c: int
    r: int
    cols: int
    rows: int
    tokens: int
    slots: int
    slot_words: int
    half: bool
    ring: int
    whole: int
    partial: int
    dw: int | None
    compute: list[Instr] = field(default_factory=list)
    fills: list[np.ndarray] = field(default_factory=list)  # weight vectors taken, in order
    sinks: list[Into] = field(default_factory=list)  # where the vectors sent up go
    sent: list[int] = field(default_factory=list)  # their lengths
    sending: list[Instr] = field(default_factory=list)  # the sending thread
    pass_starts: list[tuple[int, int]] = field(default_factory=list)  # (fills, sinks) a pass
    # Where each taken vector's FREE signal is (the thread's code and the position in it).
    _frees: list[tuple[list[Instr], int]] = field(default_factory=list)

    # -- the ring ------------------------------------------------------------------------

    def begin_pass(self) -> None:
        """Mark where a pass's weights and gradients start (the ports' marks)."""
        self.pass_starts.append((len(self.fills), len(self.sent)))

    def passes(self) -> list[Pass]:
        """What each pass takes in and sends up, in order."""
        ends = [*self.pass_starts, (len(self.fills), len(self.sent))]
        return [Pass(self.fills[a[0]:b[0]], self.sent[a[1]:b[1]], self.sinks[a[1]:b[1]])
                for a, b in zip(ends, ends[1:], strict=False)]

    def slot(self, j: int) -> int:
        """The word offset of weight vector j's ring slot."""
        return self.ring + j % self.slots * self.slot_words

    def weights(self, j: int) -> Operand:
        """Weight vector j as a vector operand (fp16 halves when mixed)."""
        return Mem(2 * self.slot(j), half=True) if self.half else Mem(self.slot(j))

    def weight_walk(self, j: int) -> Walk:
        return Walk(2 * self.slot(j), 1, half=True) if self.half else Walk(self.slot(j), 1)

    def dw_at(self, j: int) -> int:
        """Where dW of weight vector j is formed: its slot once used (fp32), else a buffer."""
        return self.slot(j) if self.dw is None else self.dw

    def take(self, vector: np.ndarray, body: Callable[[int], list[Instr]],
             sends_slot: bool = False) -> None:
        """Wait for the next weight vector (`vector`, as the service streams it), run
        `body(j)` on it (j: its index), free its slot; `sends_slot`: the body hands the
        slot to the sending thread (`column_reduce`), which frees it."""
        j = len(self.fills)
        self.fills.append(vector)
        self.compute.append(_wait(READY))
        self.compute.extend(body(j))
        if not sends_slot:
            self._free(self.compute)

    def _free(self, thread: list[Instr]) -> None:
        self._frees.append((thread, len(thread)))
        thread.append(_signal(FREE))

    def emit(self, kernel: Kernel) -> None:
        """The PE's threads into `kernel`: compute, receiving and (if it sends) sending,
        without the FREE signals of the last `slots` vectors (no fill waits for them)."""
        dropped = {(id(thread), i) for thread, i in self._frees[-self.slots:]}

        def kept(thread: list[Instr]) -> list[Instr]:
            return [instr for i, instr in enumerate(thread) if (id(thread), i) not in dropped]
        pe = (self.c, self.r)
        kernel.emit(pe, *kept(self.compute), thread=0)
        kernel.emit(pe, *self.receiving_thread(), thread=1)
        if self.sending:
            kernel.emit(pe, *kept(self.sending), thread=2)

    def receiving_thread(self) -> list[Instr]:
        """Copy every weight vector into its ring slot and signal it, waiting for a free
        slot once the ring is full."""
        receive: list[Instr] = []
        for j, vector in enumerate(self.fills):
            if j >= self.slots:
                receive.append(_wait(FREE))
            receive += [vec(Op.MOV, len(vector), self.weights(j),
                            FabIn(WEIGHTS, half=self.half)), _signal(READY)]
        return receive

    # -- collectives ---------------------------------------------------------------------

    def gather(self, own: int, f0: int, f1: int, features: int) -> None:
        """Every PE of the row gets the whole [features, T_r] activation into `whole`, from
        the own slices [f0, f1) (`compiler.streaming.linear`, "Row collectives")."""
        t, whole, cols, c = self.tokens, self.whole, self.cols, self.c
        before, words, total = f0 * t, (f1 - f0) * t, features * t
        if cols == 1:
            self.compute.append(vec(Op.MOV, words, Mem(whole), Mem(own)))
            return
        east, west = EAST[c % 2], EAST[(c - 1) % 2]
        if c == cols - 1:
            self.compute += [vec(Op.MOV, before, Mem(whole), FabIn(west)),
                             vec(Op.MOV, words, Mem(whole + before), Mem(own)),
                             vec(Op.MOV, total, FabOut(WEST), Mem(whole))]
            return
        if c > 0:
            self.compute.append(vec(Op.MOV, before, FabOut(east), FabIn(west)))
        self.compute += [vec(Op.MOV, words, FabOut(east), Mem(own)),
                         vec(Op.MOV, total, Mem(whole), FabIn(WEST))]

    def allreduce(self, buffer: int, words: int, op: Op = Op.ADD) -> None:
        """The row's `op` (ADD: sum, MAX: maximum) of the `words` words at `buffer`, on every
        PE of the row."""
        c = self.c
        if self.cols == 1:
            return
        east, west = EAST[c % 2], EAST[(c - 1) % 2]
        if c == self.cols - 1:
            self.compute += [vec(op, words, Mem(buffer), FabIn(west), Mem(buffer)),
                             vec(Op.MOV, words, FabOut(WEST), Mem(buffer))]
            return
        first = (vec(Op.MOV, words, FabOut(east), Mem(buffer)) if c == 0
                 else vec(op, words, FabOut(east), FabIn(west), Mem(buffer)))
        self.compute += [first, vec(Op.MOV, words, Mem(buffer), FabIn(WEST))]

    def column_reduce(self, buffer: int, words: int, into: Into, *,
                      frees_slot: bool = False, reused: bool = False) -> list[Instr]:
        """The compute thread's code to have the column's sum of the `words` words at
        `buffer` sent north by the top PE to the memory service, which adds it `into` a
        gradient. The sending thread does it, in order; the compute thread goes on, and must
        not write `buffer` again unless `reused` (then it waits until the words are sent);
        `frees_slot`: `buffer` is a ring slot, which the sending thread frees."""
        self.sinks.append(into)
        self.sent.append(words)
        up = FabOut(NORTH[self.r % 2])
        chain = (vec(Op.MOV, words, up, Mem(buffer)) if self.r == self.rows - 1 else
                 vec(Op.ADD, words, up, FabIn(NORTH[(self.r + 1) % 2]), Mem(buffer)))
        self.sending += [_wait(SEND), chain]
        if frees_slot:
            self._free(self.sending)
        if reused:
            self.sending.append(_signal(SENT))
            return [_signal(SEND), _wait(SENT)]
        return [_signal(SEND)]

    # -- linear layers -------------------------------------------------------------------

    def linear_forward(self, layer: LinearLayer, weight: np.ndarray, x: int, y: int,
                       span_in: Span, span_out: Span, gathered: bool = False) -> None:
        """Y = X W of `layer` (weights as streamed, [K, N]) from the own slice of X at `x`
        into the own slice of Y at `y`; `gathered`: X is already whole in `whole`."""
        t = self.tokens
        (k0, k1), (n0, n1) = span_in, span_out
        if layer.parallel == "column":
            if not gathered:
                self.gather(x, k0, k1, layer.k)
            for n in range(n1 - n0):
                self.take(weight[:, n0 + n], lambda j, n=n: dots(
                    t, layer.k, Walk(self.whole, t, step=1), self.weight_walk(j), acc=ACC,
                    out=[Mem(y + n * t + s) for s in range(t)]))
            return
        for k in range(k1 - k0):
            self.take(weight[k0 + k], lambda j, k=k: [
                _axpy(k == 0, layer.n, Mem(self.partial + s, t), self.weights(j),
                      Mem(x + k * t + s, 0)) for s in range(t)])
        self.allreduce(self.partial, layer.n * t)
        self.compute.append(vec(Op.MOV, (n1 - n0) * t, Mem(y), Mem(self.partial + n0 * t)))

    def _send_dw(self, j: int, words: int, into: Into) -> list[Instr]:
        """Weight vector j's dW to the service: from its ring slot, which the sending thread
        then frees (fp32), or from the one dW buffer, reused by the next vector (mixed)."""
        in_slot = self.dw is None
        return self.column_reduce(self.dw_at(j), words, into, frees_slot=in_slot,
                                  reused=not in_slot)

    def linear_backward(self, layer: LinearLayer, weight: np.ndarray, x: int, dy: int,
                        dx: int, span_in: Span, span_out: Span,
                        into: Callable[[int], Into], *, gathered: bool = False,
                        first: bool = True, last: bool = True) -> None:
        """dX = dY W^T into the own slice at `dx` and dW = X^T dY to the service (`into(v)`
        places weight vector v's gradient), from the own slices of X at `x` and dY at
        `dy`. Column-parallel layers that share X (the attention's q, k and v) run one
        after another with `gathered` after the first, summing one partial dX: `first`
        starts it, `last` all-reduces it."""
        t = self.tokens
        (k0, k1), (n0, n1) = span_in, span_out
        if layer.parallel == "column":
            if not gathered:
                self.gather(x, k0, k1, layer.k)
            for n in range(n1 - n0):
                scalars = [Mem(dy + n * t + s, 0) for s in range(t)]
                self.take(weight[:, n0 + n], lambda j, n=n, scalars=scalars: (
                    [_axpy(first and n == 0, layer.k, Mem(self.partial + s, t),
                           self.weights(j), scalars[s]) for s in range(t)]
                    + [_axpy(s == 0, layer.k, Mem(self.dw_at(j)), Mem(self.whole + s, t),
                             scalars[s]) for s in range(t)]
                    + self._send_dw(j, layer.k, into(n0 + n))),
                    sends_slot=self.dw is None)
            if last:
                self.allreduce(self.partial, layer.k * t)
                self.compute.append(vec(Op.MOV, (k1 - k0) * t, Mem(dx),
                                        Mem(self.partial + k0 * t)))
            return
        self.gather(dy, n0, n1, layer.n)
        for k in range(k1 - k0):
            self.take(weight[k0 + k], lambda j, k=k: (
                dots(t, layer.n, Walk(self.whole, t, step=1), self.weight_walk(j), acc=ACC,
                     out=[Mem(dx + k * t + s) for s in range(t)])
                + [_axpy(s == 0, layer.n, Mem(self.dw_at(j)), Mem(self.whole + s, t),
                         Mem(x + k * t + s, 0)) for s in range(t)]
                + self._send_dw(j, layer.n, into(k0 + k))),
                sends_slot=self.dw is None)


def _axpy(first: bool, n: int, dst: Operand, a: Operand, scalar: Operand) -> Instr:
    """dst = a * scalar (first) or dst += a * scalar, n elements."""
    if first:
        return vec(Op.MUL, n, dst, a, scalar)
    return vec(Op.FMA, n, dst, a, scalar, dst)


def _signal(color: int) -> Instr:
    """One token to the PE itself (`compiler.lowering.kernel.Tokens`)."""
    return vec(Op.MOV, 1, FabOut(color), Imm(1.0))


def _wait(color: int) -> Instr:
    return vec(Op.MOV, 1, Reg(TOKEN_REG), FabIn(color))


def set_routes(program: Program, c: int, r: int, cols: int, rows: int) -> None:
    """The routes of PE (c, r): weights down the column, the row chains and multicast, the
    column chains up (the top PE's into the edge port), the ring's tokens."""
    ramp, n, e, s, w = (port_mask(p) for p in (Port.RAMP, Port.N, Port.E, Port.S, Port.W))
    program.set_route(c, r, WEIGHTS, Route(n, ramp | (s if r < rows - 1 else 0)))
    for color in (READY, FREE, SEND, SENT):
        program.set_route(c, r, color, Route(ramp, ramp))
    if cols > 1:
        if c < cols - 1:
            program.set_route(c, r, EAST[c % 2], Route(ramp, e))
        if c > 0:
            program.set_route(c, r, EAST[(c - 1) % 2], Route(w, ramp))
        program.set_route(c, r, WEST, Route(ramp, w) if c == cols - 1
                          else Route(e, ramp | (w if c > 0 else 0)))
    program.set_route(c, r, NORTH[r % 2], Route(ramp, n))
    if r < rows - 1:
        program.set_route(c, r, NORTH[(r + 1) % 2], Route(s, ramp))


def edge_ports(column: int, pe: StreamPE, half: bool) -> list[EdgePort]:
    """The memory service's two ports of a column, beside its top PE `pe`: the inbound one
    sends the weight vectors the column's PEs take (fp16 halves two a wavelet when `half`),
    the outbound one receives what the column sends up. Each marks the first and the last
    word of every pass that has words in its direction (the runs' timelines)."""
    parts = [wavelets(p.fills, half) for p in pe.passes() if p.fills]
    sent = [sum(p.sent) for p in pe.passes() if p.sent]
    return [EdgePort(f"weights {column}", column, 0, Port.N, WEIGHTS, True,
                     np.concatenate(parts), marks=block_ends([len(p) for p in parts])),
            EdgePort(f"gradients {column}", column, 0, Port.N, NORTH[0], False,
                     np.zeros(0, np.float32), sum(pe.sent), marks=block_ends(sent))]


def received(top: list[StreamPE], port_words: dict[str, np.ndarray],
             into: dict[str, np.ndarray]) -> None:
    """The memory service's side of `column_reduce`: add the words each column's outbound
    port received into the arrays `into` (by parameter name), where each vector's `Into`
    says; `top` are the columns' top PEs, which recorded what they send."""
    for c, pe in enumerate(top):
        words, at = port_words[f"gradients {c}"], 0
        for sink, n in zip(pe.sinks, pe.sent, strict=True):
            np.add.at(into[sink.param], sink.index, words[at:at + n].reshape(sink.shape))
            at += n


def port_timeline(top: list[StreamPE], passes: list[str],
                  port_marks: dict[str, np.ndarray]) -> list[dict[str, object]]:
    """Per pass (named "<part> forward|backward", in order), from the ports' marks
    (`edge_ports`): when its weights entered the fabric (the first column's first word to
    the last column's last) and when what it sent up reached the memory service."""
    spans: dict[tuple[int, str], list[tuple[int, int]]] = {}
    for c, pe in enumerate(top):
        blocks = {"weights in": 0, "gradients out": 0}
        for p, done in enumerate(pe.passes()):
            for kind, port, present in (("weights in", f"weights {c}", done.fills),
                                        ("gradients out", f"gradients {c}", done.sent)):
                if present:
                    marks, b = port_marks[port], blocks[kind]
                    spans.setdefault((p, kind), []).append((int(marks[2 * b]),
                                                            int(marks[2 * b + 1])))
                    blocks[kind] += 1
    out = []
    for (p, kind), ends in sorted(spans.items(),  # a pass's weights, then its gradients
                                  key=lambda item: (item[0][0], item[0][1] != "weights in")):
        part, direction = passes[p].rsplit(" ", 1)
        out.append({"layer": part, "pass": direction, "stream": kind,
                    "start": min(s for s, _ in ends), "end": max(e for _, e in ends)})
    return out


def wavelets(vectors: list[np.ndarray], half: bool) -> np.ndarray:
    """The words that carry weight vectors: fp32, or (`half`) fp16 halves two to a wavelet,
    each vector from a new wavelet (`wse_sim.program`, "fp16")."""
    if not vectors:
        return np.zeros(0, np.float32)
    if not half:
        return np.concatenate([np.asarray(v, np.float32).ravel() for v in vectors])
    parts = []
    for v in vectors:
        halves = np.zeros(len(v) + len(v) % 2, np.float16)
        halves[:len(v)] = v
        parts.append(halves.view(np.float32))
    return np.concatenate(parts)


def block_ends(sizes: list[int]) -> tuple[int, ...]:
    """The first and last word index of each of consecutive blocks of `sizes` words."""
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return tuple(int(m) for a, b in zip(starts, starts[1:], strict=False) for m in (a, b - 1))
