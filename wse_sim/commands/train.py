"""`python -m wse_sim train CONFIG --steps N`: train on text, every step simulated on the
wafer and checked against float64 (wse_sim/train.py describes the loop); a checkpoint, a
JSON summary and a loss curve in the output folder, written as one set at the end or on
Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wse_sim.commands import int_in

if TYPE_CHECKING:
    from wse_sim.train import StepResult, Training

HELP = ("Train a GPT for N steps on a text (default: Python's help topics), every step "
        "simulated on the wafer and checked against the float64 reference; write a "
        "checkpoint, a JSON summary and a loss curve.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from wse_sim.train import VAL_EVERY, VAL_WINDOWS

    parser.add_argument("config", help="run config YAML (see models/)")
    parser.add_argument("--steps", type=int_in(1), required=True, metavar="N",
                        help="train until N steps are done (with --resume: in all)")
    parser.add_argument("--data", metavar="FILE",
                        help="UTF-8 text to train on (default: data.path of the config, "
                             "else Python's help topics)")
    parser.add_argument("--out", metavar="DIR",
                        help="folder of checkpoint.npz, summary.json, loss.png (and a BPE "
                             "tokenizer.json); default out/train-CONFIG_NAME")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run whose checkpoint is in --out")
    parser.add_argument("--val-every", type=int_in(1), default=VAL_EVERY, metavar="K",
                        help=f"validation loss every K steps (default {VAL_EVERY})")
    parser.add_argument("--val-windows", type=int_in(1), default=VAL_WINDOWS, metavar="N",
                        help=f"validation windows evaluated (default {VAL_WINDOWS})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from compiler.config import load_config
    from compiler.footprint import step_footprint
    from wse_sim.errors import UserError
    from wse_sim.hostmem import require
    from wse_sim.outputs import check_outputs
    from wse_sim.train import CHECKPOINT_FILE, OUTPUT_FILES, Training

    out = args.out or str(Path("out") / f"train-{Path(args.config).stem}")
    inputs = [args.config] + ([args.data] if args.data else [])
    check_outputs(folders={"--out": (out, OUTPUT_FILES)}, inputs=inputs)
    cfg = load_config(args.config)
    require(step_footprint(cfg, reference=True), args.config)
    try:
        training = Training(cfg, args.config, out, args.data, resume=args.resume,
                            val_every=args.val_every, val_windows=args.val_windows)
    except KeyboardInterrupt:
        print("stopped before the first step: nothing written", file=sys.stderr)
        return 130
    if training.step >= args.steps:
        raise UserError(f"--steps {args.steps}: {Path(out) / CHECKPOINT_FILE} already holds "
                        f"{training.step} steps")
    print(_header(training, args.steps))
    bar = tqdm(total=args.steps, initial=training.step, unit="step", file=sys.stderr,
               disable=args.quiet or not sys.stderr.isatty(), dynamic_ncols=True)
    try:
        if training.validation_due(args.steps):  # an interrupt came between step and val
            training.validate()
        while training.step < args.steps:
            result = training.train_step()
            line = _step_line(training, result, args.steps)
            if training.validation_due(args.steps):
                wafer, _ = training.validate()
                line += f"  val {wafer:.4f}"
            bar.write(line, file=sys.stdout)
            bar.update(1)
        bar.close()
        summary = _write(training, out, args.steps)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the save
        bar.close()
        cycle = training.interrupted_at
        where = f" (cycle {cycle:,} of its simulation)" if cycle is not None else ""
        _write(training, out, args.steps)
        print(f"stopped at step {training.step}{where}: {Path(out) / CHECKPOINT_FILE} holds "
              f"{training.step} steps; --resume continues", file=sys.stderr)
        return 130
    print(_footer(summary, out))
    return 0 if summary["checks_passed"] else 1


def _write(training: Training, out: str, steps: int) -> dict[str, Any]:
    """The checkpoint, the summary and the loss curve, as one set; the summary."""
    from wse_sim.losscurve import loss_curve_png
    from wse_sim.outputs import strict_json, write_files
    from wse_sim.train import CHECKPOINT_FILE, CURVE_FILE, SUMMARY_FILE

    summary = training.summary(partial=training.step < steps)
    h = training.run.history
    title = (f"{Path(training.source).name}: {training.cfg.training.optimizer}, "
             f"{training.step} steps on {training.data['source']}")
    folder = Path(out)
    write_files({
        folder / CHECKPOINT_FILE: training.checkpoint().write,
        folder / SUMMARY_FILE: (strict_json(summary, indent=1) + "\n").encode(),
        folder / CURVE_FILE: loss_curve_png(h["loss"], h["loss_float64"], h["val_step"],
                                            h["val_loss"], h["val_loss_float64"], title),
    })
    return summary


def _header(training: Training, steps: int) -> str:
    cfg, compiled = training.cfg, training.compiled
    train, data = cfg.training, training.data
    start = f"steps {training.step}..{steps - 1}" if training.step else f"{steps} steps"
    micro = (f" in {train.micro_batches} micro-batches of {train.micro_batch}"
             if train.micro_batches > 1 else "")
    return (f"{training.source}: {compiled.graph.parameter_count():,} parameters on "
            f"{sum(len(k.programs) for k in compiled.kernels)} PEs ({len(compiled.kernels)} "
            f"kernels, compiled once in {compiled.seconds:.1f} s), {train.optimizer} lr "
            f"{train.lr:g}, batch {train.batch_size} x {train.seq_len} tokens{micro}; data "
            f"{data['source']} ({data['tokenizer']} tokens: {data['train_tokens']:,} train, "
            f"{data['validation_tokens']:,} validation); {start}")


def _step_line(training: Training, result: StepResult, steps: int) -> str:
    error = abs(result.loss - result.loss_reference) / abs(result.loss_reference)
    seconds = result.cycles / training.cfg.wafer.clock_hz
    line = (f"step {result.step:>{len(str(steps))}}/{steps}  loss {result.loss:.4f}  "
            f"(float64 {result.loss_reference:.4f}, rel. error {error:.1e})  "
            f"simulated {seconds * 1e6:,.1f} us  host {result.host_seconds:.1f} s")
    if not result.check_passed:
        line += f"  CHECK FAILED: {', '.join(result.failures[:4])}"
    return line


def _footer(summary: dict[str, Any], out: str) -> str:
    def shown(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    drift = summary["weight_drift"]
    checks = ("every step's check passed" if summary["checks_passed"]
              else "SOME STEPS FAILED THE CHECK")
    return "\n".join([
        f"{summary['steps']} steps: {summary['total_cycles']:,} cycles = "
        f"{summary['simulated_seconds'] * 1e3:.3f} ms simulated, "
        f"{shown(summary['tokens_per_second'], ',.0f')} tokens/s; host "
        f"{summary['host_seconds']:.0f} s",
        f"loss: step 0 {shown(summary['step0_loss'], '.4f')}, final validation "
        f"{shown(summary['final_val_loss'], '.4f')} "
        f"({shown(summary['val_loss_drop'], '.1%')} below step 0)",
        f"largest loss error of a step against float64 from the same weights: "
        f"{shown(summary['max_loss_error'], '.1e')}; {checks}",
        f"weight drift from the float64 run: {shown(drift['max'], '.1e')} "
        f"({drift['parameter']})",
        f"wrote {Path(out)}: checkpoint.npz, summary.json, loss.png",
    ])
