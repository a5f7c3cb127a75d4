"""Sweeps: the grid of a sweep file, its one-line errors before any cluster starts, and a
small grid on gpt_tiny run on a LocalCluster of 2 workers (and again through --scheduler
on a cluster the test starts) whose rows come back in grid order, failed points included."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from compiler.config import load_config
from wse_sim import sweep as sweep_module
from wse_sim.cli import main
from wse_sim.errors import UserError
from wse_sim.sweep import FIGURES, HOST_TIMES, load_sweep

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "models" / "gpt_tiny.yaml"
GOLDEN = ROOT / "tests" / "golden" / "gpt_tiny.json"

# 2 placements x 2 wafers; 4 colors cannot route gpt_tiny, so points 1 and 3 fail.
GRID = {"configs": [str(TINY)], "placements": ["linear", "snake"],
        "wafer": [{}, {"colors": 4}]}


def _write(folder: Path, data: object, name: str = "grid.yaml") -> Path:
    path = folder / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> tuple[Path, int, Path]:
    """The grid through the CLI on the LocalCluster it starts (2 workers)."""
    folder = tmp_path_factory.mktemp("sweep")
    path = _write(folder, GRID)
    code = main(["sweep", str(path), "--workers", "2", "--out", str(folder / "out"), "--quiet"])
    return path, code, folder / "out"


def _rows(out: Path) -> tuple[list[dict], list[dict]]:
    data = json.loads((out / "grid.json").read_text())
    with open(out / "grid.csv", newline="") as f:
        return data["rows"], list(csv.DictReader(f))


def test_sweep_rows_in_grid_order_with_failed_points(local_run):
    path, code, out = local_run
    assert code == 1  # not every point ran
    rows, csv_rows = _rows(out)
    sweep = load_sweep(path)
    assert [r["point"] for r in rows] == [0, 1, 2, 3]
    assert [r["label"] for r in rows] == ["gpt_tiny linear", "gpt_tiny linear wafer.colors=4",
                                          "gpt_tiny snake", "gpt_tiny snake wafer.colors=4"]
    assert [r["placement"] for r in rows] == ["linear", "linear", "snake", "snake"]
    assert [r["wafer.colors"] for r in rows] == [24, 4, 24, 4]  # effective values
    assert [list(r) for r in rows] == [sweep.columns] * 4  # figures only, never the grids
    for row in rows[1::2]:
        assert row["error"].startswith("routing: stream ") and "4 colors" in row["error"]
        assert "\n" not in row["error"]
        assert all(row[key] is None for key in FIGURES)
    golden = json.loads(GOLDEN.read_text())
    for row in rows[0::2]:
        assert row["error"] is None and row["check_passed"] is True
        assert row["pes_used"] == golden["pes_used"]
        assert row["tokens_per_second"] == pytest.approx(2 * 16 / row["simulated_seconds"])
        assert all(row[key] > 0 for key in HOST_TIMES)
    # the linear point is the golden run of gpt_tiny
    for key in ("cycles", "colors_used", "hop_words", "fabric_wavelet_hops", "max_link_load",
                "loss_sim"):
        assert rows[0][key] == golden[key], key
    assert rows[0]["max_link_estimate"] == golden["link_load_estimate"]["max"]
    assert rows[2]["hop_words"] != rows[0]["hop_words"]  # the placement did change
    # the CSV holds the same rows
    assert [r["label"] for r in csv_rows] == [r["label"] for r in rows]
    assert [r["error"] for r in csv_rows] == [r["error"] or "" for r in rows]
    assert [r["cycles"] for r in csv_rows] == [str(r["cycles"] or "") for r in rows]


def test_sweep_on_a_scheduler_gives_the_same_rows(local_run, tmp_path):
    from distributed import LocalCluster

    path, _, out = local_run
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address="127.0.0.1:0") as cluster:
        code = main(["sweep", str(path), "--scheduler", cluster.scheduler_address,
                     "--out", str(tmp_path), "--quiet"])
    assert code == 1
    local, remote = _rows(out)[0], _rows(tmp_path)[0]
    drop = set(HOST_TIMES)
    assert [{k: v for k, v in r.items() if k not in drop} for r in remote] == \
           [{k: v for k, v in r.items() if k not in drop} for r in local]


def test_grid_labels_ids_and_merged_sections(tmp_path):
    wse2 = yaml.safe_load((ROOT / "wse_sim" / "presets" / "wse2.yaml").read_text())
    preset = _write(tmp_path, wse2 | {"width": 100, "height": 90}, "mywafer.yaml")
    sweep = load_sweep(_write(tmp_path, {
        "configs": [str(TINY)],
        "wafer": [{}, {"preset": preset.name, "queue_depth": 2}],
        "training": [{}, {"seed": 3}]}))
    assert [p.label for p in sweep.points] == [
        "gpt_tiny", "gpt_tiny training.seed=3", "gpt_tiny wafer.preset=mywafer.yaml "
        "wafer.queue_depth=2", "gpt_tiny wafer.preset=mywafer.yaml wafer.queue_depth=2 "
        "training.seed=3"]
    assert sweep.varied == ["wafer.preset", "wafer.queue_depth", "training.seed"]
    plain, seeded, small, _ = (p.cfg for p in sweep.points)
    # no override: the config as it is, and its id is the same in any sweep
    assert plain == load_config(TINY)
    assert sweep.points[0].id == load_sweep(_write(tmp_path, {"configs": [str(TINY)]},
                                                   "other.yaml")).points[0].id
    assert len({p.id for p in sweep.points}) == 4
    assert seeded.training.seed == 3 and seeded.training.lr == plain.training.lr
    # `wafer: wse2` merged with a preset file found beside the sweep file
    assert (small.wafer.width, small.wafer.height, small.wafer.queue_depth) == (100, 90, 2)
    assert small.wafer.clock_hz == plain.wafer.clock_hz


@pytest.mark.parametrize(("text", "expected"), [
    ("[1, 2]", "expected a mapping"),
    ("configs: [a\n", "invalid YAML at line"),
    ({"configs": []}, "configs: List should have at least 1 item"),
    ({"configs": [str(TINY)], "placement": ["linear"]}, "placement: Extra inputs"),
    ({"configs": [str(TINY)], "placements": ["linear", "spiral"]}, "placements.1: Input should"),
    ({"configs": [str(TINY)], "wafer": [{}, {"colours": 4}]},
     "wafer[1].colours: not a field of the wafer section"),
    ({"configs": [str(TINY)], "compile": {"seed": 1}}, "compile: Input should be a valid list"),
    ({"configs": [str(TINY)], "placements": ["snake"], "compile": [{"placement": "linear"}]},
     "compile[0].placement: the placements axis already sets it"),
    ({"configs": [str(TINY)], "max_cycles": 0}, "max_cycles: Input should be greater than 0"),
    ({"configs": [str(TINY), "nope.yaml"]}, "configs[1]: "),
    ({"configs": [str(TINY)], "wafer": [{}, {"colors": 0}]},
     "point 1 (gpt_tiny wafer.colors=0): wafer.colors: Input should be greater than 0"),
    ({"configs": [str(TINY)], "training": [{"seq_len": 64}]},
     "point 0 (gpt_tiny training.seq_len=64): training.seq_len: seq_len (64) must be <="),
    ({"configs": [str(TINY)], "placements": ["linear"], "training": [{}, {"seed": 0}]},
     "points 0 (gpt_tiny linear) and 1 (gpt_tiny linear training.seed=0) are the same run"),
])
def test_bad_sweep_file_is_one_line_naming_file_and_field(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(UserError) as err:
        load_sweep(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and expected in message
    assert "\n" not in message


def test_bad_sweep_fails_before_any_cluster_starts(tmp_path, monkeypatch, capsys):
    def no_cluster(*args, **kwargs):
        raise AssertionError("a cluster was started")

    monkeypatch.setattr(sweep_module, "dask_client", no_cluster)
    path = _write(tmp_path, {"configs": [str(TINY)], "wafer": [{}, {"colors": 0}]})
    assert main(["sweep", str(path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "point 1 (gpt_tiny wafer.colors=0)" in err
    assert main(["sweep", str(path), "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"]) == 2
    assert "--workers" in capsys.readouterr().err
