"""Attention over a KV cache: the forward of causal multi-head attention for the rows of one
sequence at positions p0 .. p0 + R - 1, with the keys and values of the positions before
p0 kept in SRAM from earlier runs (generation: `compiler.generate`; a prefill run of the
prompt's P rows, then runs of one row each).

Graph: kind `kv_attention` (attributes heads, d_head, n_ctx), inputs q, k, v [R, d], the
input `positions` [R, 1] (p0 .. p0 + R - 1) and the caches `kv.k:{block}`,
`kv.v:{block}` [n_ctx, d] (kind state); outputs o [R, d] and the updated caches (rows
p0 .. p0 + R - 1 written). FLOPs: per row at position t and head, 4 (t + 1) dh (scores and
values) plus 5 (t + 1) (scale, max, exp, sum). Forward only: there is no backward.

Layout. The heads are grouped as the training kernel groups them (`attention.head_groups`:
the fewest heads whose q, k, v and o lanes no other group shares); group g is PE (g, 0) of
a 1-high strip. It receives its q, k and v lanes on three receiving threads
(`compiler.lowering.inbox`): q rows into a row store, k and v rows straight into rows
p0 .. p0 + R - 1 of its K and V caches ([n_ctx, W] each, W the group's columns, allocated
first so that every run's program has them at the same words). The caches are the result
slots of the updated cache tensors: the host carries them from run to run by name
(`compiler.state`), like a training step's weights.

Per row i (position t = p0 + i), after its q, k and v have arrived, per head h of the group
(its dh columns; n = t + 1 keys):

    s_j = q . K[j] / sqrt(dh)   n dot products of dh terms      n (dh + 2) + n
    m = max s; s = exp(s - m); l = sum s                       3 n + 4
    o = sum_j s_j V[j]                                         dh + n dh
    o *= 1 / l                                                 dh + 1

then the group's output lanes leave from o (W). The positions are constants of the code
(like the batch, `compiler.batch`): a run's code is built for its p0 and R.
Cost per PE and row (not yet tested against the simulator): sum over the group's heads of
n (2 dh + 6) + 2 dh + 5, plus W.
SRAM per PE: 2 n_ctx W (caches) + R W (q rows) + W (o) + n_ctx (scores) + 2.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from compiler.graph import GraphBuilder, OpSpec, updated_name
from compiler.lowering.inbox import RowStore, inbox
from compiler.lowering.ir import FabOut, Imm, Instr, Mem, Op, repeat, vec
from compiler.lowering.kernel import Kernel, ResultSlot, StreamIds
from compiler.lowering.rowreduce import row_reduce
from compiler.ops.attention import AttnShape, head_groups, merge_heads, split_heads
from compiler.ops.base import OpFamily, Tensors

if TYPE_CHECKING:
    from compiler.lower import LoweringContext

Lane = tuple[int, int]


def cache_names(block: str) -> tuple[str, str]:
    """The key and value caches of attention block `block` (`h{i}.attn`)."""
    return f"kv.k:{block}", f"kv.v:{block}"


def add_kv_attention(b: GraphBuilder, name: str, q: str, k: str, v: str, positions: str,
                     heads: int, d_head: int) -> str:
    """o = causal attention of q over the cached and new k, v (op `name`, `h{i}.attn.kv`)."""
    rows, d = b.shape(q)
    n_ctx = b.cfg.model.n_ctx
    caches = tuple(b.tensor(c, (n_ctx, d), "state") for c in cache_names(name.rsplit(".", 1)[0]))
    keys = rows * n_ctx  # at most
    (out, *_) = b.forward(
        name, "kv_attention", (q, k, v, positions, *caches),
        {f"{name}.out": (rows, d), **{updated_name(c): (n_ctx, d) for c in caches}},
        flops=heads * keys * (4 * d_head + 5), bwd_flops=0,
        attrs={"heads": heads, "d_head": d_head, "n_ctx": n_ctx})
    return out


# -- numpy ------------------------------------------------------------------------------------


def kv_attention_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int,
                         k_cache: np.ndarray, v_cache: np.ndarray,
                         heads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(o [R, d], the updated caches): rows at positions start .. start + R - 1 attend to
    every position up to their own."""
    rows = len(q)
    k_cache, v_cache = k_cache.copy(), v_cache.copy()
    k_cache[start:start + rows], v_cache[start:start + rows] = k, v
    end = start + rows
    kh, vh = split_heads(k_cache[:end], 1, heads), split_heads(v_cache[:end], 1, heads)
    qh = split_heads(q, 1, heads)
    scores = qh @ kh.transpose(0, 1, 3, 2) / math.sqrt(q.shape[1] // heads)
    visible = np.arange(end)[None, :] <= np.arange(start, end)[:, None]
    scores = np.where(visible, scores, -np.inf)
    probs = np.exp(scores - scores.max(axis=3, keepdims=True))
    probs /= probs.sum(axis=3, keepdims=True)
    return merge_heads(probs @ vh), k_cache, v_cache


# -- kernel -----------------------------------------------------------------------------------


def build_kv_attention(name: str, ops: list[str], ids: StreamIds, *, rows: int, start: int,
                       n_ctx: int, heads: int, d_head: int, qkv_lanes: list[Lane],
                       o_lanes: list[Lane], qkv: str, out: str, caches: tuple[str, str],
                       queue_depth: int) -> Kernel:
    """The kv-attention kernel of `rows` rows at positions `start` .. (module docstring):
    q, k, v in the lanes `qkv_lanes` of the fused tensor `qkv` [rows, 3d], the output `out`
    [rows, d] in `o_lanes`; result slots of the updated caches `caches` [n_ctx, d]."""
    if start + rows > n_ctx:
        raise ValueError(f"{name}: positions {start}..{start + rows - 1} past n_ctx {n_ctx}")
    d = heads * d_head
    groups = head_groups(name, AttnShape(1, rows, heads, d_head, qkv_lanes, o_lanes, 1))
    kernel = Kernel(name=name, op="kv_attention", ops=list(ops), width=len(groups), height=1,
                    shapes={qkv: (rows, 3 * d), out: (rows, d),
                            **{updated_name(c): (n_ctx, d) for c in caches}})
    in_ids = kernel.lane_inputs(ids, qkv, qkv_lanes, [(_owner(groups, d_head, c0 % d),)
                                                      for c0, _ in qkv_lanes], "ascending")
    out_ids = kernel.lane_outputs(ids, out, o_lanes, [_owner(groups, d_head, c0)
                                                      for c0, _ in o_lanes], "ascending")
    for g, (h0, count) in enumerate(groups):
        pe, g0, width = (g, 0), h0 * d_head, count * d_head
        k_cache = kernel.alloc(pe, n_ctx * width, "key cache")
        v_cache = kernel.alloc(pe, n_ctx * width, "value cache")
        q_rows = kernel.alloc(pe, rows * width, "q rows")
        o_row = kernel.alloc(pe, width, "o row")
        scores = kernel.alloc(pe, n_ctx, "scores")
        stat = kernel.alloc(pe, 2, "max, 1 / sum")
        for cache, offset in zip(caches, (k_cache, v_cache), strict=True):
            kernel.results.append(ResultSlot(updated_name(cache), pe, offset, (0, n_ctx),
                                             (g0, g0 + width), width))

        def section(s: int, g0: int = g0, width: int = width) -> list[tuple[int, Lane]]:
            """(stream, columns within the group) of the group's lanes of q, k or v."""
            return [(in_ids[j], (c0 - s * d - g0, c1 - s * d - g0))
                    for j, (c0, c1) in enumerate(qkv_lanes)
                    if s * d + g0 <= c0 and c1 <= s * d + g0 + width]

        q_in, k_in, v_in = (
            inbox(kernel, pe, ids, section(s), RowStore(base, width, rows),
                  queue_depth=queue_depth)
            for s, base in ((0, q_rows), (1, k_cache + start * width),
                            (2, v_cache + start * width)))
        outs = [(out_ids[j], c0 - g0, c1 - g0) for j, (c0, c1) in enumerate(o_lanes)
                if g0 <= c0 and c1 <= g0 + width]
        for i in range(rows):
            n = start + i + 1
            body: list[Instr] = [*q_in.take(), *k_in.take(), *v_in.take()]
            for h in range(count):
                c = h * d_head
                body += _head(n, d_head, width, q=q_rows + i * width + c, keys=k_cache + c,
                              values=v_cache + c, scores=scores, stat=stat, o=o_row + c)
            body += [vec(Op.MOV, c1 - c0, FabOut(stream), Mem(o_row + c0))
                     for stream, c0, c1 in outs]
            kernel.emit(pe, *body)
    return kernel


def _owner(groups: list[tuple[int, int]], d_head: int, column: int) -> tuple[int, int]:
    """The PE of the group that owns `column` of d (q, k, v or o)."""
    head = column // d_head
    return next((g, 0) for g, (h0, count) in enumerate(groups) if h0 <= head < h0 + count)


def _head(n: int, dh: int, width: int, *, q: int, keys: int, values: int, scores: int,
          stat: int, o: int) -> list[Instr]:
    """One head's attention of one query over keys 0..n-1 (module docstring)."""
    return [
        *repeat(n, row_reduce("dot", width=dh, dst=Mem(scores, 1, 1),
                              a=Mem(keys, 1, width), b=Mem(q))),
        vec(Op.MUL, n, Mem(scores), Mem(scores), Imm(1.0 / math.sqrt(dh))),
        *row_reduce("max", width=n, dst=Mem(stat), a=Mem(scores)),
        vec(Op.SUB, n, Mem(scores), Mem(scores), Mem(stat, 0)),
        vec(Op.EXP, n, Mem(scores), Mem(scores)),
        *row_reduce("sum", width=n, dst=Mem(stat + 1), a=Mem(scores)),
        vec(Op.RECIP, 1, Mem(stat + 1), Mem(stat + 1)),
        vec(Op.MOV, dh, Mem(o), Imm(0.0)),
        *repeat(n, [vec(Op.FMA, dh, Mem(o), Mem(values, 1, width), Mem(scores, 0, 1),
                        Mem(o))]),
        vec(Op.MUL, dh, Mem(o), Mem(o), Mem(stat + 1, 0)),
    ]


class KvAttention(OpFamily):
    kinds = ("kv_attention",)

    def forward(self, op: OpSpec, t: Tensors) -> None:
        q, k, v, positions, k_cache, v_cache = op.inputs
        o, new_k, new_v = op.outputs
        t[o], t[new_k], t[new_v] = kv_attention_forward(
            t[q], t[k], t[v], int(t[positions][0, 0]), t[k_cache], t[v_cache],
            op.attrs["heads"])

    def pes(self, ctx: LoweringContext, op: OpSpec) -> int:
        block = op.name.rsplit(".", 1)[0]
        a = op.attrs
        shape = AttnShape(1, ctx.rows_cols(op.outputs[0])[0], a["heads"], a["d_head"],
                          ctx.lanes(f"{block}.qkv.out"), ctx.lanes(op.outputs[0]), 1)
        return len(head_groups(op.name, shape))

    def lower(self, ctx: LoweringContext, op: OpSpec) -> Kernel:
        block = op.name.rsplit(".", 1)[0]
        qkv, out = f"{block}.qkv.out", op.outputs[0]
        rows, _ = ctx.rows_cols(out)
        a = op.attrs
        return build_kv_attention(
            op.name, [op.name], ctx.ids, rows=rows, start=ctx.batch.start, n_ctx=a["n_ctx"],
            heads=a["heads"], d_head=a["d_head"], qkv_lanes=ctx.lanes(qkv),
            o_lanes=ctx.lanes(out), qkv=qkv, out=out, caches=cache_names(block),
            queue_depth=ctx.wafer.queue_depth)


FAMILY = KvAttention()
