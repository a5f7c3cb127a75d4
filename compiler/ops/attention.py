"""Attention: causal scores `S = q k^T / sqrt(dh)` and values `o = P v`, with their
backward passes, on a key-block x query-group grid of PEs per head.

Graph: three op kinds over all heads at once (attributes heads, d_head, batch, seq_len):
`attn_scores` (q, k -> S [M, H*T], scale 1/sqrt(dh); FLOPs 2 M H T dh for the product over
the full T x T plus M H T for the scaling, backward twice the product plus the scaling),
`causal_mask` (S -> S with -inf where key > query; no FLOPs) and `attn_values` (P, v -> o
[M, d]; 2 M H T dh, backward twice). Head j owns columns [j dh, (j+1) dh) of q, k, v and o,
and columns [j T, (j+1) T) of S and P (see `split_heads`). The softmax between them is
`compiler.ops.softmax`.

Layout. Both kernels use the same rectangle: `T/lw` columns (key blocks, `lw` keys each:
exactly the columns of one scores lane) by `H * R` rows (head `h` owns rows
`h*R .. h*R + R-1`; `R = row_groups`). PE `(c, h*R + r)` handles key block `c` of head
`h` for the query rows `m` with `m % R == r` (round-robin, so the causal triangle's work is
spread evenly over the groups). It stores the k (or v) rows of its key block for every
batch element and only its own query rows of q, dS, P, dO. With `R = 1` this is the
(T/lw) x H layout of one PE per (key block, head); a larger `R` divides the per-PE work
(the arithmetic is `O(M T dh)` per head and would otherwise sit on T/lw PEs) for the price
of relaying rows, which costs fabric bandwidth that is otherwise idle.

Choosing R is the caller's (the builders default to 1): `fit_row_groups` gives the
smallest R with which every PE fits its SRAM (R = 1 for gpt_small; a T = 2048 model needs
tens), and the cost notes below say how far a larger R still pays.

Only `lw == dh` is supported: then q, k and v of head `h` are the single lanes `h`,
`H + h`, `2H + h` of the qkv tensor and one lane carries a whole head (the default lane
width is `d_head`).

Every arithmetic step is one primitive, `_dots`: a batch of dot products, each one output
element accumulated in register 0 over `terms` products (a 1-element MUL or FMA seeding
it — the FMA adds an incoming fabric wavelet, which is how partial sums are chained — an
FMA over the middle terms, and a 1-element FMA writing the result), in a zero-overhead
REPEAT over the outputs. Each term is one cycle and both factors are strided SRAM reads
(the 2 reads/cycle budget, no scalar-load surcharge), so a batch of `n` dots of length `k`
costs `n * k + 1` cycles.

Phases (the same three shapes serve both kernels):

* block products (scores forward, dP): for each own query row, the `nk` unmasked keys of
  the block get `x_m . y_j` (nk dots of dh terms), the masked rest is a fill value
  (`-inf` for scores: the causal mask is applied here; `0` for dP). With R = 1 the rows go
  straight out; with R > 1 each PE computes its own rows into SRAM, then the column relays
  the lane south in row order (each PE forwards lower groups' rows from the north and
  injects its own) to the group-(R-1) PE, which emits it. Computing first is what lets
  the groups work in parallel: a PE that interleaved its own rows with forwarding would
  wait for every earlier row, serializing the column.
* row reduction (forward o, dq): `out_m = sum_j w[m, j] y_j` over the block's unmasked
  keys is `dh` dots of `nk` terms, the first term seeded by the partial sum from the
  west PE; a PE whose block is fully masked for row m forwards the west partial. The east
  column emits the lane (R = 1) or keeps its results and relays them south (R > 1).
* column sums (dk, dv): `out_j = sum_m w[m, j] x_m` over the own rows with `t >= j` is `dh`
  dots, seeded by the north PE's partial sum and passed south; the bottom group holds the
  total and relays its block east, batch by batch, to the PE that emits the lane.

Masked work is skipped exactly: a masked score is the constant `-inf` (its softmax weight
P is exactly 0), so no term with `j > t` contributes to o, dq, dk or dv, and the gradient
reaching a masked score is zero by definition. The dS entries above the diagonal are
ignored (they are P * (...) = 0 anyway), and dP is emitted as 0 there: the true dL/dP of
a masked entry (do . v, what a dense numpy reference reports) is never used because
softmax's backward multiplies it by P = 0.
The scale 1/sqrt(dh) is folded into k when it arrives (S = q . k', dq = dS k'), so the
only extra multiply is on dk as it leaves (dk = scale * dS^T q): no cycle is spent on it.

Deadlock (the kernel.py rule). The scores kernel reads all of q and k (one producer,
interleaved row by row) into SRAM before it emits a score: the values kernel reads all of
v, a sibling lane of the same QKV producer, before it reads P, and P depends on these
scores, so streaming scores while q/k are still arriving could stall the QKV kernel
forever. The values kernel reads v completely, then P: with R = 1 row by row, each P row
just before the row it weights (P lane c has the one reader, PE c, which reads no further
ahead than its west neighbour's partial sums, whose lane comes from the same softmax);
with R > 1 completely first, because the R PEs of a column share one multicast P lane
and a PE busy on its own row would stall the lane for the others. Backward inputs (dS,
dO) are read completely first. Inside a kernel every stream flows east or south and each
PE runs its phases in one order, so the chains cannot wait in a cycle.

Cycle cost, one element per cycle (M = B*T rows, nk = min(lw, t + 1) the unmasked keys of
block 0 for query position t; block 0 is the busiest PE column, and the kernel ends when
the east PE has relayed block 0's column sums and injected its own):

* R = 1, scores: `2 M dh` (q, k) + `M lw` (dS) + sum over rows of
  `[nk > 1] + nk dh + (lw - nk)` (S row: REPEAT, dots, -inf fill) and `[dh > 1] + nk dh`
  (dq row) + sum over keys j < lw, per batch element, of `1 + (T - j) dh` (dk) +
  `(B + 1) lw dh` (dk relay). Dominant: `~3 B T lw dh` — each of S, dq, dk costs
  `B (T - lw/2) lw dh`.
* R = 1, values: the same with reads `2 M dh` (v, dO) and `lw` more per row (the P row
  read as the row is reduced).
* R > 1: the arithmetic terms divide by R (round-robin rows balance the triangle); the
  reads stay `2 M dh + M lw` per PE (every PE takes whole multicast lanes), and each
  relay adds up to `M lw` (S, dP) or `M dh` (dq, o) cycles at the emitting PE. So the cost
  is about `(3 B T lw dh) / R + 6 M dh` for lw = dh, and R beyond ~lw/2 buys little.
Measured (gpt_small attention, B 2, T 64, 4 heads, dh 32, run alone with run_kernel):
scores 314,830 / 108,889 / 55,880 cycles and values 316,177 / 113,056 / 57,806 cycles at
R = 1 / 4 / 16 (8, 32, 128 PEs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from compiler.graph import GraphBuilder, OpSpec, grad_name
from compiler.lowering.kernel import Kernel, LocalPE, LocalStream, StreamEnd, StreamIds
from compiler.ops.base import OpFamily, Tensors
from wse_sim.errors import UserError
from wse_sim.program import (
    BYTES_PER_WORD,
    SOURCES_OF,
    FabIn,
    FabOut,
    Imm,
    Instr,
    Kind,
    Mem,
    Op,
    Operand,
    Reg,
    repeat,
    vec,
)

if TYPE_CHECKING:
    from compiler.lower import LoweringContext

NEG_INF = float("-inf")


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


# -- kernels ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttnLayout:
    """Shapes of one attention op and the PE grid that runs it."""

    batch: int
    seq: int
    heads: int
    d_head: int
    lane_width: int
    row_groups: int = 1

    @property
    def rows(self) -> int:
        return self.batch * self.seq

    @property
    def blocks(self) -> int:
        return self.seq // self.lane_width

    @property
    def d_model(self) -> int:
        return self.heads * self.d_head

    def pe(self, c: int, h: int, r: int) -> LocalPE:
        return (c, h * self.row_groups + r)

    def own_rows(self, r: int) -> int:
        """Query rows of group r (m = r, r + R, ...)."""
        return len(range(r, self.rows, self.row_groups))

    def slot(self, m: int) -> int:
        """Where own row m sits among its group's rows."""
        return m // self.row_groups

    def keys(self, c: int, t: int) -> int:
        """Unmasked keys of block c for query position t."""
        return max(0, min(self.lane_width, t - c * self.lane_width + 1))


