"""Cross-entropy: the mean next-token loss over logits [M, V] and its gradient.

Graph: kind `cross_entropy`, inputs the logits and the targets [B T, 1], output
`loss.out` [1, 1]; it saves both. FLOPs per logit: forward 4 (max, subtract, exp, sum),
backward 6.

Row m predicts targets[m] (the token after the row's input token). loss = mean over the
M = B T rows of max + log(sum exp(z - max)) - z[target]; dlogits = (softmax - onehot) / M.
A step of several micro-batches (`training.micro_batch_size`) lowers the graph of one
micro-batch, whose M rows are a share of the step's N = `mean_over` predictions: it
divides by N instead, so its loss and gradients are its share of the step's, and the
micro-batches' sum is the step's mean.

The targets are known when the code is built (the batch is part of the code, like an input
DMA's descriptors: `compiler.batch` rebuilds them for every training step): which PE holds
a row's target column and the word it sits at are constants of the code.

Layout and algorithm
--------------------
A 1-high strip, PE (j, 0) owns lane j of V (the last lane may be narrower); one reduction
group (rowreduce). A thread of its own receives each PE's logits (kept: result slot
`logits_result`) and signals each block of R rows; per block, each PE: row max partials ->
allreduce(max); p = exp(z - max) into the probability store; row sum partials; the PE
holding a row's target copies its logit into that row's slot of a target vector (zero
elsewhere). The sums and the target vector are reduced to the last PE, the sums
broadcast back. Then p /= sum, p[target] -= 1, p *= weight: the block's dlogits.
After the last block every PE emits its dlogits lane, rows descending (the backward's
order, compiler.lowering.kernel): the last row's dlogits exist only after every row's
logits have arrived, which is why the cross-entropy is where the step turns around.

The loss is computed on the last PE after that emission, off the critical path. The PE has
no log instruction, so log(s) for the row sums s in [1, V] is Newton's method on exp:
z <- z + 1 - s exp(z) converges to z = -log s (quadratically; from above, since exp is
convex). The start y0 = 2^k (s^(1/2^k) - 1) >= log s costs k square roots; k and the number
of steps are chosen at build time for the worst case s = V (the start error grows with s),
minimising k + 3 * steps passes. Then loss = sum_m (max_m - z_m - z[target]_m) / M.

Cycle cost of the compute thread per PE (one cycle per vector element; M rows, lane w, G
lanes, R = block; `cycles` below):
6 M w + 9 M + 2 per row whose target is in its lane (gather, -1) + (M / R) * 3 chain
latencies (subtract, exp, divide, scale by 1 / M: 4 M w; two row partials M (w + 2) each;
allreduce(max) 2 M, reduce sums and targets 2 M, broadcast sums M), then the dlogits
emission M w. The receiving thread's M w writes share the PE's write port with the four
passes that write. Last PE after that: (k + 3 steps + 3) M + M for the loss. Chain and
broadcast latencies: see rowreduce.
SRAM per PE: 2 M w + 3 M (+ 2 M + 1 on the last PE).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from compiler.graph import GraphBuilder, OpSpec
from compiler.lowering.inbox import receiving_thread
from compiler.lowering.ir import FabIn, FabOut, Imm, Mem, Op, repeat, vec
from compiler.lowering.kernel import Kernel, ResultSlot, StreamIds, Tokens
from compiler.lowering.rowreduce import (
    DEFAULT_BLOCK_ROWS,
    GroupReducer,
    Lane,
    alloc_all,
    broadcast_latency,
    reduce_latency,
    row_blocks,
    row_partials,
    rows_at,
    rows_back,
    scalar_at,
    strip_inputs,
    strip_kernel,
    strip_outputs,
)
from compiler.ops.base import OpFamily, Tensors

if TYPE_CHECKING:
    from compiler.lower import LoweringContext

FORWARD_FLOPS = 4  # per logit of a predicted row
BACKWARD_FLOPS = 6


def add_cross_entropy(b: GraphBuilder, logits: str, targets: str) -> str:
    """The loss op `loss` of `logits` [M, V] against `targets` [M, 1]."""
    rows, vocab = b.shape(logits)
    train = b.cfg.training
    (loss,) = b.forward(
        "loss", "cross_entropy", (logits, targets), {"loss.out": (1, 1)},
        flops=FORWARD_FLOPS * rows * vocab, bwd_flops=BACKWARD_FLOPS * rows * vocab,
        saved=(logits, targets),
        attrs={"predictions": rows, "mean_over": train.batch_size * train.seq_len})
    return loss


# -- numpy ------------------------------------------------------------------------------------


def cross_entropy_forward(logits: np.ndarray, targets: np.ndarray,
                          mean_over: int | None = None) -> np.ndarray:
    """The loss [1, 1] of logits [M, V] predicting targets (M ids, any shape): the sum of
    the M rows' losses over `mean_over` (default M: their mean)."""
    return _loss_and_gradient(logits, targets, mean_over)[0]


