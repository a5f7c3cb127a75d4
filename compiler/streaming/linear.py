"""A stack of linear layers in weight-streaming mode: X_{l+1} = X_l W_l, forward then
backward, every weight entering through the wafer's north edge and every weight gradient
leaving through it (`wse_sim.program.EdgePort`), the activations staying in SRAM.

Layout. The layers run one after another on one R x C rectangle whose top row is the
wafer's north edge. PE row r holds the tokens `rows[r]` (T_r of them): data parallelism
down a column. PE column c owns the features `split(F, C)[c]` of every activation with F
features (its *slice*): tensor parallelism across a row, as in Megatron-LM. Every
activation and activation gradient is stored sliced, transposed ([f_c, T_r], so one
token's features are a stride-T_r vector): the forward's activations stay on the wafer
for the backward at 1/C of a replicated copy's SRAM. A layer that needs a whole
activation gathers it into a scratch buffer first (`_gather`).

A layer is sliced one of two ways (`LinearLayer.parallel`):

* `column` (Megatron's column-parallel, for K <= N): column c streams W[:, n] for its
  output features n, one weight column (K words) after another. Forward: gather X, then
  per weight column T_r dot products of K terms (`compiler.lowering.dots`): Y[t, n] lands
  in the PE's own slice, no reduction. Backward: gather X again; per weight column add
  dY[t, n] W[:, n] to a partial dX (one FMA of K per token), then overwrite the column's
  ring slot with dW[:, n] = sum over the tokens of X[t, :] dY[t, n] and send it up the
  column; after the columns, sum the partial dX over the row (`_allreduce`) and keep the
  own slice.
* `row` (row-parallel, for K > N): column c streams W[k, :] for its input features k, one
  weight row (N words) after another. Forward: per weight row add X[k, t] W[k, :] to a
  partial Y (one FMA of N per token), then sum it over the row and keep the own slice.
  Backward: gather dY; per weight row T_r dots give dX[t, k] in the own slice, then the
  slot becomes dW[k, :] = sum over the tokens of X[k, t] dY[t, :] and goes up the column.

Weights in. The column's routers multicast each weight word from the north edge to every
PE of the column (one color: rx N, tx S + RAMP). On each PE a receiving thread copies
weight vectors into a ring of S slots and signals each (a token to the PE itself, as
`compiler.lowering.kernel.Tokens`); the compute thread waits for a slot, uses it, and
frees it. The ring is the prefetch: the receiver runs up to S vectors ahead, across a
layer boundary into the next layer's weights while the compute thread gathers and
reduces. S is as many slots as the SRAM left over allows, at most 2 x queue_depth
(`Tokens.capacity`, so that no token is ever held up).

Mixed precision (`precision="mixed"`). The memory service rounds its fp32 master weights
to fp16 and streams them two to a wavelet (each vector from a new wavelet); the ring holds
halves, and every product is an fp16 weight times an fp32 activation, computed in fp32
(the engine's mixed class, one element a cycle: the fp32 operand is strided). dW is formed
in an fp32 buffer of its own and leaves in fp32, a word a weight, so a backward moves twice
the words out that it takes in. The reference uses the same fp16 weights and is otherwise
fp32 arithmetic: the check's tolerance does not change.

Gradients out. The column sums each dW vector with an ADD chain northward (colors
alternate by row parity); the top PE's sums leave through the column's outbound port in
the order the weights came in, and the memory service applies the optimizer
(`compiler.streaming.service`). A third thread on each PE sends them
(`compiler.streaming.pe`): the compute thread hands over each dW, formed in its weight's
ring slot, and goes on to the next vector, so a backward pass moves weights in and dW out
at once; the sending thread frees the slot once the dW has left.

Row collectives. Gather: an eastward chain, each PE relaying its west neighbour's words
and appending its own slice (colors alternate by column parity), then the east PE
multicasts the whole [F, T_r] block back west. All-reduce: an eastward ADD chain, then the
same multicast of the total.

Why it cannot deadlock. Every PE runs the same sequence of phases (per layer and pass:
collectives, weight vectors with their column chains, collectives) on one compute thread;
its sending thread runs the column chains in the same order on every PE of a column (the
token argument between the threads is in `compiler.streaming.pe`).
Consider the earliest phase some PE still waits in. A chain or multicast waits only on
PEs of the same row or column in the same phase, which have finished every earlier phase,
and each is a path towards one end (and back), so it completes. A weight vector waits for
its words: the multicast down a column moves a word only when every PE of the column has
room for it, and a PE's ring is full only when its compute thread is behind its receiver,
i.e. in an earlier phase than this one, which contradicts the choice (every receiver of a
column is at the same word: the multicast is atomic). Tokens never block their sender.

Cost (one fp32 element per cycle, `phase_cycles`): per weight vector of length V a PE
spends T_r V cycles on its products forward, 2 T_r V + V backward (dX, dW, the column
chain); its receiving thread copies the vector beside them (one SRAM write an element,
while the products read two words a cycle and write none). The edge supplies
`wafer.edge_words_per_cycle` words a cycle shared by the C columns, at most one per column.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from compiler.lowering.kernel import Kernel, sram_budget
from compiler.ops.matmul import linear_backward, linear_forward, to_half
from compiler.streaming.pe import (
    COLORS,
    Precision,
    Span,
    StreamPE,
    edge_ports,
    port_timeline,
    received,
    ring_depth,
    set_routes,
    split,
    weight_into,
)
from wse_sim.errors import UserError
from wse_sim.hardware import WaferConfig
from wse_sim.program import (
    BYTES_PER_WORD,
    Program,
    Region,
    TensorLayout,
    TensorSlot,
)

Parallel = Literal["column", "row"]


@dataclass(frozen=True)
class LinearLayer:
    name: str
    k: int  # input features
    n: int  # output features

    @property
    def parallel(self) -> Parallel:
        """How the layer is sliced over a PE row (module docstring)."""
        return "column" if self.k <= self.n else "row"

    @property
    def vector(self) -> int:
        """Words per weight vector streamed: a column of W (column-parallel) or a row."""
        return self.k if self.parallel == "column" else self.n


@dataclass
class Stack:
    """The program of one step of a linear stack, and where its results are."""

    program: Program
    layers: list[LinearLayer]
    rows: list[Span]  # tokens of each PE row
    cols: list[list[Span]]  # slices of activation l (l = 0 .. L) per PE column
    slots: int  # ring slots per PE (weight vectors prefetched)
    precision: Precision = "fp32"  # mixed: the weights stream in fp16
    top: list[StreamPE] = field(default_factory=list)  # row 0's PE of every column

    def passes(self) -> list[tuple[int, bool]]:
        """(layer, backward) in the order they run: forward up, backward down."""
        n = len(self.layers)
        return [(i, False) for i in range(n)] + [(i, True) for i in reversed(range(n))]

    def timeline(self, port_marks: dict[str, np.ndarray]) -> list[dict[str, object]]:
        """Per pass: its weights in and, backward, its dW out, measured (`port_timeline`)."""
        names = [f"{self.layers[i].name} {'backward' if backward else 'forward'}"
                 for i, backward in self.passes()]
        return port_timeline(self.top, names, port_marks)

    def gradients(self, port_words: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """dW of every layer from the words the memory service received (`received`)."""
        out = {layer.name: np.zeros((layer.k, layer.n), np.float32) for layer in self.layers}
        received(self.top, port_words, out)
        return out


def reference(layers: list[LinearLayer], x: np.ndarray, weights: dict[str, np.ndarray],
              dy: np.ndarray, precision: Precision = "fp32") -> dict[str, np.ndarray]:
    """The float64 twin: every layer's output `y:{name}`, the first layer's input gradient
    `dx` and every weight gradient `dw:{name}`; `mixed`: with the weights the memory
    service sends, rounded to fp16 (`streamed_weight`)."""
    out: dict[str, np.ndarray] = {}
    acts = [np.asarray(x, np.float64)]
    used = {layer.name: streamed_weight(weights[layer.name], precision).astype(np.float64)
            for layer in layers}
    for layer in layers:
        acts.append(linear_forward(acts[-1], used[layer.name], np.zeros(layer.n)))
        out[f"y:{layer.name}"] = acts[-1]
    grad = np.asarray(dy, np.float64)
    for layer, act in zip(reversed(layers), reversed(acts[:-1]), strict=True):
        grad, out[f"dw:{layer.name}"], _ = linear_backward(grad, act, used[layer.name])
    out["dx"] = grad
    return out


def streamed_weight(weight: np.ndarray, precision: Precision) -> np.ndarray:
    """The weight as the memory service streams it: fp32, or (`mixed`) rounded to fp16."""
    weight = np.asarray(weight, np.float32)
    return to_half(weight) if precision == "mixed" else weight


def slot_words(layers: list[LinearLayer], precision: Precision) -> int:
    """SRAM words of a ring slot: the longest weight vector, fp32 or (`mixed`) fp16 halves
    two to a word."""
    widest = max(layer.vector for layer in layers)
    return (widest + 1) // 2 if precision == "mixed" else widest


def build_stack(layers: list[LinearLayer], x: np.ndarray, weights: dict[str, np.ndarray],
                dy: np.ndarray, *, rows: int, cols: int, wafer: WaferConfig,
                precision: Precision = "fp32") -> Stack:
    """The weight-streaming program of forward and backward through `layers` for the tokens
    `x` [T, K_0] with output gradient `dy` [T, N_last], on a `rows` x `cols` rectangle at
    the wafer's north-west corner; `precision` "mixed" streams the weights in fp16."""
    tokens = len(x)
    features = [layers[0].k] + [layer.n for layer in layers]
    _check(layers, features, tokens, rows, cols, wafer)
    token_rows = split(tokens, rows)
    slices = [split(f, cols) for f in features]
    slots = ring_slots(layers, tokens, rows, cols, wafer, precision=precision)
    widest = max(layer.vector for layer in layers)
    kernel = Kernel(name="stack", op="linear", ops=[], width=cols, height=rows)
    buffers = {(c, r): _allocate(kernel, (c, r), widest, token_rows[r],
                                 [s[c] for s in slices], precision)
               for r in range(rows) for c in range(cols)}
    for pe, buf in buffers.items():
        buf.ring = kernel.alloc(pe, slots * slot_words(layers, precision), "weight ring")
    program = Program(width=cols, height=rows)
    stack = Stack(program, layers, token_rows, slices, slots, precision)
    for (c, r), buf in buffers.items():
        t0, t1 = token_rows[r]
        (i0, i1), (o0, o1) = slices[0][c], slices[-1][c]
        kernel.load((c, r), buf.act[0], np.asarray(x, np.float32)[t0:t1, i0:i1].T)
        kernel.load((c, r), buf.grad[-1], np.asarray(dy, np.float32)[t0:t1, o0:o1].T)
        pe = _stack_pe(stack, buf, weights, c, r)
        pe.emit(kernel)
        program.pes[(c, r)] = kernel.programs[(c, r)]
        set_routes(program, c, r, cols, rows)
        if r == 0:
            stack.top.append(pe)
    program.regions.append(Region("linear stack", "linear", 0, 0, cols, rows))
    _tensors(stack, buffers, features, tokens)
    _ports(stack)
    return stack


