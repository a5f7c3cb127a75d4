"""Op families: one module per kind of op, each holding its graph spec, numpy math, kernel
builder and cost (see `compiler.ops.base`). `FAMILIES` maps every graph op kind (forward
kinds; a backward twin `<kind>.bwd` belongs to its forward kind's family) to its family.
"""

from __future__ import annotations

from compiler.graph import OpSpec, forward_kind
from compiler.ops import (
    add,
    attention,
    cross_entropy,
    embedding,
    gelu,
    kv_attention,
    layernorm,
    matmul,
    softmax,
    store,
    update,
)
from compiler.ops.base import OpFamily

_ALL: tuple[OpFamily, ...] = (
    embedding.FAMILY, layernorm.FAMILY, matmul.FAMILY, *attention.FAMILIES, softmax.FAMILY,
    gelu.FAMILY, add.FAMILY, cross_entropy.FAMILY, update.FAMILY, kv_attention.FAMILY,
    store.FAMILY,
)
FAMILIES: dict[str, OpFamily] = {kind: family for family in _ALL for kind in family.kinds}


def family_of(op: OpSpec) -> OpFamily:
    """The family that computes and lowers `op` (a forward, backward or update op)."""
    return FAMILIES[forward_kind(op.kind)]
