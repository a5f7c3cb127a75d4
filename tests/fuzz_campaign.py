"""A fuzz campaign: thousands of random valid Programs (tests/fuzz_programs.py) through the
engine, in child processes, so that a segfault or a hang ends one batch, not the campaign,
and is seen for what it is.

    python tests/fuzz_campaign.py --programs 2000 [--batch 250] [--seed 0] [--out DIR]

Each batch is a child process running Hypothesis with its own seed (the campaign's seed +
the batch number, so a campaign is repeatable) over `--batch` programs, each through
`fuzz_programs.run_case` (twin run without bulk execution included). Before each program
the child saves it as DIR/batch-K.npz (with its wafer; `meta` holds the cycle limit and
its index), so the program that crashed or hung a child is on disk:

    python -m wse_sim simulate DIR/batch-K.npz --max-cycles N

A batch ends "ok", "failed" (an invariant or an unexpected exception: Hypothesis shrinks
it and prints the smallest program; the file then holds that program), "crashed" (killed
by a signal: a segfault) or "hung" (past --timeout). The summary, printed and written to
DIR/summary.json, gives the programs run, their endings, and each batch's outcome. Exit
status 0 if every batch was ok.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(programs: int, seed: int, last: Path, report: Path) -> int:
    """Run one batch in this process; write its endings to `report`."""
    sys.path.insert(0, str(HERE))
    from fuzz_programs import cases, run_case
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as with_seed

    from wse_sim.program import save_program

    endings: Counter[str] = Counter()

    @with_seed(seed)
    @settings(max_examples=programs, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(cases())
    def batch(case):
        case.program.meta = {"fuzz_max_cycles": case.max_cycles, "fuzz_index": endings.total()}
        save_program(case.program, last, case.wafer)
        endings[run_case(case, twin=True)] += 1

    try:
        batch()
    finally:
        report.write_text(json.dumps({"programs": endings.total(), "endings": endings}))
    return 0


def _index(last: Path) -> int | None:
    from wse_sim.errors import UserError
    from wse_sim.program import load_program

    try:
        return load_program(last).meta["fuzz_index"]
    except (UserError, KeyError):
        return None


def campaign(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    total: Counter[str] = Counter()
    batches = []
    started = time.monotonic()
    done = 0
    k = 0
    while done < args.programs:
        size = min(args.batch, args.programs - done)
        last, report = out / f"batch-{k}.npz", out / f"batch-{k}.json"
        report.unlink(missing_ok=True)
        command = [sys.executable, "-X", "faulthandler", __file__, "--child",
                   "--programs", str(size), "--seed", str(args.seed + k), "--last", str(last),
                   "--report", str(report)]
        t0 = time.monotonic()
        try:
            run = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            code = run.returncode
            outcome = ("ok" if code == 0 else "failed" if code > 0
                       else f"crashed ({signal.Signals(-code).name})")
            tail = (run.stdout + run.stderr)[-4000:]
        except subprocess.TimeoutExpired as err:
            outcome, tail = f"hung (> {args.timeout} s)", str(err.stderr or "")[-4000:]
        if report.exists():
            ran = json.loads(report.read_text())["programs"]
            total.update(json.loads(report.read_text())["endings"])
        else:  # killed: the programs before the one it was running
            ran = _index(last)
        entry = {"batch": k, "seed": args.seed + k, "programs": ran, "outcome": outcome,
                 "seconds": round(time.monotonic() - t0, 1)}
        if outcome != "ok":
            entry.update(program=str(last), output=tail)
        else:
            last.unlink(missing_ok=True)
        batches.append(entry)
        print(f"batch {k} (seed {args.seed + k}): {outcome}, {ran} programs, "
              f"{entry['seconds']} s", flush=True)
        if outcome != "ok":
            print(tail, flush=True)
        done += size
        k += 1
    ran_all = sum(b["programs"] or 0 for b in batches)
    summary = {"programs": ran_all, "endings": dict(sorted(total.items())),
               "seconds": round(time.monotonic() - started, 1),
               "batches_not_ok": sum(b["outcome"] != "ok" for b in batches),
               "batches": batches}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "batches"}))
    return 0 if summary["batches_not_ok"] == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--programs", type=int, default=2000, help="programs in all (2000)")
    parser.add_argument("--batch", type=int, default=250, help="programs per child (250)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first batch (0)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per batch (900)")
    parser.add_argument("--out", default="fuzz-campaign", help="folder of the batch files")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--last", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.programs, args.seed, args.last, args.report)
    return campaign(args)


if __name__ == "__main__":
    sys.exit(main())