def ring_slots(layers: list[LinearLayer], tokens: int, rows: int, cols: int,
               wafer: WaferConfig, saved: int = 0, precision: Precision = "fp32") -> int:
    """The weight vectors a PE's ring holds (the prefetch depth) for this shape: what the
    SRAM of the fullest PE leaves (`ring_depth`), with `saved` words per PE taken by
    activations the rest of a step keeps. A UserError names the SRAM when that is fewer
    than two (or the buffers alone do not fit)."""
    features = [layers[0].k] + [layer.n for layer in layers]
    widest = max(layer.vector for layer in layers)
    fullest = Kernel(name="stack", op="linear", ops=[], width=cols, height=rows)
    budget = wafer.sram_bytes_per_pe // BYTES_PER_WORD
    with sram_budget(budget):
        if saved:
            fullest.alloc((0, 0), saved, "activations the rest of the step saves")
        _allocate(fullest, (0, 0), widest, (0, -(-tokens // rows)),
                  [(0, -(-f // cols)) for f in features], precision)
    return ring_depth(budget - fullest.sram_words((0, 0)), slot_words(layers, precision),
                      wafer, f"weight streaming: {rows} x {cols} PEs", "use more PE rows")


def _check(layers: list[LinearLayer], features: list[int], tokens: int, rows: int,
           cols: int, wafer: WaferConfig) -> None:
    for layer, nxt in zip(layers, layers[1:], strict=False):
        if nxt.k != layer.n:
            raise UserError(f"layer {nxt.name}: takes {nxt.k} features, layer {layer.name} "
                            f"gives {layer.n}")
    if not 1 <= rows <= min(tokens, wafer.height):
        raise UserError(f"rows: {rows} PE rows for {tokens} tokens on a wafer {wafer.height} "
                        f"high (need 1 <= rows <= both)")
    if not 1 <= cols <= min(min(features), wafer.width):
        raise UserError(f"cols: {cols} PE columns, but an activation has {min(features)} "
                        f"features and the wafer is {wafer.width} wide (every column owns "
                        f"a feature of every activation)")
    if wafer.colors < COLORS:
        raise UserError(f"wafer.colors: weight streaming uses {COLORS} colors, the wafer "
                        f"has {wafer.colors}")


@dataclass
class _Buffers:
    """One PE's SRAM map (word offsets); blocks are transposed, [features, T_r]."""

    tokens: int  # T_r
    act: list[int]  # own slice of activation l, l = 0 .. L (saved for the backward)
    grad: list[int]  # own slice of its gradient (grad[L]: the given dY)
    whole: int  # scratch: a gathered activation, [F, T_r]
    partial: int  # scratch: a partial sum, all-reduced over the row in place, [F, T_r]
    dw: int | None  # mixed: an fp32 dW vector (fp32: dW overwrites its weights' ring slot)
    ring: int = 0  # weight vectors, `slots` x `slot_words`


def _allocate(kernel: Kernel, pe: tuple[int, int], widest: int, rows: Span,
              slices: list[Span], precision: Precision) -> _Buffers:
    """The buffers of PE `pe`; the scratch blocks hold what a layer gathers or all-reduces,
    min(K, N) features (`LinearLayer.vector`), at most `widest`."""
    t = rows[1] - rows[0]
    act = [kernel.alloc(pe, (s1 - s0) * t, f"activation {i}")
           for i, (s0, s1) in enumerate(slices)]
    grad = [kernel.alloc(pe, (s1 - s0) * t, f"gradient {i}")
            for i, (s0, s1) in enumerate(slices)]
    whole = kernel.alloc(pe, widest * t, "gathered activation")
    partial = kernel.alloc(pe, widest * t, "partial sums")
    dw = kernel.alloc(pe, widest, "weight gradient") if precision == "mixed" else None
    return _Buffers(t, act, grad, whole, partial, dw)


def _stack_pe(stack: Stack, buf: _Buffers, weights: dict[str, np.ndarray], c: int,
              r: int) -> StreamPE:
    """The code of PE (c, r): every pass of the stack in order (`Stack.passes`)."""
    pe = StreamPE(c, r, len(stack.cols[0]), len(stack.rows), buf.tokens, stack.slots,
                  slot_words(stack.layers, stack.precision), stack.precision == "mixed",
                  buf.ring, buf.whole, buf.partial, buf.dw)
    for i, backward in stack.passes():
        layer = stack.layers[i]
        weight = streamed_weight(weights[layer.name], stack.precision)
        spans = stack.cols[i][c], stack.cols[i + 1][c]
        pe.begin_pass()
        if backward:
            pe.linear_backward(layer, weight, buf.act[i], buf.grad[i + 1], buf.grad[i],
                               *spans, weight_into(layer, layer.name))
        else:
            pe.linear_forward(layer, weight, buf.act[i], buf.act[i + 1], *spans)
    return pe


def _tensors(stack: Stack, buffers: dict[tuple[int, int], _Buffers], features: list[int],
             tokens: int) -> None:
    """Result slots: every layer's output and the first layer's input gradient, from the
    PEs' own slices."""
    names = [f"y:{layer.name}" for layer in stack.layers]
    for name, index, field_name in [*((n, i + 1, "act") for i, n in enumerate(names)),
                                    ("dx", 0, "grad")]:
        layout = TensorLayout((tokens, features[index]))
        for (c, r), buf in buffers.items():
            offset = getattr(buf, field_name)[index]
            layout.slots.append(TensorSlot(c, r, offset, stack.rows[r],
                                           stack.cols[index][c], 1, buf.tokens))
        stack.program.tensors[name] = layout


def _ports(stack: Stack) -> None:
    """Column c's inbound port sends the weight vectors its PEs take, forward then
    backward; its outbound port receives the dW vectors, backward order (`edge_ports`)."""
    for c, pe in enumerate(stack.top):
        stack.program.ports += edge_ports(c, pe, stack.precision == "mixed")


# -- cost -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhaseCost:
    """The cycles of one pass (forward or backward) of one layer, by what they wait for:
    the edge delivering the layer's weights (backward, or taking its dW, whichever is
    longer), the slowest PE's products (and, backward, its column chain), and its row
    collectives (gathers, all-reduces, copies)."""

    weight_io: int
    compute: int
    fabric: int

    @property
    def cycles(self) -> int:
        """Collectives, then the weight vectors at the pace of the slower of the edge and
        the PEs (the receiving thread overlaps the two)."""
        return self.fabric + max(self.weight_io, self.compute)

    @property
    def bound(self) -> str:
        """The largest of the three: `weight I/O`, `compute` or `fabric`."""
        parts = {"weight I/O": self.weight_io, "compute": self.compute, "fabric": self.fabric}
        return max(parts, key=parts.__getitem__)


def streamed_words(layer: LinearLayer, precision: Precision) -> int:
    """Words (wavelets) that carry one of the layer's weight vectors."""
    return (layer.vector + 1) // 2 if precision == "mixed" else layer.vector


def phase_cost(layer: LinearLayer, tokens: int, rows: int, cols: int, wafer: WaferConfig,
               *, backward: bool, precision: Precision = "fp32") -> PhaseCost:
    """The model of one pass of `layer` over `tokens` tokens on `rows` x `cols` PEs (the
    module docstring's cost; `tests/test_streaming.py` holds it against simulated runs).
    Per weight vector of V elements (W words: V, or V / 2 in fp16) and T_r tokens, besides
    the products (T_r V, twice backward; an fp16 weight times an fp32 activation is one
    element a cycle too) and the column chain (V): the receiving thread's W SRAM writes,
    which take the write port from an FMA writing SRAM (not from a dot product, which
    writes a register);
    a cycle per FMA whose scalar and accumulator make three reads in its first element; two
    cycles for the tokens. Per chain along a row: a wavelet's latency per PE
    (`hop_latency` + 2)."""
    t = -(-tokens // rows)  # T_r of the fullest row
    owned = layer.n if layer.parallel == "column" else layer.k
    vectors = -(-owned // cols)  # of the busiest column
    words = streamed_words(layer, precision)
    # Backward, dW leaves (fp32, a word an element) over the outbound side at the same rate
    # as the weights come in: the longer stream bounds the pass. The edge's words a cycle
    # are shared by the columns still streaming, each taking at most one a cycle (a link):
    # the pass takes all its words at the edge's rate, or the busiest column's at one a
    # cycle, whichever is longer (a column with fewer vectors finishes early and leaves
    # its share to the others).
    vector_words = max(words, layer.vector) if backward else words
    weight_io = math.ceil(max(owned * vector_words / wafer.edge_words_per_cycle,
                              vectors * vector_words))
    v = layer.vector
    if not backward:
        per_vector = t * v if layer.parallel == "column" else t * v + words + t
    else:
        per_vector = 2 * t * v + v + words + (2 * t if layer.parallel == "column" else t)
    compute = vectors * (per_vector + 2)
    leg = (cols - 1) * (wafer.hop_latency + 2)  # a chain's fill along the row

    def gather(features: int) -> int:  # a chain east, then the multicast back (a copy alone)
        return 2 * (features * t + leg) if cols > 1 else features * t

    def allreduce_own(features: int) -> int:  # the same two legs, then the own slice copied
        return (2 * (features * t + leg) if cols > 1 else 0) + t * -(-features // cols)

    if layer.parallel == "column":
        fabric = gather(layer.k) + (allreduce_own(layer.k) if backward else 0)
    else:
        fabric = gather(layer.n) if backward else allreduce_own(layer.n)
    return PhaseCost(weight_io, compute, fabric)


def phase_events(layer: LinearLayer, tokens: int, rows: int, cols: int, *,
                 backward: bool, precision: Precision = "fp32") -> dict[str, int]:
    """The events of one pass of `layer` summed over the rectangle, for an energy estimate
    at a shape too large to simulate (`wse_sim.energy`'s classes, edge I/O in words;
    `tests/test_streaming.py` holds them against counted runs). Products: each an FMA
    reading two words; a product writes its word when it accumulates in SRAM (an axpy: the
    row-parallel forward, both backward products of a column-parallel layer, dW of a
    row-parallel one), not when it accumulates in a register (a dot). Every PE of a column
    copies the column's weight words into its ring (a write each). A gather writes the
    whole activation on every PE and its chain carries half of it east on average, the
    multicast all of it west; an all-reduce reads and writes the whole on every PE and its
    chain and multicast carry it all. Weights cross the column's links on the way down,
    dW on the way up (an ADD reading a word each)."""
    t = -(-tokens // rows)
    k, n = layer.k, layer.n
    weights = k * n
    products = tokens * weights * (2 if backward else 1)
    # Elements whose product starts a sum (a MUL, not an FMA): a dot's first term; an
    # axpy chain's first vector (each PE column's first, or each vector's first token).
    first = {("column", False): tokens * n, ("row", False): tokens * n * cols,
             ("column", True): tokens * k * cols + rows * weights,
             ("row", True): tokens * k + rows * weights}[(layer.parallel, backward)]
    in_sram = {("column", False): 0, ("row", False): products, ("column", True): products,
               ("row", True): products // 2}[(layer.parallel, backward)]
    whole = layer.vector * t  # one PE's gathered or all-reduced block
    gathers = int(layer.parallel == "column" or backward)
    allreduces = int((layer.parallel == "row") != backward)
    pes = rows * cols
    out = weights if backward else 0
    streamed = (n if layer.parallel == "column" else k) * streamed_words(layer, precision)
    return {
        "fma": products - first,
        "fp_other": first + allreduces * rows * (cols - 1) * whole + out * (rows - 1),
        "sram_read": 2 * products + allreduces * pes * whole + out * rows,
        "sram_write": in_sram + streamed * rows + (gathers + allreduces) * pes * whole,
        "hop": (streamed + out) * (rows - 1)
        + round(rows * whole * (cols - 1) * (1.5 * gathers + 2 * allreduces)),
        "edge_words": streamed + out,
    }
