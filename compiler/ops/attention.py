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
PE c owns the keys at positions t = c, c + G, c + 2G, ... of every sequence (round-robin,
so the causal triangle's work spreads evenly). Every PE of the column receives every q,
k and v row of its group (multicast lanes) and keeps the q rows (the backward needs them)
and its own keys' k (scaled by 1/sqrt(dh) as it arrives) and v rows.

Forward, rows ascending, per row m at position t and per head: PE c takes its own keys
j <= t (n of them): scores s_j = q_m . k_j (n dot products of dh), its local max mu_c,
p_j = exp(s_j - mu_c), l_c = sum p_j and o_c = sum p_j v_j (dh dots of n terms): a
partial softmax. The partials combine along the column c = 0 -> G-1 as flash attention's
do: mu = max(mu_in, mu_c), l = l_in e^(mu_in - mu) + l_c e^(mu_c - mu), o likewise; a PE
with no key <= t passes its input on. The last PE divides o by l and sends the o lanes,
and multicasts (mu, 1 / l) of every row back up the column, where a second thread stores
them for the backward (so no PE waits for them in the forward).
Backward, rows descending (compiler.lowering.kernel), per row m: every PE receives dO_m,
recomputes p_j = exp(q_m . k_j - mu) / l for its keys, dP_j = dO_m . v_j, and its share of
D = sum_j p_j dP_j (= dO_m . o_m); the shares are summed down the column and the total
multicast back (while the PE adds dv_j += p_j dO_m, which does not need D); then dS_j =
p_j (dP_j - D), its share of dq_m = sum_j dS_j k'_j (k' the scaled keys: no multiply on
the way out) is summed down the column, and dk_j += dS_j q_m. Walking the rows backwards
completes key t's dk and dv when row t passes (every query i >= t has been seen): its
owner sends them down the column, scaled by 1/sqrt(dh), and the last PE sends the dq, dk,
dv lanes of row m.

Deadlock (compiler.lowering.kernel): the kernel is row-causal; within a column every
stream flows one way (down the chain, or from the last PE up to the others' second thread
and, in the backward, for D, which every PE reads after sending its share of it), and each
PE reads its streams in the same order per row.

