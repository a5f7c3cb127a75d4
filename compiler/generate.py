"""Generation: the forward-only programs that prefill a prompt and decode tokens with a KV
cache on the wafer, the host's token choice, and the float64 reference's greedy decode.

Programs (`forward_graph`): the model's forward over R consecutive positions of one
sequence: the embedding of the tokens at their positions, each block with its attention
over a KV cache (`compiler.ops.kv_attention`: the keys and values of earlier positions
stay in SRAM between runs), the final LayerNorm, the tied LM head, and the logits kept in
SRAM (`compiler.ops.store`) for the host. The parameters have the training graph's names,
so a checkpoint's weights load by name. Two programs are compiled, placed and routed once
each (`compile_forward`): the prefill program (R = the prompt's P tokens, one run) and the
decode program (R = 1, one run per new token). Between runs the host
* carries the KV caches by name (they are the programs' state tensors: `compiler.state`),
* rebuilds the code of the kernels that read the run's inputs, the tokens and positions
  (the embedding's and the KV attentions'), as a training step's batch (`compiler.batch`),
* reads the last row of the logits and chooses the next token (`choose`): greedy at
  temperature 0, else sampling from softmax(logits / temperature) over the top-k tokens
  with `numpy.random.default_rng(seed)`.

The reference (`reference_greedy`) decodes greedily with `compiler.reference.forward` over
the whole sequence so far: no cache, float64, the training graph's forward.
"""

from __future__ import annotations

import numpy as np

from compiler.compile import Compiled, compile_graph
from compiler.config import RunConfig
from compiler.graph import GraphBuilder, TrainingGraph
from compiler.inputs import Batch
from compiler.ops.add import add_residual
from compiler.ops.embedding import add_embedding, add_lm_head
from compiler.ops.gelu import add_gelu
from compiler.ops.kv_attention import add_kv_attention
from compiler.ops.layernorm import add_layernorm
from compiler.ops.matmul import add_linear
from compiler.ops.store import add_store
from compiler.reference import forward
from wse_sim.errors import UserError

LOGITS = "logits"


def _window(cfg: RunConfig, rows: int) -> RunConfig:
    """`cfg` with a batch of one sequence of `rows` tokens (the graph builders' shapes)."""
    training = cfg.training.model_copy(update={"batch_size": 1, "seq_len": rows})
    return cfg.model_copy(update={"training": training})


def forward_graph(cfg: RunConfig, rows: int) -> TrainingGraph:
    """The forward-only graph of `rows` consecutive positions (module docstring)."""
    model = cfg.model
    if not model.tie_embeddings:
        raise UserError("model.tie_embeddings: the lowering implements tied embeddings only")
    b = GraphBuilder(_window(cfg, rows))
    tokens = b.tensor("tokens", (rows, 1), "input", dtype="int32")
    positions = b.tensor("positions", (rows, 1), "input", dtype="int32")
    x = add_embedding(b, tokens)
    for i in range(model.n_layers):
        p = f"h{i}"
        b.layer = i
        q, k, v = add_linear(b, f"{p}.attn.qkv", add_layernorm(b, f"{p}.ln1", x),
                             3 * model.d_model, out_names=("q", "k", "v"))
        o = add_kv_attention(b, f"{p}.attn.kv", q, k, v, positions, model.n_heads,
                             model.d_head)
        (proj,) = add_linear(b, f"{p}.attn.proj", o, model.d_model, init="normal_residual")
        x = add_residual(b, f"{p}.attn.res", x, proj)
        (fc,) = add_linear(b, f"{p}.mlp.fc", add_layernorm(b, f"{p}.ln2", x), model.d_ffn)
        (mlp,) = add_linear(b, f"{p}.mlp.proj", add_gelu(b, f"{p}.mlp.gelu", fc,
                                                          model.activation),
                            model.d_model, init="normal_residual")
        x = add_residual(b, f"{p}.mlp.res", x, mlp)
    b.layer = None
    add_store(b, add_lm_head(b, add_layernorm(b, "ln_f", x), "wte.weight"), LOGITS)
    return b.graph()


def run_batch(tokens: list[int], start: int) -> Batch:
    """The inputs of a run: `tokens` at positions start .. (no targets: forward only)."""
    ids = np.array([tokens], np.int32)
    return Batch(ids, np.zeros_like(ids), start)


def compile_forward(cfg: RunConfig, params: dict[str, np.ndarray], rows: int) -> Compiled:
    """The program of `rows` positions with the weights `params`, its code built for
    zeros at position 0 (each run rebuilds the code of its inputs)."""
    return compile_graph(cfg, forward_graph(cfg, rows), params, run_batch([0] * rows, 0))


def check_length(cfg: RunConfig, prompt: int, new: int) -> None:
    """A prompt of `prompt` tokens and `new` new ones must fit the model's positions."""
    if prompt < 1:
        raise UserError("--prompt: the prompt has no token")
    if prompt + new > cfg.model.n_ctx:
        raise UserError(f"--max-new-tokens: the prompt's {prompt} tokens and {new} new ones "
                        f"exceed model.n_ctx ({cfg.model.n_ctx} positions)")


def choose(logits: np.ndarray, temperature: float, top_k: int | None,
           rng: np.random.Generator) -> int:
    """The next token from a row of logits: argmax at temperature 0, else a sample of
    softmax(logits / temperature) restricted to the `top_k` largest (all if None)."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = np.asarray(logits, np.float64) / temperature
    if top_k is not None and top_k < len(z):
        z[z < np.sort(z)[-top_k]] = -np.inf
    p = np.exp(z - z.max())
    return int(rng.choice(len(z), p=p / p.sum()))


def reference_greedy(cfg: RunConfig, params: dict[str, np.ndarray], prompt: list[int],
                     count: int) -> list[int]:
    """`count` greedy tokens after `prompt` from the float64 reference (module docstring)."""
    tokens = list(prompt)
    for _ in range(count):
        logits = forward(_window(cfg, len(tokens)), params,
                         run_batch(tokens, 0))["lm_head.out"]
        tokens.append(int(np.argmax(logits[-1])))
    return tokens[len(prompt):]
