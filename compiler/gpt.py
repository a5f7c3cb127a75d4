"""The GPT training step as a graph: which ops, in which order, with which shapes.

GPT-2 / Cerebras-GPT semantics: learned positions, pre-LayerNorm blocks, fused QKV with
bias, causal softmax attention scaled by 1/sqrt(d_head), MLP with GELU, final LayerNorm,
LM head tied to the token embedding when configured (no bias); the loss is the mean
cross-entropy of predicting `targets[b, t]` (the token that follows `tokens[b, t]`) at
every position of every sequence: a window of T + 1 tokens gives T predictions. Each op
comes from its family module (`compiler.ops`); `compiler.graph` derives the backward pass
and `compiler.ops.update` adds the optimizer's updates.

Shapes: activations are 2-D `(rows, cols)` with rows M = B*T tokens in batch-major order
(row `b*T + t`; B the sequences of a micro-batch when the step has several); attention
matrices are `(M, H*T)` (see `compiler.ops.attention`); weights are `(in, out)` so that
`y = x @ W + b`, except the embeddings `wte.weight (vocab, d)`, `wpe.weight (n_ctx, d)`
and an untied `lm_head.weight (vocab, d)`.

Op names: `embed`, `h{i}.ln1`, `h{i}.attn.qkv`, `h{i}.attn.scores`, `h{i}.attn.mask`,
`h{i}.attn.softmax`, `h{i}.attn.values`, `h{i}.attn.proj`, `h{i}.attn.res`, `h{i}.ln2`,
`h{i}.mlp.fc`, `h{i}.mlp.gelu`, `h{i}.mlp.proj`, `h{i}.mlp.res`, `ln_f`, `lm_head`, `loss`;
the QKV op's outputs are `.q`, `.k`, `.v`; `tokens` and `targets` are the inputs.
"""

from __future__ import annotations

from compiler.config import RunConfig
from compiler.graph import GraphBuilder, TrainingGraph
from compiler.ops.add import add_residual
from compiler.ops.attention import add_mask, add_scores, add_values
from compiler.ops.cross_entropy import add_cross_entropy
from compiler.ops.embedding import add_embedding, add_lm_head
from compiler.ops.gelu import add_gelu
from compiler.ops.layernorm import add_layernorm
from compiler.ops.matmul import add_linear
from compiler.ops.softmax import add_softmax
from compiler.ops.update import add_updates


def _attention(b: GraphBuilder, p: str, x: str) -> str:
    """Causal multi-head self-attention on LayerNorm output `x`; returns the projection."""
    model, train = b.cfg.model, b.cfg.training
    heads = {"heads": model.n_heads, "d_head": model.d_head, "batch": b.sequences,
             "seq_len": train.seq_len}
    q, k, v = add_linear(b, f"{p}.qkv", x, 3 * model.d_model, out_names=("q", "k", "v"))
    scores = add_scores(b, f"{p}.scores", q, k, heads)
    probs = add_softmax(b, f"{p}.softmax", add_mask(b, f"{p}.mask", scores, heads), heads)
    values = add_values(b, f"{p}.values", probs, v, heads)
    (proj,) = add_linear(b, f"{p}.proj", values, model.d_model, init="normal_residual")
    return proj


def build_graph(cfg: RunConfig, sequences: int | None = None) -> TrainingGraph:
    """The graph of one training step of `cfg`: forward, backward, one optimizer update
    per parameter; with `sequences`, the graph of one micro-batch of that many sequences
    (its loss and gradients are its share of the whole batch's: `compiler.ops.
    cross_entropy` takes the mean over every prediction of the step)."""
    model, train = cfg.model, cfg.training
    b = GraphBuilder(cfg, sequences)
    rows = b.sequences * train.seq_len
    tokens = b.tensor("tokens", (rows, 1), "input", dtype="int32")
    targets = b.tensor("targets", (rows, 1), "input", dtype="int32")
    x = add_embedding(b, tokens)
    for i in range(model.n_layers):
        p = f"h{i}"
        b.layer = i
        x = add_residual(b, f"{p}.attn.res", x, _attention(b, f"{p}.attn",
                                                            add_layernorm(b, f"{p}.ln1", x)))
        (fc,) = add_linear(b, f"{p}.mlp.fc", add_layernorm(b, f"{p}.ln2", x), model.d_ffn)
        (mlp,) = add_linear(b, f"{p}.mlp.proj", add_gelu(b, f"{p}.mlp.gelu", fc,
                                                          model.activation),
                            model.d_model, init="normal_residual")
        x = add_residual(b, f"{p}.mlp.res", x, mlp)
    b.layer = None
    final = add_layernorm(b, "ln_f", x)
    head = ("wte.weight" if model.tie_embeddings
            else b.param("lm_head.weight", (model.vocab_size, model.d_model), "normal"))
    loss = add_cross_entropy(b, add_lm_head(b, final, head), targets)
    b.backward(loss)
    add_updates(b)
    return b.graph()