def cross_entropy_backward(logits: np.ndarray, targets: np.ndarray,
                           mean_over: int | None = None) -> np.ndarray:
    """d loss / d logits."""
    return _loss_and_gradient(logits, targets, mean_over)[1]


def _loss_and_gradient(logits: np.ndarray, targets: np.ndarray, mean_over: int | None
                       ) -> tuple[np.ndarray, np.ndarray]:
    rows = np.arange(len(logits))
    targets = np.asarray(targets).ravel()
    n = mean_over or len(logits)
    z = logits - logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = (lse[:, 0] - z[rows, targets]).sum() / n
    dlogits = np.exp(z - lse)
    dlogits[rows, targets] -= 1
    return np.asarray(loss, logits.dtype).reshape(1, 1), dlogits / n


# -- kernel -----------------------------------------------------------------------------------

# Newton on exp stops when the worst-case error is below this (float64 model of the
# iteration; the fp32 result is then limited by rounding, ~1 ulp of the loss).
_LOG_TOLERANCE = 2.0**-26


def log_plan(largest: float) -> tuple[int, int]:
    """(square roots k, Newton steps) that compute log(s) for every s in [1, largest] with
    the fewest vector passes (k + 3 per step)."""
    best: tuple[int, int, int] | None = None
    for k in range(12):
        scale = 2.0**k
        err = scale * math.expm1(math.log(largest) / scale) - math.log(largest)
        steps = 0
        while err > _LOG_TOLERANCE:
            err = err - 1.0 + math.exp(-err)
            steps += 1
        if best is None or k + 3 * steps < best[0]:
            best = (k + 3 * steps, k, steps)
    assert best is not None
    return best[1], best[2]


