"""Weight-streaming linear layers (`compiler.streaming`): the numbers against float64, the
weights in and the gradients out through the edge, and what bounds a layer."""

from __future__ import annotations

import numpy as np
import pytest

from compiler.config import TrainingConfig
from compiler.streaming.linear import (
    LinearLayer,
    build_stack,
    phase_cost,
    phase_events,
    streamed_words,
)
from wse_sim.errors import UserError
from wse_sim.hardware import WaferConfig
from wse_sim.pipeline import run_linear_stack

SGD = TrainingConfig(batch_size=1, seq_len=2, lr=0.1)
ADAMW = TrainingConfig(batch_size=1, seq_len=2, lr=0.01, optimizer="adamw")


def wafer(words_per_cycle: float, **fields) -> WaferConfig:
    """WSE-2 with the memory service moving `words_per_cycle` 32-bit words a cycle."""
    base = WaferConfig()
    return WaferConfig(edge_bytes_per_s=words_per_cycle * 4 * base.clock_hz, **fields)


def stack_run(layers, tokens, rows, cols, chip, training=SGD, seed=0, precision="fp32"):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, layers[0].k)).astype(np.float32)
    weights = {layer.name: rng.standard_normal((layer.k, layer.n)).astype(np.float32)
               for layer in layers}
    dy = rng.standard_normal((tokens, layers[-1].n)).astype(np.float32)
    return run_linear_stack(layers, x, weights, dy, rows=rows, cols=cols, wafer=chip,
                            training=training, precision=precision)


# Column- and row-parallel layers (K <= N, K > N) in one stack.
LAYERS = [LinearLayer("up", 6, 11), LinearLayer("down", 11, 5), LinearLayer("mid", 5, 5),
          LinearLayer("out", 5, 9)]


@pytest.mark.parametrize("rows, cols, training, precision", [
    (2, 3, SGD, "fp32"), (3, 5, ADAMW, "fp32"), (1, 1, SGD, "fp32"), (2, 3, SGD, "mixed"),
    (3, 5, ADAMW, "mixed")])
def test_stack_matches_float64_through_a_narrow_edge(rows, cols, training, precision):
    """Every layer's output, dX, every dW (as the memory service received it) and the
    service's update pass the check, with the edge at a quarter word a cycle; `mixed`
    against the reference with the same fp16 weights (and an odd vector length, 5 and 11
    halves: each vector starts a new wavelet)."""
    result, report = stack_run(LAYERS, 7, rows, cols, wafer(0.25), training,
                               precision=precision)
    check = report["check"]
    assert check["passed"], {n: e for n, e in check["tensors"].items()
                             if e > check["tolerances"][n]}
    assert {f"dw:{layer.name}" for layer in LAYERS} <= set(check["tensors"])
    assert {f"update:{layer.name}" for layer in LAYERS} <= set(check["tensors"])
    weights = sum(layer.k * layer.n for layer in LAYERS)
    # forward and again backward; mixed: two halves a word, each vector from a new word
    streamed = sum(2 * (layer.n if layer.parallel == "column" else layer.k)
                   * streamed_words(layer, precision) for layer in LAYERS)
    assert streamed == 2 * weights if precision == "fp32" else weights < streamed < 2 * weights
    totals = result.stats.totals()
    assert totals["edge_in"] == streamed
    assert totals["edge_out"] == weights  # every gradient, once, fp32
    # The measured timeline: each pass's weights arrive after the edge latency, in pass
    # order; each layer's dW reaches the service after its weights came in.
    timeline = report["weight_streaming"]["timeline"]
    weights_in = [e for e in timeline if e["stream"] == "weights in"]
    grads_out = {e["layer"]: e for e in timeline if e["stream"] == "gradients out"}
    assert len(weights_in) == 2 * len(LAYERS) and set(grads_out) == {la.name for la in LAYERS}
    assert weights_in[0]["start"] == wafer(0.25).edge_latency_cycles
    assert all(a["start"] < b["start"] and a["end"] < b["end"]
               for a, b in zip(weights_in, weights_in[1:], strict=False))
    for entry in weights_in[len(LAYERS):]:
        assert entry["start"] < grads_out[entry["layer"]]["start"]
        assert entry["end"] < grads_out[entry["layer"]]["end"] <= max(
            result.port_last_cycle.values())
    # The service updates a layer once its dW is complete, one layer after another; the
    # step ends when the wafer and the service are both done.
    ws = report["weight_streaming"]
    updates = ws["service_updates"]
    assert [u["what"] for u in updates] == [layer.name for layer in reversed(LAYERS)]
    for u in updates:
        assert u["start_seconds"] >= grads_out[u["what"]]["end"] / wafer(0.25).clock_hz
    assert ws["step_seconds"] == pytest.approx(max(ws["wafer_seconds"],
                                                   updates[-1]["end_seconds"]))


def layer_cycles(layer, tokens, rows, cols, words_per_cycle, precision="fp32"):
    result, report = stack_run([layer], tokens, rows, cols, wafer(words_per_cycle),
                               precision=precision)
    assert report["check"]["passed"]
    return result.cycles, report


def test_halving_the_edge_bandwidth_doubles_an_io_bound_layer_only():
    """One token per PE row and 8 columns sharing half a word a cycle: the layer waits for
    its weights, and half the bandwidth takes about twice as long (the edge latency, 850
    cycles once, is the rest). 64 tokens per row on the same edge: the products take
    longer than the weights, the ring prefetches, and half the bandwidth changes little."""
    layer = LinearLayer("fc", 32, 96)
    io_full, report = layer_cycles(layer, 2, 2, 8, 0.5)
    io_half, _ = layer_cycles(layer, 2, 2, 8, 0.25)
    assert {p["bound"] for p in report["weight_streaming"]["phases"]} == {"weight I/O"}
    assert 1.85 < io_half / io_full < 2.05
    compute_full, report = layer_cycles(layer, 128, 2, 8, 0.5)
    compute_half, _ = layer_cycles(layer, 128, 2, 8, 0.25)
    assert {p["bound"] for p in report["weight_streaming"]["phases"]} == {"compute"}
    assert compute_half / compute_full < 1.1


