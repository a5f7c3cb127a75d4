"""Store: a forward-only program's output kept in SRAM for the host to read (the logits of a
generation step, `compiler.generate`).

Graph: kind `store`, input x [M, N], output the named result tensor [M, N] (a copy; no
FLOPs, no backward).

Kernel: a 1-high strip, PE (j, 0) receives lane j of x, rows ascending, into a row-major
block (one MOV of M w elements: M w cycles) that is the result slot of the output.
SRAM per PE: M w.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from compiler.graph import GraphBuilder, OpSpec
from compiler.lowering.ir import FabIn, Mem, Op, vec
from compiler.lowering.kernel import Kernel, ResultSlot, StreamIds
from compiler.lowering.rowreduce import strip_inputs, strip_kernel
from compiler.ops.base import OpFamily, Tensors

if TYPE_CHECKING:
    from compiler.lower import LoweringContext


def add_store(b: GraphBuilder, x: str, name: str) -> str:
    """Keep `x` in SRAM as the result tensor `name`."""
    shape = b.shape(x)
    (out,) = b.forward(name, "store", (x,), {name: shape}, flops=0, bwd_flops=0)
    return out


def build_store(name: str, ops: list[str], ids: StreamIds, *, rows: int,
                lanes: list[tuple[int, int]], x_tensor: str, result: str) -> Kernel:
    """Receive x [rows, cols] in `lanes` into SRAM, as result slots of `result`."""
    kernel, strip = strip_kernel(name, "store", ops, lanes)
    cols = lanes[-1][1]
    kernel.shapes.update({x_tensor: (rows, cols), result: (rows, cols)})
    x_in = strip_inputs(kernel, ids, x_tensor, strip, "ascending")
    for lane in strip:
        block = kernel.alloc(lane.pe, rows * lane.width, f"{result} lane")
        kernel.emit(lane.pe, vec(Op.MOV, rows * lane.width, Mem(block), FabIn(x_in[lane.index])))
        kernel.results.append(ResultSlot(result, lane.pe, block, (0, rows), lane.cols,
                                         lane.width))
    return kernel


class Store(OpFamily):
    kinds = ("store",)

    def forward(self, op: OpSpec, t: Tensors) -> None:
        t[op.outputs[0]] = np.array(t[op.inputs[0]])

    def pes(self, ctx: LoweringContext, op: OpSpec) -> int:
        return len(ctx.lanes(op.inputs[0]))

    def lower(self, ctx: LoweringContext, op: OpSpec) -> Kernel:
        (x,) = op.inputs
        rows, _ = ctx.rows_cols(x)
        return build_store(op.name, [op.name], ctx.ids, rows=rows, lanes=ctx.lanes(x),
                           x_tensor=x, result=op.outputs[0])


FAMILY = Store()