def attn_layout(op: str, *, batch: int, seq: int, heads: int, d_head: int, lane_width: int,
                row_groups: int = 1) -> AttnLayout:
    """Check the shapes an attention kernel supports (UserError names the op and field)."""
    if lane_width != d_head:
        raise UserError(f"op {op}: compile.lane_width {lane_width} must equal d_head {d_head} "
                        f"for attention (one lane per head)")
    if seq % lane_width:
        raise UserError(f"op {op}: compile.lane_width {lane_width} must divide seq_len {seq}")
    if min(batch, seq, heads, d_head, row_groups) < 1:
        raise UserError(f"op {op}: batch, seq_len, heads, d_head and row_groups must be >= 1")
    if row_groups > batch * seq:
        raise UserError(f"op {op}: row_groups {row_groups} exceeds the {batch * seq} query rows")
    return AttnLayout(batch, seq, heads, d_head, lane_width, row_groups)


@dataclass(frozen=True)
class _Vec:
    """A strided SRAM vector walked by `_dots`: element k of output i is at
    offset + k * stride + i * step."""

    offset: int
    stride: int
    step: int

    def term(self, k: int, stride: int = 1) -> Operand:
        return Mem(self.offset + k * self.stride, stride, self.step)


def _dots(outputs: int, terms: int, a: _Vec, b: _Vec, init: Operand | None,
          out: Operand) -> list[Instr]:
    """`outputs` dot products out[i] = (init[i] +) sum_k a[k, i] * b[k, i].

    `out` is a FabOut, or a Mem whose loop_stride is the step between outputs; `init` is
    None or a FabIn supplying one addend per output. Cost: outputs * terms (+1 for the
    REPEAT) cycles."""
    seeded = Op.FMA if init is not None else Op.MUL
    seed = () if init is None else (init,)
    if terms == 0:
        out_vec = out if out.kind is Kind.FABOUT else Mem(out.offset, out.loop_stride)
        return [vec(Op.MOV, outputs, out_vec, init if init is not None else Imm(0.0))]
    if terms == 1:
        out_vec = out if out.kind is Kind.FABOUT else Mem(out.offset, out.loop_stride)
        return [vec(seeded, outputs, out_vec, Mem(a.offset, a.step), Mem(b.offset, b.step),
                    *seed)]
    acc = Reg(0)
    body = [vec(seeded, 1, acc, a.term(0), b.term(0), *seed)]
    if terms > 2:
        body.append(vec(Op.FMA, terms - 2, acc, a.term(1, a.stride), b.term(1, b.stride), acc))
    body.append(vec(Op.FMA, 1, out, a.term(terms - 1), b.term(terms - 1), acc))
    return body if outputs == 1 else repeat(outputs, body)