def test_fp16_weights_halve_an_io_bound_forward_only():
    """Mixed precision streams two fp16 weights a wavelet: the I/O-bound layer above
    takes half the forward's cycles, but its backward is bound as before by dW leaving in
    fp32 (a word a weight, the outbound side's rate): about 3/4 of fp32's cycles."""
    layer = LinearLayer("fc", 32, 96)
    fp32, _ = layer_cycles(layer, 2, 2, 8, 0.5)
    mixed, report = layer_cycles(layer, 2, 2, 8, 0.5, precision="mixed")
    assert {p["bound"] for p in report["weight_streaming"]["phases"]} == {"weight I/O"}
    assert 0.72 < mixed / fp32 < 0.78


@pytest.mark.parametrize("precision", ["fp32", "mixed"])
@pytest.mark.parametrize("layer, tokens, rows, cols, words", [
    (LinearLayer("col", 24, 48), 16, 2, 6, 2.0),  # compute-bound, column-parallel
    (LinearLayer("row", 48, 24), 16, 2, 6, 2.0),  # compute-bound, row-parallel
    (LinearLayer("col", 24, 48), 4, 4, 6, 0.5),  # weight-I/O-bound
    (LinearLayer("row", 48, 24), 4, 4, 6, 0.5),
])
def test_cost_model_tracks_the_simulation(layer, tokens, rows, cols, words, precision):
    """`phase_cost`, summed over both passes, within 12% of the simulated cycles (the edge
    latency, paid once per run, added): the model the projections use."""
    cycles, report = layer_cycles(layer, tokens, rows, cols, words, precision)
    chip = wafer(words)
    modelled = report["weight_streaming"]["modelled_cycles"] + chip.edge_latency_cycles
    assert abs(modelled / cycles - 1) < 0.12, (modelled, cycles)


def test_phase_cost_names_the_bound():
    """Cerebras-GPT-111M's first MLP layer on WSE-2 (44 words a cycle over 750 columns):
    each column's weights come at 1/17 word a cycle, so a row needs 17 tokens for its
    products to take longer than its weights."""
    chip = WaferConfig()
    layer = LinearLayer("fc", 768, 3072)
    assert chip.edge_words_per_cycle == pytest.approx(150e9 / 850e6 / 4)
    assert phase_cost(layer, 8 * 994, 994, 750, chip, backward=False).bound == "weight I/O"
    assert phase_cost(layer, 32 * 994, 994, 750, chip, backward=False).bound == "compute"


def test_a_stack_too_wide_for_the_columns_or_the_sram_is_refused():
    x, dy = np.zeros((4, 3), np.float32), np.zeros((4, 3), np.float32)
    layer = LinearLayer("a", 3, 3)
    with pytest.raises(UserError, match="cols: 4 PE columns, but an activation has 3"):
        build_stack([layer], x, {"a": np.zeros((3, 3))}, dy, rows=1, cols=4,
                    wafer=WaferConfig())
    square = LinearLayer("sq", 2000, 2000)  # buffers 12,000 words of 12,288: no ring
    x, dy = np.zeros((1, 2000), np.float32), np.zeros((1, 2000), np.float32)
    with pytest.raises(UserError, match="1 x 1 PEs leave room for 0 weight vectors of 2000"):
        build_stack([square], x, {"sq": np.zeros((2000, 2000))}, dy, rows=1, cols=1,
                    wafer=WaferConfig())
    with pytest.raises(UserError, match=r"op stack \(linear\): PE \(0, 0\) .* needs at least"):
        build_stack([LinearLayer("big", 7000, 7000)], np.zeros((1, 7000)),
                    {"big": np.zeros((7000, 7000))}, np.zeros((1, 7000)), rows=1, cols=1,
                    wafer=WaferConfig())


@pytest.mark.parametrize("precision", ["fp32", "mixed"])
@pytest.mark.parametrize("layers, tokens, rows, cols", [
    ([LinearLayer("col", 16, 48)], 8, 2, 4),
    ([LinearLayer("row", 48, 16)], 8, 2, 4),
    ([LinearLayer("a", 32, 64), LinearLayer("b", 64, 32)], 16, 4, 8),
])
def test_event_model_matches_the_counters(layers, tokens, rows, cols, precision):
    """`phase_events` (the energy estimate at shapes too large to simulate) against the
    counted run: arithmetic, link crossings (a word to an outbound port crosses none) and
    edge words exactly, SRAM words within 5%."""
    result, _ = stack_run(layers, tokens, rows, cols, wafer(2.0), precision=precision)
    modelled: dict[str, int] = {}
    for backward in (False, True):
        for layer in layers:
            for name, count in phase_events(layer, tokens, rows, cols, backward=backward,
                                            precision=precision).items():
                modelled[name] = modelled.get(name, 0) + count
    stats = result.stats
    ops, flops = int(stats.ops.sum()), int(stats.flops.sum())
    assert modelled["fma"] == flops - ops
    assert modelled["fp_other"] == 2 * ops - flops
    for name in ("sram_read", "sram_write"):
        counted = int(getattr(stats, name).sum())
        assert abs(modelled[name] / counted - 1) < 0.05, (name, modelled[name], counted)
    assert modelled["hop"] == int(stats.link.sum())
    assert modelled["edge_words"] == int(stats.edge_in.sum() + stats.edge_out.sum())
