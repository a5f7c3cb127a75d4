"""`python -m wse_sim generate CONFIG --checkpoint FILE --prompt TEXT`: text from a trained
checkpoint, the prompt prefilled and every new token decoded on the simulated wafer with
a KV cache in SRAM (compiler/generate.py describes the programs)."""

from __future__ import annotations

import argparse
import math
import sys

from wse_sim.commands import int_in

HELP = ("Generate text from a training checkpoint on the wafer: prefill the prompt, decode "
        "token by token with a KV cache in SRAM; report time to the first token, cycles and "
        "microseconds per token, and tokens/s; greedy tokens are checked against the float64 "
        "reference.")


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (got {text})")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="the run config the checkpoint was trained with")
    parser.add_argument("--checkpoint", required=True, metavar="FILE",
                        help="checkpoint.npz written by `train`")
    parser.add_argument("--prompt", required=True, metavar="TEXT", help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int_in(1), default=8, metavar="N",
                        help="tokens to generate (default 8; prompt + N <= model.n_ctx)")
    parser.add_argument("--temperature", type=_temperature, default=0.0, metavar="T",
                        help="0 (default): greedy; above 0: sample from softmax(logits / T)")
    parser.add_argument("--top-k", type=int_in(1), metavar="K",
                        help="sample among the K most likely tokens only")
    parser.add_argument("--seed", type=int_in(0), default=0, metavar="S",
                        help="seed of the sampling (default 0)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from compiler.checkpoint import load_checkpoint
    from compiler.config import load_config
    from compiler.data import normalize_text, saved_tokenizer
    from compiler.generate import check_length, choose, reference_greedy
    from compiler.gpt import build_graph
    from wse_sim.errors import UserError
    from wse_sim.generate import generate

    cfg = load_config(args.config)
    checkpoint = load_checkpoint(args.checkpoint)
    trained = checkpoint.config.get("model")
    if trained != cfg.model.model_dump(mode="json"):
        raise UserError(f"--checkpoint {args.checkpoint}: trained with another model "
                        f"section than {args.config}'s")
    tokenizer = saved_tokenizer(cfg.data.tokenizer, cfg.model.vocab_size,
                                Path(args.checkpoint).parent)
    prompt = tokenizer.encode(normalize_text(args.prompt)).tolist()
    check_length(cfg, len(prompt), args.max_new_tokens)
    params = checkpoint.wafer.params(build_graph(cfg))
    rng = np.random.default_rng(args.seed)
    try:
        out = generate(cfg, params, prompt, args.max_new_tokens,
                       lambda logits: choose(logits, args.temperature, args.top_k, rng))
    except KeyboardInterrupt:
        print("stopped: nothing generated", file=sys.stderr)
        return 130
    print(tokenizer.decode(prompt + out.tokens))
    print()
    clock = cfg.wafer.clock_hz
    mode = "greedy" if args.temperature == 0 else (
        f"temperature {args.temperature:g}" + (f", top-k {args.top_k}" if args.top_k else "")
        + f", seed {args.seed}")
    first = out.prefill_cycles / clock
    print(f"{len(prompt)} prompt tokens, {len(out.tokens)} new ({mode}), "
          f"checkpoint of {checkpoint.step} steps")
    print(f"prefill: {out.prefill_cycles:,} cycles = {first * 1e6:.2f} us to the first token "
          f"({len(prompt) / first:,.0f} prompt tokens/s)")
    if out.decode_cycles:
        per = float(np.mean(out.decode_cycles))
        print(f"decode: {per:,.0f} cycles = {per / clock * 1e6:.2f} us per token "
              f"({clock / per:,.0f} tokens/s) over {len(out.decode_cycles)} tokens")
    print(f"host: compile {out.compile_seconds:.1f} s, engine {out.engine_seconds:.1f} s, "
          f"simulate {out.simulate_seconds:.1f} s")
    if args.temperature != 0:
        return 0
    expected = reference_greedy(cfg, params, prompt, len(out.tokens))
    if expected == out.tokens:
        print("greedy tokens equal the float64 reference's")
        return 0
    first_difference = next(i for i, (a, b) in enumerate(zip(expected, out.tokens, strict=True))
                            if a != b)
    print(f"greedy tokens DIFFER from the float64 reference's from new token "
          f"{first_difference} on: {expected}")
    return 1