Cost per PE and row (`cycles`, `sram_words` below), per head with n own keys <= t:
forward 3 W (receive q, k, v rows, W = the group's columns) + n dh (scores) + 4 n + 6
(softmax partial) + n dh (o) + 2 dh + 10 (combine; dh + 2 to pass on); backward W
(receive dO) + 2 n dh + 3 n (recompute p) + n dh (dP) + n (D) + n (dh + 1) (dv) + 2 n
(dS) + n dh (dq) + n (dh + 1) (dk) + W (dq down the column) + 2 W (key t's dk, dv, on the
PEs from its owner to the last). With G PEs per group n ~ (t + 1) / G.
SRAM per PE: M W (q rows) + 4 (B ceil(T / G)) W (own k, v and their gradients) + 2 M
(row statistics per head) + a few rows of scratch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from compiler.graph import GraphBuilder, OpSpec, grad_name
from compiler.lowering.dots import Walk, dots
from compiler.lowering.kernel import Kernel, LocalPE, StreamIds, Tokens
from compiler.ops.base import OpFamily, Tensors
from compiler.ops.softmax import partial_softmax
from wse_sim.errors import UserError
from wse_sim.program import FabIn, FabOut, Imm, Instr, Mem, Op, Reg, vec

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
    key_pes: int  # G: PEs per head group, each owning every G-th key

    @property
    def rows(self) -> int:
        return self.batch * self.seq

    @property
    def d_model(self) -> int:
        return self.heads * self.d_head

    def own_keys(self, c: int) -> int:
        """Key positions of one sequence that PE c owns (t = c, c + G, ...)."""
        return len(range(c, self.seq, self.key_pes))

    def keys_upto(self, c: int, t: int) -> int:
        """PE c's keys at positions <= t."""
        return len(range(c, t + 1, self.key_pes))


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


@dataclass
class _Group:
    """One head group's column of PEs, its lanes and its local streams."""

    first_head: int
    n_heads: int
    col: int  # the kernel column
    q: list[tuple[int, Lane]]  # (stream, columns relative to the group) of its q lanes
    k: list[tuple[int, Lane]]
    v: list[tuple[int, Lane]]
    o: list[tuple[int, Lane]]  # o lanes (outputs), dO lanes (inputs) below
    d_out: list[tuple[int, Lane]]
    dq: list[tuple[int, Lane]]
    dk: list[tuple[int, Lane]]
    dv: list[tuple[int, Lane]]
    down: list[int]  # down[c]: PE c -> PE c + 1
    up: int | None  # the last PE -> every other (None for one PE)


@dataclass(frozen=True)
class _Buffers:
    """SRAM word offsets of one PE of a group (the same layout on every PE)."""

    q: int  # q rows: M x W
    k: int  # own keys, scaled: slots x W
    v: int
    dk: int
    dv: int
    stats: int  # per row and head: mu, 1 / l
    s: int  # per head: the row's scores / probabilities over own keys
    dp: int  # per head: dP, then dS
    o: int  # the row's partial o (W), then o or dq partial
    d_out: int  # the row's dO (W)
    scal: int  # per head: mu_c, l_c, mu, a, b, 1 / l; then D share and D
    discard: int


SCALARS = 8  # words per head in `scal`


def _buffers(kernel: Kernel, pe: LocalPE, shape: AttnShape, width: int, heads: int,
             c: int) -> _Buffers:
    slots = shape.batch * shape.own_keys(c)
    n_max = shape.own_keys(0)

    def words(count: int, what: str) -> int:
        return kernel.alloc(pe, count, f"{kernel.name}: {what}")

    return _Buffers(
        q=words(shape.rows * width, "q rows"), k=words(slots * width, "own k rows (scaled)"),
        v=words(slots * width, "own v rows"), dk=words(slots * width, "dk of own keys"),
        dv=words(slots * width, "dv of own keys"),
        stats=words(2 * heads * shape.rows, "softmax statistics"),
        s=words(heads * n_max, "scores, then probabilities"), dp=words(heads * n_max, "dP, dS"),
        o=words(width, "partial o, then dq"), d_out=words(width, "dO row"),
        scal=words(SCALARS * heads, "scalars"), discard=words(1, "discarded wavelets"))


def build_attention(name: str, ops: list[str], ids: StreamIds, *, shape: AttnShape,
                    qkv: str, out: str, d_out: str, d_qkv: str, queue_depth: int) -> Kernel:
    """Causal softmax attention of the q, k, v lanes of `qkv` [M, 3d] into `out` [M, d]
    (forward, rows ascending) and the d(q, k, v) lanes of `d_qkv` from `d_out` (backward,
    rows descending); see the module docstring."""
    d, dh, G = shape.d_model, shape.d_head, shape.key_pes
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
                    g1: int = g1) -> list[tuple[int, Lane]]:
            """The group's lanes of `tensor` in the section at `base`, columns relative
            to the group."""
            return [(streams[tensor][j], (c0 - base - g0, c1 - base - g0))
                    for j, (c0, c1) in _lanes_within(lanes, base + g0, base + g1)]

        down = [kernel.local((gi, c), ((gi, c + 1),), ids) for c in range(G - 1)]
        up = kernel.local((gi, G - 1), tuple((gi, c) for c in range(G - 1)), ids) if G > 1 \
            else None
        group = _Group(h0, nh, gi, section(qkv, shape.qkv_lanes, 0),
                       section(qkv, shape.qkv_lanes, d), section(qkv, shape.qkv_lanes, 2 * d),
                       section(out, shape.o_lanes, 0), section(d_out, shape.o_lanes, 0),
                       section(d_qkv, shape.qkv_lanes, 0), section(d_qkv, shape.qkv_lanes, d),
                       section(d_qkv, shape.qkv_lanes, 2 * d), down, up)
        for c in range(G):
            _emit_pe(kernel, ids, shape, group, c, queue_depth)
    return kernel


