"""The compute graph of one whole training step: forward, backward, SGD update.

`build_graph(cfg)` returns a `TrainingGraph`: a networkx DiGraph whose nodes are ops and
whose edges go producer op -> consumer op (edge attribute `tensors`: the names of the
tensors passed), plus the tensor table. Building is per op, never per element, so the
13B model builds as fast as the tiny one.

Shapes (all fp32 except `tokens`, int32; every tensor 4 bytes per element)
--------------------------------------------------------------------------
Activations are 2-D `(rows, cols)` with rows M = B*T tokens in batch-major order
(row `b*T + t`). Per-head data is a column block: head `j` owns

* columns `[j*d_head, (j+1)*d_head)` of q, k, v (each `(M, d_model)`, the three column
  blocks of the fused QKV product) and of `attn.values.out`;
* columns `[j*T, (j+1)*T)` of the attention matrices `(M, H*T)` (scores, masked scores,
  probabilities): entry `(b*T + t, j*T + s)` is query t against key s of sequence b.

So one attention op covers all heads (attribute `heads`); lowering it per head means
taking column block j of each operand. Other shapes: `tokens (M, 1)`, LayerNorm
statistics `mean`, `rstd` `(M, 1)`, logits `(M, vocab)`, `loss.out (1, 1)`. Weights are
`(in, out)` so that `y = x @ W + b`, except the embeddings `wte.weight (vocab, d)`,
`wpe.weight (n_ctx, d)` and an untied `lm_head.weight (vocab, d)`, which the LM head uses
transposed (attribute `transpose_b`). Biases and LayerNorm parameters are 1-D.

Names
-----
Ops: `embed`, `h{i}.ln1`, `h{i}.attn.qkv`, `h{i}.attn.scores`, `h{i}.attn.mask`,
`h{i}.attn.softmax`, `h{i}.attn.values`, `h{i}.attn.proj`, `h{i}.attn.res`, `h{i}.ln2`,
`h{i}.mlp.fc`, `h{i}.mlp.gelu`, `h{i}.mlp.proj`, `h{i}.mlp.res`, `ln_f`, `lm_head`,
`loss`; the backward twin of op X is `X.bwd` (kind `<kind>.bwd`); the SGD update of
parameter P is `P.sgd`; a gradient accumulation for tensor X is `X.grad_acc`.
Tensors: an op's activation output is `{op}.out` (the QKV op has `.q`, `.k`, `.v`; a
LayerNorm also saves `.mean`, `.rstd`); parameters `{op}.weight`, `{op}.bias`
(embeddings: `wte.weight`, `wpe.weight`); `tokens` is the only input. The gradient of
tensor X is `grad:X`; when X feeds several ops, the op C's share is `grad:X@C` and
`X.grad_acc` sums the shares into `grad:X` (residual fan-out, tied embedding). The
updated parameter P is `updated:P`. The forward ops of block i and their backward twins
carry `attrs["layer"] = i`.

Backward conventions: an `add` has no backward node (its gradient is the identity on
both inputs), so consumers read the output's gradient directly: `h{i}.mlp.proj.bwd`
reads `grad:h{i}.mlp.res.out`. The cross-entropy backward seeds the chain (dloss = 1).
A backward op reads the gradients of its forward twin's outputs, then the saved tensors
it needs, and writes the gradients of the twin's inputs in the order of those inputs.

FLOPs
-----
`matmul_flops` counts 2 per multiply-add of every matrix product (attention products over
the full T x T, not causally halved); backward products cost twice the forward ones.
`flops` adds the other arithmetic at documented per-element rates (exp, erf and tanh
count as one): bias 1, embedding 1 / backward 2, LayerNorm 7 / 13, softmax 5 / 4,
score scaling 1 / 1, GELU 8 / 12, add 1, accumulation 1 per extra share, cross-entropy
4 / 6 per logit of the B*(T-1) predicted rows, SGD 2, causal mask 0 (a select).
Bytes read/written are the fp32 sizes of the inputs/outputs, except that the embedding
reads only the gathered rows of its tables.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import networkx as nx

from compiler.config import RunConfig

TensorKind = Literal["activation", "parameter", "gradient", "input"]
Phase = Literal["forward", "backward", "update"]
# How init_params fills a parameter: normal(0, init_std), the same scaled by
# 1/sqrt(2 n_layers) for projections into the residual stream, zeros, ones.
ParamInit = Literal["normal", "normal_residual", "zeros", "ones"]

PHASES: tuple[Phase, ...] = ("forward", "backward", "update")
BYTES_PER_ELEMENT = 4  # fp32 activations and weights, int32 tokens


def grad_name(tensor: str) -> str:
    """Name of the (total) gradient of `tensor`."""
    return f"grad:{tensor}"


def grad_share_name(tensor: str, consumer: str) -> str:
    """Name of the share of `tensor`'s gradient that flows back from op `consumer`."""
    return f"grad:{tensor}@{consumer}"


