"""A config campaign: random small GPT configs through the whole product, as a user runs it.

    python tests/config_campaign.py --configs 100 [--seed 0] [--timeout 900] [--out DIR]

Config k of seed s (drawn from numpy's generator seeded with (s, k), so any one can be
drawn again alone) is a gpt_tiny-sized model and training step with random widths (1, 2
or 4 heads of 2..16, at least 4 features; an MLP of 1 to 4 widths or one more), 1 or 2
layers, a vocabulary of 8..299, 2..16 tokens, 1..3 sequences (micro-batches sometimes), SGD
or AdamW, GELU exact or tanh, every placement strategy, lane widths chosen or 2..16, fp32
or mixed precision; a quarter of them in weight-streaming mode (fp32, the whole batch at
once) instead. Each is written to DIR/config-k.yaml and run in a child process with
`python -m wse_sim run`, which must either pass the check (exit 0) or refuse the config in
one line naming what (exit 2, as every user error does). A check that fails (exit 1), an
error naming an instruction of the compiled program (the compiler emitted an invalid one),
a traceback or a several-line error, a crash or a run past --timeout is a bug: its config
stays in DIR with what the run printed. The summary (printed and DIR/summary.json) counts
the outcomes and lists each refusal's line. Exit status 0 if no config found a bug.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

from compiler.config import PLACEMENTS
from wse_sim.commands import OneLineParser, int_in
from wse_sim.errors import UserError
from wse_sim.outputs import check_outputs

BUGS = ("check failed", "invalid program", "not one line", "crashed", "hung")
# A one-line error about an instruction of the compiled program: the compiler's fault, not
# the config's (`wse_sim.program.validate`'s lines name the PE, task and instruction).
INVALID_PROGRAM = re.compile(r"PE \(\d+, \d+\) task \d+ instr \d+")


def draw_config(seed: int, k: int) -> dict:
    """Config k of campaign `seed` (module docstring)."""
    rng = np.random.default_rng((seed, k))
    heads = int(rng.choice([1, 2, 4]))
    # At least 4 features: over 2, LayerNorm's outputs are nearly +-1 and the gradients
    # cancel so much that numpy itself in fp32 misses the check's 1e-4 on a bias gradient.
    d_model = heads * int(rng.choice([2, 4, 8, 16] if heads > 1 else [4, 8, 16]))
    seq = int(rng.integers(2, 17))
    batch = int(rng.integers(1, 4))
    micro = int(rng.choice([d for d in range(1, batch + 1) if batch % d == 0]))
    training = {"batch_size": batch, "seq_len": seq, "lr": float(rng.choice([0.1, 0.01])),
                "seed": int(rng.integers(0, 100)), "optimizer": str(rng.choice(["sgd", "adamw"]))}
    if rng.random() < 0.25:
        # weight streaming lays the step out itself, in fp32, the whole batch at once
        compile_ = {"mode": "weight_streaming"}
    else:
        precision = str(rng.choice(["fp32", "fp32", "mixed"]))
        compile_ = {"placement": str(rng.choice(PLACEMENTS)), "seed": int(rng.integers(0, 10)),
                    "precision": precision}
        if rng.random() < 0.3:
            compile_["lane_width"] = int(rng.choice([2, 3, 4, 8, 16]))
        if rng.random() < 0.3 and precision == "fp32":  # micro-batches: fp32 only
            training["micro_batch_size"] = micro
    return {
        "model": {"vocab_size": int(rng.integers(8, 300)), "n_ctx": seq + int(rng.integers(0, 8)),
                  "d_model": d_model, "n_layers": int(rng.integers(1, 3)), "n_heads": heads,
                  "d_ffn": int(rng.choice([1, 2, 4])) * d_model + int(rng.integers(0, 2)),
                  "activation": str(rng.choice(["gelu", "gelu_tanh"])),
                  "tie_embeddings": True},
        "training": training,
        "wafer": "wse2",
        "compile": compile_,
    }


def outcome(code: int | None, stderr: str) -> str:
    """How one run ended: "passed", "refused" (exit 2, one line) or one of BUGS."""
    if code is None:
        return "hung"
    if code == 0:
        return "passed"
    if code == 1:
        return "check failed"
    if code == 2:
        if len(stderr.strip().splitlines()) != 1:
            return "not one line"
        return "invalid program" if INVALID_PROGRAM.search(stderr) else "refused"
    return "crashed"


def campaign(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    counts: Counter[str] = Counter()
    refusals, bugs = [], []
    started = time.monotonic()
    for k in range(args.configs):
        config = out / f"config-{k}.yaml"
        config.write_text(yaml.safe_dump(draw_config(args.seed, k), sort_keys=False))
        t0 = time.monotonic()
        try:
            run = subprocess.run([sys.executable, "-m", "wse_sim", "run", str(config)],
                                 capture_output=True, text=True, timeout=args.timeout)
            code, printed, stderr = run.returncode, run.stdout + run.stderr, run.stderr
        except subprocess.TimeoutExpired as err:
            code, printed, stderr = None, str(err.stdout or "") + str(err.stderr or ""), ""
        ended = outcome(code, stderr)
        counts[ended] += 1
        seconds = round(time.monotonic() - t0, 1)
        print(f"config {k}: {ended}, {seconds} s" + (f": {stderr.strip()}" if ended == "refused"
                                                     else ""), flush=True)
        if ended == "refused":
            refusals.append({"config": k, "line": stderr.strip()})
        if ended in BUGS:
            (out / f"config-{k}.out").write_text(printed[-20000:])
            bugs.append({"config": str(config), "outcome": ended})
        else:
            config.unlink()
    summary = {"configs": args.configs, "seed": args.seed, "outcomes": dict(counts),
               "seconds": round(time.monotonic() - started, 1), "bugs": bugs,
               "refusals": refusals}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "refusals"}))
    return 1 if bugs else 0


def main() -> int:
    parser = OneLineParser(prog="tests/config_campaign.py",
                           description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=int_in(1), default=100, help="configs to run (100)")
    parser.add_argument("--seed", type=int_in(0), default=0, help="the campaign's seed (0)")
    parser.add_argument("--timeout", type=int_in(1), default=900,
                        help="seconds per run (900)")
    parser.add_argument("--out", default="config-campaign", help="folder of the kept configs")
    args = parser.parse_args()
    try:  # before the first run, not after the last
        check_outputs(folders={"--out": (args.out, ["summary.json"])})
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return campaign(args)


if __name__ == "__main__":
    sys.exit(main())