class _PE:
    """Instruction builders of PE c of one group."""

    def __init__(self, kernel: Kernel, shape: AttnShape, group: _Group, c: int,
                 buf: _Buffers) -> None:
        self.kernel, self.shape, self.g, self.c, self.buf = kernel, shape, group, c, buf
        self.width = group.n_heads * shape.d_head
        self.last = c == shape.key_pes - 1
        self.pe = (group.col, c)

    def slot(self, b: int, t: int) -> int:
        """The own-key slot of position t (owned by this PE) in sequence b."""
        return b * self.shape.own_keys(self.c) + (t - self.c) // self.shape.key_pes

    def scal(self, h: int, k: int) -> int:
        return self.buf.scal + SCALARS * h + k

    def row_buffers(self, h: int) -> tuple[int, int]:
        """Head h's scores / probabilities and dP / dS of the current row."""
        n_max = self.shape.own_keys(0)
        return self.buf.s + h * n_max, self.buf.dp + h * n_max

    def stat(self, m: int, h: int, k: int) -> int:
        """mu (k = 0) or 1 / l (k = 1) of row m, head h."""
        return self.buf.stats + 2 * (m * self.g.n_heads + h) + k

    # -- forward ------------------------------------------------------------------------------

    def receive(self, m: int) -> list[Instr]:
        """q_m kept, k_m and v_m kept (k scaled) if this PE owns key t, else discarded."""
        b, t = divmod(m, self.shape.seq)
        mine = t % self.shape.key_pes == self.c
        scale = Imm(1.0 / math.sqrt(self.shape.d_head))
        instrs = [vec(Op.MOV, c1 - c0, Mem(self.buf.q + m * self.width + c0), FabIn(s))
                  for s, (c0, c1) in self.g.q]
        for lanes, base, factor in ((self.g.k, self.buf.k, scale), (self.g.v, self.buf.v, None)):
            for s, (c0, c1) in lanes:
                if not mine:
                    instrs.append(vec(Op.MOV, c1 - c0, Mem(self.buf.discard, 0), FabIn(s)))
                    continue
                dst = Mem(base + self.slot(b, t) * self.width + c0)
                instrs.append(vec(Op.MUL, c1 - c0, dst, FabIn(s), factor) if factor
                              else vec(Op.MOV, c1 - c0, dst, FabIn(s)))
        return instrs

    def scores(self, m: int, h: int, n: int, dst: int) -> list[Instr]:
        """n scores q_m . k'_j of head h into `dst`."""
        b, _ = divmod(m, self.shape.seq)
        dh, w = self.shape.d_head, self.width
        return dots(n, dh, Walk(self.buf.q + m * w + h * dh, 1),
                    Walk(self.buf.k + self.slot(b, self.c) * w + h * dh, 1, w), acc=0,
                    out=[Mem(dst + i) for i in range(n)])

    def weighted_rows(self, m: int, h: int, n: int, weights: int, rows: int,
                      dst: int) -> list[Instr]:
        """dst[:dh] = sum over the n own keys j of weights[j] * rows[j, head h]."""
        b, _ = divmod(m, self.shape.seq)
        dh, w = self.shape.d_head, self.width
        return dots(dh, n, Walk(weights, 1), Walk(rows + self.slot(b, self.c) * w + h * dh,
                                                  w, 1),
                    acc=0, out=[Mem(dst + i) for i in range(dh)])

    def forward_row(self, m: int) -> list[Instr]:
        t = m % self.shape.seq
        dh = self.shape.d_head
        instrs = self.receive(m)
        for h in range(self.g.n_heads):
            n = self.shape.keys_upto(self.c, t)
            s, o = self.row_buffers(h)[0], self.buf.o + h * dh
            mu, ell = self.scal(h, 0), self.scal(h, 1)
            if n:
                instrs += self.scores(m, h, n, s)
                instrs += partial_softmax(n, s, mu=mu, total=ell, acc=1)
                instrs += self.weighted_rows(m, h, n, s, self.buf.v, o)
            instrs += self.combine(m, h, n)
        return instrs

    def combine(self, m: int, h: int, n: int) -> list[Instr]:
        """Merge (mu, l, o) of head h from the PE above with this PE's own and send it on
        (in that order); the last PE keeps the merge and finishes."""
        dh = self.shape.d_head
        o = Mem(self.buf.o + h * dh)
        mu, ell = Mem(self.scal(h, 0)), Mem(self.scal(h, 1))
        down = FabOut(self.g.down[self.c]) if not self.last else None
        if self.c == 0:  # the first PE always owns key 0 of the row
            if down is None:
                return self.finish(m, h)
            return [vec(Op.MOV, 1, down, mu), vec(Op.MOV, 1, down, ell),
                    vec(Op.MOV, dh, down, o)]
        inflow = FabIn(self.g.down[self.c - 1])
        if n == 0:  # no key of its own yet: pass on (or keep) the partial from above
            if down is not None:
                return [vec(Op.MOV, dh + 2, down, inflow)]
            return [vec(Op.MOV, 1, mu, inflow), vec(Op.MOV, 1, ell, inflow),
                    vec(Op.MOV, dh, o, inflow), *self.finish(m, h)]
        mu_in, new, a, bb = (Mem(self.scal(h, k)) for k in (2, 3, 4, 5))
        instrs = [
            vec(Op.MOV, 1, mu_in, inflow),
            vec(Op.MAX, 1, new, mu_in, mu),
            vec(Op.SUB, 1, a, mu_in, new), vec(Op.EXP, 1, a, a),  # e^(mu_in - mu')
            vec(Op.SUB, 1, bb, mu, new), vec(Op.EXP, 1, bb, bb),  # e^(mu_c - mu')
            vec(Op.MUL, 1, ell, ell, bb),
            vec(Op.MUL, dh, o, o, Mem(self.scal(h, 5), 0)),
        ]
        a_scalar = Mem(self.scal(h, 4), 0)
        if down is not None:
            return instrs + [vec(Op.MOV, 1, down, new), vec(Op.FMA, 1, down, inflow, a, ell),
                             vec(Op.FMA, dh, down, inflow, a_scalar, o)]
        return instrs + [vec(Op.MOV, 1, mu, new), vec(Op.FMA, 1, ell, inflow, a, ell),
                         vec(Op.FMA, dh, o, inflow, a_scalar, o), *self.finish(m, h)]

    def finish(self, m: int, h: int) -> list[Instr]:
        """The last PE: 1 / l, o / l to the o lanes, the statistics kept and sent up."""
        dh = self.shape.d_head
        o = self.buf.o + h * dh
        mu, rl = self.stat(m, h, 0), self.stat(m, h, 1)
        instrs = [vec(Op.MOV, 1, Mem(mu), Mem(self.scal(h, 0))),
                  vec(Op.RECIP, 1, Mem(rl), Mem(self.scal(h, 1)))]
        for s, (c0, c1) in self.g.o:  # the lanes (or parts of lanes) of head h
            lo, hi = max(c0, h * dh), min(c1, (h + 1) * dh)
            if lo < hi:
                instrs.append(vec(Op.MUL, hi - lo, FabOut(s), Mem(o + lo - h * dh),
                                  Mem(rl, 0)))
        if self.g.up is not None:
            instrs.append(vec(Op.MOV, 2, FabOut(self.g.up), Mem(mu)))
        return instrs

    # -- backward -----------------------------------------------------------------------------

    def backward_row(self, m: int) -> list[Instr]:
        b, t = divmod(m, self.shape.seq)
        dh, w, nh = self.shape.d_head, self.width, self.g.n_heads
        n = self.shape.keys_upto(self.c, t)
        instrs = [vec(Op.MOV, c1 - c0, Mem(self.buf.d_out + c0), FabIn(s))
                  for s, (c0, c1) in self.g.d_out]
        for h in range(nh):
            s, dp = self.row_buffers(h)
            if not n:
                instrs.append(vec(Op.MOV, 1, Mem(self.scal(h, 6)), Imm(0.0)))  # D's share
                continue
            instrs += self.scores(m, h, n, s)
            instrs += [vec(Op.SUB, n, Mem(s), Mem(s), Mem(self.stat(m, h, 0), 0)),
                       vec(Op.EXP, n, Mem(s), Mem(s)),
                       vec(Op.MUL, n, Mem(s), Mem(s), Mem(self.stat(m, h, 1), 0))]  # p_j
            instrs += dots(n, dh, Walk(self.buf.d_out + h * dh, 1),
                           Walk(self.buf.v + self.slot(b, self.c) * w + h * dh, 1, w),
                           acc=0, out=[Mem(dp + i) for i in range(n)])  # dP_j
            instrs += [vec(Op.MOV, 1, Reg(1), Imm(0.0)),
                       vec(Op.FMA, n, Reg(1), Mem(s), Mem(dp), Reg(1)),
                       vec(Op.MOV, 1, Mem(self.scal(h, 6)), Reg(1))]  # D's share
        instrs += self.sum_down(nh)
        for h in range(nh):  # dv does not need D: it hides the sum's round trip
            s, _ = self.row_buffers(h)
            instrs += self.accumulate(b, h, n, self.buf.dv, self.buf.d_out + h * dh, s)
        if self.g.up is not None:
            target = Mem(self.scal(0, 6), SCALARS)
            instrs.append(vec(Op.MOV, nh, target, FabIn(self.g.up)) if not self.last
                          else vec(Op.MOV, nh, FabOut(self.g.up), target))
        for h in range(nh):
            s, dp = self.row_buffers(h)
            dq = self.buf.o + h * dh
            if not n:
                instrs.append(vec(Op.MOV, dh, Mem(dq), Imm(0.0)))
                continue
            instrs += [vec(Op.SUB, n, Mem(dp), Mem(dp), Mem(self.scal(h, 6), 0)),
                       vec(Op.MUL, n, Mem(dp), Mem(dp), Mem(s))]  # dS_j
            instrs += self.weighted_rows(m, h, n, dp, self.buf.k, dq)
            instrs += self.accumulate(b, h, n, self.buf.dk, self.buf.q + m * w + h * dh, dp)
        instrs += self.dq_down()
        instrs += self.key_gradients(b, t)
        return instrs

    def accumulate(self, b: int, h: int, n: int, grads: int, row: int,
                   weights: int) -> list[Instr]:
        """grads[j, head h] += weights[j] * row[:dh] for the n own keys j."""
        dh, w = self.shape.d_head, self.width
        first = grads + self.slot(b, self.c) * w + h * dh
        return [vec(Op.FMA, dh, Mem(first + i * w), Mem(row), Mem(weights + i, 0),
                    Mem(first + i * w)) for i in range(n)]

    def sum_down(self, heads: int) -> list[Instr]:
        """Every head's share of D summed down the column into the last PE's (in place)."""
        if self.shape.key_pes == 1:
            return []
        shares = Mem(self.scal(0, 6), SCALARS)
        if self.c == 0:
            return [vec(Op.MOV, heads, FabOut(self.g.down[0]), shares)]
        target = shares if self.last else FabOut(self.g.down[self.c])
        return [vec(Op.ADD, heads, target, FabIn(self.g.down[self.c - 1]), shares)]

    def dq_down(self) -> list[Instr]:
        """dq's shares summed down the column; the last PE sends the dq lanes."""
        w = self.width
        o = Mem(self.buf.o)
        if self.shape.key_pes > 1 and self.c == 0:
            return [vec(Op.MOV, w, FabOut(self.g.down[0]), o)]
        instrs = []
        if self.c > 0:
            inflow = FabIn(self.g.down[self.c - 1])
            if not self.last:
                return [vec(Op.ADD, w, FabOut(self.g.down[self.c]), inflow, o)]
            instrs.append(vec(Op.ADD, w, o, inflow, o))
        return instrs + [vec(Op.MOV, c1 - c0, FabOut(s), Mem(self.buf.o + c0))
                         for s, (c0, c1) in self.g.dq]

    def key_gradients(self, b: int, t: int) -> list[Instr]:
        """Key t's dk (scaled) and dv, complete now: its owner sends them down the column
        and clears them; PEs below pass them on; the last PE sends the dk, dv lanes."""
        owner = t % self.shape.key_pes
        if self.c < owner:
            return []
        w = self.width
        scale = Imm(1.0 / math.sqrt(self.shape.d_head))
        if self.c > owner:
            inflow = FabIn(self.g.down[self.c - 1])
            if not self.last:
                return [vec(Op.MOV, 2 * w, FabOut(self.g.down[self.c]), inflow)]
            return [*(vec(Op.MOV, c1 - c0, FabOut(s), inflow) for s, (c0, c1) in self.g.dk),
                    *(vec(Op.MOV, c1 - c0, FabOut(s), inflow) for s, (c0, c1) in self.g.dv)]
        slot = self.slot(b, t) * w
        dk, dv = self.buf.dk + slot, self.buf.dv + slot
        if self.last:
            sends = [*(vec(Op.MUL, c1 - c0, FabOut(s), Mem(dk + c0), scale)
                       for s, (c0, c1) in self.g.dk),
                     *(vec(Op.MOV, c1 - c0, FabOut(s), Mem(dv + c0)) for s, (c0, c1) in self.g.dv)]
        else:
            down = FabOut(self.g.down[self.c])
            sends = [vec(Op.MUL, w, down, Mem(dk), scale), vec(Op.MOV, w, down, Mem(dv))]
        # cleared for the next wave of rows through the same slots
        return sends + [vec(Op.MOV, w, Mem(dk), Imm(0.0)), vec(Op.MOV, w, Mem(dv), Imm(0.0))]