def updated_name(parameter: str) -> str:
    """Name of `parameter` after the SGD update."""
    return f"updated:{parameter}"


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


class _Builder:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
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

    # -- backward and update ----------------------------------------------------------------

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
                f"{f.name}.bwd",
                f"{f.kind}.bwd",
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

    def updates(self) -> None:
        lr = self.cfg.training.lr
        for p in self.parameters:
            spec = self.tensors[p]
            new = self.tensor(updated_name(p), spec.shape, "parameter")
            self.op(
                f"{p}.sgd",
                "sgd_update",
                "update",
                (p, grad_name(p)),
                (new,),
                2 * spec.numel,
                attrs={"lr": lr, "parameter": p},
            )

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


def _matmul(
    b: _Builder,
    name: str,
    x: str,
    n_out: int,
    *,
    out_names: tuple[str, ...] = ("out",),
    init: ParamInit = "normal",
) -> tuple[str, ...]:
    """`x @ weight + bias` with weight (in, out); several `out_names` split the output
    columns into equal blocks (the fused QKV projection)."""
    m, k = b.tensors[x].shape
    w = b.param(f"{name}.weight", (k, n_out), init)
    bias = b.param(f"{name}.bias", (n_out,), "zeros")
    part = n_out // len(out_names)
    products = 2 * m * k * n_out
    return b.forward(
        name,
        "matmul",
        (x, w, bias),
        {f"{name}.{o}": (m, part) for o in out_names},
        flops=products + m * n_out,
        matmul_flops=products,
        bwd_flops=2 * products + m * n_out,
        saved=(x, w),
        attrs={"m": m, "k": k, "n": n_out, "bias": True, "transpose_b": False},
    )


def _layernorm(b: _Builder, name: str, x: str) -> str:
    m, d = b.tensors[x].shape
    w = b.param(f"{name}.weight", (d,), "ones")
    bias = b.param(f"{name}.bias", (d,), "zeros")
    mean, rstd = f"{name}.mean", f"{name}.rstd"
    (out,) = b.forward(
        name,
        "layernorm",
        (x, w, bias),
        {f"{name}.out": (m, d)},
        stats={mean: (m, 1), rstd: (m, 1)},
        flops=7 * m * d,
        bwd_flops=13 * m * d,
        saved=(x, w, mean, rstd),
        attrs={"eps": b.cfg.model.ln_eps},
    )
    return out


def _elementwise(
    b: _Builder,
    name: str,
    kind: str,
    inputs: tuple[str, ...],
    rates: tuple[int, int],
    saved: tuple[str, ...] = (),
    attrs: dict[str, Any] | None = None,
) -> str:
    """An op whose output has the shape of its first input; `rates` are fwd/bwd FLOPs per
    output element."""
    shape = b.tensors[inputs[0]].shape
    n = math.prod(shape)
    (out,) = b.forward(
        name,
        kind,
        inputs,
        {f"{name}.out": shape},
        flops=rates[0] * n,
        bwd_flops=rates[1] * n,
        saved=saved,
        attrs=attrs,
    )
    return out


