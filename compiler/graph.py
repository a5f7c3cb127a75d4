"""The graph IR of one training step: tensors, ops, and the builder that derives the
backward pass from the forward ops.

A `TrainingGraph` is a networkx DiGraph whose nodes are ops and whose edges go producer op
-> consumer op (edge attribute `tensors`: the names of the tensors passed), plus the tensor
table. What each op computes, costs and lowers to lives in its family's module under
`compiler.ops`; which ops a GPT step has is `compiler.gpt`. Building is per op, never per
element, so the 13B model builds as fast as the tiny one.

Shapes: every tensor is fp32 except `tokens` (int32); 4 bytes per element.

Names
-----
The backward twin of op X is `X.bwd` (kind `<kind>.bwd`); the update of parameter P is
`P.update` (`compiler.ops.update`; AdamW's moments of P and the step count are tensors of
kind `state`); a gradient accumulation for tensor X is `X.grad_acc`. An op's activation output is
`{op}.out` unless its family says otherwise; parameters are `{op}.weight`, `{op}.bias`.
The gradient of tensor X is `grad:X`; when X feeds several ops, the op C's share is
`grad:X@C` and `X.grad_acc` sums the shares into `grad:X` (residual fan-out, tied
embedding). The updated parameter P is `updated:P`. Ops built inside a transformer block
carry `attrs["layer"]`.

Backward conventions: an `add` has no backward node (its gradient is the identity on
both inputs), so consumers read the output's gradient directly. The loss seeds the chain
(dloss = 1). A backward op reads the gradients of its forward twin's outputs (not the
loss's), then the saved tensors it needs, and writes the gradients of the twin's inputs
(those that are not `input` tensors) in the order of those inputs.

FLOPs: each family states its counts (2 per multiply-add of a matrix product, backward
products twice the forward ones, per-element rates for the rest); `matmul_flops` is the
matrix-product part. Bytes read/written are the fp32 sizes of an op's inputs/outputs
unless the family gives its own (the embedding reads only the gathered rows).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import networkx as nx

from compiler.config import RunConfig

TensorKind = Literal["activation", "parameter", "gradient", "input", "state"]
Phase = Literal["forward", "backward", "update"]
# How compiler.inputs.init_params fills a parameter: normal(0, init_std), the same scaled
# by 1/sqrt(2 n_layers) for projections into the residual stream, zeros, ones.
ParamInit = Literal["normal", "normal_residual", "zeros", "ones"]

PHASES: tuple[Phase, ...] = ("forward", "backward", "update")
BYTES_PER_ELEMENT = 4  # fp32 activations and weights, int32 tokens
BACKWARD_SUFFIX = ".bwd"


def grad_name(tensor: str) -> str:
    """Name of the (total) gradient of `tensor`."""
    return f"grad:{tensor}"


def is_gradient(tensor: str) -> bool:
    """Whether `tensor` is a gradient (a total or a share): the backward pass makes it."""
    return tensor.startswith("grad:")


def grad_share_name(tensor: str, consumer: str) -> str:
    """Name of the share of `tensor`'s gradient that flows back from op `consumer`."""
    return f"grad:{tensor}@{consumer}"


def updated_name(parameter: str) -> str:
    """Name of `parameter` after the update."""
    return f"updated:{parameter}"


