"""The GPT training step in weight-streaming mode: every op of `compiler.gpt`'s step on one
rectangle of PEs, the weights streaming in through the north edge, the gradients going
out through it, the activations staying in SRAM (`compiler.streaming.linear`'s layout).

Layout. The rectangle is `cols` x B PEs (`region`: the wafer's width, at most the narrowest
of d_model, d_ffn and the vocabulary): PE row b holds the T tokens of sequence b (data
parallel down a column; a sequence never spans rows, so causal attention is row-local),
PE column c owns the features `split(F, cols)[c]` of every activation with F features: of
the residual stream (d_model), of q, k and v (d_model each), of the MLP's hidden layer
(d_ffn) and of the logits (vocab). Activations are stored transposed, [f_c, T].

The passes, in order (each a "pass" of the ports' marks and of `Step.timeline`):

* embedding, forward: the memory service sends each column the embedding rows of the
  step's tokens (its features; it looks the rows up, as it gathers any weight it streams)
  and the position rows 0..T-1; the PE adds its sequence's.
* block i, forward: LayerNorm (own partial sums of x and x^2 all-reduced over the row:
  the mean and the biased variance, in one pass); q, k and v as three column-parallel
  layers of one gathered input; attention (below); the projection; the residual add;
  LayerNorm; the MLP's column-parallel fc, GELU and row-parallel proj; the residual add.
* head, forward: the final LayerNorm; the tied LM head, column-parallel over the
  vocabulary, its weight vectors the embedding's rows streamed again; the cross-entropy:
  the row's maximum (an all-reduce of MAX), exp, the row sums and the target logit (one
  all-reduce), log by Newton's method on exp (`compiler.ops.cross_entropy.log_plan`),
  the token losses (column 0 sends them up; the service averages them) and dlogits.
* head, block L-1 .. 0, embedding, backward: the same in reverse; every weight gradient,
  the LayerNorm gains' and the biases' gradients, and the embedding's and the position
  table's gradient rows go up their column to the service (`StreamPE.column_reduce`).

Attention. A head's d_head features span several columns, so a PE's own features give
partial scores q_f k_f for the heads they belong to; the row all-reduces the [H, T, T]
partials, each PE finishes the softmax of its own heads' rows (scaled, causal: row t has
t + 1 entries) and computes its features of the output. Backward the same way: the
partial dP = dO v all-reduced, dS by the softmax's backward on own heads, then dq, dk, dv
locally. An all-reduce of H T^2 words a PE: the layout suits short simulated sequences.

Small parameters (the LayerNorm gains and biases, the layers' biases, 0.1% of the
parameters) are loaded into the SRAM of the columns that own their features with the
step; their gradients leave like the weights'. The service's optimizer updates every
parameter (`compiler.streaming.service`).

Why it cannot deadlock: as for a stack (`compiler.streaming.linear`): every PE runs the
same phases in the same order on one compute thread, and each collective waits only on
PEs of its row or column in the same phase.

Cost: the linear layers as in `compiler.streaming.linear.phase_cost`; the rest are row
collectives (a chain's latency across the row each) and O(T) or O(T^2) local work per own
feature, small beside the weights' I/O at the shapes simulated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from compiler.config import RunConfig
from compiler.lowering.dots import Walk, dots
from compiler.lowering.ir import Imm, Instr, Mem, Op, Reg, repeat, vec
from compiler.lowering.kernel import Kernel, sram_budget
from compiler.ops.cross_entropy import log_plan
from compiler.ops.gelu import forward_and_derivative
from compiler.streaming.linear import LinearLayer
from compiler.streaming.pe import (
    ACC,
    COLORS,
    Into,
    Span,
    StreamPE,
    edge_ports,
    port_timeline,
    received,
    ring_depth,
    set_routes,
    split,
    weight_into,
)
from wse_sim.errors import UserError
from wse_sim.program import (
    BYTES_PER_WORD,
    Program,
    Region,
    TensorLayout,
    TensorSlot,
)

LOSS = "loss"  # the service's name for the loss words column 0 sends


@dataclass(frozen=True)
class Shape:
    """The step's sizes: B sequences of T tokens on `cols` PE columns."""

    batch: int
    seq: int
    cols: int
    d: int
    ffn: int
    heads: int
    vocab: int
    layers: int
    eps: float
    activation: str

    @classmethod
    def of(cls, cfg: RunConfig, cols: int) -> Shape:
        m, t = cfg.model, cfg.training
        return cls(t.batch_size, t.seq_len, cols, m.d_model, m.d_ffn, m.n_heads, m.vocab_size,
                   m.n_layers, m.ln_eps, m.activation)

    @property
    def d_head(self) -> int:
        return self.d // self.heads

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def region(cfg: RunConfig) -> tuple[int, int]:
    """(cols, rows) of the step's rectangle: one PE row per sequence, as many columns as the
    wafer has, at most one per feature of the narrowest sliced activation (the residual,
    the MLP's hidden or the logits), so that every column owns some of each."""
    wafer, model = cfg.wafer, cfg.model
    rows = cfg.training.batch_size
    cols = min(wafer.width, model.d_model, model.d_ffn, model.vocab_size)
    if rows > wafer.height:
        raise UserError(f"training.batch_size: weight streaming puts each of the {rows} "
                        f"sequences on a PE row of its own; the wafer has {wafer.height}")
    if wafer.colors < COLORS:
        raise UserError(f"wafer.colors: weight streaming uses {COLORS} colors, the wafer "
                        f"has {wafer.colors}")
    return cols, rows