def _merge(instrs: list[Instr]) -> list[Instr]:
    """Fuse neighbouring vector instructions that continue each other (same op and fabric
    or immediate operands, memory operands contiguous), e.g. the per-row reads of a lane
    into one instruction. REPEAT blocks are left untouched."""
    out: list[Instr] = []
    loop_left = 0  # instructions of the current REPEAT body still to copy
    free_last = False  # out[-1] is outside any REPEAT block
    for instr in instrs:
        if loop_left:
            loop_left -= 1
            out.append(instr)
            continue
        if instr.op is Op.REPEAT:
            loop_left = instr.body
            free_last = False
        elif free_last and _continues(out[-1], instr):
            prev = out.pop()
            instr = Instr(prev.op, n=prev.n + instr.n, dst=prev.dst, a=prev.a, b=prev.b,
                          c=prev.c)
        else:
            free_last = instr.op in SOURCES_OF
        out.append(instr)
    return out


def _continues(prev: Instr, nxt: Instr) -> bool:
    if prev.op is not nxt.op:
        return False
    for p, q in ((prev.dst, nxt.dst), (prev.a, nxt.a), (prev.b, nxt.b), (prev.c, nxt.c)):
        if p.kind is not q.kind or p.kind is Kind.REG:
            return False
        if p.kind is Kind.MEM:
            if (q.stride != p.stride or p.loop_stride or q.loop_stride
                    or q.offset != p.offset + prev.n * p.stride):
                return False
        elif p != q:
            return False
    return True