def forward_kind(kind: str) -> str:
    """The kind of the forward op whose backward twin has `kind` (itself otherwise)."""
    return kind.removesuffix(BACKWARD_SUFFIX)


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor of the step. `init` is set for parameters only."""

    name: str
    shape: tuple[int, ...]
    kind: TensorKind
    dtype: Literal["float32", "int32"] = "float32"
    init: ParamInit | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return BYTES_PER_ELEMENT * self.numel


@dataclass(frozen=True)
class OpSpec:
    """One node of the graph. `attrs` holds kind-specific facts (heads, eps, lr, ...)."""

    name: str
    kind: str
    phase: Phase
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    flops: int
    matmul_flops: int
    bytes_read: int
    bytes_written: int
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainingGraph:
    """The op DAG of one training step and its tensor table (see the module docstring)."""

    cfg: RunConfig
    g: nx.DiGraph
    tensors: dict[str, TensorSpec]
    ops: dict[str, OpSpec]  # in construction order, which is a topological order
    parameters: list[str]

    def ops_in_order(self) -> list[str]:
        """A deterministic topological order: forward, then backward, then updates."""
        index = {name: i for i, name in enumerate(self.ops)}
        return list(nx.lexicographical_topological_sort(self.g, key=index.__getitem__))

    def producer(self, tensor: str) -> str | None:
        """The op that writes `tensor`, or None for parameters and inputs."""
        return self._producers.get(tensor)

    def consumers(self, tensor: str) -> list[str]:
        """The ops that read `tensor`, in construction order."""
        return self._consumers.get(tensor, [])

    def backward_of(self, name: str) -> OpSpec | None:
        """The backward twin of forward op `name`, if it has one."""
        return self.ops.get(name + BACKWARD_SUFFIX)

    @cached_property
    def _producers(self) -> dict[str, str]:
        return {out: op.name for op in self.ops.values() for out in op.outputs}

    @cached_property
    def _consumers(self) -> dict[str, list[str]]:
        readers: dict[str, list[str]] = {}
        for op in self.ops.values():
            for t in op.inputs:
                readers.setdefault(t, []).append(op.name)
        return readers

    def parameter_count(self) -> int:
        return sum(self.tensors[p].numel for p in self.parameters)

    def summary(self) -> dict[str, Any]:
        """Counts for reports: parameters, ops (total and by kind), FLOPs by phase and of
        all matrix products, bytes moved through SRAM by op inputs/outputs."""
        flops = {phase: 0 for phase in PHASES}
        for op in self.ops.values():
            flops[op.phase] += op.flops
        return {
            "parameters": self.parameter_count(),
            "ops": len(self.ops),
            "tensors": len(self.tensors),
            "ops_by_kind": dict(sorted(Counter(op.kind for op in self.ops.values()).items())),
            "flops": {
                **flops,
                "matmul": sum(op.matmul_flops for op in self.ops.values()),
                "total": sum(flops.values()),
            },
            "bytes": {
                "read": sum(op.bytes_read for op in self.ops.values()),
                "written": sum(op.bytes_written for op in self.ops.values()),
            },
        }


@dataclass(frozen=True)
class _Forward:
    """What the backward pass needs to know about one forward op."""

    name: str
    kind: str
    grad_inputs: tuple[str, ...]  # inputs that receive a gradient
    outputs: tuple[str, ...]  # outputs whose gradient flows back
    saved: tuple[str, ...]  # tensors the backward op reads besides output gradients
    bwd_flops: int
    bwd_matmul_flops: int
    attrs: dict[str, Any]


class GraphBuilder:
    """Builds a TrainingGraph: op families add forward ops (`forward`), then `backward`
    derives the backward pass and `compiler.ops.update.add_updates` the updates."""

    def __init__(self, cfg: RunConfig, sequences: int | None = None) -> None:
        self.cfg = cfg
        # sequences one pass of the graph streams: the batch, or a micro-batch's
        self.sequences = sequences or cfg.training.batch_size
        self.tensors: dict[str, TensorSpec] = {}
        self.ops: dict[str, OpSpec] = {}
        self.parameters: list[str] = []
        self.forwards: list[_Forward] = []
        self.layer: int | None = None  # the block being built; its ops get attrs["layer"]

    # -- tables ---------------------------------------------------------------------------

    def tensor(self, name: str, shape: tuple[int, ...], kind: TensorKind, **kw: Any) -> str:
        assert name not in self.tensors, f"tensor {name} defined twice"
        self.tensors[name] = TensorSpec(name, shape, kind, **kw)
        return name

    def param(self, name: str, shape: tuple[int, ...], init: ParamInit) -> str:
        self.parameters.append(name)
        return self.tensor(name, shape, "parameter", init=init)

    def shape(self, tensor: str) -> tuple[int, ...]:
        return self.tensors[tensor].shape

    def op(
        self,
        name: str,
        kind: str,
        phase: Phase,
        inputs: tuple[str, ...],
        outputs: tuple[str, ...],
        flops: int,
        matmul_flops: int = 0,
        attrs: dict[str, Any] | None = None,
        bytes_read: int | None = None,
    ) -> None:
        assert name not in self.ops, f"op {name} defined twice"
        if bytes_read is None:
            bytes_read = sum(self.tensors[t].nbytes for t in inputs)
        self.ops[name] = OpSpec(
            name=name,
            kind=kind,
            phase=phase,
            inputs=inputs,
            outputs=outputs,
            flops=flops,
            matmul_flops=matmul_flops,
            bytes_read=bytes_read,
            bytes_written=sum(self.tensors[t].nbytes for t in outputs),
            attrs=attrs or {},
        )

    def forward(
        self,
        name: str,
        kind: str,
        inputs: tuple[str, ...],
        outputs: dict[str, tuple[int, ...]],
        *,
        flops: int,
        bwd_flops: int,
        matmul_flops: int = 0,
        stats: dict[str, tuple[int, ...]] | None = None,
        saved: tuple[str, ...] = (),
        attrs: dict[str, Any] | None = None,
        bytes_read: int | None = None,
    ) -> tuple[str, ...]:
        """Add a forward op; `outputs` carry gradients, `stats` are saved, non-differentiable
        outputs. The backward twin costs `bwd_flops`, its products twice `matmul_flops`."""
        attrs = {**(attrs or {}), **({} if self.layer is None else {"layer": self.layer})}
        outs = tuple(self.tensor(n, s, "activation") for n, s in outputs.items())
        extra = tuple(self.tensor(n, s, "activation") for n, s in (stats or {}).items())
        self.op(name, kind, "forward", inputs, outs + extra, flops, matmul_flops, attrs, bytes_read)
        grad_inputs = tuple(t for t in inputs if self.tensors[t].kind != "input")
        self.forwards.append(
            _Forward(name, kind, grad_inputs, outs, saved, bwd_flops, 2 * matmul_flops, attrs)
        )
        return outs

    def elementwise(
        self,
        name: str,
        kind: str,
        inputs: tuple[str, ...],
        rates: tuple[int, int],
        saved: tuple[str, ...] = (),
        attrs: dict[str, Any] | None = None,
    ) -> str:
        """A forward op whose one output `{name}.out` has the shape of its first input;
        `rates` are its forward and backward FLOPs per output element."""
        shape = self.shape(inputs[0])
        n = math.prod(shape)
        (out,) = self.forward(name, kind, inputs, {f"{name}.out": shape}, flops=rates[0] * n,
                              bwd_flops=rates[1] * n, saved=saved, attrs=attrs)
        return out

    # -- backward ----------------------------------------------------------------------------

    def backward(self, loss: str) -> None:
        """Add one backward op per forward op (none for `add`, whose gradient is the
        identity) in reverse order, and an accumulation wherever a tensor fed several ops."""
        uses = Counter(t for f in self.forwards for t in f.grad_inputs)
        shares: dict[str, list[str]] = {t: [] for t in uses}
        grad_of: dict[str, str] = {}

        def contribute(tensor: str, share: str) -> None:
            shares[tensor].append(share)
            if len(shares[tensor]) < uses[tensor]:
                return
            if uses[tensor] == 1:
                grad_of[tensor] = share
                return
            total = self.tensor(grad_name(tensor), self.tensors[tensor].shape, "gradient")
            numel = self.tensors[tensor].numel
            self.op(
                f"{tensor}.grad_acc",
                "grad_acc",
                "backward",
                tuple(shares[tensor]),
                (total,),
                numel * (uses[tensor] - 1),
                attrs={"tensor": tensor},
            )
            grad_of[tensor] = total

        for f in reversed(self.forwards):
            if f.kind == "add":
                for t in f.grad_inputs:
                    contribute(t, grad_of[f.outputs[0]])
                continue
            outs = []
            for t in f.grad_inputs:
                name = grad_name(t) if uses[t] == 1 else grad_share_name(t, f.name)
                outs.append(self.tensor(name, self.tensors[t].shape, "gradient"))
            grads_in = tuple(grad_of[o] for o in f.outputs if o != loss)
            self.op(
                f.name + BACKWARD_SUFFIX,
                f.kind + BACKWARD_SUFFIX,
                "backward",
                grads_in + f.saved,
                tuple(outs),
                f.bwd_flops,
                f.bwd_matmul_flops,
                {**f.attrs, "forward": f.name},
            )
            for t, share in zip(f.grad_inputs, outs, strict=True):
                contribute(t, share)

        for p in self.parameters:
            assert grad_of[p] == grad_name(p), f"parameter {p} has no gradient tensor"

    def graph(self) -> TrainingGraph:
        g = nx.DiGraph()
        producers: dict[str, str] = {}
        for op in self.ops.values():
            g.add_node(
                op.name,
                kind=op.kind,
                phase=op.phase,
                inputs=op.inputs,
                outputs=op.outputs,
                input_shapes=tuple(self.tensors[t].shape for t in op.inputs),
                output_shapes=tuple(self.tensors[t].shape for t in op.outputs),
                flops=op.flops,
                matmul_flops=op.matmul_flops,
                bytes_read=op.bytes_read,
                bytes_written=op.bytes_written,
                **op.attrs,
            )
            for t in op.inputs:
                if t in producers:
                    src = producers[t]
                    passed = g.edges[src, op.name]["tensors"] if g.has_edge(src, op.name) else ()
                    g.add_edge(src, op.name, tensors=(*passed, t))
            producers.update((t, op.name) for t in op.outputs)
        return TrainingGraph(self.cfg, g, self.tensors, self.ops, self.parameters)