def _emit_pe(kernel: Kernel, ids: StreamIds, shape: AttnShape, group: _Group, c: int,
             queue_depth: int) -> None:
    width = group.n_heads * shape.d_head
    pe = (group.col, c)
    buf = _buffers(kernel, pe, shape, width, group.n_heads, c)
    unit = _PE(kernel, shape, group, c, buf)
    for m in range(shape.rows):
        kernel.emit(pe, *unit.forward_row(m))
    if group.up is not None and not unit.last:
        # The last PE's statistics arrive while the forward runs; the backward waits for
        # the token that says they all have.
        tokens = Tokens.create(kernel, pe, ids, queue_depth)
        kernel.emit(pe, vec(Op.MOV, 2 * group.n_heads * shape.rows, Mem(buf.stats),
                            FabIn(group.up)), tokens.signal(), thread=1)
        kernel.emit(pe, tokens.wait())
    for m in reversed(range(shape.rows)):
        kernel.emit(pe, *unit.backward_row(m))


# -- cost -------------------------------------------------------------------------------------


def _finish_cycles(shape: AttnShape, up: bool) -> int:
    """The last PE's per-head finish: 1 / l, o / l out, the statistics kept and sent up."""
    return 2 + shape.d_head + (2 if up else 0)


def pe_cycles(shape: AttnShape, heads: int, c: int) -> int:
    """Busy cycles of PE c of a group of `heads` heads (the docstring's per-row costs,
    summed over the rows; stalls and the fill are left out)."""
    dh, G, w = shape.d_head, shape.key_pes, heads * shape.d_head
    last, up = c == G - 1, G > 1
    total = 0
    for m in range(shape.rows):
        t = m % shape.seq
        n = shape.keys_upto(c, t)
        forward = 3 * w
        backward = w + (heads if up else 0)  # dO; D's share down the column (or its sum)
        for _ in range(heads):
            if n:
                forward += n * dh + 4 * n + 4 + dh * n  # scores, partial softmax, o
            if c == 0:
                forward += _finish_cycles(shape, up) if last else dh + 2
            elif n == 0:
                forward += dh + 2 + (_finish_cycles(shape, up) if last else 0)
            else:
                forward += 7 + dh + 2 + dh + (_finish_cycles(shape, up) if last else 0)
            if n:
                backward += (n * dh + 3 * n + n * dh + 3 + n  # recompute p, dP, D's share
                             + n * (dh + 1) + 2 * n + dh * n + n * (dh + 1))  # dv, dS, dq, dk
            else:
                backward += 1 + dh
        backward += w if (c > 0 or G == 1) else w  # dq's share down the column / out
        if up:
            backward += heads  # D up the column
        owner = t % G
        if c == owner:
            backward += 4 * w  # dk, dv sent and cleared
        elif c > owner:
            backward += 2 * w
        total += forward + backward
    return total


