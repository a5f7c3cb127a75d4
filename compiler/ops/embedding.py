"""The token embedding (+ learned positions) and the LM head: one kernel, one copy of wte.

Graph: kind `embedding` (tokens, `wte.weight` [V, d], `wpe.weight` [n_ctx, d] -> h0 [M, d];
FLOPs M d forward (the add of the position), 2 M d backward; it reads only the gathered
rows) and kind `lm_head` (x, W [V, d] -> logits = x W^T [M, V]; W is `wte.weight` when the
embeddings are tied, else `lm_head.weight`; 2 M d V FLOPs, backward twice that).

Layout. The LM head is logits = x wte^T, so wte is held as the [d, V] matrix wte^T on a
weight-stationary grid exactly like `matmul` (R = lanes of d rows, C = lanes of V columns:
PE (c, r) holds wte^T[d-lane r, V-lane c], i.e. wte[V-lane c, d-lane r] transposed, and
its gradient). One more column, x = C (the *position column*), holds wpe[:, d-lane r] on
PE (C, r) with its gradient; it emits h0 lane r. wpe lives apart from the grid so that the
grid PEs, which also store the LM head's x and dlogits rows, keep their SRAM for those.

Tokens are known at compile time: the batch is baked into the program like an input DMA
(the step simulated is one fixed batch), so every PE knows which rows it serves.

Forward embedding, h0[m, lane r] = wte[tok_m, lane r] + wpe[t, lane r] (m = b T + t): the
chunk wte[tok_m, lane r] is column tok_m - v0 of the block on PE (c(tok_m), r), read with
stride nb. Along each PE row the chunks are relayed east in row order: PE c forwards
every row owned by a PE west of it and injects its own rows (consecutive forwarded rows
are one MOV), so each relay link carries the rows owned west of it; the position PE adds
wpe[t] and emits h0 lane r.
LM head forward: the matmul forward (x lane r multicast along grid row r, partial sums
down the columns, logits lane c leaves the bottom PE); no bias.
Backward: the matmul backward on dlogits (dX lane r = the final LayerNorm's gradient
leaves PE (C - 1, r); dwte^T accumulates x^T dlogits). Then dh0 lane r is multicast
along PE row r (grid and position column): the PE holding tok_m's column
adds row m into that column of the same gradient block (strided destination), the others
discard it (runs of discarded rows are one MOV into a scratch word), so the tied gradient
sums both uses; the position PE adds dh0[b T + t] into dwpe[t]. The optimizer updates wte
(one copy) and wpe locally (`compiler.ops.update`).

Cost (cycles; M = B T rows, kb = |d-lane r|, n_ctx positions; `embedding_cycles` and
`sram_words` below): embedding forward M kb + 3 plus up to 3 C for the first row's
chunk to reach the position column (every relay PE moves at most M kb wavelets at one per
cycle, 3 cycles a hop);
LM head forward and backward: the matmul formulas with N = V and no bias (see
`compiler.ops.matmul`); embedding backward M kb on every PE of a row (each dh0 element
is consumed by every PE once); update kb nb per grid PE and n_ctx kb on the position PE.
"""

from __future__ import annotations

from itertools import groupby
from typing import TYPE_CHECKING

import numpy as np

from compiler.graph import BYTES_PER_ELEMENT, GraphBuilder, OpSpec
from compiler.lowering.ir import FabIn, FabOut, Instr, Mem, Op, repeat, vec
from compiler.lowering.kernel import Kernel, LocalPE, StreamIds, Tokens
from compiler.ops.base import OpFamily, Tensors, token_batch
from compiler.ops.matmul import (
    Lane,
    WeightGrid,
    emit_backward,
    emit_forward,
    is_mixed,
    place_weights,
    to_half,
    update_weights,
)
from compiler.ops.update import UpdateRule, emit_update
from wse_sim.errors import UserError

if TYPE_CHECKING:
    from compiler.lower import LoweringContext