def _attention(b: _Builder, p: str, x: str) -> str:
    """Causal multi-head self-attention on LayerNorm output `x`; returns the projection."""
    model, train = b.cfg.model, b.cfg.training
    batch, t, h, dh = train.batch_size, train.seq_len, model.n_heads, model.d_head
    m = batch * t
    q, k, v = _matmul(b, f"{p}.qkv", x, 3 * model.d_model, out_names=("q", "k", "v"))
    heads = {"heads": h, "d_head": dh, "batch": batch, "seq_len": t}
    scores_shape = (m, h * t)
    n_scores = m * h * t
    products = 2 * n_scores * dh
    (scores,) = b.forward(
        f"{p}.scores",
        "attn_scores",
        (q, k),
        {f"{p}.scores.out": scores_shape},
        flops=products + n_scores,
        matmul_flops=products,
        bwd_flops=2 * products + n_scores,
        saved=(q, k),
        attrs={**heads, "scale": 1.0 / math.sqrt(dh)},
    )
    masked = _elementwise(b, f"{p}.mask", "causal_mask", (scores,), (0, 0), attrs=heads)
    # The softmax backward needs only its own output, the probabilities.
    probs = _elementwise(
        b, f"{p}.softmax", "softmax", (masked,), (5, 4), saved=(f"{p}.softmax.out",), attrs=heads
    )
    (values,) = b.forward(
        f"{p}.values",
        "attn_values",
        (probs, v),
        {f"{p}.values.out": (m, model.d_model)},
        flops=products,
        matmul_flops=products,
        bwd_flops=2 * products,
        saved=(probs, v),
        attrs=heads,
    )
    (proj,) = _matmul(b, f"{p}.proj", values, model.d_model, init="normal_residual")
    return proj


def build_graph(cfg: RunConfig) -> TrainingGraph:
    """The graph of one training step of `cfg`: forward, backward, one SGD update per
    parameter (see the module docstring for names, shapes and FLOP rules)."""
    model, train = cfg.model, cfg.training
    batch, t, d, vocab = train.batch_size, train.seq_len, model.d_model, model.vocab_size
    m = batch * t
    b = _Builder(cfg)

    tokens = b.tensor("tokens", (m, 1), "input", dtype="int32")
    wte = b.param("wte.weight", (vocab, d), "normal")
    wpe = b.param("wpe.weight", (model.n_ctx, d), "normal")
    (x,) = b.forward(
        "embed",
        "embedding",
        (tokens, wte, wpe),
        {"embed.out": (m, d)},
        flops=m * d,
        bwd_flops=2 * m * d,
        saved=(tokens,),
        attrs={"batch": batch, "seq_len": t},
        bytes_read=BYTES_PER_ELEMENT * (m + m * d + t * d),  # only the gathered rows
    )

    for i in range(model.n_layers):
        p = f"h{i}"
        b.layer = i
        attn = _attention(b, f"{p}.attn", _layernorm(b, f"{p}.ln1", x))
        x = _elementwise(b, f"{p}.attn.res", "add", (x, attn), (1, 0))
        fc = _matmul(b, f"{p}.mlp.fc", _layernorm(b, f"{p}.ln2", x), model.d_ffn)[0]
        act = _elementwise(
            b,
            f"{p}.mlp.gelu",
            "gelu",
            (fc,),
            (8, 12),
            saved=(fc,),
            attrs={"activation": model.activation},
        )
        (mlp,) = _matmul(b, f"{p}.mlp.proj", act, d, init="normal_residual")
        x = _elementwise(b, f"{p}.mlp.res", "add", (x, mlp), (1, 0))
    b.layer = None

    final = _layernorm(b, "ln_f", x)
    head = wte if model.tie_embeddings else b.param("lm_head.weight", (vocab, d), "normal")
    products = 2 * m * d * vocab
    (logits,) = b.forward(
        "lm_head",
        "matmul",
        (final, head),
        {"lm_head.out": (m, vocab)},
        flops=products,
        matmul_flops=products,
        bwd_flops=2 * products,
        saved=(final, head),
        attrs={"m": m, "k": d, "n": vocab, "bias": False, "transpose_b": True},
    )
    predictions = batch * (t - 1)
    (loss,) = b.forward(
        "loss",
        "cross_entropy",
        (logits, tokens),
        {"loss.out": (1, 1)},
        flops=4 * predictions * vocab,
        bwd_flops=6 * predictions * vocab,
        saved=(logits, tokens),
        attrs={"batch": batch, "seq_len": t, "predictions": predictions},
    )
    b.backward(loss)
    b.updates()
    return b.graph()