def build_cross_entropy(name: str, ops: list[str], ids: StreamIds, *, targets: np.ndarray,
                        lanes: list[tuple[int, int]], logits_tensor: str, dlogits_tensor: str,
                        queue_depth: int, logits_result: str = "logits",
                        loss_result: str = "loss", mean_over: int | None = None,
                        block_rows: int = DEFAULT_BLOCK_ROWS) -> Kernel:
    """Cross-entropy of logits [M, vocab] (in `lanes`) against `targets` (M ids), summed
    over the rows and divided by `mean_over` (default M: the mean); dlogits leave in the
    same lanes, rows descending."""
    targets = np.asarray(targets).ravel()
    vocab = lanes[-1][1]
    rows = len(targets)
    weight = 1.0 / (mean_over or rows)
    if targets.min() < 0 or targets.max() >= vocab:
        raise ValueError(f"{name}: targets outside 0..{vocab - 1}")
    kernel, strip = strip_kernel(name, "cross_entropy", ops, lanes)
    pes = [lane.pe for lane in strip]
    kernel.shapes.update({logits_tensor: (rows, vocab), dlogits_tensor: (rows, vocab),
                          logits_result: (rows, vocab), loss_result: (1, 1)})
    z_in = strip_inputs(kernel, ids, logits_tensor, strip, "ascending")
    dz_out = strip_outputs(kernel, ids, dlogits_tensor, strip, "descending")
    reducer = GroupReducer.create(kernel, ids, pes)

    lw = max(lane.width for lane in strip)
    blocks = row_blocks(rows, block_rows)
    logits = alloc_all(kernel, pes, rows * lw, f"{logits_tensor} lane")
    probs = alloc_all(kernel, pes, rows * lw, "softmax, then dlogits")
    row_max = alloc_all(kernel, pes, rows, "row max")
    sums = alloc_all(kernel, pes, rows, "row sum of exp")
    picked = alloc_all(kernel, pes, rows, "target logit (0 off its lane)")
    for lane in strip:
        kernel.results.append(ResultSlot(logits_result, lane.pe, logits, (0, rows),
                                         (lane.c0, lane.c1), lane.width))

    def targets_in(lane: Lane, r0: int, r1: int) -> list[tuple[int, int]]:
        """(row, column within the lane) of the rows r0..r1 whose target is in the lane."""
        return [(m, int(targets[m]) - lane.c0) for m in range(r0, r1)
                if lane.c0 <= targets[m] < lane.c1]

    # Each PE receives its logits on a thread of its own, a token per block, so the LM head
    # never waits while a block is computed (compiler.lowering.inbox).
    arrived = {}
    for lane in strip:
        arrived[lane.pe] = Tokens.create(kernel, lane.pe, ids, queue_depth)
        kernel.emit(lane.pe, *(instr for r0, r1 in blocks for instr in (
            vec(Op.MOV, (r1 - r0) * lane.width, Mem(logits + r0 * lane.width),
                FabIn(z_in[lane.index])), arrived[lane.pe].signal())),
                    thread=receiving_thread(kernel, lane.pe))
    for r0, r1 in blocks:
        r = r1 - r0
        for lane in strip:
            w, z = lane.width, logits + r0 * lane.width
            kernel.emit(lane.pe, arrived[lane.pe].wait(),
                        *row_partials("max", rows=r, width=w, dst=row_max + r0, a=rows_at(z, w)))
        reducer.allreduce(row_max + r0, r, Op.MAX)
        for lane in strip:
            w, z, p = lane.width, logits + r0 * lane.width, probs + r0 * lane.width
            kernel.emit(
                lane.pe,
                *repeat(r, [vec(Op.SUB, w, rows_at(p, w), rows_at(z, w), scalar_at(row_max + r0))]),
                vec(Op.EXP, r * w, Mem(p), Mem(p)),
                *row_partials("sum", rows=r, width=w, dst=sums + r0, a=rows_at(p, w)),
                *(vec(Op.MOV, 1, Mem(picked + m), Mem(logits + m * w + col))
                  for m, col in targets_in(lane, r0, r1)),
            )
        reducer.reduce(sums + r0, r, Op.ADD)
        reducer.reduce(picked + r0, r, Op.ADD)
        reducer.broadcast(sums + r0, r)
        for lane in strip:
            w, p = lane.width, probs + r0 * lane.width
            kernel.emit(
                lane.pe,
                *repeat(r, [vec(Op.DIV, w, rows_at(p, w), rows_at(p, w), scalar_at(sums + r0))]),
                *(vec(Op.ADD, 1, Mem(probs + m * w + col), Mem(probs + m * w + col), Imm(-1.0))
                  for m, col in targets_in(lane, r0, r1)),
                vec(Op.MUL, r * w, Mem(p), Mem(p), Imm(weight)),
            )
    # The LM head's backward takes dlogits rows descending (compiler.lowering.kernel).
    for lane in strip:
        w = lane.width
        kernel.emit(lane.pe, *repeat(rows, [vec(Op.MOV, w, FabOut(dz_out[lane.index]),
                                                rows_back(probs + (rows - 1) * w, w))]))

    # The loss, on the last PE: z = -log(sum) by Newton, then the weighted row losses.
    last = reducer.last
    neg_log = kernel.alloc(last, rows, "-log(row sum)")
    tmp = kernel.alloc(last, rows, "Newton scratch")
    loss = kernel.alloc(last, 1, "loss")
    k, steps = log_plan(float(vocab))
    s, nz, t = Mem(sums), Mem(neg_log), Mem(tmp)
    root = s
    for _ in range(k):
        kernel.emit(last, vec(Op.SQRT, rows, t, root))
        root = t
    kernel.emit(last, vec(Op.FMA, rows, nz, root, Imm(-(2.0**k)), Imm(2.0**k)))
    for _ in range(steps):
        kernel.emit(
            last,
            vec(Op.EXP, rows, t, nz),
            vec(Op.FMA, rows, t, t, s, Imm(-1.0)),  # s exp(z) - 1
            vec(Op.SUB, rows, nz, nz, t),
        )
    kernel.emit(
        last,
        vec(Op.SUB, rows, t, Mem(row_max), nz),  # max + log(sum) = log sum exp
        vec(Op.SUB, rows, t, t, Mem(picked)),
        *row_partials("dot", rows=1, width=rows, dst=loss, a=t, b=Imm(weight)),
    )
    kernel.results.append(ResultSlot(loss_result, last, loss, (0, 1), (0, 1), 1))
    return kernel