@dataclass
class _Grid:
    """A kernel under construction plus the neighbour streams of its PE grid: `east` from
    (c, h, r) to (c+1, h, r), `south` from (c, h, r) to (c, h, r+1)."""

    kernel: Kernel
    lay: AttnLayout
    ids: StreamIds
    east: dict[tuple[int, int, int], int] = field(default_factory=dict)
    south: dict[tuple[int, int, int], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lay = self.lay
        for h in range(lay.heads):
            for r in range(lay.row_groups):
                for c in range(lay.blocks):
                    for links, nbr in ((self.east, (c + 1, h, r)), (self.south, (c, h, r + 1))):
                        if nbr[0] < lay.blocks and nbr[2] < lay.row_groups:
                            links[(c, h, r)] = sid = self.ids.new()
                            self.kernel.local_streams.append(
                                LocalStream(lay.pe(c, h, r), (lay.pe(*nbr),), sid))

    def west_in(self, c: int, h: int, r: int) -> Operand | None:
        return FabIn(self.east[(c - 1, h, r)]) if c > 0 else None

    def north_in(self, c: int, h: int, r: int) -> Operand | None:
        return FabIn(self.south[(c, h, r - 1)]) if r > 0 else None

    def east_out(self, c: int, h: int, r: int, last: Operand) -> Operand:
        return FabOut(self.east[(c, h, r)]) if c < self.lay.blocks - 1 else last

    def south_out(self, c: int, h: int, r: int, last: int) -> Operand:
        """Towards the lane `last` emitted by the bottom group of the column."""
        return FabOut(self.south[(c, h, r)] if r < self.lay.row_groups - 1 else last)

    def head_pes(self, h: int) -> tuple[LocalPE, ...]:
        lay = self.lay
        return tuple(lay.pe(c, h, r) for r in range(lay.row_groups) for c in range(lay.blocks))

    def column_pes(self, c: int, h: int) -> tuple[LocalPE, ...]:
        return tuple(self.lay.pe(c, h, r) for r in range(self.lay.row_groups))

    def emit(self, pe: LocalPE, instrs: list[Instr]) -> None:
        self.kernel.emit(pe, *_merge(instrs))


@dataclass(frozen=True)
class _PE:
    """PE (c, h*R + r) of the grid."""

    c: int
    h: int
    r: int
    scratch: int  # a word that discarded wavelets are moved to


def _read_own(g: _Grid, p: _PE, stream: int, width: int, base: int) -> list[Instr]:
    """Read a whole lane; keep the own rows (row slot s at base + s * width)."""
    lay = g.lay
    return [vec(Op.MOV, width,
                Mem(base + lay.slot(m) * width) if m % lay.row_groups == p.r
                else Mem(p.scratch, 0), FabIn(stream))
            for m in range(lay.rows)]


def _read_block_row(g: _Grid, p: _PE, m: int, stream: int, block: int,
                    scale: float | None) -> Instr:
    """Receive row m of a k or v lane; keep it (times `scale`) if its key is in block c."""
    lay = g.lay
    b, t = divmod(m, lay.seq)
    dh = lay.d_head
    if t // lay.lane_width != p.c:
        return vec(Op.MOV, dh, Mem(p.scratch, 0), FabIn(stream))
    dst = Mem(block + (b * lay.lane_width + t % lay.lane_width) * dh)
    if scale is None:
        return vec(Op.MOV, dh, dst, FabIn(stream))
    return vec(Op.MUL, dh, dst, FabIn(stream), Imm(scale))


def _relay_south(g: _Grid, p: _PE, buf: int, width: int, lane: int) -> list[Instr]:
    """Send a lane down the PE column in row order: rows of lower groups forwarded from
    the north, own rows (slot s at buf + s * width) injected from SRAM."""
    lay = g.lay
    out = g.south_out(p.c, p.h, p.r, lane)
    instrs: list[Instr] = []
    for m in range(lay.rows):
        group = m % lay.row_groups
        if group < p.r:
            instrs.append(vec(Op.MOV, width, out, g.north_in(p.c, p.h, p.r)))
        elif group == p.r:
            instrs.append(vec(Op.MOV, width, out, Mem(buf + lay.slot(m) * width)))
    return instrs


def _block_products(g: _Grid, p: _PE, x_rows: int, block: int, fill: float, lane: int,
                    buf: int) -> list[Instr]:
    """Lane (h, c) of x y^T over the block's unmasked keys, `fill` where masked. With one
    group the rows go straight out; with several, own rows are computed into `buf` first
    and then relayed, so the groups compute in parallel rather than in row order."""
    lay = g.lay
    lw, dh = lay.lane_width, lay.d_head
    direct = lay.row_groups == 1
    instrs: list[Instr] = []
    for m in range(p.r, lay.rows, lay.row_groups):
        b, t = divmod(m, lay.seq)
        nk = lay.keys(p.c, t)
        row = buf + lay.slot(m) * lw
        if nk:
            instrs += _dots(nk, dh, _Vec(x_rows + lay.slot(m) * dh, 1, 0),
                            _Vec(block + b * lw * dh, 1, dh), None,
                            FabOut(lane) if direct else Mem(row, 1, 1))
        if nk < lw:
            instrs.append(vec(Op.MOV, lw - nk, FabOut(lane) if direct else Mem(row + nk),
                              Imm(fill)))
    return instrs if direct else instrs + _relay_south(g, p, buf, lw, lane)


def _row_reduce(g: _Grid, p: _PE, w_rows: int, block: int, lane: int, read: int | None,
                buf: int) -> list[Instr]:
    """Lane h of w y (w: the own rows' block weights), summed west to east over the key
    blocks. With `read`, the weights arrive on that stream: with one group each weight row
    is read just before its row is reduced (the kernel streams); with several they are
    read completely first (every PE of the column takes the whole multicast lane, so a PE
    busy on its own row would hold back the others). With one group the east PE emits
    the lane; with several it keeps its results in `buf`, then relays them south."""
    lay = g.lay
    lw, dh = lay.lane_width, lay.d_head
    direct = lay.row_groups == 1
    east = p.c == lay.blocks - 1
    west = g.west_in(p.c, p.h, p.r)
    instrs = [] if direct or read is None else _read_own(g, p, read, lw, w_rows)
    for m in range(p.r, lay.rows, lay.row_groups):
        b, t = divmod(m, lay.seq)
        if direct and read is not None:
            instrs.append(vec(Op.MOV, lw, Mem(w_rows + lay.slot(m) * lw), FabIn(read)))
        out = g.east_out(p.c, p.h, p.r,
                         FabOut(lane) if direct else Mem(buf + lay.slot(m) * dh, 1, 1))
        instrs += _dots(dh, lay.keys(p.c, t), _Vec(w_rows + lay.slot(m) * lw, 1, 0),
                        _Vec(block + b * lw * dh, dh, 1), west, out)
    if east and not direct:
        instrs += _relay_south(g, p, buf, dh, lane)
    return instrs


def _column_sums(g: _Grid, p: _PE, w_rows: int, x_rows: int, block: int, lane: int,
                 scale: float | None) -> list[Instr]:
    """Lane of w^T x for the block's keys (key j sums the own rows with t >= j), summed
    north to south over the groups into `block` of the bottom PE (replacing the k or v
    rows, no longer needed), then relayed east batch by batch (times `scale`)."""
    lay = g.lay
    lw, dh, rg = lay.lane_width, lay.d_head, lay.row_groups
    north = g.north_in(p.c, p.h, p.r)
    instrs: list[Instr] = []
    for b in range(lay.batch):
        for jj in range(lw):
            row0 = b * lay.seq + p.c * lw + jj  # first row that sees key j
            first = row0 + (p.r - row0) % rg
            count = len(range(first, (b + 1) * lay.seq, rg))
            s = lay.slot(first)
            out = (FabOut(g.south[(p.c, p.h, p.r)]) if p.r < rg - 1
                   else Mem(block + (b * lw + jj) * dh, 1, 1))
            instrs += _dots(dh, count, _Vec(w_rows + s * lw + jj, lw, 0),
                            _Vec(x_rows + s * dh, dh, 1), north, out)
        if p.r == rg - 1:
            out = g.east_out(p.c, p.h, p.r, FabOut(lane))
            if p.c:
                instrs.append(vec(Op.MOV, p.c * lw * dh, out, g.west_in(p.c, p.h, p.r)))
            mine = Mem(block + b * lw * dh)
            instrs.append(vec(Op.MOV, lw * dh, out, mine) if scale is None
                          else vec(Op.MUL, lw * dh, out, mine, Imm(scale)))
    return instrs


def _scores_buffers(lay: AttnLayout, c: int, r: int) -> dict[str, int]:
    """SRAM words of scores PE (c, h, r), by purpose."""
    own, lw, dh = lay.own_rows(r), lay.lane_width, lay.d_head
    relays_dq = lay.row_groups > 1 and c == lay.blocks - 1
    return {"q rows": own * dh, "k block (scaled), then dk": lay.batch * lw * dh,
            "own S rows, then dS rows": own * lw, "own dq rows": own * dh if relays_dq else 0}


def _values_buffers(lay: AttnLayout, r: int) -> dict[str, int]:
    """SRAM words of values PE (c, h, r), by purpose."""
    own, lw, dh = lay.own_rows(r), lay.lane_width, lay.d_head
    return {"v block, then dv": lay.batch * lw * dh, "P rows": own * lw,
            "own o rows, then dO rows": own * dh,
            "own dP rows": own * lw if lay.row_groups > 1 else 0}


def attn_sram_words(lay: AttnLayout) -> int:
    """The most SRAM words any PE of either attention kernel needs (group 0 has the most
    rows; +1 for the discard word)."""
    return 1 + max(sum(_scores_buffers(lay, lay.blocks - 1, 0).values()),
                   sum(_values_buffers(lay, 0).values()))


def fit_row_groups(op: str, lay: AttnLayout, sram_words: int, at_least: int = 1) -> int:
    """The smallest row_groups >= `at_least` with which both attention kernels of `lay`
    fit `sram_words` per PE; UserError naming `op` if none does (every PE keeps the k or v
    block of each batch element, whatever R)."""
    for groups in range(max(1, at_least), lay.rows + 1):
        if attn_sram_words(replace(lay, row_groups=groups)) <= sram_words:
            return groups
    words = attn_sram_words(replace(lay, row_groups=lay.rows))
    raise UserError(f"op {op}: PE (0, 0) needs {BYTES_PER_WORD * words} bytes of SRAM even with "
                    f"one query row per group, has {BYTES_PER_WORD * sram_words}")


def _alloc(g: _Grid, c: int, h: int, r: int, sizes: dict[str, int]) -> tuple[_PE, list[int]]:
    pe = g.lay.pe(c, h, r)
    offsets = [g.kernel.alloc(pe, words, f"{g.kernel.name}: {what}")
               for what, words in sizes.items()]
    return _PE(c, h, r, g.kernel.alloc(pe, 1, f"{g.kernel.name}: discard")), offsets


def build_attn_scores(name: str, ops: list[str], ids: StreamIds, *, batch: int, seq: int,
                      heads: int, d_head: int, lane_width: int, qkv: str, scores: str,
                      d_scores: str, d_qkv: str, row_groups: int = 1) -> Kernel:
    """Causal attention scores S = q k^T / sqrt(dh) (masked entries exactly -inf) from the
    q and k lanes of `qkv`, and the backward dq, dk lanes of `d_qkv` from `d_scores`."""
    lay = attn_layout(name, batch=batch, seq=seq, heads=heads, d_head=d_head,
                      lane_width=lane_width, row_groups=row_groups)
    M, T, H, lw, dh = lay.rows, seq, heads, lane_width, d_head
    kernel = Kernel(name=name, op="attn_scores", ops=list(ops), width=lay.blocks,
                    height=H * row_groups,
                    shapes={qkv: (M, 3 * lay.d_model), scores: (M, H * T),
                            d_scores: (M, H * T), d_qkv: (M, 3 * lay.d_model)})
    g = _Grid(kernel, lay, ids)
    scale = 1.0 / math.sqrt(dh)
    for h in range(H):
        q_in, k_in, dq_out, dk_out = (ids.new() for _ in range(4))
        kernel.inputs += [StreamEnd(qkv, h, g.head_pes(h), q_in),
                          StreamEnd(qkv, H + h, g.head_pes(h), k_in)]
        emitter = lay.pe(lay.blocks - 1, h, row_groups - 1)
        kernel.outputs += [StreamEnd(d_qkv, h, (emitter,), dq_out),
                           StreamEnd(d_qkv, H + h, (emitter,), dk_out)]
        for c in range(lay.blocks):
            lane = h * lay.blocks + c
            s_out, ds_in = ids.new(), ids.new()
            kernel.outputs.append(StreamEnd(scores, lane, (lay.pe(c, h, row_groups - 1),),
                                            s_out))
            kernel.inputs.append(StreamEnd(d_scores, lane, g.column_pes(c, h), ds_in))
            for r in range(row_groups):
                p, (q, k, ds, dq) = _alloc(g, c, h, r, _scores_buffers(lay, c, r))
                reads: list[Instr] = []
                for m in range(M):
                    keep = Mem(q + lay.slot(m) * dh) if m % row_groups == r else Mem(
                        p.scratch, 0)
                    reads += [vec(Op.MOV, dh, keep, FabIn(q_in)),
                              _read_block_row(g, p, m, k_in, k, scale)]
                g.emit(lay.pe(c, h, r), [
                    *reads,
                    *_block_products(g, p, q, k, NEG_INF, s_out, ds),
                    *_read_own(g, p, ds_in, lw, ds),
                    *_row_reduce(g, p, ds, k, dq_out, None, dq),
                    *_column_sums(g, p, ds, q, k, dk_out, scale),
                ])
    return kernel


def build_attn_values(name: str, ops: list[str], ids: StreamIds, *, batch: int, seq: int,
                      heads: int, d_head: int, lane_width: int, qkv: str, probs: str, out: str,
                      d_out: str, d_probs: str, d_qkv: str, row_groups: int = 1) -> Kernel:
    """Attention output o = P v from the v lanes of `qkv` and the `probs` lanes, and the
    backward dP lanes of `d_probs` and dv lanes of `d_qkv` from `d_out`."""
    lay = attn_layout(name, batch=batch, seq=seq, heads=heads, d_head=d_head,
                      lane_width=lane_width, row_groups=row_groups)
    M, T, H, dh = lay.rows, seq, heads, d_head
    kernel = Kernel(name=name, op="attn_values", ops=list(ops), width=lay.blocks,
                    height=H * row_groups,
                    shapes={qkv: (M, 3 * lay.d_model), probs: (M, H * T), out: (M, lay.d_model),
                            d_out: (M, lay.d_model), d_probs: (M, H * T),
                            d_qkv: (M, 3 * lay.d_model)})
    g = _Grid(kernel, lay, ids)
    for h in range(H):
        v_in, o_out, do_in, dv_out = (ids.new() for _ in range(4))
        kernel.inputs += [StreamEnd(qkv, 2 * H + h, g.head_pes(h), v_in),
                          StreamEnd(d_out, h, g.head_pes(h), do_in)]
        emitter = lay.pe(lay.blocks - 1, h, row_groups - 1)
        kernel.outputs += [StreamEnd(out, h, (emitter,), o_out),
                           StreamEnd(d_qkv, 2 * H + h, (emitter,), dv_out)]
        for c in range(lay.blocks):
            lane = h * lay.blocks + c
            p_in, dp_out = ids.new(), ids.new()
            kernel.inputs.append(StreamEnd(probs, lane, g.column_pes(c, h), p_in))
            kernel.outputs.append(StreamEnd(d_probs, lane, (lay.pe(c, h, row_groups - 1),),
                                            dp_out))
            for r in range(row_groups):
                p, (v, pr, do, dp) = _alloc(g, c, h, r, _values_buffers(lay, r))
                g.emit(lay.pe(c, h, r), [
                    *(_read_block_row(g, p, m, v_in, v, None) for m in range(M)),
                    *_row_reduce(g, p, pr, v, o_out, p_in, do),
                    *_read_own(g, p, do_in, dh, do),
                    *_block_products(g, p, do, v, 0.0, dp_out, dp),
                    *_column_sums(g, p, pr, do, v, dv_out, None),
                ])
    return kernel


# -- cost -------------------------------------------------------------------------------------


def cycles(kernel: str, batch: int, seq: int, d_head: int) -> int:
    """Cycles of a lone scores or values kernel with row_groups = 1 and lw = dh. The busiest
    PE is key block 0 (every query row has nk = min(lw, t + 1) unmasked keys there), and the
    kernel ends when the east PE has injected its own block after relaying block 0's.

    Per query row: products (S / dP) `[nk > 1] + nk dh + (lw - nk)` (a REPEAT over the nk
    dots of dh terms, then the masked fill); reduction (dq / o) `[dh > 1] + nk dh`, plus
    `lw` in the values kernel, which reads each P row just before it reduces it. Per key j
    of block 0: `1 + (T - j) dh` (column sum), then `lw dh` per batch element to inject the
    block, and one more block injected by the east PE. Bulk reads: q, k and dS rows
    (scores), v and dO rows (values)."""
    if kernel not in ("scores", "values"):
        raise ValueError(f"attention.cycles: kernel must be 'scores' or 'values', not {kernel}")
    lw, rows = d_head, batch * seq
    streams_p = kernel == "values"
    total = 2 * rows * d_head if streams_p else 3 * rows * d_head
    for t in range(seq):
        nk = min(lw, t + 1)
        products = (nk > 1) + nk * d_head + (lw - nk)
        reduction = (d_head > 1) + nk * d_head + (lw if streams_p else 0)
        total += batch * (products + reduction)
    total += batch * sum(1 + (seq - j) * d_head for j in range(lw))
    return total + batch * lw * d_head + lw * d_head


def fit_shape(ctx: LoweringContext, op: OpSpec) -> dict[str, int]:
    """Shape arguments of both attention kernels of `op`, with the fewest query-row groups
    per head that fit SRAM. More groups divide the attention products over more PE rows:
    on gpt_small 4 groups cut the step from 7.0 M to 6.2 M cycles, but added 192 PEs,
    their relay streams (colors) and half again the host time, so fewest-that-fit is the
    default."""
    attrs = op.attrs
    shape = {"batch": attrs["batch"], "seq": attrs["seq_len"], "heads": attrs["heads"],
             "d_head": attrs["d_head"], "lane_width": ctx.lane_width}
    layout = attn_layout(op.name, **shape)
    groups = fit_row_groups(op.name, layout, ctx.wafer.sram_words_per_pe)
    return {**shape, "row_groups": groups}


def _block_of(name: str) -> str:
    """`h{i}.attn` of an attention op name `h{i}.attn.<part>`."""
    return name.rsplit(".", 1)[0]


class Scores(OpFamily):
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
        (mask,) = ctx.graph.consumers(op.outputs[0])  # the causal mask, fused here
        return build_attn_scores(
            op.name, [op.name, mask, f"{mask}.bwd", f"{op.name}.bwd"], ctx.ids,
            **fit_shape(ctx, op), qkv=f"{block}.qkv.out",
            scores=ctx.graph.ops[mask].outputs[0], d_scores=ctx.dy(mask),
            d_qkv=grad_name(f"{block}.qkv.out"))


class CausalMask(OpFamily):
    """Applied by the scores kernel, which writes exactly -inf above the diagonal."""

    kinds = ("causal_mask",)

    def forward(self, op: OpSpec, t: Tensors) -> None:
        t[op.outputs[0]] = causal_mask_forward(t[op.inputs[0]], op.attrs["batch"],
                                               op.attrs["heads"])

    def backward(self, op: OpSpec, t: Tensors) -> None:
        t[op.outputs[0]] = causal_mask_backward(t[op.inputs[0]], op.attrs["batch"],
                                                op.attrs["heads"])


class Values(OpFamily):
    kinds = ("attn_values",)

    def forward(self, op: OpSpec, t: Tensors) -> None:
        p, v = op.inputs
        t[op.outputs[0]] = attn_values_forward(t[p], t[v], op.attrs["batch"], op.attrs["heads"])

    def backward(self, op: OpSpec, t: Tensors) -> None:
        dout, p, v = op.inputs
        dp, dv = op.outputs
        t[dp], t[dv] = attn_values_backward(t[dout], t[p], t[v], op.attrs["batch"],
                                            op.attrs["heads"])

    def lower(self, ctx: LoweringContext, op: OpSpec) -> Kernel:
        block = _block_of(op.name)
        probs, _ = op.inputs
        return build_attn_values(
            op.name, ctx.ops_with_updates(op.name), ctx.ids, **fit_shape(ctx, op),
            qkv=f"{block}.qkv.out", probs=probs, out=op.outputs[0], d_out=ctx.dy(op.name),
            d_probs=ctx.dx(op.name), d_qkv=grad_name(f"{block}.qkv.out"))


FAMILIES = (Scores(), CausalMask(), Values())
