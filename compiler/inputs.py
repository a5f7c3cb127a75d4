"""The inputs of a step: initial parameters and a batch, deterministic in the training
seed. The reference and the compiler both take them from here."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from compiler.config import RunConfig
from compiler.gpt import build_graph

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class Batch:
    """One step's batch: `tokens` (B, T) the model reads and `targets` (B, T) it predicts,
    both int32; targets[b, t] is the token that follows tokens[b, t] in the text. `start`
    is the position of column 0 in its sequences (a training window starts at 0; a decode
    step reads the token at its position)."""

    tokens: np.ndarray
    targets: np.ndarray
    start: int = 0

    @classmethod
    def from_windows(cls, windows: np.ndarray) -> Batch:
        """The batch of windows (B, T + 1) of consecutive tokens (`compiler.data`)."""
        windows = np.asarray(windows, np.int32)
        return cls(windows[:, :-1], windows[:, 1:])

    def micro_batches(self, size: int) -> list[Batch]:
        """The batch cut into micro-batches of `size` sequences, in order."""
        return [Batch(self.tokens[b:b + size], self.targets[b:b + size], self.start)
                for b in range(0, len(self.tokens), size)]


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


def make_batch(cfg: RunConfig) -> Batch:
    """A synthetic batch: windows `(batch_size, seq_len + 1)` of token ids uniform in
    [0, vocab_size), drawn from `numpy.random.default_rng([seed, 1])` (a stream separate
    from the weights'). Training on text takes its windows from `compiler.data`."""
    rng = np.random.default_rng([cfg.training.seed, 1])
    shape = (cfg.training.batch_size, cfg.training.seq_len + 1)
    return Batch.from_windows(rng.integers(0, cfg.model.vocab_size, size=shape, dtype=np.int32))