def add_embedding(b: GraphBuilder, tokens: str) -> str:
    """h0 = wte[tokens] + wpe[:T] (op `embed`); creates both tables."""
    model, train = b.cfg.model, b.cfg.training
    batch, seq, d = b.sequences, train.seq_len, model.d_model
    m = batch * seq
    wte = b.param("wte.weight", (model.vocab_size, d), "normal")
    wpe = b.param("wpe.weight", (model.n_ctx, d), "normal")
    (h0,) = b.forward(
        "embed", "embedding", (tokens, wte, wpe), {"embed.out": (m, d)}, flops=m * d,
        bwd_flops=2 * m * d, saved=(tokens,),
        attrs={"batch": batch, "seq_len": seq, "vocab": model.vocab_size, "n_ctx": model.n_ctx},
        bytes_read=BYTES_PER_ELEMENT * (m + m * d + seq * d))  # only the gathered rows
    return h0


def add_lm_head(b: GraphBuilder, x: str, weight: str) -> str:
    """logits = x weight^T (op `lm_head`), weight [V, d]."""
    m, d = b.shape(x)
    vocab = b.shape(weight)[0]
    products = 2 * m * d * vocab
    attrs: dict[str, object] = {"m": m, "k": d, "n": vocab}
    if b.cfg.compile.precision == "mixed":  # as the linear layers (compiler.ops.matmul)
        attrs.update(precision="mixed", loss_scale=b.cfg.compile.loss_scale)
    (logits,) = b.forward("lm_head", "lm_head", (x, weight), {"lm_head.out": (m, vocab)},
                          flops=products, matmul_flops=products, bwd_flops=2 * products,
                          saved=(x, weight), attrs=attrs)
    return logits


# -- numpy ------------------------------------------------------------------------------------


def embedding_forward(tokens: np.ndarray, wte: np.ndarray, wpe: np.ndarray,
                      start: int = 0) -> np.ndarray:
    """h0 [B T, d] of tokens [B, T] at positions start .. start + T - 1."""
    batch, seq = tokens.shape
    return (wte[tokens] + wpe[start:start + seq]).reshape(batch * seq, -1)


def embedding_backward(dh0: np.ndarray, tokens: np.ndarray, vocab: int,
                       n_ctx: int) -> tuple[np.ndarray, np.ndarray]:
    """(dwte, dwpe): a token used twice gets both rows' gradients."""
    batch, seq = tokens.shape
    d = dh0.reshape(batch, seq, -1)
    dwte = np.zeros((vocab, d.shape[2]), dh0.dtype)
    np.add.at(dwte, tokens, d)
    dwpe = np.zeros((n_ctx, d.shape[2]), dh0.dtype)
    dwpe[:seq] = d.sum(axis=0)
    return dwte, dwpe


def lm_head_forward(x: np.ndarray, weight: np.ndarray, half: bool = False) -> np.ndarray:
    """x weight^T; `half`: mixed precision, as `compiler.ops.matmul.linear_forward`."""
    if half:
        x, weight = to_half(x), to_half(weight)
    return x @ weight.T


