"""Bad input, as a new user gives it, to every command: each case must end in exit code 2
with at most 3 lines on stderr, the first naming what is wrong, no traceback, and no file
written or replaced (the case's folder is compared entry by entry, inode and mtime
included, before and after).

Classes: encodings (E), input files (F), numbers (N: infinite, of the wrong type, too
large for this machine's memory), output paths (O), traffic options (T) and the command
line itself (A). The issue's items that are not exit-2 cases are tested where their
behaviour lives: JSON without NaN (test_traffic, test_end_to_end, test_check), the
output mode and the plots written all or nothing under Ctrl-C (test_outputs).

Cases run in-process through `wse_sim.cli.main` (an exception that is not a UserError
would fail the test as it would print a traceback); `SUBPROCESS` repeats a few through
`python -m wse_sim` to check the real process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_plots import synthetic_run

from wse_sim.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "models" / "gpt_tiny.yaml"
UNWRITABLE = "/sys/wse-sim-bad-input"  # creating files in /sys fails even for root
BIG = 10**12
DEADLINE = 120  # seconds a case may take

Setup = Callable[[Path], list[str]]  # makes the case's files in a folder; returns argv


@pytest.fixture(scope="module")
def program_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("program") / "step.npz"
    assert main(["compile", str(TINY), "-o", str(path)]) == 0
    return path


# -- making the inputs ----------------------------------------------------------------------


def config(folder: Path, name: str = "cfg.yaml", **changes: object) -> str:
    """gpt_tiny with `section__field=value` changes, as YAML in `folder`."""
    data = yaml.safe_load(TINY.read_text())
    data["wafer"] = {"preset": "wse2"}
    for dotted, value in changes.items():
        section, field = dotted.split("__")
        data[section][field] = value
    path = folder / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def raw(folder: Path, name: str, content: bytes | str) -> str:
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def tiny_with(old: str, new: str) -> Callable[[Path], str]:
    """A config: gpt_tiny's text with one line edited (what a user types)."""
    def make(folder: Path) -> str:
        text = TINY.read_text()
        assert old in text
        return raw(folder, "cfg.yaml", text.replace(old, new))
    return make


def fifo(folder: Path, name: str = "fifo") -> str:
    os.mkfifo(folder / name)
    return str(folder / name)


def unix_socket(folder: Path) -> str:
    """A special file that any user can make (a device would need root, and a real one,
    /dev/null, is what a regression would replace)."""
    path = folder / "sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
    return str(path)


def symlink(folder: Path, name: str, target: str) -> str:
    (folder / name).symlink_to(target)
    return str(folder / name)


def run_file(folder: Path, content: bytes | str | None = None) -> str:
    if content is None:
        content = json.dumps(synthetic_run(4, 4, [(0, 0, 2, 2)]))
    return raw(folder, "run.json", content)


