"""Issue 12's training benchmark: `python -m wse_sim train models/gpt_tiny.yaml --steps 300`
on the default corpus, with SGD (the config's, lr 0.1) and with AdamW (the same config with
`optimizer: adamw`, lr 1e-3, Cerebras-GPT's betas, eps and weight decay), each a real
`train` process. For each it prints the host time of the whole process, the step-0 loss
against the final validation loss, and the largest relative error of a step's simulated
loss against float64 from the same weights; then whether each meets the issue's bar
(host time under 15 minutes, validation loss at least 30% below step 0, loss error at most
1e-4). Exit 1 if one does not.

    python benchmarks/train.py [--steps 300] [--out benchmarks/out/train]

The runs' folders (checkpoint, summary.json, loss.png and the printout, train.log) stay in
--out; the AdamW config is written there too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "models" / "gpt_tiny.yaml"
ADAMW = {"optimizer": "adamw", "lr": 1e-3}
HOST_LIMIT = 15 * 60  # seconds
DROP = 0.30  # the final validation loss at least this far below the step-0 loss
LOSS_ERROR = 1e-4


def run(config: Path, steps: int, out: Path) -> tuple[float, dict]:
    """One `train` process (its printout kept in OUT/train.log); its host seconds and
    summary. It runs in the repository, so a config there is named as in the README."""
    out.mkdir(parents=True, exist_ok=True)
    name = config.relative_to(ROOT) if config.is_relative_to(ROOT) else config
    started = time.perf_counter()
    with open(out / "train.log", "w") as log:
        subprocess.run([sys.executable, "-m", "wse_sim", "train", str(name), "--steps",
                        str(steps), "--out", str(out), "--quiet"], check=True,
                       stdout=log, cwd=ROOT)
    seconds = time.perf_counter() - started
    return seconds, json.loads((out / "summary.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "train")
    args = parser.parse_args()
    args.out = args.out.resolve()  # the runs start in the repository
    args.out.mkdir(parents=True, exist_ok=True)
    adamw = yaml.safe_load(TINY.read_text())
    adamw["training"].update(ADAMW)
    adamw_config = args.out / "gpt_tiny_adamw.yaml"
    adamw_config.write_text(yaml.safe_dump(adamw))
    print(f"{'run':<6} {'host':>8} {'step-0 loss':>12} {'final val':>10} {'drop':>7} "
          f"{'max loss err':>13} {'checks':>7}  bar met")
    ok = True
    for name, config in (("sgd", TINY), ("adamw", adamw_config)):
        folder = args.out / name
        for stale in ("checkpoint.npz", "summary.json", "loss.png"):
            (folder / stale).unlink(missing_ok=True)
        seconds, s = run(config, args.steps, folder)
        met = (seconds < HOST_LIMIT and s["val_loss_drop"] >= DROP
               and s["max_loss_error"] <= LOSS_ERROR)
        ok &= met
        print(f"{name:<6} {seconds / 60:>6.1f} m {s['step0_loss']:>12.4f} "
              f"{s['final_val_loss']:>10.4f} {s['val_loss_drop']:>7.1%} "
              f"{s['max_loss_error']:>13.1e} {'passed' if s['checks_passed'] else 'FAILED':>7}"
              f"  {'yes' if met else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