def block_layers(shape: Shape, i: int) -> dict[str, LinearLayer]:
    """Block i's linear layers: q, k and v (the fused QKV weight's three thirds), the
    attention's projection, the MLP's fc and proj."""
    d, f, p = shape.d, shape.ffn, f"h{i}"
    return {"q": LinearLayer(f"{p}.attn.q", d, d), "k": LinearLayer(f"{p}.attn.k", d, d),
            "v": LinearLayer(f"{p}.attn.v", d, d),
            "proj": LinearLayer(f"{p}.attn.proj", d, d),
            "fc": LinearLayer(f"{p}.mlp.fc", d, f), "fc2": LinearLayer(f"{p}.mlp.proj", f, d)}


def head_layer(shape: Shape) -> LinearLayer:
    return LinearLayer("lm_head", shape.d, shape.vocab)


@dataclass
class Step:
    """The program of one weight-streaming training step and how to read it."""

    program: Program
    shape: Shape
    slots: int
    passes: list[str]  # "<part> forward|backward", in order
    top: list[StreamPE] = field(default_factory=list)  # row 0's PE of every column

    def gradients(self, port_words: dict[str, np.ndarray], params: dict[str, np.ndarray]
                  ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Every parameter's gradient as the service assembles it from the words each
        column sent (`Into`), and the token losses [B T]."""
        grads = {name: np.zeros(p.shape, np.float64) for name, p in params.items()}
        loss = np.zeros(self.shape.tokens)
        received(self.top, port_words, {**grads, LOSS: loss})
        return grads, loss

    def timeline(self, port_marks: dict[str, np.ndarray]) -> list[dict[str, object]]:
        """Per pass: its weights in and its gradients out, measured (`port_timeline`)."""
        return port_timeline(self.top, self.passes, port_marks)

    def linear_layers(self) -> list[LinearLayer]:
        """Every block's linear layers, then the LM head."""
        return [*(layer for i in range(self.shape.layers)
                  for layer in block_layers(self.shape, i).values()), head_layer(self.shape)]

    def completed(self) -> dict[str, list[str]]:
        """Per pass (by name, in order): the parameters whose gradient is complete after
        it, i.e. whose last part some column sends up in it."""
        last: dict[str, int] = {}
        for pe in self.top:
            for p, done in enumerate(pe.passes()):
                for into in done.sinks:
                    if into.param != LOSS:
                        last[into.param] = max(last.get(into.param, -1), p)
        return {name: [param for param, p in last.items() if p == i]
                for i, name in enumerate(self.passes) if i in last.values()}


@dataclass(frozen=True)
class Plan:
    """The step's shape and its weight ring: `slots` vectors of `slot_words` words a PE."""

    shape: Shape
    rows: int
    slots: int
    slot_words: int


def plan(cfg: RunConfig) -> Plan:
    """The step's layout, or a UserError naming the SRAM (and training.seq_len, which sets
    what a PE keeps) when a PE's buffers and a ring of two weight vectors do not fit."""
    cols, rows = region(cfg)
    shape = Shape.of(cfg, cols)
    budget = cfg.wafer.sram_bytes_per_pe // BYTES_PER_WORD
    kernel = Kernel(name="gpt step", op="weight streaming", ops=[], width=cols, height=1)
    try:
        with sram_budget(budget):
            for c in range(cols):  # every row of a column holds the same buffers
                _Sram.allocate(kernel, (c, 0), shape)
    except UserError as err:
        raise UserError(f"training.seq_len: {err} (a PE keeps {shape.seq} tokens of every "
                        "saved activation: shorten the sequences)") from None
    # The longest vector: a weight vector (d words: every layer's input or output is the
    # residual stream) or the embedding rows of the step's tokens.
    slot_words = max(shape.d, shape.batch * -(-shape.d // cols) * shape.seq)
    free = min(budget - kernel.sram_words((c, 0)) for c in range(cols))
    slots = ring_depth(free, slot_words, cfg.wafer,
                       "training.seq_len: the busiest PE's activations", "shorten the sequences")
    return Plan(shape, rows, slots, slot_words)


def build_step(cfg: RunConfig, params: dict[str, np.ndarray], tokens: np.ndarray,
               targets: np.ndarray) -> Step:
    """The weight-streaming program of one training step of `cfg` on the batch `tokens`,
    `targets` [B, T] from the weights `params` (float32 as the service holds them)."""
    layout = plan(cfg)
    shape, rows, slots, slot_words = layout.shape, layout.rows, layout.slots, layout.slot_words
    cols = shape.cols
    params32 = {name: np.asarray(p, np.float32) for name, p in params.items()}
    kernel = Kernel(name="gpt step", op="weight streaming", ops=[], width=cols, height=rows)
    maps = {(c, r): _Sram.allocate(kernel, (c, r), shape) for r in range(rows)
            for c in range(cols)}
    program = Program(width=cols, height=rows)
    step = Step(program, shape, slots, [])
    for (c, r), sram in maps.items():
        ring = kernel.alloc((c, r), slots * slot_words, "weight ring")
        pe = StreamPE(c, r, cols, rows, shape.seq, slots, slot_words, False, ring,
                      sram.whole, sram.partial, None)
        writer = _StepPE(pe, sram, shape, params32, np.asarray(tokens), np.asarray(targets))
        writer.load(kernel)
        step.passes = writer.write()
        pe.emit(kernel)
        program.pes[(c, r)] = kernel.programs[(c, r)]
        set_routes(program, c, r, cols, rows)
        if r == 0:
            step.top.append(pe)
    program.regions.append(Region("gpt step", "weight streaming", 0, 0, cols, rows))
    _tensors(step, maps)
    _ports(step)
    return step


@dataclass
class _Block:
    """A block's saved activations on one PE (own slices, [features, T])."""

    x: int  # the block's input (the residual stream)
    ln1: int
    xhat1: int
    rstd1: int
    q: int
    k: int
    v: int
    probs: int  # own heads' attention probabilities, [own heads, T, T]
    attn: int  # attention output, the projection's input
    x1: int  # the residual stream after attention
    ln2: int
    xhat2: int
    rstd2: int
    hidden: int  # GELU's output, the MLP proj's input
    gelu_prime: int  # GELU's derivative at its input
    params: dict[str, int]  # resident small parameters: own slices


@dataclass
class _Sram:
    """One PE's SRAM map (word offsets)."""

    blocks: list[_Block]
    x_final: int
    ln_f: int
    xhat_f: int
    rstd_f: int
    ln_f_params: dict[str, int]
    logits: int
    probs: int  # softmax of the logits, then dlogits
    whole: int
    partial: int
    stats: int  # [2, T] row partials
    stats2: int  # [2, T]
    scratch: int  # [max(own d, own ffn), T]
    grad_x: int  # the residual stream's gradient
    grad_a: int  # gradients of own [d] slices
    grad_q: int
    grad_k: int
    grad_v: int
    grad_hidden: int
    param_grads: dict[str, int]  # the small parameters' gradients (own slices)
    embed: int  # the embedding gradient vector [B, own d, T]
    ones: int  # T ones
    loss: int

    @classmethod
    def allocate(cls, kernel: Kernel, pe: tuple[int, int], shape: Shape) -> _Sram:
        c = pe[0]
        t = shape.seq
        nd = _width(split(shape.d, shape.cols)[c])
        nf = _width(split(shape.ffn, shape.cols)[c])
        nv = _width(split(shape.vocab, shape.cols)[c])
        nh = len(_own_heads(split(shape.d, shape.cols)[c], shape.d_head))

        def a(words: int, what: str) -> int:
            return kernel.alloc(pe, words, what)

        sizes: dict[str, int] = {}  # the small parameters' own slices

        def small(name: str, words: int) -> int:
            sizes[name] = words
            return a(words, name)

        def ln_params(name: str) -> dict[str, int]:
            return {f"{name}.{part}": small(f"{name}.{part}", nd) for part in ("weight", "bias")}

        blocks = []
        for i in range(shape.layers):
            p = f"h{i}"
            params = ln_params(f"{p}.ln1") | ln_params(f"{p}.ln2")
            for part in ("q", "k", "v", "proj"):
                params[f"{p}.attn.{part}.bias"] = small(f"{p}.attn.{part}.bias", nd)
            params[f"{p}.mlp.fc.bias"] = small(f"{p}.mlp.fc.bias", nf)
            params[f"{p}.mlp.proj.bias"] = small(f"{p}.mlp.proj.bias", nd)
            blocks.append(_Block(
                x=a(nd * t, f"{p} input"), ln1=a(nd * t, f"{p} ln1"),
                xhat1=a(nd * t, f"{p} ln1 xhat"), rstd1=a(t, f"{p} ln1 rstd"),
                q=a(nd * t, f"{p} q"), k=a(nd * t, f"{p} k"), v=a(nd * t, f"{p} v"),
                probs=a(nh * t * t, f"{p} attention probabilities"),
                attn=a(nd * t, f"{p} attention output"), x1=a(nd * t, f"{p} residual"),
                ln2=a(nd * t, f"{p} ln2"), xhat2=a(nd * t, f"{p} ln2 xhat"),
                rstd2=a(t, f"{p} ln2 rstd"), hidden=a(nf * t, f"{p} gelu"),
                gelu_prime=a(nf * t, f"{p} gelu'"), params=params))
        return cls(
            blocks=blocks, x_final=a(nd * t, "final residual"), ln_f=a(nd * t, "ln_f"),
            xhat_f=a(nd * t, "ln_f xhat"), rstd_f=a(t, "ln_f rstd"),
            ln_f_params=ln_params("ln_f"),
            param_grads={name: a(words, f"{name} gradient") for name, words in sizes.items()},
            logits=a(nv * t, "logits"),
            probs=a(nv * t, "dlogits"), whole=a(shape.d * t, "gathered activation"),
            partial=a(max(shape.d * t, shape.heads * t * t), "partial sums"),
            stats=a(2 * t, "row statistics"), stats2=a(2 * t, "row statistics"),
            scratch=a(max(nd, nf) * t, "scratch"), grad_x=a(nd * t, "residual gradient"),
            grad_a=a(nd * t, "gradient"), grad_q=a(nd * t, "dq"), grad_k=a(nd * t, "dk"),
            grad_v=a(nd * t, "dv"), grad_hidden=a(nf * t, "hidden gradient"),
            embed=a(shape.batch * nd * t, "embedding gradient"), ones=a(t, "ones"),
            loss=a(shape.tokens, "token losses"))


def _width(span: Span) -> int:
    return span[1] - span[0]


def _own_heads(span: Span, d_head: int) -> list[int]:
    """The heads the features `span` belong to."""
    return list(range(span[0] // d_head, (span[1] - 1) // d_head + 1))


@dataclass
class _StepPE:
    """Writes the step's code for one PE."""

    pe: StreamPE
    sram: _Sram
    shape: Shape
    params: dict[str, np.ndarray]
    tokens: np.ndarray  # [B, T]
    targets: np.ndarray  # [B, T]

    def __post_init__(self) -> None:
        s, c = self.shape, self.pe.c
        self.sd = split(s.d, s.cols)[c]
        self.sf = split(s.ffn, s.cols)[c]
        self.sv = split(s.vocab, s.cols)[c]
        self.nd, self.nf, self.nv = _width(self.sd), _width(self.sf), _width(self.sv)
        self.heads = _own_heads(self.sd, s.d_head)
        self.code = self.pe.compute
        self.passes: list[str] = []

    # -- set-up --------------------------------------------------------------------------

    def load(self, kernel: Kernel) -> None:
        """The resident small parameters and the constants."""
        pe, sram = (self.pe.c, self.pe.r), self.sram
        for offsets in [*(b.params for b in sram.blocks), sram.ln_f_params]:
            for name, offset in offsets.items():
                kernel.load(pe, offset, self._param_slice(name))
        kernel.load(pe, sram.ones, np.ones(self.shape.seq, np.float32))

    def _owned(self, name: str) -> tuple[str, slice]:
        """The graph parameter a small parameter's own slice lives in, and where: q, k and
        v's biases are thirds of the fused QKV bias."""
        d = self.shape.d
        for i, part in enumerate(("q", "k", "v")):
            if name.endswith(f".attn.{part}.bias"):
                return (name.replace(f".attn.{part}.", ".attn.qkv."),
                        slice(i * d + self.sd[0], i * d + self.sd[1]))
        return name, slice(*(self.sf if name.endswith("mlp.fc.bias") else self.sd))

    def _param_slice(self, name: str) -> np.ndarray:
        param, where = self._owned(name)
        return self.params[param][where]

    def _into(self, name: str) -> Into:
        """Where the gradient of a small parameter's own slice goes."""
        param, where = self._owned(name)
        return Into(param, (where,), (where.stop - where.start,))

    def _weight(self, layer: str, i: int) -> tuple[np.ndarray, Callable[[int], Into]]:
        """Block i's weight of `layer` as streamed ([K, N]) and where its gradient goes."""
        d, p = self.shape.d, f"h{i}"
        layers = block_layers(self.shape, i)
        if layer in ("q", "k", "v"):
            third = ("q", "k", "v").index(layer)
            fused = f"{p}.attn.qkv.weight"
            return (self.params[fused][:, third * d:(third + 1) * d],
                    weight_into(layers[layer], fused, offset=third * d))
        name = f"{layers[layer].name}.weight"
        return self.params[name], weight_into(layers[layer], name)

    # -- the step ------------------------------------------------------------------------

    def write(self) -> list[str]:
        """The compute thread's code, pass by pass; returns the passes' names."""
        s, sram = self.shape, self.sram
        self._begin("embedding forward")
        self._embed()
        for i in range(s.layers):
            self._begin(f"h{i} forward")
            self._block_forward(i)
        self._begin("head forward")
        self._layernorm(sram.x_final, sram.ln_f, sram.xhat_f, sram.rstd_f, sram.ln_f_params,
                        "ln_f")
        head = head_layer(s)
        self.pe.linear_forward(head, self.params["wte.weight"].T, sram.ln_f, sram.logits,
                               self.sd, self.sv)
        self._cross_entropy()
        self._begin("head backward")
        self.pe.linear_backward(head, self.params["wte.weight"].T, sram.ln_f, sram.probs,
                                sram.grad_a, self.sd, self.sv,
                                weight_into(head, "wte.weight", transposed=True))
        self._layernorm_backward(sram.grad_a, sram.grad_x, sram.xhat_f, sram.rstd_f,
                                 sram.ln_f_params, accumulate=False)
        for i in reversed(range(s.layers)):
            self._begin(f"h{i} backward")
            self._block_backward(i)
        self._begin("embedding backward")
        self._embed_backward()
        return self.passes

    def _begin(self, name: str) -> None:
        self.passes.append(name)
        self.pe.begin_pass()

    def _embed(self) -> None:
        """x = wte[tokens] + wpe[:T], own features."""
        s, t, r, nd = self.shape, self.shape.seq, self.pe.r, self.nd
        f0, f1 = self.sd
        x = self.sram.blocks[0].x if s.layers else self.sram.x_final
        rows = self.params["wte.weight"][self.tokens][:, :, f0:f1].transpose(0, 2, 1)
        self.pe.take(rows.ravel(), lambda j: [
            vec(Op.MOV, nd * t, Mem(x), Mem(self.pe.slot(j) + r * nd * t))])
        positions = self.params["wpe.weight"][:t, f0:f1].T
        self.pe.take(positions.ravel(), lambda j: [
            vec(Op.ADD, nd * t, Mem(x), Mem(x), Mem(self.pe.slot(j)))])

    def _embed_backward(self) -> None:
        """The residual gradient's rows go to the service twice: as embedding rows (a
        [B, own d, T] vector, zero but for this PE's row, summed up the column) and summed
        over the sequences as the position table's rows."""
        s, t, r, nd = self.shape, self.shape.seq, self.pe.r, self.nd
        f0 = self.sd[0]
        sram = self.sram
        size = s.batch * nd * t
        self.code += [vec(Op.MOV, size, Mem(sram.embed), Imm(0.0)),
                      vec(Op.MOV, nd * t, Mem(sram.embed + r * nd * t), Mem(sram.grad_x))]
        b, f, pos = np.meshgrid(np.arange(s.batch), np.arange(nd), np.arange(t), indexing="ij")
        self.code += self.pe.column_reduce(
            sram.embed, size, Into("wte.weight", (self.tokens[b, pos], f0 + f), (s.batch, nd, t)))
        f, pos = np.meshgrid(np.arange(nd), np.arange(t), indexing="ij")
        self.code += self.pe.column_reduce(
            sram.grad_x, nd * t, Into("wpe.weight", (pos, f0 + f), (nd, t)))

    def _block_forward(self, i: int) -> None:
        s, sram, blk, t = self.shape, self.sram, self.sram.blocks[i], self.shape.seq
        layers = block_layers(s, i)
        nxt = sram.blocks[i + 1].x if i + 1 < s.layers else sram.x_final
        self._layernorm(blk.x, blk.ln1, blk.xhat1, blk.rstd1, blk.params, f"h{i}.ln1")
        self.pe.gather(blk.ln1, *self.sd, s.d)
        for part, out in (("q", blk.q), ("k", blk.k), ("v", blk.v)):
            weight, _ = self._weight(part, i)
            self.pe.linear_forward(layers[part], weight, blk.ln1, out, self.sd, self.sd,
                                   gathered=True)
            self._add_bias(out, blk.params[f"h{i}.attn.{part}.bias"], self.nd)
        self._attention(blk)
        weight, _ = self._weight("proj", i)
        self.pe.linear_forward(layers["proj"], weight, blk.attn, blk.x1, self.sd, self.sd)
        self._add_bias(blk.x1, blk.params[f"h{i}.attn.proj.bias"], self.nd)
        self.code.append(vec(Op.ADD, self.nd * t, Mem(blk.x1), Mem(blk.x1), Mem(blk.x)))
        self._layernorm(blk.x1, blk.ln2, blk.xhat2, blk.rstd2, blk.params, f"h{i}.ln2")
        weight, _ = self._weight("fc", i)
        self.pe.linear_forward(layers["fc"], weight, blk.ln2, sram.scratch, self.sd, self.sf)
        self._add_bias(sram.scratch, blk.params[f"h{i}.mlp.fc.bias"], self.nf)
        self.code += forward_and_derivative(
            self.nf * t, Mem(sram.scratch), Mem(blk.gelu_prime), Mem(sram.grad_hidden),
            Mem(blk.hidden), s.activation == "gelu_tanh")
        weight, _ = self._weight("fc2", i)
        self.pe.linear_forward(layers["fc2"], weight, blk.hidden, nxt, self.sf, self.sd)
        self._add_bias(nxt, blk.params[f"h{i}.mlp.proj.bias"], self.nd)
        self.code.append(vec(Op.ADD, self.nd * t, Mem(nxt), Mem(nxt), Mem(blk.x1)))

    def _block_backward(self, i: int) -> None:
        """In: the gradient of the block's output in grad_x; out: its input's, there."""
        s, sram, blk, t = self.shape, self.sram, self.sram.blocks[i], self.shape.seq
        layers = block_layers(s, i)
        nd, nf = self.nd, self.nf
        weight, into = self._weight("fc2", i)
        self._bias_gradient(sram.grad_x, nd, f"h{i}.mlp.proj.bias")
        self.pe.linear_backward(layers["fc2"], weight, blk.hidden, sram.grad_x,
                                sram.grad_hidden, self.sf, self.sd, into)
        self.code.append(vec(Op.MUL, nf * t, Mem(sram.grad_hidden), Mem(sram.grad_hidden),
                             Mem(blk.gelu_prime)))
        self._bias_gradient(sram.grad_hidden, nf, f"h{i}.mlp.fc.bias")
        weight, into = self._weight("fc", i)
        self.pe.linear_backward(layers["fc"], weight, blk.ln2, sram.grad_hidden, sram.grad_a,
                                self.sd, self.sf, into)
        self._layernorm_backward(sram.grad_a, sram.grad_x, blk.xhat2, blk.rstd2, blk.params,
                                 accumulate=True, name=f"h{i}.ln2")
        self._bias_gradient(sram.grad_x, nd, f"h{i}.attn.proj.bias")
        weight, into = self._weight("proj", i)
        self.pe.linear_backward(layers["proj"], weight, blk.attn, sram.grad_x, sram.grad_a,
                                self.sd, self.sd, into)
        self._attention_backward(blk, sram.grad_a)
        for n, (part, grad) in enumerate((("q", sram.grad_q), ("k", sram.grad_k),
                                          ("v", sram.grad_v))):
            self._bias_gradient(grad, nd, f"h{i}.attn.{part}.bias")
            weight, into = self._weight(part, i)
            self.pe.linear_backward(layers[part], weight, blk.ln1, grad, sram.grad_a,
                                    self.sd, self.sd, into, gathered=n > 0, first=n == 0,
                                    last=n == 2)
        self._layernorm_backward(sram.grad_a, sram.grad_x, blk.xhat1, blk.rstd1, blk.params,
                                 accumulate=True, name=f"h{i}.ln1")

    # -- pieces --------------------------------------------------------------------------

    def _add_bias(self, y: int, bias: int, features: int) -> None:
        t = self.shape.seq
        self.code += [vec(Op.ADD, t, Mem(y + n * t), Mem(y + n * t), Mem(bias + n, 0))
                      for n in range(features)]

    def _row_sums(self, dst: int, a: int, features: int, b: int | None = None) -> list[Instr]:
        """dst[f] = sum over the tokens of a[f, :] (times b[f, :]), f < features."""
        t = self.shape.seq
        other = Walk(self.sram.ones, 1) if b is None else Walk(b, 1, step=t)
        return dots(features, t, Walk(a, 1, step=t), other, acc=ACC,
                    out=[Mem(dst + f) for f in range(features)])

    def _send(self, name: str, features: int) -> None:
        """A small parameter's gradient to the service (its buffer is its own: the sending
        thread sends it while the compute thread goes on)."""
        self.code += self.pe.column_reduce(self.sram.param_grads[name], features,
                                           self._into(name))

    def _bias_gradient(self, dy: int, features: int, name: str) -> None:
        self.code += self._row_sums(self.sram.param_grads[name], dy, features)
        self._send(name, features)

    def _feature_sums(self, dst: int, a: int, b: int | None = None) -> None:
        """dst[:] = sum over own features f of a[f, :] (times b[f, :]): a dot product of
        the own features per token."""
        t = self.shape.seq
        other = Walk(self.sram.ones, 0) if b is None else Walk(b, t, step=1)
        self.code += dots(t, self.nd, Walk(a, t, step=1), other, acc=ACC,
                          out=[Mem(dst + q) for q in range(t)])

    def _layernorm(self, x: int, y: int, xhat: int, rstd: int, params: dict[str, int],
                   name: str) -> None:
        """y = (x - mean) rstd gain + bias over the row's d features; saves xhat, rstd."""
        t, nd, st = self.shape.seq, self.nd, self.sram.stats
        self._feature_sums(st, x)
        self._feature_sums(st + t, x, x)
        self.pe.allreduce(st, 2 * t)
        inv = 1.0 / self.shape.d
        self.code += [
            vec(Op.MUL, 2 * t, Mem(st), Mem(st), Imm(inv)),  # mean, E[x^2]
            vec(Op.MUL, t, Mem(rstd), Mem(st), Mem(st)),
            vec(Op.SUB, t, Mem(st + t), Mem(st + t), Mem(rstd)),  # biased variance
            vec(Op.ADD, t, Mem(st + t), Mem(st + t), Imm(self.shape.eps)),
            vec(Op.RSQRT, t, Mem(rstd), Mem(st + t))]
        gain, bias = params[f"{name}.weight"], params[f"{name}.bias"]
        for f in range(nd):
            row = f * t
            self.code += [vec(Op.SUB, t, Mem(xhat + row), Mem(x + row), Mem(st)),
                          vec(Op.MUL, t, Mem(xhat + row), Mem(xhat + row), Mem(rstd)),
                          vec(Op.FMA, t, Mem(y + row), Mem(xhat + row), Mem(gain + f, 0),
                              Mem(bias + f, 0))]

    def _layernorm_backward(self, dy: int, dx: int, xhat: int, rstd: int,
                            params: dict[str, int], *, accumulate: bool,
                            name: str = "ln_f") -> None:
        """dx (+)= rstd (g dy - mean(g dy) - xhat mean(g dy xhat)); the gain's and the
        bias's gradients go to the service. Uses `scratch` for g dy."""
        t, nd, st, g = self.shape.seq, self.nd, self.sram.stats, self.sram.scratch
        self.code += self._row_sums(self.sram.param_grads[f"{name}.weight"], dy, nd, xhat)
        self._send(f"{name}.weight", nd)
        self._bias_gradient(dy, nd, f"{name}.bias")
        gain = params[f"{name}.weight"]
        self.code += [vec(Op.MUL, t, Mem(g + f * t), Mem(dy + f * t), Mem(gain + f, 0))
                      for f in range(nd)]
        self._feature_sums(st, g)
        self._feature_sums(st + t, g, xhat)
        self.pe.allreduce(st, 2 * t)
        self.code.append(vec(Op.MUL, 2 * t, Mem(st), Mem(st), Imm(-1.0 / self.shape.d)))
        tmp = self.sram.stats2
        for f in range(nd):
            row = f * t
            self.code += [vec(Op.ADD, t, Mem(g + row), Mem(g + row), Mem(st)),
                          vec(Op.MUL, t, Mem(tmp), Mem(xhat + row), Mem(st + t)),
                          vec(Op.ADD, t, Mem(g + row), Mem(g + row), Mem(tmp))]
            if accumulate:
                self.code += [vec(Op.MUL, t, Mem(g + row), Mem(g + row), Mem(rstd)),
                              vec(Op.ADD, t, Mem(dx + row), Mem(dx + row), Mem(g + row))]
            else:
                self.code.append(vec(Op.MUL, t, Mem(dx + row), Mem(g + row), Mem(rstd)))

    def _head_of(self, f: int) -> int:
        """The head of own feature f (0-based within the own slice)."""
        return (self.sd[0] + f) // self.shape.d_head

    def _partial_scores(self, a: int, b: int) -> None:
        """partial[h, t, s] = sum over own features f of head h of a[f, t] b[f, s], s <= t
        (zero elsewhere), all-reduced over the row."""
        s, t, p = self.shape, self.shape.seq, self.sram.partial
        self.code.append(vec(Op.MOV, s.heads * t * t, Mem(p), Imm(0.0)))
        for f in range(self.nd):
            h = self._head_of(f)
            self.code += [vec(Op.FMA, q + 1, Mem(p + (h * t + q) * t), Mem(b + f * t),
                              Mem(a + f * t + q, 0), Mem(p + (h * t + q) * t))
                          for q in range(t)]
        self.pe.allreduce(p, s.heads * t * t)

    def _attention(self, blk: _Block) -> None:
        """Own features of softmax(q k^T / sqrt(d_head), causal) v."""
        t, p, tmp = self.shape.seq, self.sram.partial, self.sram.stats
        scale = 1.0 / math.sqrt(self.shape.d_head)
        self._partial_scores(blk.q, blk.k)
        for j, h in enumerate(self.heads):
            for q in range(t):
                n, row = q + 1, blk.probs + (j * t + q) * t
                src = p + (h * t + q) * t
                self.code += [
                    vec(Op.MOV, 1, Reg(ACC), Mem(src)),
                    vec(Op.MAX, n, Reg(ACC), Mem(src), Reg(ACC)),
                    vec(Op.MOV, 1, Mem(tmp), Reg(ACC)),
                    vec(Op.SUB, n, Mem(row), Mem(src), Mem(tmp, 0)),
                    vec(Op.MUL, n, Mem(row), Mem(row), Imm(scale)),
                    vec(Op.EXP, n, Mem(row), Mem(row)),
                    vec(Op.MOV, 1, Reg(ACC), Imm(0.0)),
                    vec(Op.ADD, n, Reg(ACC), Mem(row), Reg(ACC)),
                    vec(Op.RECIP, 1, Mem(tmp), Reg(ACC)),
                    vec(Op.MUL, n, Mem(row), Mem(row), Mem(tmp, 0))]
        for f in range(self.nd):
            probs = blk.probs + self.heads.index(self._head_of(f)) * t * t
            for q in range(t):
                self.code += dots(1, q + 1, Walk(probs + q * t, 1), Walk(blk.v + f * t, 1),
                                  acc=ACC, out=[Mem(blk.attn + f * t + q)])

    def _attention_backward(self, blk: _Block, d_out: int) -> None:
        """dq, dk, dv of own features from the output's gradient `d_out`."""
        t, p, tmp = self.shape.seq, self.sram.partial, self.sram.stats
        scale = 1.0 / math.sqrt(self.shape.d_head)
        sram = self.sram
        self._partial_scores(d_out, blk.v)  # dP[h, t, s] = sum_f dO[f, t] v[f, s]
        for j, h in enumerate(self.heads):  # dS = P (dP - sum_s P dP) / sqrt(d_head)
            for q in range(t):
                n, row = q + 1, p + (h * t + q) * t
                probs = blk.probs + (j * t + q) * t
                self.code += [
                    *dots(1, n, Walk(row, 1), Walk(probs, 1), acc=ACC, out=[Mem(tmp)]),
                    vec(Op.SUB, n, Mem(row), Mem(row), Mem(tmp, 0)),
                    vec(Op.MUL, n, Mem(row), Mem(row), Mem(probs)),
                    vec(Op.MUL, n, Mem(row), Mem(row), Imm(scale))]
        for f in range(self.nd):
            h = self._head_of(f)
            probs = blk.probs + self.heads.index(h) * t * t
            for q in range(t):  # dq[f, q] = sum_s dS[h, q, s] k[f, s]
                self.code += dots(1, q + 1, Walk(p + (h * t + q) * t, 1),
                                  Walk(blk.k + f * t, 1), acc=ACC,
                                  out=[Mem(sram.grad_q + f * t + q)])
            for grad, weights, factor in ((sram.grad_v, probs, d_out),
                                          (sram.grad_k, p + h * t * t, blk.q)):
                # dv[f, s] = sum_{q >= s} P[h, q, s] dO[f, q]; dk likewise with dS and q
                self.code += [vec(Op.MUL if q == t - 1 else Op.FMA, q + 1,
                                  Mem(grad + f * t), Mem(weights + q * t),
                                  Mem(factor + f * t + q, 0),
                                  *(() if q == t - 1 else (Mem(grad + f * t),)))
                              for q in reversed(range(t))]

    def _cross_entropy(self) -> None:
        """The loss's rows (column 0 sends their sum / M up) and dlogits into `probs`."""
        s, t, nv, sram = self.shape, self.shape.seq, self.nv, self.sram
        z, p, m, st = sram.logits, sram.probs, sram.stats, sram.stats2
        self.code.append(vec(Op.MOV, t, Mem(m), Mem(z)))
        self.code += repeat(nv - 1, [vec(Op.MAX, t, Mem(m), Mem(z + t, 1, t), Mem(m))])
        self.pe.allreduce(m, t, Op.MAX)
        self.code += repeat(nv, [vec(Op.SUB, t, Mem(p, 1, t), Mem(z, 1, t), Mem(m))])
        self.code += [vec(Op.EXP, nv * t, Mem(p), Mem(p)),
                      vec(Op.MOV, t, Mem(st), Mem(p)),
                      *repeat(nv - 1, [vec(Op.ADD, t, Mem(st), Mem(p + t, 1, t), Mem(st))]),
                      vec(Op.MOV, t, Mem(st + t), Imm(0.0))]
        own = self._own_targets()
        self.code += [vec(Op.MOV, 1, Mem(st + t + q), Mem(z + (v - self.sv[0]) * t + q))
                      for q, v in own]
        self.pe.allreduce(st, 2 * t)  # row sums, target logits
        if self.pe.c == 0:
            self._loss(st, m)
        inv_m = 1.0 / s.tokens
        self.code += [vec(Op.RECIP, t, Mem(m), Mem(st)),
                      vec(Op.MUL, t, Mem(m), Mem(m), Imm(inv_m)),
                      *repeat(nv, [vec(Op.MUL, t, Mem(p, 1, t), Mem(p, 1, t), Mem(m))])]
        self.code += [vec(Op.SUB, 1, Mem(p + (v - self.sv[0]) * t + q),
                          Mem(p + (v - self.sv[0]) * t + q), Imm(inv_m)) for q, v in own]

    def _own_targets(self) -> list[tuple[int, int]]:
        """(token, target) of this row's tokens whose target is in the own vocabulary."""
        v0, v1 = self.sv
        return [(q, int(v)) for q, v in enumerate(self.targets[self.pe.r]) if v0 <= v < v1]

    def _loss(self, st: int, m: int) -> None:
        """The row's token losses max + log(sum) - target logit (log by Newton's method on
        exp, as `compiler.ops.cross_entropy`) go up column 0 as a [B, T] vector, zero but
        for this row's; the service averages them."""
        t, out = self.shape.seq, self.sram.loss
        k, steps = log_plan(float(self.shape.vocab))
        root, work = Mem(st), Mem(self.sram.scratch)
        for _ in range(k):
            self.code.append(vec(Op.SQRT, t, work, root))
            root = work
        nz = Mem(m + t)  # -log(sum), beside the row maxima
        self.code.append(vec(Op.FMA, t, nz, root, Imm(-(2.0**k)), Imm(2.0**k)))
        for _ in range(steps):
            self.code += [vec(Op.EXP, t, work, nz),
                          vec(Op.FMA, t, work, work, Mem(st), Imm(-1.0)),
                          vec(Op.SUB, t, nz, nz, work)]
        rows = Mem(out + self.pe.r * t)
        self.code += [vec(Op.MOV, self.shape.tokens, Mem(out), Imm(0.0)),
                      vec(Op.SUB, t, rows, Mem(m), nz),  # max + log(sum)
                      vec(Op.SUB, t, rows, rows, Mem(st + t))]
        self.code += self.pe.column_reduce(out, self.shape.tokens,
                                           Into(LOSS, (slice(None),), (self.shape.tokens,)))


def _tensors(step: Step, maps: dict[tuple[int, int], _Sram]) -> None:
    """Result slots: the logits and every block's output (the residual stream)."""
    s = step.shape
    named = [("lm_head.out", s.vocab, lambda m: m.logits)]
    named += [(f"h{i}.mlp.res.out", s.d,
               lambda m, i=i: m.blocks[i + 1].x if i + 1 < s.layers else m.x_final)
              for i in range(s.layers)]
    for name, features, where in named:
        layout = TensorLayout((s.tokens, features))
        slices = split(features, s.cols)
        for (c, r), sram in maps.items():
            layout.slots.append(TensorSlot(c, r, where(sram), (r * s.seq, (r + 1) * s.seq),
                                           slices[c], 1, s.seq))
        step.program.tensors[name] = layout


def _ports(step: Step) -> None:
    """Column c's ports: the vectors its PEs take in, what it sends up out (`edge_ports`)."""
    for c, pe in enumerate(step.top):
        step.program.ports += edge_ports(c, pe, False)