def program_copy(folder: Path, program: Path, header: bytes | None = None,
                 drop_tensors: bool = False) -> str:
    """The compiled program, or a copy with another header or without its tensors."""
    with np.load(program) as z:
        arrays = {name: z[name] for name in z.files}
    if header is not None:
        arrays["header"] = np.frombuffer(header, np.uint8)
    if drop_tensors:
        meta = json.loads(arrays["header"].tobytes())
        meta["tensors"] = []
        arrays["header"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        arrays["tensor_slots"] = np.zeros((0, 10), np.int64)
    path = folder / "step.npz"
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return str(path)


def header_with_fabric(program: Path, side: int) -> bytes:
    """The header of a program for a `side` x `side` fabric, on a wafer that large."""
    with np.load(program) as z:
        header = json.loads(z["header"].tobytes())
    header.update(width=side, height=side)
    header["wafer"].update(width=side, height=side)
    return json.dumps(header).encode()


def header_with_nan(program: Path) -> bytes:
    with np.load(program) as z:
        header = json.loads(z["header"].tobytes())
    header["meta"]["model_flops"] = float("nan")
    return json.dumps(header).encode()  # Python's json writes NaN


def sweep_file(folder: Path, data: dict | str | bytes | None = None,
               name: str = "grid.yaml") -> str:
    """A sweep file over gpt_tiny, or with `data` (a mapping, or the file's text)."""
    if data is None:
        data = {"configs": [str(TINY)]}
    if isinstance(data, dict):
        data = yaml.safe_dump(data)
    return raw(folder, name, data)


def sweep(*options: str, **data: object) -> Setup:
    """`sweep` of a sweep file over gpt_tiny with `data` added, its results in the case's
    folder unless an --out is given."""
    def make(d: Path) -> list[str]:
        out = [] if "--out" in options else ["--out", str(d / "out")]
        return ["sweep", sweep_file(d, {"configs": [str(TINY)], **data}), *out, *options]
    return make


def folder_with(folder: Path, name: str, inside: str) -> str:
    """A folder holding a folder named `inside` where a file is to be written."""
    (folder / name / inside).mkdir(parents=True)
    return str(folder / name)


# -- the cases ------------------------------------------------------------------------------
# (id, setup, expected in the first stderr line); setups taking the program get it as `p`.

def traffic(*options: str) -> Setup:
    return lambda d: ["traffic", "--mesh", "4x4", "--rate", "0.1", *options]


CASES: list[tuple[str, Callable[..., list[str]], str]] = [
    # E: encodings
    ("E-config-graph", lambda d: ["graph", raw(d, "c.yaml", TINY.read_bytes() + b"# \xe9\n")],
     "not UTF-8 text: byte 0xe9"),
    ("E-config-run", lambda d: ["run", raw(d, "c.yaml", b"model: {vocab_size: 64\xff}\n"),
                                "--json", str(d / "out.json")], "not UTF-8 text: byte 0xff"),
    ("E-config-compile", lambda d: ["compile", raw(d, "c.yaml", b"\xc3\x28"), "-o",
                                    str(d / "s.npz")], "not UTF-8 text: byte 0xc3"),
    ("E-config-utf16", lambda d: ["graph", raw(d, "c.yaml", TINY.read_text().encode("utf-16"))],
     "not UTF-8 text: byte 0xff at offset 0"),
    ("E-preset", lambda d: ["run", (raw(d, "w.yaml", b"width: 4 # \xff\n"),
                                    config(d, wafer__preset="w.yaml"))[1]],
     "wafer.preset: bad preset file"),
    ("E-run-file", lambda d: ["plot", run_file(d, b'{"config": "caf\xe9"}')],
     "not UTF-8 text: byte 0xe9"),
    ("E-sweep", lambda d: ["sweep", sweep_file(d, b"configs: [caf\xe9.yaml]\n"), "--out",
                           str(d / "out")], "grid.yaml: not UTF-8 text: byte 0xe9"),
    ("E-program-header", lambda d, p: ["simulate", program_copy(d, p, header=b"\xff{}")],
     "UnicodeDecodeError"),
    # F: input files
    ("F-missing-config", lambda d: ["graph", str(d / "absent.yaml")], "cannot read config"),
    ("F-config-is-folder", lambda d: ["graph", str(d)], "cannot read config: Is a directory"),
    ("F-malformed-yaml", lambda d: ["graph", raw(d, "c.yaml", "model: {vocab_size: 3\n")],
     "invalid YAML at line"),
    ("F-yaml-not-mapping", lambda d: ["compile", raw(d, "c.yaml", "- 1\n- 2\n"), "-o",
                                      str(d / "s.npz")], "expected a mapping"),
    ("F-yaml-deep", lambda d: ["graph", raw(d, "c.yaml", "[" * 100_000 + "]" * 100_000)],
     "nested too deeply"),
    ("F-program-not-zip", lambda d: ["simulate", raw(d, "s.npz", "hello")],
     "not a saved program"),
    ("F-program-truncated", lambda d, p: ["simulate", raw(d, "s.npz", p.read_bytes()[:3000])],
     "BadZipFile"),
    ("F-program-nan", lambda d, p: ["simulate", program_copy(d, p, header_with_nan(p))],
     "header holds NaN"),
    ("F-program-missing", lambda d: ["simulate", str(d / "absent.npz")],
     "absent.npz: cannot read program: No such file or directory"),
    ("F-program-no-tensors", lambda d, p: ["simulate", program_copy(d, p, drop_tensors=True),
                                           "--tensors", str(d / "t.npz")],
     "names no tensors to write"),
    ("F-run-not-json", lambda d: ["plot", run_file(d, "{not json")], "not JSON"),
    ("F-run-deep", lambda d: ["plot", run_file(d, "[" * 100_000 + "]" * 100_000)],
     "nested too deeply"),
    ("F-run-not-object", lambda d: ["plot", run_file(d, "[1, 2]")], "expected a JSON object"),
    ("F-run-bad-field", lambda d: ["plot", run_file(d, '{"fabric": 3}')], "field fabric"),
    # F: special files as inputs: refused before anything waits on them or reads them
    ("F-config-fifo", lambda d: ["graph", fifo(d)],
     "cannot read config: is a FIFO, not a regular file"),
    ("F-config-dev-zero", lambda d: ["run", "/dev/zero", "--json", str(d / "out.json")],
     "/dev/zero: cannot read config: is a device, not a regular file"),
    ("F-config-socket", lambda d: ["compile", unix_socket(d), "-o", str(d / "s.npz")],
     "cannot read config: No such device or address"),
    ("F-preset-fifo", lambda d: ["graph", (fifo(d, "w.yaml"),
                                           config(d, wafer__preset="w.yaml"))[1]],
     "wafer.preset: bad preset file: "),
    ("F-program-fifo", lambda d: ["simulate", fifo(d, "s.npz")],
     "cannot read program: is a FIFO, not a regular file"),
    ("F-program-dev-zero", lambda d: ["simulate", "/dev/zero"],
     "/dev/zero: cannot read program: is a device"),
    ("F-run-file-fifo", lambda d: ["plot", fifo(d, "run.json")],
     "cannot read run file: is a FIFO"),
    ("F-sweep-fifo", lambda d: ["sweep", fifo(d, "grid.yaml"), "--out", str(d / "out")],
     "cannot read sweep: is a FIFO"),
    ("F-sweep-dev-zero", lambda d: ["sweep", "/dev/zero", "--out", str(d / "out")],
     "/dev/zero: cannot read sweep: is a device"),
    # F: sweep files
    ("F-sweep-malformed", lambda d: ["sweep", sweep_file(d, "configs: [a.yaml\n"), "--out",
                                     str(d / "out")], "grid.yaml: invalid YAML at line"),
    ("F-sweep-not-mapping", lambda d: ["sweep", sweep_file(d, "- a.yaml\n"), "--out",
                                       str(d / "out")], "grid.yaml"),
    ("F-sweep-unknown-key", sweep(colour=1), "grid.yaml: colour: Extra inputs are not permitted"),
    ("F-sweep-unknown-field", sweep(wafer=[{}, {"colour": 3}]),
     "grid.yaml: wafer[1].colour: not a field of the wafer section"),
    ("F-sweep-missing-config", lambda d: ["sweep", sweep_file(d, {"configs": ["absent.yaml"]}),
                                          "--out", str(d / "out")],
     "absent.yaml: cannot read config: No such file or directory"),
    ("F-sweep-unknown-placement", sweep(placements=["spiral"]), "grid.yaml: placements"),
    # N: numbers
    ("N-inf-lr", lambda d: ["graph", tiny_with("lr: 0.1 ", "lr: .inf")(d)],
     "training.lr: Input should be a finite number"),
    ("N-nan-lr", lambda d: ["run", tiny_with("lr: 0.1 ", "lr: .nan")(d)],
     "training.lr: Input should be a finite number"),
    ("N-overflow-init", lambda d: ["graph", tiny_with("init_std: 0.02", "init_std: 1e200")(d)],
     "training.init_std: 1e+200 is not a normal float32"),
    ("N-underflow-lr", lambda d: ["compile", tiny_with("lr: 0.1 ", "lr: 1e-50")(d), "-o",
                                  str(d / "s.npz")], "training.lr: 1e-50 is not a normal"),
    ("N-huge-eps", lambda d: ["graph", tiny_with("ln_eps: 1.0e-5", "ln_eps: 1e999")(d)],
     "model.ln_eps: Input should be a finite number"),
    ("N-float-for-int", lambda d: ["graph", tiny_with("n_layers: 2", "n_layers: 2.0")(d)],
     "model.n_layers: Input should be a valid integer (got 2.0)"),
    ("N-exponent-for-int", lambda d: ["graph", tiny_with("d_ffn: 128", "d_ffn: 1.28e2")(d)],
     "model.d_ffn: Input should be a valid integer (got 128.0)"),
    ("N-precision", lambda d: ["run", config(d, compile__precision="half")],
     "compile.precision: Input should be 'fp32' or 'mixed' (got 'half')"),
    ("N-switch-latency", lambda d: ["run", config(d, wafer__switch_latency=-1)],
     "wafer.switch_latency: Input should be greater than or equal to 0 (got -1)"),
    ("N-micro-batch", lambda d: ["run", config(d, training__micro_batch_size=3)],
     "training.micro_batch_size: must divide batch_size (2), got 3"),
    ("N-micro-batch-compile", lambda d: ["compile", config(d, training__micro_batch_size=1),
                                         "-o", str(d / "s.npz")],
     "training.micro_batch_size: the step runs its program once per micro-batch (2 times)"),
    ("N-micro-batch-streaming", lambda d: ["run", raw(d, "cfg.yaml", TINY.read_text().replace(
        "batch_size: 2", "batch_size: 2\n  micro_batch_size: 1").replace(
        "placement: linear\n  lane_width: null", "mode: weight_streaming"))],
     "training.micro_batch_size: weight streaming runs the whole batch at once"),
    ("N-micro-batch-mixed", lambda d: ["run", config(d, training__micro_batch_size=1,
                                                     compile__precision="mixed")],
     "training.micro_batch_size: micro-batches are built for fp32 only"),
    ("N-bool-for-int", lambda d: ["graph", tiny_with("batch_size: 2", "batch_size: true")(d)],
     "training.batch_size: Input should be a valid integer (got True)"),
    ("N-int-for-bool", lambda d: ["graph", tiny_with("tie_embeddings: true",
                                                     "tie_embeddings: 1")(d)],
     "model.tie_embeddings: Input should be a valid boolean"),
    ("N-string-for-int", lambda d: ["graph", tiny_with("d_model: 32", "d_model: '32'")(d)],
     "model.d_model: Input should be a valid integer (got '32')"),
    ("N-string-for-float", lambda d: ["graph", tiny_with("lr: 0.1 ", "lr: '0.1'")(d)],
     "training.lr: Input should be a valid number (got '0.1')"),
    ("N-bool-for-float", lambda d: ["graph", tiny_with("lr: 0.1 ", "lr: yes")(d)],
     "training.lr: Input should be a valid number (got True)"),
    ("N-inf-clock", lambda d: ["graph", config(d, wafer__clock_hz=float("inf"))],
     "wafer.clock_hz: Input should be a finite number"),
    ("N-float-wafer-width", lambda d: ["compile", tiny_with("wafer: wse2",
                                                           "wafer: {width: 1e3}")(d),
                                       "-o", str(d / "s.npz")],
     "wafer.width: Input should be a valid integer (got 1000.0)"),
    ("N-negative-seed", lambda d: ["graph", config(d, training__seed=-1)],
     "training.seed: Input should be greater than or equal to 0"),
    ("N-float-seed", lambda d: ["run", config(d, compile__seed=1.5)],
     "compile.seed: Input should be a valid integer (got 1.5)"),
    ("N-graph-layers", lambda d: ["graph", config(d, model__n_layers=BIG)],
     "model.n_layers: too large for this machine's memory: the graph needs at least"),
    ("N-run-layers", lambda d: ["run", config(d, model__n_layers=BIG)],
     "model.n_layers: too large for this machine's memory"),
    ("N-run-vocab", lambda d: ["run", config(d, model__vocab_size=BIG), "--json",
                               str(d / "out.json")],
     "model.vocab_size: too large for this machine's memory"),
    ("N-compile-d-ffn", lambda d: ["compile", config(d, model__d_ffn=BIG), "-o",
                                   str(d / "s.npz")],
     "model.d_ffn: too large for this machine's memory"),
    ("N-compile-wafer", lambda d: ["compile", config(d, wafer__width=BIG), "-o",
                                   str(d / "s.npz")],
     "wafer.width: too large for this machine's memory"),
    ("N-compile-n-ctx", lambda d: ["compile", config(d, model__n_ctx=BIG), "-o",
                                   str(d / "s.npz")],
     "model.n_ctx: too large for this machine's memory"),
    ("N-program-fabric", lambda d, p: ["simulate", program_copy(d, p, header_with_fabric(
        p, 10**7))], "step.npz: fabric: too large for this machine's memory"),
    ("N-max-cycles-zero", lambda d: ["run", config(d), "--max-cycles", "0"],
     "argument --max-cycles: must be >= 1 (got 0)"),
    ("N-max-cycles-negative", lambda d, p: ["simulate", str(p), "--max-cycles", "-5"],
     "argument --max-cycles: must be >= 1 (got -5)"),
    ("N-threads-zero", lambda d: ["run", config(d), "--threads", "0"],
     "argument --threads: must be >= 1 (got 0)"),
    ("N-threads-negative", lambda d, p: ["simulate", str(p), "--threads", "-2"],
     "argument --threads: must be >= 1 (got -2)"),
    ("N-threads-float", lambda d: ["traffic", "--rate", "0.1", "--threads", "1.5"],
     "argument --threads: not an integer: '1.5'"),
    ("N-sweep-point-value", sweep(wafer=[{"colors": 0}]),
     "grid.yaml: point 0 (gpt_tiny wafer.colors=0): wafer.colors: Input should be greater"),
    ("N-sweep-float-seed", sweep(compile=[{"seed": 1.5}]),
     "compile.seed: Input should be a valid integer (got 1.5)"),
    ("N-sweep-max-cycles-zero", sweep(max_cycles=0),
     "grid.yaml: max_cycles: Input should be greater than 0"),
    ("N-sweep-max-cycles-float", sweep(max_cycles=2.0),
     "grid.yaml: max_cycles: Input should be a valid integer (got 2.0)"),
    ("N-sweep-max-cycles-bool", sweep(max_cycles=True),
     "grid.yaml: max_cycles: Input should be a valid integer (got True)"),
    ("N-indent-huge", lambda d: ["schema", "--indent", "1000000000"],
     "argument --indent: must be in 0..16"),
    ("N-indent-negative", lambda d: ["schema", "--indent", "-1"],
     "argument --indent: must be in 0..16"),
    # O: output paths, refused before anything is compiled or simulated
    ("O-json-folder", lambda d: ["run", config(d), "--json", str(d)], "is a folder, not a file"),
    ("O-json-unwritable", lambda d: ["run", config(d), "--json", f"{UNWRITABLE}.json"],
     "cannot create files in /sys"),
    ("O-json-fifo", lambda d: ["run", config(d), "--json", fifo(d)], "is a FIFO"),
    ("O-json-link-to-fifo", lambda d: ["run", config(d), "--json",
                                       symlink(d, "link", fifo(d))], "is a FIFO"),
    ("O-json-link-loop", lambda d: ["run", config(d), "--json",
                                    (symlink(d, "a", str(d / "b")), symlink(d, "b", "a"))[0]],
     "Too many levels of symbolic links"),
    ("O-json-link-unwritable", lambda d: ["run", config(d), "--json",
                                          symlink(d, "out.json", f"{UNWRITABLE}.json")],
     "cannot create files in /sys"),
    ("O-json-under-file", lambda d: ["run", config(d), "--json", str(d / "cfg.yaml" / "x")],
     "cfg.yaml is not a folder"),
    ("O-json-socket", lambda d: ["run", config(d), "--json", unix_socket(d)], "is a socket"),
    ("O-plot-file", lambda d: ["run", config(d), "--plot", config(d, "other.yaml")],
     "is not a folder"),
    ("O-plot-png-folder", lambda d: ["run", config(d), "--plot",
                                     folder_with(d, "plots", "utilization.png")],
     "utilization.png: is a folder"),
    ("O-plot-unwritable", lambda d: ["run", config(d), "--plot", UNWRITABLE],
     "cannot create files in /sys"),
    ("O-out-folder", lambda d: ["compile", config(d), "-o", str(d)], "is a folder"),
    ("O-out-is-input", lambda d: ["compile", config(d), "-o", str(d / "cfg.yaml")],
     "the same file as the input"),
    ("O-out-unwritable", lambda d: ["compile", config(d), "-o", f"{UNWRITABLE}.npz"],
     "cannot create files in /sys"),
    ("O-out-link-to-folder", lambda d: ["compile", config(d), "-o",
                                        symlink(d, "s.npz", str(d))], "is a folder"),
    ("O-tensors-same-as-json", lambda d, p: ["simulate", str(p), "--json", str(d / "a"),
                                             "--tensors", str(d / "a")],
     "the same file as --json"),
    ("O-tensors-folder", lambda d, p: ["simulate", str(p), "--tensors", str(d)], "is a folder"),
    ("O-simulate-json-fifo", lambda d, p: ["simulate", str(p), "--json", fifo(d)], "is a FIFO"),
    ("O-simulate-plot-fifo", lambda d, p: ["simulate", str(p), "--plot", fifo(d)],
     "is not a folder"),
    ("O-simulate-json-is-input", lambda d, p: ["simulate", program_copy(d, p), "--json",
                                               str(d / "step.npz")], "the same file as the input"),
    ("O-plot-out-file", lambda d: ["plot", run_file(d), "--out", str(d / "run.json")],
     "is not a folder"),
    ("O-plot-out-unwritable", lambda d: ["plot", run_file(d), "--out", UNWRITABLE],
     "cannot create files in /sys"),
    ("O-plot-out-png-loop", lambda d: ["plot", run_file(d), "--out",
                                       (symlink(d, "timeline.png", "timeline.png"), str(d))[1]],
     "timeline.png: Too many levels of symbolic links"),
    ("O-sweep-out-file", lambda d: ["sweep", sweep_file(d), "--out", raw(d, "o", "x")],
     "--out "),
    ("O-sweep-out-unwritable", sweep("--out", UNWRITABLE), "cannot create files in /sys"),
    ("O-sweep-out-csv-folder", lambda d: ["sweep", sweep_file(d), "--out",
                                          folder_with(d, "out", "grid.csv")],
     "grid.csv: is a folder"),
    ("O-sweep-out-is-input", lambda d: ["sweep", sweep_file(d, name="grid.json"), "--out",
                                        str(d)], "the same file as the input"),
    # T: traffic options
    ("T-seed-negative", traffic("--seed", "-1"), "seed must be in 0 .. 2**64 - 1 (got -1)"),
    ("T-seed-too-large", traffic("--seed", str(2**64)), "seed must be in 0 .. 2**64 - 1"),
    ("T-seed-text", traffic("--seed", "abc"), "argument --seed: invalid int value"),
    ("T-drain-negative", traffic("--drain", "-1"), "drain must be >= 0 (got -1)"),
    ("T-hotspot-above-1", traffic("--pattern", "hotspot", "--hotspot-fraction", "1.5"),
     "hotspot_fraction must be in [0, 1] (got 1.5)"),
    ("T-hotspot-negative", traffic("--hotspot-fraction", "-0.1"), "hotspot_fraction must be"),
    ("T-hotspot-nan", traffic("--hotspot-fraction", "nan"), "hotspot_fraction must be"),
    ("T-rate-nan", lambda d: ["traffic", "--rate", "nan"], "rate must be in (0, 1]"),
    ("T-rate-inf", lambda d: ["traffic", "--rate", "inf"], "rate must be in (0, 1]"),
    ("T-rate-zero", lambda d: ["traffic", "--rate", "0"], "rate must be in (0, 1]"),
    ("T-cycles-zero", traffic("--cycles", "0"), "cycles must be >= 1 (got 0)"),
    ("T-warmup-negative", traffic("--warmup", "-1"), "warmup must be >= 0 (got -1)"),
    ("T-queue-depth-zero", traffic("--queue-depth", "0"), "queue_depth must be >= 1"),
    ("T-hop-latency-zero", traffic("--hop-latency", "0"), "hop_latency must be >= 1"),
    ("T-cycles-overflow", traffic("--cycles", str(10**14)), "must be below 2**39 cycles"),
    ("T-hop-latency-overflow", traffic("--hop-latency", str(10**18)), "must be below 2**39"),
    ("T-mesh-memory", lambda d: ["traffic", "--rate", "0.1", "--mesh", "4096x4096",
                                 "--queue-depth", str(10**9)],
     "queue_depth: too large for this machine's memory: the mesh needs at least"),
    ("T-mesh-empty", lambda d: ["traffic", "--rate", "0.1", "--mesh", "0x4"],
     "mesh must have at least 2 nodes"),
    ("T-mesh-negative", lambda d: ["traffic", "--rate", "0.1", "--mesh", "4x-4"],
     "mesh must have at least 2 nodes"),
    ("T-mesh-side", lambda d: ["traffic", "--rate", "0.1", "--mesh", "5000x2"],
     "mesh sides are limited to 4096"),
    ("T-mesh-text", lambda d: ["traffic", "--rate", "0.1", "--mesh", "big"],
     "argument --mesh: mesh must look like 16x16"),
    ("T-transpose-not-square", traffic("--pattern", "transpose", "--mesh", "4x8"),
     "transpose needs a square mesh"),
    ("T-pattern-unknown", traffic("--pattern", "spiral"), "argument --pattern: invalid choice"),
    # train: the data, the run folder and its options
    ("E-train-data", lambda d: ["train", config(d), "--steps", "1", "--out", str(d / "o"),
                                "--data", raw(d, "t.txt", b"some text \xff")],
     "not UTF-8 text: byte 0xff"),
    ("F-train-data-missing", lambda d: ["train", config(d), "--steps", "1", "--out",
                                        str(d / "o"), "--data", str(d / "absent.txt")],
     "cannot read data"),
    ("F-train-data-short", lambda d: ["train", config(d), "--steps", "1", "--out", str(d / "o"),
                                      "--data", raw(d, "t.txt", "a short text")],
     "too short"),
    ("F-train-resume-nothing", lambda d: ["train", config(d), "--steps", "1", "--resume",
                                          "--out", str(d / "o")], "--resume: no checkpoint"),
    ("F-train-resume-not-checkpoint", lambda d: ["train", config(d), "--steps", "1",
                                                 "--resume", "--out", (raw(
                                                     d, "checkpoint.npz", "no zip"), str(d))[1]],
     "not a training checkpoint"),
    ("N-train-steps-zero", lambda d: ["train", config(d), "--steps", "0"],
     "argument --steps: must be >= 1 (got 0)"),
    ("N-train-byte-vocab", lambda d: ["train", config(d, model__vocab_size=64), "--steps", "1",
                                      "--out", str(d / "o")],
     "model.vocab_size: byte-level tokens need at least 256"),
    ("O-train-out-file", lambda d: ["train", config(d), "--steps", "1", "--out",
                                    raw(d, "o", "a file")], "is not a folder"),
    ("A-train-no-steps", lambda d: ["train", config(d)],
     "the following arguments are required: --steps"),
    # generate: the checkpoint and the options
    ("F-generate-checkpoint-missing", lambda d: ["generate", config(d), "--checkpoint",
                                                 str(d / "absent.npz"), "--prompt", "a"],
     "not a training checkpoint"),
    ("F-generate-checkpoint-not-zip", lambda d: ["generate", config(d), "--checkpoint",
                                                 raw(d, "c.npz", "text"), "--prompt", "a"],
     "not a training checkpoint"),
    ("N-generate-temperature-nan", lambda d: ["generate", config(d), "--checkpoint",
                                              str(d / "c.npz"), "--prompt", "a",
                                              "--temperature", "nan"],
     "argument --temperature: must be a finite number >= 0"),
    ("N-generate-top-k-zero", lambda d: ["generate", config(d), "--checkpoint",
                                         str(d / "c.npz"), "--prompt", "a", "--top-k", "0"],
     "argument --top-k: must be >= 1 (got 0)"),
    ("A-generate-no-prompt", lambda d: ["generate", config(d), "--checkpoint",
                                        str(d / "c.npz")],
     "the following arguments are required: --prompt"),
    # A: the command line
    ("A-no-command", lambda d: [], "the following arguments are required: command"),
    ("A-unknown-command", lambda d: ["fly"], "invalid choice: 'fly'"),
    ("A-run-no-config", lambda d: ["run"], "the following arguments are required: config"),
    ("A-compile-no-output", lambda d: ["compile", config(d)],
     "the following arguments are required: -o"),
    ("A-traffic-no-rate", lambda d: ["traffic"], "the following arguments are required: --rate"),
    ("A-unknown-placement", lambda d: ["run", config(d), "--placement", "spiral"],
     "--placement: unknown strategy 'spiral'"),
    ("A-sweep-workers-zero", sweep("--workers", "0"), "argument --workers: must be >= 1 (got 0)"),
    ("A-sweep-workers-text", sweep("--workers", "two"), "argument --workers: not an integer"),
    ("A-sweep-workers-and-scheduler", sweep("--workers", "2", "--scheduler", "tcp://x:1"),
     "--workers sizes a LocalCluster"),
    ("A-sweep-no-file", lambda d: ["sweep"], "the following arguments are required: sweep"),
    ("A-unknown-option", lambda d: ["graph", config(d), "--verbose"],
     "unrecognized arguments: --verbose"),
    ("A-compile-quiet-with-value", lambda d: ["compile", config(d), "-o", str(d / "s.npz"),
                                              "--quiet=yes"],
     "argument --quiet: ignored explicit argument 'yes'"),
]
SUBPROCESS = ("E-config-graph", "O-json-fifo", "T-seed-negative", "A-no-command",
              "N-run-vocab", "F-program-fifo", "F-sweep-unknown-field")


def _snapshot(folder: Path) -> dict[str, tuple[int, int, int, int]]:
    """Every entry under `folder` (symbolic links not followed): inode, mode, size, mtime."""
    entries = {}
    for path in [folder, *folder.rglob("*")]:
        st = path.lstat()
        entries[str(path)] = (st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns)
    return entries


def _argv(setup: Callable[..., list[str]], folder: Path, program: Path) -> list[str]:
    takes_program = setup.__code__.co_argcount == 2
    return setup(folder, program) if takes_program else setup(folder)


def _check(code: int | None, stderr: str, expected: str) -> None:
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert 1 <= len(lines) <= 3, stderr
    assert expected in lines[0], stderr


@pytest.fixture
def deadline():
    """A case that hangs (opening a FIFO waits for a writer) fails after DEADLINE seconds."""
    def expired(signum, frame):
        raise TimeoutError(f"the command still runs after {DEADLINE} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(DEADLINE)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(("setup", "expected"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_and_exit_2(setup, expected, tmp_path, program_file, capsys,
                                          deadline):
    argv = _argv(setup, tmp_path, program_file)
    before = _snapshot(tmp_path)
    devices = _snapshot_devices(argv)
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    _check(code, capsys.readouterr().err, expected)
    assert _snapshot(tmp_path) == before
    assert _snapshot_devices(argv) == devices


def _snapshot_devices(argv: list[str]) -> dict[str, tuple[int, int, int]]:
    """The device files a case names (/dev/zero): inode, mode and device number, which a
    command that replaced one would change."""
    return {arg: (os.stat(arg).st_ino, os.stat(arg).st_mode, os.stat(arg).st_rdev)
            for arg in argv if arg.startswith("/dev/")}


@pytest.mark.parametrize("name", SUBPROCESS)
def test_bad_input_in_a_real_process(name, tmp_path, program_file):
    _, setup, expected = next(case for case in CASES if case[0] == name)
    argv = _argv(setup, tmp_path, program_file)
    before = _snapshot(tmp_path)
    result = subprocess.run([sys.executable, "-m", "wse_sim", *argv], capture_output=True,
                            text=True, cwd=tmp_path, timeout=120)
    _check(result.returncode, result.stderr, expected)
    assert _snapshot(tmp_path) == before


BENCHMARKS = ROOT / "benchmarks"
BENCHMARK_CASES = [  # the benchmark scripts' options: (script, options, first line)
    ("cerebras_gpt.py", ["--out", "{file}"], "error: --out {file}: is not a folder"),
    ("cerebras_gpt.py", ["--simulate", "cerebras_gpt_7b"],
     "--simulate: no config cerebras_gpt_7b"),
    ("cerebras_gpt.py", ["--rows", "0"], "argument --rows: must be >= 1 (got 0)"),
    ("scaling.py", ["--micro-batch", "0"], "argument --micro-batch: must be >= 1 (got 0)"),
    ("scaling.py", ["--placement", "spiral"], "argument --placement: invalid choice: 'spiral'"),
    ("streaming_timeline.py", ["--report", "{file}"], "error: {file}: not JSON"),
    ("streaming_timeline.py", ["--config", str(ROOT / "models" / "gpt_tiny.yaml"),
                               "--report", "{file}"], "not allowed with argument"),
    ("streaming_timeline.py", ["--config", str(ROOT / "models" / "gpt_tiny.yaml")],
     "gpt_tiny.yaml: compile.mode is not weight_streaming"),
]


@pytest.mark.parametrize(("script", "options", "expected"), BENCHMARK_CASES,
                         ids=[f"{c[0]} {' '.join(c[1])}" for c in BENCHMARK_CASES])
def test_benchmark_bad_input_is_one_line_and_exit_2(script, options, expected, tmp_path):
    file = tmp_path / "a file"
    file.write_text("")
    before = _snapshot(tmp_path)
    result = subprocess.run([sys.executable, str(BENCHMARKS / script),
                             *(o.format(file=file) for o in options)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    lines = [line for line in result.stderr.splitlines() if not line.startswith((" ", "usage"))]
    _check(result.returncode, "\n".join(lines), expected.format(file=file))
    assert _snapshot(tmp_path) == before


def test_the_suite_covers_every_class_and_command(tmp_path, program_file):
    assert {case[0].split("-")[0] for case in CASES} == {"E", "F", "N", "O", "T", "A"}
    assert len(CASES) >= 60
    commands = set()
    for i, (_, setup, _) in enumerate(CASES):
        folder = tmp_path / str(i)
        folder.mkdir()
        commands.update(_argv(setup, folder, program_file)[:1])
    assert commands == {"run", "compile", "simulate", "graph", "schema", "traffic", "plot",
                        "sweep", "train", "generate", "fly"}  # (fly: an unknown command)
