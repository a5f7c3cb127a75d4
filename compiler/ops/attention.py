"""Attention: causal scores `S = q k^T / sqrt(dh)`, the causal mask, the softmax and the
values `o = P v`, with their backward passes, in one streaming kernel.

Graph: three op kinds over all heads at once (attributes heads, d_head, batch, seq_len):
`attn_scores` (q, k -> S [M, H*T], scale 1/sqrt(dh); FLOPs 2 M H T dh for the product over
the full T x T plus M H T for the scaling, backward twice the product plus the scaling),
`causal_mask` (S -> S with -inf where key > query; no FLOPs) and `attn_values` (P, v -> o
[M, d]; 2 M H T dh, backward twice). Head j owns columns [j dh, (j+1) dh) of q, k, v and o,
and columns [j T, (j+1) T) of S and P (see `split_heads`). The softmax between them is
`compiler.ops.softmax`; one kernel implements all four ops (and their backward twins):
the masked entries are never computed, the probabilities never leave the PEs.

Layout. The q, k, v lanes (of the fused [M, 3d] QKV output) and the o lanes may split a
head over several lanes or hold several heads in one; the heads whose columns share lanes
form a *group* (`head_groups`), one column of the kernel. A group's column has G PEs, and
PE c owns the block of keys at positions [c b, (c + 1) b) of every sequence, b = ceil(T /
G). Every PE of the column receives every q, k and v row of its group (multicast lanes),
each section on a receiving thread of its own (`compiler.lowering.inbox`), and keeps the q
rows (the backward needs them) and its own keys' k (scaled by 1/sqrt(dh) as it arrives)
and v rows.

Regions. For a query at position t, PE c has either no key yet (t < c b), its diagonal
block (the query's own position is in its block: the keys after t are masked with -inf,
a sliding window over one [0] * b + [-inf] * (b - 1) vector, so they get probability 0
and gradient 0 exactly), or its full block. Within a region every row runs the same
instructions on the same keys, so each region of each sequence is one REPEAT over its
rows: a PE has a few hundred instructions whatever T is. The cost of the blocks over a
round-robin assignment is the masked half of the diagonal block; what sets the pace is the
busiest row, b keys either way.

Forward, rows ascending, per row m at position t and per head: PE c scores its keys (nk
of them) s_j = q_m . k_j, takes its local max mu_c, p_j = exp(s_j - mu_c), l_c = sum p_j
and o_c = sum p_j v_j: a partial softmax (with one key p = exp(0) = 1 exactly, and o_c is
its v row as stored: no products). The partials combine along the column c = 0 ->
G-1 as flash attention's do: mu = max(mu_in, mu_c), l = l_in e^(mu_in - mu) + l_c e^(mu_c -
mu), o likewise; a PE with no key yet passes its input on. The last PE divides o by l,
keeps the row and sends the o lanes, and multicasts (mu, 1 / l) of every row back up the
column, where a thread of their own stores them for the backward (so no PE waits for them
in the forward).
Backward, rows descending (compiler.lowering.kernel), per row m: the last PE's dO receiver
computes D = sum_j p_j dP_j = dO_m . o_m per head as soon as dO_m arrives (the flash
attention identity; it kept o_m) and multicasts it up the column; every PE recomputes p_j
= exp(q_m . k_j - mu) / l for its keys, dP_j = dO_m . v_j, dv_j += p_j dO_m, dS_j = p_j (dP_j
- D), its share of dq_m = sum_j dS_j k'_j (k' the scaled keys: no multiply on the way out),
which is summed down the column, and dk_j += dS_j q_m. Walking the rows backwards completes
key t's dk and dv when row t passes (every query i >= t has been seen): its owner sends
them down the column, scaled by 1/sqrt(dh), and the last PE sends the dq, dk, dv lanes of
row m. No row waits for a round trip over the column: every stream within it flows one
way, so the PEs of a column pipeline rows like a systolic array.

Deadlock (compiler.lowering.kernel): the kernel is row-causal; within a column every
stream flows one way (down the chain, or from the last PE up to the others), each stream
has one reading thread, which reads it in row order, and the last PE's dO receiver waits
only for the ring slot that the compute thread frees after an earlier row (its first
credits come after the forward, when every o row is stored).

Cost per PE and row (`row_cycles`, `cycles`, `sram_words` below), per head with nk own
keys: forward nk dh (scores; + nk masked on the diagonal) + 4 nk + 4 (softmax partial) +
nk (dh + 1) - 1 (o; none for one key) + the combine (dh + 2 to send or pass on, 2 dh + 9
to merge, 2 dh + 4 to finish on the last PE); backward nk dh (+ nk) + 3 nk (p) + nk dh
(dP) + nk (dh + 1) (dv) + 2 nk (dS) + nk (dh + 1) - 1 (dq) + nk (dh + 1) (dk) + W (dq down
the column) + 2 W (key t's dk, dv, on the PEs from its owner to the last). The receiving
threads' arithmetic (k's scaling, the last PE's D) takes the same fp32 unit. Each row
takes its slowest PE's time (the chains keep a column in step), so the pace is set by the
full-block rows: b keys. These count the compute thread only: the receiving threads share
the PE's one SRAM write port, storing every q row and discarding the k and v rows of keys
not its own, so with few keys per PE the forward is bound by writes (README, "Known gaps":
gpt_small's attention at one key per PE runs its forward in 1.26x the formula).
SRAM per PE: M W (q rows) + 4 B b W (own k, v and their gradients) + 2 M heads (row
statistics) + the dO ring and a few rows of scratch; the last PE also M W (o rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from compiler.graph import GraphBuilder, OpSpec, grad_name
from compiler.lowering.dots import Walk, dots
from compiler.lowering.inbox import (
    RING,
    Inbox,
    PerPE,
    RowStore,
    inbox,
    receiving_thread,
    rounds,
)
from compiler.lowering.ir import FabIn, FabOut, Imm, Instr, Mem, Op, Operand, Reg, repeat, vec
from compiler.lowering.kernel import Kernel, LocalPE, StreamIds, Tokens
from compiler.lowering.rowreduce import row_reduce
from compiler.ops.base import OpFamily, Tensors
from compiler.ops.softmax import partial_softmax
from wse_sim.errors import UserError

if TYPE_CHECKING:
    from compiler.lower import LoweringContext

Lane = tuple[int, int]


def add_scores(b: GraphBuilder, name: str, q: str, k: str, heads: dict[str, Any]) -> str:
    """S = q k^T / sqrt(dh) per head; `heads` are the attention attributes."""
    m = b.shape(q)[0]
    n_scores = m * heads["heads"] * heads["seq_len"]
    products = 2 * n_scores * heads["d_head"]
    (scores,) = b.forward(
        name, "attn_scores", (q, k), {f"{name}.out": (m, heads["heads"] * heads["seq_len"])},
        flops=products + n_scores, matmul_flops=products, bwd_flops=2 * products + n_scores,
        saved=(q, k), attrs={**heads, "scale": 1.0 / math.sqrt(heads["d_head"])})
    return scores


def add_mask(b: GraphBuilder, name: str, scores: str, heads: dict[str, Any]) -> str:
    """The causal mask: -inf where key s > query t."""
    return b.elementwise(name, "causal_mask", (scores,), (0, 0), attrs=heads)


def add_values(b: GraphBuilder, name: str, probs: str, v: str, heads: dict[str, Any]) -> str:
    """o = P v per head."""
    m, d = b.shape(v)
    products = 2 * m * heads["heads"] * heads["seq_len"] * heads["d_head"]
    (out,) = b.forward(name, "attn_values", (probs, v), {f"{name}.out": (m, d)},
                       flops=products, matmul_flops=products, bwd_flops=2 * products,
                       saved=(probs, v), attrs=heads)
    return out


# -- numpy ------------------------------------------------------------------------------------


def split_heads(x: np.ndarray, batch: int, heads: int) -> np.ndarray:
    """(B*T, H*w) with head j in column block j -> (B, H, T, w)."""
    rows, cols = x.shape
    return x.reshape(batch, rows // batch, heads, cols // heads).transpose(0, 2, 1, 3)


def merge_heads(x: np.ndarray) -> np.ndarray:
    """(B, H, T, w) -> (B*T, H*w), the inverse of split_heads."""
    batch, heads, seq, width = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch * seq, heads * width)


def causal(seq: int) -> np.ndarray:
    """True where query t may attend to key s (s <= t)."""
    return np.tril(np.ones((seq, seq), dtype=bool))


def attn_scores_forward(q: np.ndarray, k: np.ndarray, batch: int, heads: int,
                        scale: float) -> np.ndarray:
    q4, k4 = split_heads(q, batch, heads), split_heads(k, batch, heads)
    return merge_heads((q4 @ k4.transpose(0, 1, 3, 2)) * scale)


def attn_scores_backward(dscores: np.ndarray, q: np.ndarray, k: np.ndarray, batch: int,
                         heads: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(dq, dk)."""
    ds4 = split_heads(dscores, batch, heads)
    q4, k4 = split_heads(q, batch, heads), split_heads(k, batch, heads)
    return merge_heads(scale * ds4 @ k4), merge_heads(scale * ds4.transpose(0, 1, 3, 2) @ q4)