def cycles(shape: AttnShape, op: str = "attention") -> int:
    """Busy cycles of the busiest PE of the kernel."""
    return max(pe_cycles(shape, heads, c) for _, heads in head_groups(op, shape)
               for c in range(shape.key_pes))


def sram_words(shape: AttnShape, heads: int, c: int) -> int:
    """Words of PE c of a group of `heads` heads (see `_buffers`)."""
    w, slots = heads * shape.d_head, shape.batch * shape.own_keys(c)
    return (shape.rows * w + 4 * slots * w + 2 * heads * shape.rows
            + 2 * heads * shape.own_keys(0) + 2 * w + SCALARS * heads + 1)


def fit_key_pes(op: str, shape: AttnShape, sram_words_per_pe: int, at_least: int = 1) -> int:
    """The fewest PEs per head group (>= `at_least`) with which every PE fits its SRAM; a
    UserError naming `op` if even one key per PE does not fit."""
    groups = head_groups(op, shape)
    for g in range(max(1, at_least), shape.seq + 1):
        trial = AttnShape(**{**shape.__dict__, "key_pes": g})
        if all(sram_words(trial, heads, 0) <= sram_words_per_pe for _, heads in groups):
            return g
    trial = AttnShape(**{**shape.__dict__, "key_pes": shape.seq})
    words = max(sram_words(trial, heads, 0) for _, heads in groups)
    raise UserError(f"op {op}: PE (0, 0) needs {4 * words:,} bytes of SRAM even with one key "
                    f"per PE, has {4 * sram_words_per_pe:,}")


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

    def lower(self, ctx: LoweringContext, op: OpSpec) -> Kernel:
        block = _block_of(op.name)
        parts = [op.name, f"{block}.mask", f"{block}.softmax", f"{block}.values"]
        values = ctx.graph.ops[f"{block}.values"]
        qkv, d_qkv = f"{block}.qkv.out", grad_name(f"{block}.qkv.out")
        out = values.outputs[0]
        return build_attention(
            block, parts + [f"{p}.bwd" for p in parts], ctx.ids,
            shape=ctx.attention_shape(op, qkv, out), qkv=qkv, out=out,
            d_out=ctx.dy(values.name), d_qkv=d_qkv, queue_depth=ctx.wafer.queue_depth)


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