# -- cost -------------------------------------------------------------------------------------


def cycles(rows: int, vocab: int, lane_width: int,
           block_rows: int = DEFAULT_BLOCK_ROWS) -> int:
    """Cycles of the compute thread of a lone cross-entropy kernel: the docstring's 6 M w +
    9 M, the dlogits emission M w, the loss on the last PE, and per block of rows its token,
    four REPEATs and the latencies of its three chain reductions and two broadcasts (the
    gathers of the target logits, two cycles per predicted row, are left out)."""
    k, steps = log_plan(float(vocab))
    w, group = lane_width, math.ceil(vocab / lane_width)
    latency = 3 * reduce_latency(group) + 2 * broadcast_latency(group)
    return (7 * rows * w + 9 * rows + (k + 3 * steps + 3) * rows + rows
            + math.ceil(rows / block_rows) * (latency + 5))


def sram_words(rows: int, lane_width: int, *, last: bool) -> int:
    """Words per PE: logits and probabilities lanes, three row vectors (max, sum, target
    logit), and on the last PE the log's two vectors and the loss."""
    return 2 * rows * lane_width + 3 * rows + (2 * rows + 1 if last else 0)


class CrossEntropy(OpFamily):
    kinds = ("cross_entropy",)

    def forward(self, op: OpSpec, t: Tensors) -> None:
        logits, targets = op.inputs
        t[op.outputs[0]] = cross_entropy_forward(t[logits], t[targets], op.attrs["mean_over"])

    def backward(self, op: OpSpec, t: Tensors) -> None:
        logits, targets = op.inputs
        t[op.outputs[0]] = cross_entropy_backward(t[logits], t[targets], op.attrs["mean_over"])

    def pes(self, ctx: LoweringContext, op: OpSpec) -> int:
        return len(ctx.lanes(op.inputs[0]))

    def lower(self, ctx: LoweringContext, op: OpSpec) -> Kernel:
        logits, _ = op.inputs
        return build_cross_entropy(
            op.name, ctx.ops_with_updates(op.name), ctx.ids, targets=ctx.batch.targets,
            lanes=ctx.lanes(logits), logits_tensor=logits,
            dlogits_tensor=ctx.dx(op.name), queue_depth=ctx.wafer.queue_depth,
            logits_result="logits", loss_result="loss", mean_over=op.attrs["mean_over"])


FAMILY = CrossEntropy()