def causal_mask_forward(s: np.ndarray, batch: int, heads: int) -> np.ndarray:
    s4 = split_heads(s, batch, heads)
    return merge_heads(np.where(causal(s4.shape[2]), s4, -np.inf))


def causal_mask_backward(ds: np.ndarray, batch: int, heads: int) -> np.ndarray:
    ds4 = split_heads(ds, batch, heads)
    return merge_heads(np.where(causal(ds4.shape[2]), ds4, 0))


def attn_values_forward(p: np.ndarray, v: np.ndarray, batch: int, heads: int) -> np.ndarray:
    return merge_heads(split_heads(p, batch, heads) @ split_heads(v, batch, heads))


def attn_values_backward(dout: np.ndarray, p: np.ndarray, v: np.ndarray, batch: int,
                         heads: int) -> tuple[np.ndarray, np.ndarray]:
    """(dp, dv)."""
    do4, p4, v4 = (split_heads(a, batch, heads) for a in (dout, p, v))
    return merge_heads(do4 @ v4.transpose(0, 1, 3, 2)), merge_heads(p4.transpose(0, 1, 3, 2) @ do4)


# -- kernel -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttnShape:
    """One attention op's shapes, its tensors' lanes, and the PEs per head group."""

    batch: int
    seq: int
    heads: int
    d_head: int
    qkv_lanes: list[Lane]  # lanes of the fused [M, 3d] q | k | v tensor
    o_lanes: list[Lane]  # lanes of the output [M, d]
    key_pes: int  # G: PEs per head group, each owning a block of consecutive keys

    @property
    def rows(self) -> int:
        return self.batch * self.seq

    @property
    def d_model(self) -> int:
        return self.heads * self.d_head

    @property
    def block(self) -> int:
        """Keys per PE (the last PE's block may be shorter)."""
        return -(-self.seq // self.key_pes)

    def keys(self, c: int) -> tuple[int, int]:
        """Positions [k0, k1) of the keys PE c owns in every sequence."""
        k0 = c * self.block
        return k0, min(self.seq, k0 + self.block)

    def regions(self, c: int) -> list[tuple[str, int, int]]:
        """PE c's query positions by what it does for them, ascending: "none" (no key of its
        own yet), "diagonal" (its block holds the query's own position: future keys are
        masked) and "full" (all its keys count)."""
        k0, k1 = self.keys(c)
        return [(name, t0, t1) for name, t0, t1 in
                (("none", 0, k0), ("diagonal", k0, k1), ("full", k1, self.seq)) if t1 > t0]


def key_pe_counts(seq: int) -> list[int]:
    """The G for which every PE of a group owns at least one key of a `seq`-long sequence."""
    return [g for g in range(1, seq + 1) if (g - 1) * -(-seq // g) < seq]


def head_groups(op: str, shape: AttnShape) -> list[tuple[int, int]]:
    """(first head, heads) of each group: the fewest consecutive heads whose q, k, v and o
    columns no lane shares with another group. A lane crossing the q/k/v boundaries is a
    UserError naming the op."""
    d, dh = shape.d_model, shape.d_head
    owner = list(range(shape.heads))  # union of heads that share a lane

    def join(cols: Lane, base: int) -> None:
        first, last = (cols[0] - base) // dh, (cols[1] - 1 - base) // dh
        for h in range(first + 1, last + 1):
            owner[h] = owner[first]

    for c0, c1 in shape.qkv_lanes:
        if c0 // d != (c1 - 1) // d:
            raise UserError(f"op {op}: a lane of the QKV output (columns {c0}..{c1 - 1}) "
                            f"crosses the q, k, v boundary at a multiple of d_model {d}")
        join((c0, c1), c0 // d * d)
    for lane in shape.o_lanes:
        join(lane, 0)
    for h in range(shape.heads):  # owners point back: resolve to the first head
        owner[h] = owner[owner[h]]
    groups: list[tuple[int, int]] = []
    for h in range(shape.heads):
        if groups and owner[h] == groups[-1][0]:
            groups[-1] = (groups[-1][0], groups[-1][1] + 1)
        else:
            groups.append((h, 1))
    return groups


def _lanes_within(lanes: list[Lane], c0: int, c1: int) -> list[tuple[int, Lane]]:
    """(lane index, columns) of the lanes inside columns [c0, c1)."""
    return [(j, lane) for j, lane in enumerate(lanes) if c0 <= lane[0] and lane[1] <= c1]


Section = list[tuple[int, Lane]]  # (stream, columns relative to the group) of each lane


@dataclass
class _Group:
    """One head group's column of PEs, its lanes and its local streams."""

    first_head: int
    n_heads: int
    col: int  # the kernel column
    q: Section
    k: Section
    v: Section
    o: Section  # outputs; d_out (dO) an input
    d_out: Section
    dq: Section
    dk: Section
    dv: Section
    down: list[int]  # down[c]: PE c -> PE c + 1
    up: int | None  # the last PE -> every other: the softmax statistics (None for one PE)
    d_up: int | None  # the last PE -> every other: D of each backward row


@dataclass(frozen=True)
class _Buffers:
    """SRAM word offsets of one PE of a group (the same layout on every PE)."""

    q: int  # q rows: M x W
    k: int  # own keys, scaled: B x block x W
    v: int
    dk: int
    dv: int
    stats: int  # per row and head: mu, 1 / l
    s: int  # per head: the row's scores / probabilities over own keys
    dp: int  # per head: dP, then dS
    o: int  # the row's partial o (W), then the dq partial
    d_out: int  # the dO ring: RING x W
    d: int  # D per head of the rows in the dO ring: RING x heads
    scal: int  # per head: mu_c, l_c, mu_in, mu, a, b, D
    mask: int  # [0] * block + [-inf] * (block - 1): row i of the causal mask at block - 1 - i
    discard: int
    out: int | None  # the last PE: the output rows o, M x W (for D = dO . o)


SCALARS = 8  # words per head in `scal`
# Registers (a PE's threads share them): the compute thread accumulates dot products in 0
# and softmax sums in 1, the last PE's dO receiver computes D in this one, and the compute
# thread scales its partial o element by element in MERGE_ACC as it merges.
RECEIVER_ACC = Reg(2)
MERGE_ACC = Reg(3)


def _buffers(kernel: Kernel, pe: LocalPE, shape: AttnShape, width: int, heads: int,
             last: bool) -> _Buffers:
    slots, block = shape.batch * shape.block, shape.block

    def words(count: int, what: str) -> int:
        return kernel.alloc(pe, count, f"{kernel.name}: {what}")

    return _Buffers(
        q=words(shape.rows * width, "q rows"), k=words(slots * width, "own k rows (scaled)"),
        v=words(slots * width, "own v rows"), dk=words(slots * width, "dk of own keys"),
        dv=words(slots * width, "dv of own keys"),
        stats=words(2 * heads * shape.rows, "softmax statistics"),
        s=words(heads * block, "scores, then probabilities"), dp=words(heads * block, "dP, dS"),
        o=words(width, "partial o, then dq"), d_out=words(RING * width, "dO ring"),
        d=words(RING * heads, "D of the dO ring's rows"),
        scal=words(SCALARS * heads, "scalars"), mask=words(2 * block - 1, "causal mask"),
        discard=words(1, "discarded wavelets"),
        out=words(shape.rows * width, "output rows") if last else None)


def build_attention(name: str, ops: list[str], ids: StreamIds, *, shape: AttnShape,
                    qkv: str, out: str, d_out: str, d_qkv: str, queue_depth: int) -> Kernel:
    """Causal softmax attention of the q, k, v lanes of `qkv` [M, 3d] into `out` [M, d]
    (forward, rows ascending) and the d(q, k, v) lanes of `d_qkv` from `d_out` (backward,
    rows descending); see the module docstring."""
    d, dh, G = shape.d_model, shape.d_head, shape.key_pes
    if G not in key_pe_counts(shape.seq):
        raise ValueError(f"{name}: with {G} PEs per group of a {shape.seq}-long sequence "
                         f"some PE owns no key")
    groups = head_groups(name, shape)
    kernel = Kernel(name=name, op="attention", ops=list(ops), width=len(groups), height=G,
                    shapes={qkv: (shape.rows, 3 * d), out: (shape.rows, d),
                            d_out: (shape.rows, d), d_qkv: (shape.rows, 3 * d)})
    column = [[(gi, c) for c in range(G)] for gi in range(len(groups))]
    streams = {}
    for tensor, lanes, order, sending in ((qkv, shape.qkv_lanes, "ascending", False),
                                          (d_qkv, shape.qkv_lanes, "descending", True),
                                          (out, shape.o_lanes, "ascending", True),
                                          (d_out, shape.o_lanes, "descending", False)):
        owners = [next(gi for gi, (h0, nh) in enumerate(groups)
                       if h0 * dh <= lane[0] % d < (h0 + nh) * dh) for lane in lanes]
        if sending:
            ids_ = kernel.lane_outputs(ids, tensor, lanes, [(gi, G - 1) for gi in owners],
                                       order)
        else:
            ids_ = kernel.lane_inputs(ids, tensor, lanes,
                                      [tuple(column[gi]) for gi in owners], order)
        streams[tensor] = ids_
    for gi, (h0, nh) in enumerate(groups):
        g0, g1 = h0 * dh, (h0 + nh) * dh

        def section(tensor: str, lanes: list[Lane], base: int, g0: int = g0,
                    g1: int = g1) -> Section:
            """The group's lanes of `tensor` in the section at `base`, columns relative
            to the group."""
            return [(streams[tensor][j], (c0 - base - g0, c1 - base - g0))
                    for j, (c0, c1) in _lanes_within(lanes, base + g0, base + g1)]

        down = [kernel.local((gi, c), ((gi, c + 1),), ids) for c in range(G - 1)]
        up, d_up = (kernel.local((gi, G - 1), tuple((gi, c) for c in range(G - 1)), ids)
                    if G > 1 else None for _ in range(2))
        group = _Group(h0, nh, gi, section(qkv, shape.qkv_lanes, 0),
                       section(qkv, shape.qkv_lanes, d), section(qkv, shape.qkv_lanes, 2 * d),
                       section(out, shape.o_lanes, 0), section(d_out, shape.o_lanes, 0),
                       section(d_qkv, shape.qkv_lanes, 0), section(d_qkv, shape.qkv_lanes, d),
                       section(d_qkv, shape.qkv_lanes, 2 * d), down, up, d_up)
        for c in range(G):
            _PE(kernel, ids, shape, group, c, queue_depth).emit()
    return kernel


class _PE:
    """The program of PE c of one group. Row operands are built for row m of a REPEAT
    whose iterations step `loop` rows (negative: descending)."""

    def __init__(self, kernel: Kernel, ids: StreamIds, shape: AttnShape, group: _Group,
                 c: int, queue_depth: int) -> None:
        self.kernel, self.ids, self.shape, self.g, self.c = kernel, ids, shape, group, c
        self.queue_depth = queue_depth
        self.pe = (group.col, c)
        self.width = group.n_heads * shape.d_head
        self.last = c == shape.key_pes - 1
        self.buf = _buffers(kernel, self.pe, shape, self.width, group.n_heads, self.last)
        self.k0, self.k1 = shape.keys(c)
        self.nk = self.k1 - self.k0
        block = shape.block
        kernel.load(self.pe, self.buf.mask,
                    np.array([0.0] * block + [-np.inf] * (block - 1), np.float32))

    def scal(self, h: int, k: int) -> int:
        return self.buf.scal + SCALARS * h + k

    def row(self, base: int, m: int, step: int, loop: int) -> Operand:
        """Element 0 of row m of a [rows, step] store at `base`, as a vector operand."""
        return Mem(base + m * step, 1, loop * step)

    def own(self, base: int, b: int) -> int:
        """Word 0 of the first own key slot of sequence b in the key store at `base`."""
        return base + b * self.shape.block * self.width

    def stat(self, m: int, h: int, k: int, loop: int) -> Operand:
        """mu (k = 0) or 1 / l (k = 1) of row m, head h, as a scalar."""
        step = 2 * self.g.n_heads
        return Mem(self.buf.stats + m * step + 2 * h + k, 0, loop * step)

    # -- receiving ------------------------------------------------------------------------------

    def receivers(self) -> tuple[Inbox, Tokens, Tokens, Inbox]:
        """Threads that receive q (every row), k and v (own keys kept, k scaled, the rest
        discarded; a token per kept row) and dO (a ring)."""
        kernel, pe, ids, shape, w = self.kernel, self.pe, self.ids, self.shape, self.width
        depth = self.queue_depth
        q = inbox(kernel, pe, ids, self.g.q, RowStore(self.buf.q, w, shape.rows),
                  queue_depth=depth)
        scale = Imm(1.0 / math.sqrt(shape.d_head))
        keys = []
        for lanes, base, factor in ((self.g.k, self.buf.k, scale), (self.g.v, self.buf.v, None)):
            ready = Tokens.create(kernel, pe, ids, depth)
            discard = [vec(Op.MOV, c1 - c0, Mem(self.buf.discard, 0), FabIn(s))
                       for s, (c0, c1) in lanes]
            instrs = []
            for b in range(shape.batch):
                keep = [(vec(Op.MUL, c1 - c0, Mem(self.own(base, b) + c0, 1, w), FabIn(s), factor)
                         if factor else
                         vec(Op.MOV, c1 - c0, Mem(self.own(base, b) + c0, 1, w), FabIn(s)))
                        for s, (c0, c1) in lanes]
                for rows, body in ((self.k0, discard), (self.nk, [*keep, ready.signal()]),
                                   (shape.seq - self.k1, discard)):
                    instrs += repeat(rows, body) if rows else []
            kernel.emit(pe, *instrs, thread=receiving_thread(kernel, pe))
            keys.append(ready)
        d_out = self.d_out_inbox(q) if self.last else inbox(
            kernel, pe, ids, self.g.d_out, RowStore(self.buf.d_out, w, shape.rows, RING),
            queue_depth=depth, after=q)
        return q, keys[0], keys[1], d_out

    def d_out_inbox(self, after: Inbox) -> Inbox:
        """The last PE's dO receiver: a ring with credits, and per row D = dO . o per head
        (the flash-attention identity D = sum_j p_j dP_j = dO . o), kept beside the row
        and sent up the column as soon as dO arrives, so no PE waits for a sum over the
        column in the middle of a row. The ring's first credits (`Inbox.open`) come after
        the forward, when every output row is stored."""
        kernel, pe, w, dh = self.kernel, self.pe, self.width, self.shape.d_head
        assert self.buf.out is not None
        ready = after.ready  # see `inbox`'s `after`
        free = Tokens.create(kernel, pe, self.ids, self.queue_depth)
        store = RowStore(self.buf.d_out, w, self.shape.rows, RING)
        nh = self.g.n_heads

        def receive(i: int, loop: int) -> PerPE:
            slot, m = store.row(i, loop).offset, self.shape.rows - 1 - i
            d = self.buf.d + (i % RING) * nh
            instrs = [free.wait(), *(vec(Op.MOV, c1 - c0, Mem(slot + c0), FabIn(s))
                                     for s, (c0, c1) in self.g.d_out)]
            for h in range(nh):
                instrs += row_reduce("dot", width=dh, dst=Mem(d + h), a=Mem(slot + h * dh),
                                     b=self.row(self.buf.out + h * dh, m, w, -loop),
                                     acc=RECEIVER_ACC)
            if self.g.d_up is not None:
                instrs.append(vec(Op.MOV, nh, FabOut(self.g.d_up), Mem(d)))
            return {pe: [*instrs, ready.signal()]}

        kernel.emit(pe, *rounds(range(self.shape.rows), RING, receive)[pe],
                    *[free.wait()] * RING, thread=receiving_thread(kernel, pe))
        return Inbox(store, ready, free)

    def emit(self) -> None:
        shape, kernel, pe = self.shape, self.kernel, self.pe
        q, k_ready, v_ready, d_out = self.receivers()
        for b in range(shape.batch):
            for region, t0, t1 in shape.regions(self.c):
                def forward(m: int, loop: int, region: str = region, b: int = b) -> PerPE:
                    return {pe: self.forward_row(m, loop, region, b, q, k_ready, v_ready)}

                kernel.emit(pe, *rounds(range(b * shape.seq + t0, b * shape.seq + t1), 1,
                                        forward)[pe])
        if self.g.up is not None and not self.last:
            # The last PE's statistics arrive while the forward runs; the backward waits for
            # the token that says they all have.
            tokens = Tokens.create(kernel, pe, self.ids, self.queue_depth)
            kernel.emit(pe, vec(Op.MOV, 2 * self.g.n_heads * shape.rows, Mem(self.buf.stats),
                                FabIn(self.g.up)), tokens.signal(),
                        thread=receiving_thread(kernel, pe))
            kernel.emit(pe, tokens.wait())
        kernel.emit(pe, *d_out.open())  # on the last PE, after every o row is stored
        for b in reversed(range(shape.batch)):
            for region, t0, t1 in reversed(shape.regions(self.c)):
                first = shape.rows - 1 - (b * shape.seq + t1 - 1)  # backward row index

                def backward(i: int, loop: int, region: str = region, b: int = b) -> PerPE:
                    return {pe: self.backward_row(i, loop, region, b, d_out)}

                kernel.emit(pe, *rounds(range(first, first + t1 - t0), RING, backward)[pe])

    # -- forward ------------------------------------------------------------------------------

    def scores(self, m: int, loop: int, h: int, b: int, diagonal: bool) -> list[Instr]:
        """The nk scores q_m . k'_j of head h into s (the diagonal block masked)."""
        dh, w = self.shape.d_head, self.width
        s = self.buf.s + h * self.shape.block
        seed = None
        if diagonal:  # the mask of row i = t - k0 starts i words before the last 0
            i = m % self.shape.seq - self.k0
            seed = [Mem(self.buf.mask + self.shape.block - 1 - i + j, 0, -loop)
                    for j in range(self.nk)]
        return dots(self.nk, dh, Walk(self.buf.q + m * w + h * dh, 1, 0, loop * w),
                    Walk(self.own(self.buf.k, b) + h * dh, 1, w), acc=0,
                    out=[Mem(s + j) for j in range(self.nk)], seed=seed)

    def weighted_keys(self, h: int, b: int, weights: int, keys: int, dst: int) -> list[Instr]:
        """dst[:dh] = sum over the own keys j of weights[j] * keys[j, head h] (one vector
        op per key)."""
        dh, w = self.shape.d_head, self.width
        first = self.own(keys, b) + h * dh
        return [vec(Op.MUL, dh, Mem(dst), Mem(first), Mem(weights, 0)),
                *(vec(Op.FMA, dh, Mem(dst), Mem(first + j * w), Mem(weights + j, 0), Mem(dst))
                  for j in range(1, self.nk))]

    def forward_row(self, m: int, loop: int, region: str, b: int, q: Inbox,
                    k_ready: Tokens, v_ready: Tokens) -> list[Instr]:
        dh = self.shape.d_head
        instrs = q.take()
        if region == "diagonal":
            instrs += [k_ready.wait(), v_ready.wait()]
        for h in range(self.g.n_heads):
            if region != "none":
                s = self.buf.s + h * self.shape.block
                instrs += self.scores(m, loop, h, b, region == "diagonal")
                instrs += partial_softmax(self.nk, s, mu=self.scal(h, 0), total=self.scal(h, 1),
                                          acc=1)
                if self.nk > 1:
                    instrs += self.weighted_keys(h, b, s, self.buf.v, self.buf.o + h * dh)
            instrs += self.combine(m, loop, h, b, region)
        return instrs

    def own_o(self, h: int, b: int) -> int:
        """Where this PE's partial o of head h is: with one key, p = exp(s - s) = 1 exactly
        and o is that key's v row (no products, no writes); else the o buffer."""
        dh = self.shape.d_head
        return self.own(self.buf.v, b) + h * dh if self.nk == 1 else self.buf.o + h * dh

    def combine(self, m: int, loop: int, h: int, b: int, region: str) -> list[Instr]:
        """Merge (mu, l, o) of head h from the PE above with this PE's own and send it on
        (in that order); the last PE keeps the merge and finishes."""
        dh = self.shape.d_head
        o = Mem(self.buf.o + h * dh)
        mu, ell = Mem(self.scal(h, 0)), Mem(self.scal(h, 1))
        down = FabOut(self.g.down[self.c]) if not self.last else None
        if self.c == 0:  # the first PE owns key 0: it always has a partial
            if down is None:
                return self.finish(m, loop, h, self.own_o(h, b))
            return [vec(Op.MOV, 1, down, mu), vec(Op.MOV, 1, down, ell),
                    vec(Op.MOV, dh, down, Mem(self.own_o(h, b)))]
        inflow = FabIn(self.g.down[self.c - 1])
        if region == "none":  # no key of its own yet: pass on (or keep) the partial above
            if down is not None:
                return [vec(Op.MOV, dh + 2, down, inflow)]
            return [vec(Op.MOV, 1, mu, inflow), vec(Op.MOV, 1, ell, inflow),
                    vec(Op.MOV, dh, o, inflow), *self.finish(m, loop, h, o.offset)]
        mu_in, new, a, bb = (Mem(self.scal(h, k)) for k in (2, 3, 4, 5))
        instrs = [
            vec(Op.MOV, 1, mu_in, inflow),
            vec(Op.MAX, 1, new, mu_in, mu),
            vec(Op.SUB, 1, a, mu_in, new), vec(Op.EXP, 1, a, a),  # e^(mu_in - mu')
            vec(Op.SUB, 1, bb, mu, new), vec(Op.EXP, 1, bb, bb),  # e^(mu_c - mu')
            vec(Op.MUL, 1, ell, ell, bb),
        ]
        a_scalar, b_scalar = Mem(self.scal(h, 4), 0), Mem(self.scal(h, 5), 0)
        own = self.own_o(h, b)
        if down is not None:
            # element by element, o_c[i] e^(mu_c - mu) into a register, then out as it
            # merges: the merged partial starts down the column a few cycles after the one
            # from above arrives, not after a whole vector op (a hop of the chain would
            # otherwise add dh cycles to the row's latency)
            scaled = [ins for i in range(dh)
                      for ins in (vec(Op.MUL, 1, MERGE_ACC, Mem(own + i, 0), b_scalar),
                                  vec(Op.FMA, 1, down, inflow, a_scalar, MERGE_ACC))]
            return instrs + [vec(Op.MOV, 1, down, new), vec(Op.FMA, 1, down, inflow, a, ell),
                             *scaled]
        instrs.append(vec(Op.MUL, dh, o, Mem(own), b_scalar))
        return instrs + [vec(Op.MOV, 1, mu, new), vec(Op.FMA, 1, ell, inflow, a, ell),
                         vec(Op.FMA, dh, o, inflow, a_scalar, o),
                         *self.finish(m, loop, h, o.offset)]

    def finish(self, m: int, loop: int, h: int, o: int) -> list[Instr]:
        """The last PE: 1 / l, o / l (the partial o of head h at word `o`) to the o lanes,
        the statistics kept and sent up."""
        dh = self.shape.d_head
        mu, rl = self.stat(m, h, 0, loop), self.stat(m, h, 1, loop)
        assert self.buf.out is not None
        out = self.row(self.buf.out, m, self.width, loop)  # kept for the backward's D
        instrs = [vec(Op.MOV, 1, mu, Mem(self.scal(h, 0))),
                  vec(Op.RECIP, 1, rl, Mem(self.scal(h, 1))),
                  vec(Op.MUL, dh, Mem(out.offset + h * dh, 1, out.loop_stride), Mem(o), rl)]
        for s, (c0, c1) in self.g.o:  # the lanes (or parts of lanes) of head h
            lo, hi = max(c0, h * dh), min(c1, (h + 1) * dh)
            if lo < hi:
                instrs.append(vec(Op.MOV, hi - lo, FabOut(s),
                                  Mem(out.offset + lo, 1, out.loop_stride)))
        if self.g.up is not None:
            instrs.append(vec(Op.MOV, 2, FabOut(self.g.up), Mem(mu.offset, 1, mu.loop_stride)))
        return instrs

    # -- backward -----------------------------------------------------------------------------

    def backward_row(self, i: int, loop: int, region: str, b: int, d_out: Inbox) -> list[Instr]:
        """Backward row index i (row m = rows - 1 - i), REPEAT iterations `loop` rows apart."""
        m = self.shape.rows - 1 - i
        step = -loop  # rows run backwards
        dh, w, nh = self.shape.d_head, self.width, self.g.n_heads
        do = d_out.store.row(i, loop).offset
        mine = region != "none"
        instrs = d_out.take()
        if self.last:  # D of the row, from the receiving thread
            d = [Mem(self.buf.d + (i % RING) * nh + h, 0) for h in range(nh)]
        else:
            instrs.append(vec(Op.MOV, nh, Mem(self.scal(0, 6), SCALARS), FabIn(self.g.d_up)))
            d = [Mem(self.scal(h, 6), 0) for h in range(nh)]
        for h in range(nh if mine else 0):
            s, dp = self.buf.s + h * self.shape.block, self.buf.dp + h * self.shape.block
            instrs += self.scores(m, step, h, b, region == "diagonal")
            instrs += [vec(Op.SUB, self.nk, Mem(s), Mem(s), self.stat(m, h, 0, step)),
                       vec(Op.EXP, self.nk, Mem(s), Mem(s)),
                       vec(Op.MUL, self.nk, Mem(s), Mem(s), self.stat(m, h, 1, step))]  # p_j
            instrs += dots(self.nk, dh, Walk(do + h * dh, 1),
                           Walk(self.own(self.buf.v, b) + h * dh, 1, w), acc=0,
                           out=[Mem(dp + j) for j in range(self.nk)])  # dP_j
            instrs += self.accumulate(h, b, self.buf.dv, Mem(do + h * dh), s)  # dv_j += p_j dO
            instrs += [vec(Op.SUB, self.nk, Mem(dp), Mem(dp), d[h]),
                       vec(Op.MUL, self.nk, Mem(dp), Mem(dp), Mem(s))]  # dS_j
            instrs += self.weighted_keys(h, b, dp, self.buf.k, self.buf.o + h * dh)  # dq
            q_row = Mem(self.buf.q + m * w + h * dh, 1, step * w)
            instrs += self.accumulate(h, b, self.buf.dk, q_row, dp)  # dk_j += dS_j q_m
        instrs += self.dq_down(mine)
        instrs += self.key_gradients(m, step, region, b)
        return instrs + d_out.release()

    def accumulate(self, h: int, b: int, grads: int, row: Operand,
                   weights: int) -> list[Instr]:
        """grads[j, head h] += weights[j] * row[:dh] for the own keys j."""
        dh, w = self.shape.d_head, self.width
        first = self.own(grads, b) + h * dh
        return [vec(Op.FMA, dh, Mem(first + j * w), row, Mem(weights + j, 0),
                    Mem(first + j * w)) for j in range(self.nk)]

    def dq_down(self, mine: bool) -> list[Instr]:
        """dq's shares summed down the column (a PE without keys passes them on); the last
        PE sends the dq lanes."""
        w = self.width
        o = Mem(self.buf.o)
        if self.shape.key_pes > 1 and self.c == 0:
            return [vec(Op.MOV, w, FabOut(self.g.down[0]), o)]
        if self.c > 0:
            inflow = FabIn(self.g.down[self.c - 1])
            if not self.last:
                return [vec(Op.ADD, w, FabOut(self.g.down[self.c]), inflow, o) if mine
                        else vec(Op.MOV, w, FabOut(self.g.down[self.c]), inflow)]
            if not mine:
                return [vec(Op.MOV, c1 - c0, FabOut(s), inflow) for s, (c0, c1) in self.g.dq]
            return [vec(Op.ADD, w, o, inflow, o),
                    *(vec(Op.MOV, c1 - c0, FabOut(s), Mem(self.buf.o + c0))
                      for s, (c0, c1) in self.g.dq)]
        return [vec(Op.MOV, c1 - c0, FabOut(s), Mem(self.buf.o + c0)) for s, (c0, c1) in self.g.dq]

    def key_gradients(self, m: int, step: int, region: str, b: int) -> list[Instr]:
        """Key t's dk (scaled) and dv are complete once query row t has passed: its owner
        sends them down the column, PEs below it pass them on, the last PE sends the dk, dv
        lanes."""
        if region == "full":  # the key's owner is further down the column
            return []
        w = self.width
        if region == "none":
            inflow = FabIn(self.g.down[self.c - 1])
            if not self.last:
                return [vec(Op.MOV, 2 * w, FabOut(self.g.down[self.c]), inflow)]
            return [*(vec(Op.MOV, c1 - c0, FabOut(s), inflow) for s, (c0, c1) in self.g.dk),
                    *(vec(Op.MOV, c1 - c0, FabOut(s), inflow) for s, (c0, c1) in self.g.dv)]
        scale = Imm(1.0 / math.sqrt(self.shape.d_head))
        j = m % self.shape.seq - self.k0
        dk, dv = self.own(self.buf.dk, b) + j * w, self.own(self.buf.dv, b) + j * w
        if self.last:
            return [*(vec(Op.MUL, c1 - c0, FabOut(s), Mem(dk + c0, 1, step * w), scale)
                      for s, (c0, c1) in self.g.dk),
                    *(vec(Op.MOV, c1 - c0, FabOut(s), Mem(dv + c0, 1, step * w))
                      for s, (c0, c1) in self.g.dv)]
        down = FabOut(self.g.down[self.c])
        return [vec(Op.MUL, w, down, Mem(dk, 1, step * w), scale),
                vec(Op.MOV, w, down, Mem(dv, 1, step * w))]


# -- cost -------------------------------------------------------------------------------------


def row_cycles(shape: AttnShape, heads: int, c: int, region: str) -> tuple[int, int]:
    """(forward, backward) busy cycles of PE c's compute thread for one row of `region`
    in a group of `heads` heads (the docstring's per-row costs; stalls left out)."""
    dh, G, w = shape.d_head, shape.key_pes, heads * shape.d_head
    k0, k1 = shape.keys(c)
    nk, last, up, mine = k1 - k0, c == G - 1, G > 1, region != "none"
    diagonal = int(region == "diagonal")
    finish = 2 + 2 * dh + (2 if up else 0)
    # tokens of q (and k, v, whose scaling by 1 / sqrt(dh) on the receiving thread takes
    # the PE's fp32 unit); dO's token and credit; D from the last PE, or on the last PE
    # computed by the receiving thread
    forward = 1 + 2 * diagonal + diagonal * w
    backward = 2 + (heads * (dh + 2) if last else heads)
    for _ in range(heads):
        if mine:
            forward += (nk * dh + diagonal * nk + 4 * nk + 4  # scores, softmax
                        + (nk * dh + nk - 1 if nk > 1 else 0))  # o (one key's: its v row)
            backward += (nk * dh + diagonal * nk + 3 * nk + nk * dh  # p, dP
                         + nk * (dh + 1) + 2 * nk + nk * dh + nk - 1 + nk * (dh + 1))
        if c == 0:
            forward += finish if last else dh + 2
        elif not mine:
            forward += dh + 2 + (finish if last else 0)
        else:
            forward += 7 + dh + 2 + dh + (finish if last else 0)
    backward += w + (w if last and c > 0 and mine else 0)  # dq down / out
    if region == "diagonal" or (region == "none" and c > 0):
        backward += 2 * w  # key t's dk, dv
    return forward, backward


def pe_cycles(shape: AttnShape, heads: int, c: int) -> int:
    """Busy cycles of PE c of a group of `heads` heads over the whole step."""
    per_sequence = sum((t1 - t0) * sum(row_cycles(shape, heads, c, region))
                       for region, t0, t1 in shape.regions(c))
    return shape.batch * per_sequence


def _region_at(shape: AttnShape, c: int, t: int) -> str:
    return next(name for name, t0, t1 in shape.regions(c) if t0 <= t < t1)


def cycles(shape: AttnShape, op: str = "attention") -> int:
    """Cycles of a lone kernel fed at full rate: the chains down each column keep its PEs
    in step row by row (a PE runs ahead of the next by a few FIFO slots), so each row
    takes its slowest PE's time, forward and backward."""
    total = 0
    for t in range(shape.seq):
        rows = [row_cycles(shape, heads, c, _region_at(shape, c, t))
                for _, heads in head_groups(op, shape) for c in range(shape.key_pes)]
        total += max(f for f, _ in rows) + max(b for _, b in rows)
    return shape.batch * total


def slowest_row(shape: AttnShape, op: str = "attention") -> tuple[int, int]:
    """(forward, backward): the most busy cycles any PE spends on one row, the pace the
    kernel can keep up."""
    rows = [row_cycles(shape, heads, c, region) for _, heads in head_groups(op, shape)
            for c in range(shape.key_pes) for region, _, _ in shape.regions(c)]
    return max(f for f, _ in rows), max(b for _, b in rows)


def sram_words(shape: AttnShape, heads: int, *, last: bool) -> int:
    """Words of a PE of a group of `heads` heads, the last PE's or another's (see
    `_buffers`)."""
    w, slots, block = heads * shape.d_head, shape.batch * shape.block, shape.block
    return (shape.rows * w + 4 * slots * w + 2 * heads * shape.rows + 2 * heads * block
            + w + RING * w + RING * heads + SCALARS * heads + 2 * block - 1 + 1
            + (shape.rows * w if last else 0))


def balanced_key_pes(op: str, shape: AttnShape, pace: tuple[int, int]) -> int:
    """The fewest PEs per head group with which no row takes longer than `pace` (forward,
    backward cycles per row, the pipeline's), or one key per PE if none does."""
    for g in key_pe_counts(shape.seq):
        forward, backward = slowest_row(AttnShape(**{**shape.__dict__, "key_pes": g}), op)
        if forward <= pace[0] and backward <= pace[1]:
            return g
    return shape.seq


def fit_key_pes(op: str, shape: AttnShape, sram_words_per_pe: int, at_least: int = 1) -> int:
    """The fewest PEs per head group (>= `at_least`, every PE owning a key) with which every
    PE fits its SRAM; a UserError naming `op` if even one key per PE does not fit."""
    groups = head_groups(op, shape)
    for g in key_pe_counts(shape.seq):
        trial = AttnShape(**{**shape.__dict__, "key_pes": g})
        if g >= at_least and all(sram_words(trial, heads, last=True) <= sram_words_per_pe
                                 for _, heads in groups):
            return g
    trial = AttnShape(**{**shape.__dict__, "key_pes": shape.seq})
    words = max(sram_words(trial, heads, last=True) for _, heads in groups)
    raise UserError(f"op {op}: PE (0, {shape.seq - 1}) needs {4 * words:,} bytes of SRAM even "
                    f"with one key per PE, has {4 * sram_words_per_pe:,}")


def _block_of(name: str) -> str:
    """`h{i}.attn` of an attention op name `h{i}.attn.<part>`."""
    return name.rsplit(".", 1)[0]


class Scores(OpFamily):
    """Starts the fused kernel of scores, mask, softmax and values."""

    kinds = ("attn_scores",)

    def forward(self, op: OpSpec, t: Tensors) -> None:
        q, k = op.inputs
        a = op.attrs
        t[op.outputs[0]] = attn_scores_forward(t[q], t[k], a["batch"], a["heads"], a["scale"])

    def backward(self, op: OpSpec, t: Tensors) -> None:
        ds, q, k = op.inputs
        dq, dk = op.outputs
        a = op.attrs
        t[dq], t[dk] = attn_scores_backward(t[ds], t[q], t[k], a["batch"], a["heads"],
                                            a["scale"])

    def pes(self, ctx: LoweringContext, op: OpSpec) -> int:
        shape = self._shape(ctx, op)
        return len(head_groups(op.name, shape)) * shape.key_pes

    def _shape(self, ctx: LoweringContext, op: OpSpec) -> AttnShape:
        block = _block_of(op.name)
        out = ctx.graph.ops[f"{block}.values"].outputs[0]
        return ctx.attention_shape(op, f"{block}.qkv.out", out)

    def lower(self, ctx: LoweringContext, op: OpSpec) -> Kernel:
        block = _block_of(op.name)
        parts = [op.name, f"{block}.mask", f"{block}.softmax", f"{block}.values"]
        values = ctx.graph.ops[f"{block}.values"]
        qkv, d_qkv = f"{block}.qkv.out", grad_name(f"{block}.qkv.out")
        return build_attention(
            block, parts + [f"{p}.bwd" for p in parts], ctx.ids, shape=self._shape(ctx, op),
            qkv=qkv, out=values.outputs[0], d_out=ctx.dy(values.name), d_qkv=d_qkv,
            queue_depth=ctx.wafer.queue_depth)


class CausalMask(OpFamily):
    """Never computed: the attention kernel skips the masked keys."""

    kinds = ("causal_mask",)

    def forward(self, op: OpSpec, t: Tensors) -> None:
        t[op.outputs[0]] = causal_mask_forward(t[op.inputs[0]], op.attrs["batch"],
                                               op.attrs["heads"])

    def backward(self, op: OpSpec, t: Tensors) -> None:
        t[op.outputs[0]] = causal_mask_backward(t[op.inputs[0]], op.attrs["batch"],
                                                op.attrs["heads"])


class Values(OpFamily):
    """Lives in the attention kernel that the scores op starts."""

    kinds = ("attn_values",)

    def forward(self, op: OpSpec, t: Tensors) -> None:
        p, v = op.inputs
        t[op.outputs[0]] = attn_values_forward(t[p], t[v], op.attrs["batch"], op.attrs["heads"])

    def backward(self, op: OpSpec, t: Tensors) -> None:
        dout, p, v = op.inputs
        dp, dv = op.outputs
        t[dp], t[dv] = attn_values_backward(t[dout], t[p], t[v], op.attrs["batch"],
                                            op.attrs["heads"])


FAMILIES = (Scores(), CausalMask(), Values())
