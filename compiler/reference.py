"""The numpy golden model of one training step (forward, backward, SGD update).

GPT-2 / Cerebras-GPT semantics: learned positions, pre-LayerNorm blocks (biased variance),
fused QKV with bias, causal softmax attention scaled by 1/sqrt(d_head), MLP with GELU
(exact erf or tanh approximation), final LayerNorm, LM head tied to the token embedding
when configured (no bias). The loss is the mean cross-entropy of predicting tokens
1..T-1 from tokens 0..T-2 of every sequence, over all B*(T-1) predictions.

Everything is written out layer by layer, forward and backward, without autograd. Every
value is stored under its name in `compiler.graph` and in the graph's shape (activations
`(B*T, cols)`, attention matrices `(B*T, H*T)`, see that module), so a simulated tensor can
be compared with its reference by name. The computation runs in the `dtype` given
(float64 for checking gradients, float32 to match the wafer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import DTypeLike

from compiler.config import RunConfig
from compiler.graph import build_graph, grad_name, grad_share_name, updated_name

Arrays = dict[str, np.ndarray]

_erf = np.frompyfunc(math.erf, 1, 1)  # numpy has no erf; exact GELU needs it


@dataclass
class ReferenceResult:
    """One step's results. `logits` is `(B*T, vocab)`; `grads` and `updated` are keyed by
    parameter name; `tensors` holds every tensor of the graph (inputs, parameters,
    activations, gradients and their shares, updated parameters) by graph name."""

    loss: float
    logits: np.ndarray
    grads: Arrays
    updated: Arrays
    tensors: Arrays


def init_params(cfg: RunConfig) -> Arrays:
    """Initial float64 weights, by graph parameter name, deterministic in training.seed.

    Parameters are drawn in graph order from `numpy.random.default_rng([seed, 0])`:
    embedding and linear weights normal(0, init_std); the projections into the residual
    stream (`h{i}.attn.proj.weight`, `h{i}.mlp.proj.weight`) normal(0, init_std /
    sqrt(2 n_layers)) as in GPT-2; biases 0; LayerNorm weights 1 and biases 0.
    """
    graph = build_graph(cfg)
    rng = np.random.default_rng([cfg.training.seed, 0])
    std = cfg.training.init_std
    scale = {"normal": std, "normal_residual": std / math.sqrt(2 * cfg.model.n_layers)}
    params: Arrays = {}
    for name in graph.parameters:
        spec = graph.tensors[name]
        if spec.init == "zeros":
            params[name] = np.zeros(spec.shape)
        elif spec.init == "ones":
            params[name] = np.ones(spec.shape)
        else:
            params[name] = rng.normal(0.0, scale[spec.init], spec.shape)
    return params


def make_batch(cfg: RunConfig) -> np.ndarray:
    """Tokens `(batch_size, seq_len)` int32, uniform in [0, vocab_size), drawn from
    `numpy.random.default_rng([seed, 1])` (a stream separate from the weights')."""
    rng = np.random.default_rng([cfg.training.seed, 1])
    shape = (cfg.training.batch_size, cfg.training.seq_len)
    return rng.integers(0, cfg.model.vocab_size, size=shape, dtype=np.int32)


# -- layers -------------------------------------------------------------------------------


def split_heads(x: np.ndarray, batch: int, heads: int) -> np.ndarray:
    """(B*T, H*w) with head j in column block j -> (B, H, T, w)."""
    rows, cols = x.shape
    return x.reshape(batch, rows // batch, heads, cols // heads).transpose(0, 2, 1, 3)


def merge_heads(x: np.ndarray) -> np.ndarray:
    """(B, H, T, w) -> (B*T, H*w), the inverse of split_heads."""
    batch, heads, seq, width = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch * seq, heads * width)


def _causal(seq: int) -> np.ndarray:
    """True where query t may attend to key s (s <= t)."""
    return np.tril(np.ones((seq, seq), dtype=bool))


def _gelu(x: np.ndarray, activation: str) -> np.ndarray:
    if activation == "gelu":
        return 0.5 * x * (1 + _erf(x / math.sqrt(2)).astype(x.dtype))
    u = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
    return 0.5 * x * (1 + np.tanh(u))


def _gelu_grad(x: np.ndarray, activation: str) -> np.ndarray:
    """d gelu(x) / dx, elementwise."""
    if activation == "gelu":
        cdf = 0.5 * (1 + _erf(x / math.sqrt(2)).astype(x.dtype))
        return cdf + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    c = math.sqrt(2 / math.pi)
    th = np.tanh(c * (x + 0.044715 * x**3))
    return 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * c * (1 + 3 * 0.044715 * x * x)


def _layernorm(t: Arrays, name: str, x: np.ndarray, eps: float) -> np.ndarray:
    """Op `name`: stores `.out`, `.mean`, `.rstd` (biased variance) and returns `.out`."""
    mean = x.mean(axis=1, keepdims=True)
    rstd = 1 / np.sqrt(((x - mean) ** 2).mean(axis=1, keepdims=True) + eps)
    t[f"{name}.mean"], t[f"{name}.rstd"] = mean, rstd
    out = t[f"{name}.out"] = (x - mean) * rstd * t[f"{name}.weight"] + t[f"{name}.bias"]
    return out


def _layernorm_bwd(t: Arrays, name: str, x: str, dy: np.ndarray, dx: str) -> None:
    """Backward of LayerNorm `name` on input tensor `x`: writes `dx` and the parameter
    gradients."""
    rstd = t[f"{name}.rstd"]
    xhat = (t[x] - t[f"{name}.mean"]) * rstd
    dxhat = dy * t[f"{name}.weight"]
    t[dx] = rstd * (
        dxhat
        - dxhat.mean(axis=1, keepdims=True)
        - xhat * (dxhat * xhat).mean(axis=1, keepdims=True)
    )
    t[grad_name(f"{name}.weight")] = (dy * xhat).sum(axis=0)
    t[grad_name(f"{name}.bias")] = dy.sum(axis=0)


def _linear(t: Arrays, name: str, x: np.ndarray) -> np.ndarray:
    return x @ t[f"{name}.weight"] + t[f"{name}.bias"]


def _linear_bwd(t: Arrays, name: str, x: str, dy: np.ndarray, dx: str) -> None:
    """Backward of `x @ weight + bias` (op `name`): writes `dx` and the parameter grads."""
    t[dx] = dy @ t[f"{name}.weight"].T
    t[grad_name(f"{name}.weight")] = t[x].T @ dy
    t[grad_name(f"{name}.bias")] = dy.sum(axis=0)


def _cross_entropy(logits: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean loss over the B*(T-1) next-token predictions, and d loss / d logits."""
    batch, seq = tokens.shape
    z = logits.reshape(batch, seq, -1)[:, :-1]  # the last position predicts nothing
    targets = tokens[:, 1:]
    z = z - z.max(axis=2, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=2, keepdims=True))
    picked = np.take_along_axis(z, targets[..., None], axis=2)
    count = batch * (seq - 1)
    loss = (lse - picked).sum() / count

    dz = np.exp(z - lse)
    np.put_along_axis(
        dz, targets[..., None], np.take_along_axis(dz, targets[..., None], 2) - 1, axis=2
    )
    dlogits = np.zeros_like(logits).reshape(batch, seq, -1)
    dlogits[:, :-1] = dz / count
    return np.asarray(loss, logits.dtype).reshape(1, 1), dlogits.reshape(logits.shape)


# -- the step -----------------------------------------------------------------------------


def forward(
    cfg: RunConfig, params: Arrays, tokens: np.ndarray, dtype: DTypeLike = np.float64
) -> Arrays:
    """The forward pass in `dtype`: the tokens `(M, 1)`, the parameters and every forward
    activation by graph name (`lm_head.out` are the logits, `loss.out` the loss)."""
    model = cfg.model
    batch, seq = tokens.shape
    heads, eps = model.n_heads, model.ln_eps
    t: Arrays = {name: np.asarray(value, dtype=dtype) for name, value in params.items()}
    t["tokens"] = tokens.reshape(-1, 1).astype(np.int32)

    x = t["wte.weight"][tokens] + t["wpe.weight"][:seq]
    x = t["embed.out"] = x.reshape(batch * seq, model.d_model)
    mask = _causal(seq)
    for i in range(model.n_layers):
        h = f"h{i}"
        qkv = _linear(t, f"{h}.attn.qkv", _layernorm(t, f"{h}.ln1", x, eps))
        q, k, v = np.split(qkv, 3, axis=1)
        t[f"{h}.attn.qkv.q"], t[f"{h}.attn.qkv.k"], t[f"{h}.attn.qkv.v"] = q, k, v
        q4, k4, v4 = (split_heads(a, batch, heads) for a in (q, k, v))
        scores = (q4 @ k4.transpose(0, 1, 3, 2)) / math.sqrt(model.d_head)
        masked = np.where(mask, scores, -np.inf)
        probs = np.exp(masked - masked.max(axis=3, keepdims=True))
        probs /= probs.sum(axis=3, keepdims=True)
        t[f"{h}.attn.scores.out"] = merge_heads(scores)
        t[f"{h}.attn.mask.out"] = merge_heads(masked)
        t[f"{h}.attn.softmax.out"] = merge_heads(probs)
        values = t[f"{h}.attn.values.out"] = merge_heads(probs @ v4)
        proj = t[f"{h}.attn.proj.out"] = _linear(t, f"{h}.attn.proj", values)
        x = t[f"{h}.attn.res.out"] = x + proj

        fc = t[f"{h}.mlp.fc.out"] = _linear(t, f"{h}.mlp.fc", _layernorm(t, f"{h}.ln2", x, eps))
        act = t[f"{h}.mlp.gelu.out"] = _gelu(fc, model.activation)
        mlp = t[f"{h}.mlp.proj.out"] = _linear(t, f"{h}.mlp.proj", act)
        x = t[f"{h}.mlp.res.out"] = x + mlp

    head = t["wte.weight" if model.tie_embeddings else "lm_head.weight"]
    t["lm_head.out"] = _layernorm(t, "ln_f", x, eps) @ head.T
    t["loss.out"], _ = _cross_entropy(t["lm_head.out"], tokens)
    return t


def _backward(cfg: RunConfig, t: Arrays, tokens: np.ndarray) -> None:
    """Adds every gradient tensor of the graph to `t` (the forward's tensors)."""
    model = cfg.model
    batch, seq = tokens.shape
    heads, scale = model.n_heads, 1 / math.sqrt(model.d_head)
    mask = _causal(seq)
    last = f"h{model.n_layers - 1}.mlp.res.out"

    _, dlogits = _cross_entropy(t["lm_head.out"], tokens)
    t[grad_name("lm_head.out")] = dlogits
    tied = model.tie_embeddings
    head = "wte.weight" if tied else "lm_head.weight"
    t[grad_name("ln_f.out")] = dlogits @ t[head]
    head_grad = grad_share_name(head, "lm_head") if tied else grad_name(head)
    t[head_grad] = dlogits.T @ t["ln_f.out"]
    _layernorm_bwd(t, "ln_f", last, t[grad_name("ln_f.out")], grad_name(last))

    for i in reversed(range(model.n_layers)):
        h = f"h{i}"
        block_in = "embed.out" if i == 0 else f"h{i - 1}.mlp.res.out"
        # MLP; the residual add passes its output gradient to both inputs unchanged.
        d_out = t[grad_name(f"{h}.mlp.res.out")]
        _linear_bwd(t, f"{h}.mlp.proj", f"{h}.mlp.gelu.out", d_out, grad_name(f"{h}.mlp.gelu.out"))
        t[grad_name(f"{h}.mlp.fc.out")] = t[grad_name(f"{h}.mlp.gelu.out")] * _gelu_grad(
            t[f"{h}.mlp.fc.out"], model.activation
        )
        _linear_bwd(
            t,
            f"{h}.mlp.fc",
            f"{h}.ln2.out",
            t[grad_name(f"{h}.mlp.fc.out")],
            grad_name(f"{h}.ln2.out"),
        )
        mid = f"{h}.attn.res.out"
        _layernorm_bwd(
            t, f"{h}.ln2", mid, t[grad_name(f"{h}.ln2.out")], grad_share_name(mid, f"{h}.ln2")
        )
        d_mid = t[grad_name(mid)] = d_out + t[grad_share_name(mid, f"{h}.ln2")]

        # Attention, per head on (B, H, T, *) views of the column blocks.
        a = f"{h}.attn"
        _linear_bwd(t, f"{a}.proj", f"{a}.values.out", d_mid, grad_name(f"{a}.values.out"))
        d_values = split_heads(t[grad_name(f"{a}.values.out")], batch, heads)
        probs = split_heads(t[f"{a}.softmax.out"], batch, heads)
        q4, k4, v4 = (split_heads(t[f"{a}.qkv.{n}"], batch, heads) for n in "qkv")
        d_probs = d_values @ v4.transpose(0, 1, 3, 2)
        t[grad_name(f"{a}.qkv.v")] = merge_heads(probs.transpose(0, 1, 3, 2) @ d_values)
        t[grad_name(f"{a}.softmax.out")] = merge_heads(d_probs)
        d_masked = probs * (d_probs - (d_probs * probs).sum(axis=3, keepdims=True))
        t[grad_name(f"{a}.mask.out")] = merge_heads(d_masked)
        d_scores = np.where(mask, d_masked, 0)
        t[grad_name(f"{a}.scores.out")] = merge_heads(d_scores)
        t[grad_name(f"{a}.qkv.q")] = merge_heads(scale * d_scores @ k4)
        t[grad_name(f"{a}.qkv.k")] = merge_heads(scale * d_scores.transpose(0, 1, 3, 2) @ q4)
        d_qkv = np.concatenate([t[grad_name(f"{a}.qkv.{n}")] for n in "qkv"], axis=1)
        _linear_bwd(t, f"{a}.qkv", f"{h}.ln1.out", d_qkv, grad_name(f"{h}.ln1.out"))
        _layernorm_bwd(
            t,
            f"{h}.ln1",
            block_in,
            t[grad_name(f"{h}.ln1.out")],
            grad_share_name(block_in, f"{h}.ln1"),
        )
        t[grad_name(block_in)] = d_mid + t[grad_share_name(block_in, f"{h}.ln1")]

    d_embed = t[grad_name("embed.out")].reshape(batch, seq, model.d_model)
    d_wte = np.zeros_like(t["wte.weight"])
    np.add.at(d_wte, tokens, d_embed)  # a token used twice gets both rows' gradients
    d_wpe = np.zeros_like(t["wpe.weight"])
    d_wpe[:seq] = d_embed.sum(axis=0)
    t[grad_name("wpe.weight")] = d_wpe
    if tied:
        t[grad_share_name("wte.weight", "embed")] = d_wte
        t[grad_name("wte.weight")] = t[head_grad] + d_wte
    else:
        t[grad_name("wte.weight")] = d_wte


def reference_step(
    cfg: RunConfig, params: Arrays, tokens: np.ndarray, dtype: DTypeLike = np.float64
) -> ReferenceResult:
    """Forward, backward and SGD update of `params` on `tokens (B, T)`, computed in `dtype`."""
    t = forward(cfg, params, tokens, dtype)
    _backward(cfg, t, tokens)
    lr = cfg.training.lr
    grads = {p: t[grad_name(p)] for p in params}
    updated = {p: t[p] - lr * grads[p] for p in params}
    t.update((updated_name(p), value) for p, value in updated.items())
    return ReferenceResult(
        loss=float(t["loss.out"][0, 0]),
        logits=t["lm_head.out"],
        grads=grads,
        updated=updated,
        tensors=t,
    )