def lm_head_backward(dlogits: np.ndarray, x: np.ndarray, weight: np.ndarray,
                     half: bool = False, scale: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(dx, dweight); `half`: as `compiler.ops.matmul.linear_backward`."""
    if half:
        dlogits, x, weight = to_half(dlogits * scale) / scale, to_half(x), to_half(weight)
    return dlogits @ weight, dlogits.T @ x


# -- kernel -----------------------------------------------------------------------------------


def _row_owners(grid: WeightGrid, tokens: np.ndarray) -> list[tuple[int, int]]:
    """(V-lane c, column in its block) of each row's token, rows in order."""
    owners = []
    for tok in tokens.ravel():
        c = next(i for i, (v0, v1) in enumerate(grid.n_lanes) if v0 <= tok < v1)
        owners.append((c, int(tok) - grid.n_lanes[c][0]))
    return owners


def _emit_relay(grid: WeightGrid, pe: LocalPE, owners: list[tuple[int, int]],
                relay_in: int | None, relay_out: int) -> None:
    """PE (c, r) of the embedding relay, on a thread of its own (the same PEs run the LM
    head, whose first rows arrive while the relay still sends later ones): in row order,
    inject own chunks, forward the rows of PEs to the west (a run of them in one MOV)."""
    c, _ = pe
    kb, nb = grid.block(pe)
    instrs: list[Instr] = []
    for west, run in groupby(owners, key=lambda owner: owner[0] < c):
        rows = list(run)
        if west:
            instrs.append(vec(Op.MOV, kb * len(rows), FabOut(relay_out), FabIn(relay_in)))
            continue
        instrs += [vec(Op.MOV, kb, FabOut(relay_out), Mem(grid.weight[pe] + j, nb))
                   for owner, j in rows if owner == c]
    if instrs:
        grid.kernel.emit(pe, *instrs, thread=grid.kernel.new_thread(pe))


def _scatter(grid: WeightGrid, pe: LocalPE, owners: list[tuple[int, int]],
             dh0: int, grad: int) -> list[Instr]:
    """dh0 rows (descending) whose token column is on PE (c, r) add into that column of
    the embedding's gradient block at `grad`; the other rows go to a scratch word."""
    c, _ = pe
    kb, nb = grid.block(pe)
    scratch = grid.kernel.alloc(pe, 1, "discarded dh0")
    instrs: list[Instr] = []
    for mine, run in groupby(reversed(owners), key=lambda owner: owner[0] == c):
        rows = list(run)
        if not mine:
            instrs.append(vec(Op.MOV, kb * len(rows), Mem(scratch, 0), FabIn(dh0)))
            continue
        instrs += [vec(Op.ADD, kb, Mem(grad + j, nb), Mem(grad + j, nb), FabIn(dh0))
                   for _, j in rows]
    return instrs


def build_embedding(name: str, ops: list[str], ids: StreamIds, *, tokens: np.ndarray,
                    d_lanes: list[Lane], v_lanes: list[Lane], wte: np.ndarray,
                    wpe: np.ndarray, update: UpdateRule, h0_tensor: str, x_tensor: str,
                    logits_tensor: str, dlogits_tensor: str | None = None,
                    dx_tensor: str | None = None, dh0_tensor: str | None = None,
                    wte_name: str = "wte.weight", wpe_name: str = "wpe.weight",
                    queue_depth: int, start: int = 0, precision: str = "fp32",
                    loss_scale: int = 1) -> Kernel:
    """The tied embedding + LM head kernel for the batch `tokens` [B, T]; the model width
    d is cut into `d_lanes` (h0's lanes, and the lanes x arrives in), the vocabulary into
    `v_lanes` (the logits' lanes).

    Forward: h0 = wte[tokens] + wpe[:T] (output `h0_tensor`), logits = x wte^T (input
    `x_tensor` [B T, d], output `logits_tensor` [B T, V]). With `dlogits_tensor` the
    backward: dX (`dx_tensor`, optional), the embedding gradient `dh0_tensor` (optional)
    and the optimizer update; result slots grad:/updated: (and the moments) of `wte_name`
    [V, d] and (with dh0) `wpe_name` [n_ctx, d]. The tokens are at positions `start` ..
    `start + T - 1` (a forward-only decode step reads one token at its position).
    `precision` "mixed": the LM head's products as the linear layers' (fp16 factors, fp32
    sums, dlogits scaled by `loss_scale`; `compiler.ops.matmul`)."""
    vocab, d = wte.shape
    batch, seq = tokens.shape
    n_ctx = wpe.shape[0]
    if wpe.shape[1] != d or start + seq > n_ctx or (start and dlogits_tensor is not None):
        raise ValueError(f"{name}: wpe {wpe.shape} does not fit wte {wte.shape} and T={seq}")
    if not (0 <= tokens.min() and tokens.max() < vocab):
        raise ValueError(f"{name}: tokens outside 0..{vocab - 1}")
    if (dx_tensor is not None or dh0_tensor is not None) and dlogits_tensor is None:
        raise ValueError(f"{name}: a backward needs dlogits")
    backward = dlogits_tensor is not None
    rows = batch * seq
    n_r, n_c = len(d_lanes), len(v_lanes)
    kernel = Kernel(name=name, op="embedding", ops=list(ops), width=n_c + 1, height=n_r,
                    shapes={h0_tensor: (rows, d), x_tensor: (rows, d),
                            logits_tensor: (rows, vocab)})
    half = precision == "mixed"
    grid = place_weights(kernel, rows, wte.T, d_lanes, v_lanes, backward=backward, half=half)
    owners = _row_owners(grid, tokens)

    # forward embedding: relay wte chunks east along each row, the position column adds wpe
    wpe_at: dict[int, int] = {}
    h0_ids = kernel.lane_outputs(ids, h0_tensor, d_lanes, [(n_c, r) for r in range(n_r)],
                                 "ascending")
    relays: list[list[int]] = []
    for r, (k0, k1) in enumerate(d_lanes):
        pos = (n_c, r)
        wpe_at[r] = kernel.alloc(pos, n_ctx * (k1 - k0), "wpe lane")
        kernel.load(pos, wpe_at[r], wpe[:, k0:k1])
        relay = [kernel.local((c, r), ((c + 1, r),), ids) for c in range(n_c)]
        kernel.emit(pos, *[vec(Op.ADD, seq * (k1 - k0), FabOut(h0_ids[r]), FabIn(relay[-1]),
                               Mem(wpe_at[r] + start * (k1 - k0))) for _ in range(batch)])
        relays.append(relay)

    emit_forward(grid, ids, x_tensor=x_tensor, y_tensor=logits_tensor, bias=None,
                 keep_x=backward)
    for r, relay in enumerate(relays):
        for c in range(n_c):
            _emit_relay(grid, (c, r), owners, relay[c - 1] if c > 0 else None, relay[c])
    if not backward:
        return kernel
    kernel.shapes[dlogits_tensor] = (rows, vocab)
    if dx_tensor is not None:
        kernel.shapes[dx_tensor] = (rows, d)
    emit_backward(grid, ids, dy_tensor=dlogits_tensor, dx_tensor=dx_tensor, bias_grad=None,
                  queue_depth=queue_depth, scale=loss_scale)

    if dh0_tensor is not None:
        kernel.shapes[dh0_tensor] = (rows, d)
        dh0_ids = kernel.lane_inputs(
            ids, dh0_tensor, d_lanes, [tuple((c, r) for c in range(n_c + 1))
                                       for r in range(n_r)], "descending")
        for r, (k0, k1) in enumerate(d_lanes):
            pos, kb = (n_c, r), k1 - k0
            for c in range(n_c):
                # dh0 arrives while the LM head's backward still runs on the main thread:
                # the scatter has a thread and a gradient block of its own, added in when
                # its token says it is done.
                pe = (c, r)
                words = kb * grid.block(pe)[1]
                scattered = kernel.alloc(pe, words, "embedding gradient")
                done = Tokens.create(kernel, pe, ids, 1)
                kernel.emit(pe, *_scatter(grid, pe, owners, dh0_ids[r], scattered),
                            done.signal(), thread=kernel.new_thread(pe))
                kernel.emit(pe, done.wait(), vec(Op.ADD, words, Mem(grid.grad[pe]),
                                                 Mem(grid.grad[pe]), Mem(scattered)))
            dwpe = kernel.alloc(pos, n_ctx * kb, "wpe gradient")
            last = Mem(dwpe + (seq - 1) * kb, 1, -kb)  # positions T-1 .. 0
            for _ in range(batch):
                kernel.emit(pos, *repeat(seq, [vec(Op.ADD, kb, last, last, FabIn(dh0_ids[r]))]))
            emit_update(kernel, pos, update, wpe_name, (n_ctx, d), weight=wpe_at[r], grad=dwpe,
                        rows=(0, n_ctx), cols=(k0, k1), row_stride=kb)

    update_weights(grid, update, wte_name, transposed=True)
    return kernel


# -- cost -------------------------------------------------------------------------------------


def embedding_cycles(rows: int, kb: int) -> int:
    """The forward embedding alone, until the position column has emitted h0: M kb
    wavelets at one per cycle, and the 3 cycles of the last hop. The first row's chunk
    travels from its owner's column (up to C hops of 3 cycles more); the rows behind it
    are already on the way, so only that first latency adds."""
    return rows * kb + 3


def sram_words(rows: int, kb: int, nb: int, n_ctx: int, *, position_column: bool) -> int:
    """Words of a training step's fp32 grid PE (the LM head's matmul PE without bias: W,
    dW, the x rows and the dY rows, then the scatter's gradient block and the word that
    discarded dh0 elements go to) or of the position column PE (its wpe lane and
    gradient)."""
    if position_column:
        return 2 * n_ctx * kb
    return 3 * kb * nb + rows * (kb + nb) + 1


class Embedding(OpFamily):
    kinds = ("embedding", "lm_head")

    def forward(self, op: OpSpec, t: Tensors) -> None:
        if op.kind == "lm_head":
            x, weight = op.inputs
            t[op.outputs[0]] = lm_head_forward(t[x], t[weight], half=is_mixed(op))
            return
        tokens, wte, wpe = op.inputs
        t[op.outputs[0]] = embedding_forward(token_batch(op, t[tokens]), t[wte], t[wpe])

    def backward(self, op: OpSpec, t: Tensors) -> None:
        if op.kind == "lm_head.bwd":
            dlogits, x, weight = op.inputs
            dx, dweight = op.outputs
            t[dx], t[dweight] = lm_head_backward(t[dlogits], t[x], t[weight], half=is_mixed(op),
                                                 scale=op.attrs.get("loss_scale", 1))
            return
        dh0, tokens = op.inputs
        dwte, dwpe = op.outputs
        t[dwte], t[dwpe] = embedding_backward(t[dh0], token_batch(op, t[tokens]), op.attrs["vocab"],
                                              op.attrs["n_ctx"])

    def pes(self, ctx: LoweringContext, op: OpSpec) -> int:
        if op.kind == "lm_head":
            return 0
        vocab_lanes = ctx.lanes(ctx.graph.ops["lm_head"].outputs[0])
        return (len(vocab_lanes) + 1) * len(ctx.lanes(op.outputs[0]))  # + the position column

    def lower(self, ctx: LoweringContext, op: OpSpec) -> Kernel | None:
        """One kernel for both ops, started by `embed`; it holds the only copy of wte, so
        the tied gradient's accumulation and both tables' updates happen there too."""
        if op.kind == "lm_head":
            return None
        lm_head = ctx.graph.ops["lm_head"]
        final, head = lm_head.inputs
        _, wte, wpe = op.inputs
        if head != wte:
            raise UserError("model.tie_embeddings: the lowering implements tied embeddings "
                            "only (the LM head is the embedding kernel); set it to true")
        ops = [name for name in (op.name, f"{op.name}.bwd", "lm_head", "lm_head.bwd",
                                 f"{wte}.grad_acc", f"{wte}.update", f"{wpe}.update")
               if name in ctx.graph.ops]  # a forward-only graph has the first and third
        return build_embedding(
            op.name, ops, ctx.ids, tokens=ctx.tokens, d_lanes=ctx.lanes(op.outputs[0]),
            v_lanes=ctx.lanes(lm_head.outputs[0]),
            wte=ctx.param(wte), wpe=ctx.param(wpe), update=ctx.update, h0_tensor=op.outputs[0],
            x_tensor=final, logits_tensor=lm_head.outputs[0],
            dlogits_tensor=ctx.dy("lm_head"), dx_tensor=ctx.dx("lm_head"),
            dh0_tensor=ctx.dy(op.name), wte_name=wte, wpe_name=wpe,
            queue_depth=ctx.wafer.queue_depth, start=ctx.batch.start,
            precision=lm_head.attrs.get("precision", "fp32"),
            loss_scale=lm_head.attrs.get("loss_scale", 1))


FAMILY = Embedding()
