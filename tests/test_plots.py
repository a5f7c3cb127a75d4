"""`python -m wse_sim plot RUN.json`: five PNGs of the expected size, not blank, written
whole; bad input is one line naming the file and the field."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from wse_sim.cli import main
from wse_sim.plots import _NOTHING, PLOTS, PNG_SIZES, _reduce, write_plots

OPS = ("matmul", "layernorm", "attention.bwd", "gelu", "embed", "loss")


def synthetic_run(width: int, height: int, kernels: list[tuple[int, int, int, int]],
                  origin: tuple[int, int] = (0, 0)) -> dict[str, Any]:
    """A RUN.json object: `kernels` as (x, y, w, h), busy, storing and sending inside their
    rectangles, plus one thin line of link traffic across the whole fabric."""
    def zeros() -> list[list[float]]:
        return [[0] * width for _ in range(height)]  # ints: quick to write and parse

    grids: dict[str, Any] = {"utilization": zeros(), "sram_words": zeros(),
                             "link_wavelets": {d: zeros() for d in "NESW"},
                             "sram_capacity_words": 12288}
    records = []
    for i, (x, y, w, h) in enumerate(kernels):
        for row in range(y, y + h):
            for col in range(x, x + w):
                grids["utilization"][row][col] = 0.2 + 0.1 * i
                grids["sram_words"][row][col] = 1000 * (i + 1)
            grids["link_wavelets"]["E"][row][x] = 100 * (i + 1)
        records.append({"name": f"h{i}.{OPS[i % len(OPS)]}", "op": OPS[i % len(OPS)],
                        "x": x, "y": y, "w": w, "h": h, "pes": w * h,
                        "start_cycle": 50 * i, "end_cycle": 50 * i + 400, "utilization": 0.5})
    grids["link_wavelets"]["S"] = [[3 if col == width // 2 else 0 for col in range(width)]
                                   for _ in range(height)]
    return {"config": "models/gpt_tiny.yaml", "placement": "snake",
            "fabric": {"width": width, "height": height, "origin": list(origin)},
            "cycles": 50 * len(kernels) + 450, "kernels": records, "grids": grids}


def write_run(path: Path, run: dict[str, Any]) -> Path:
    path.write_text(json.dumps(run))
    return path


def hex_colour(rgba: tuple[float, ...]) -> int:
    return int(round(rgba[0] * 255)) << 16 | int(round(rgba[1] * 255)) << 8 | int(
        round(rgba[2] * 255))


def check_pngs(paths: list[Path], run: dict[str, Any]) -> None:
    """Each PNG has its size and shows what it must: PEs of no kernel in the "nothing"
    grey, the busiest PE at the top of the utilization scale, the fullest SRAM's colour,
    every op family's colour on the placement map."""
    assert [p.name for p in paths] == [f"{name}.png" for name in PLOTS]
    colours = {}
    for name, path in zip(PLOTS, paths, strict=True):
        with Image.open(path) as image:
            assert image.size == PNG_SIZES[name], name
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint32)
        colours[name] = set(np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]))
    grey = int(_NOTHING[1:], 16)
    assert grey in colours["utilization"] and grey in colours["sram"]
    busiest = max(max(row) for row in run["grids"]["utilization"])
    top = min(1.0, max(0.05, math.ceil(busiest * 20) / 20))
    assert hex_colour(colormaps["viridis"](busiest / top)) in colours["utilization"]
    fullest = max(max(row) for row in run["grids"]["sram_words"]) / 12288
    assert hex_colour(colormaps["magma"](fullest)) in colours["sram"]
    families = sorted({k["op"].split(".")[0] for k in run["kernels"]})
    for i, _ in enumerate(families):
        assert hex_colour(colormaps["tab10"](i)) in colours["placement"], families[i]


def test_plot_command_on_a_64_by_64_fabric(tmp_path, capsys):
    kernels = [(0, 0, 12, 4), (12, 0, 8, 8), (20, 0, 16, 16), (0, 8, 4, 4), (40, 30, 1, 1),
               (50, 50, 14, 14), (36, 0, 3, 9)]
    data = synthetic_run(64, 64, kernels, origin=(5, 7))
    run = write_run(tmp_path / "run.json", data)
    assert main(["plot", str(run), "--out", str(tmp_path / "pictures")]) == 0
    printed = [Path(line) for line in capsys.readouterr().out.splitlines()]
    check_pngs(printed, data)
    # written whole: nothing but the five PNGs is left in the folder
    assert sorted(p.name for p in (tmp_path / "pictures").iterdir()) == sorted(
        f"{name}.png" for name in PLOTS)


def test_plot_command_on_a_whole_wse2_wafer(tmp_path, capsys):
    kernels = [(0, 0, 16, 16), (700, 10, 1, 1), (300, 500, 12, 4), (734, 978, 16, 16)]
    data = synthetic_run(750, 994, kernels)
    run = write_run(tmp_path / "big.json", data)
    assert main(["plot", str(run)]) == 0  # --out defaults to the folder of the run
    check_pngs([Path(line) for line in capsys.readouterr().out.splitlines()], data)
    assert (tmp_path / "placement.png").exists()


def test_write_plots_takes_the_run_record_in_memory(tmp_path):
    run = synthetic_run(9, 5, [(0, 0, 3, 2), (4, 1, 5, 4)])
    run["grids"]["link_wavelets"] = {d: [[0] * 9 for _ in range(5)] for d in "NESW"}
    run["kernels"][1].update(start_cycle=-1, end_cycle=-1)  # a kernel that never ran
    paths = write_plots(run, tmp_path)  # no traffic at all: still five drawn pictures
    check_pngs(paths, run)


def black_pixels(path: Path) -> int:
    with Image.open(path) as image:
        return int((np.asarray(image.convert("RGB")) == 0).all(axis=-1).sum())


def test_timeline_marks_the_critical_path(tmp_path):
    run = synthetic_run(9, 5, [(0, 0, 3, 2), (4, 1, 5, 4), (3, 0, 1, 1)])
    timeline = PLOTS.index("timeline")
    plain = write_plots(run, tmp_path / "plain")[timeline]
    run["critical_path"] = [
        {"kernel": "h0.matmul", "input_from": None, "input_cycle": None, "output_cycle": 300},
        {"kernel": "h2.attention.bwd", "input_from": "h0.matmul", "input_cycle": 310,
         "output_cycle": 500}]
    marked = write_plots(run, tmp_path / "marked")[timeline]
    # the path (from cycle 0 to 300 on row 0, to 310 on row 2, to 500) and the outlines
    assert black_pixels(marked) > black_pixels(plain) + 1000


def test_block_reduction_keeps_a_lone_hot_link_visible():
    grid = np.zeros((994, 750))
    grid[700, 600] = 9000.0
    grid[500, :] = 1.0
    blocks, factor = _reduce(grid, 400)
    assert factor == 3 and blocks.shape == (332, 250)
    assert (blocks == 9000.0).sum() == 9  # the hot link, widened to 3 x 3 blocks
    assert (blocks[166, :] >= 1.0).all()  # the one-PE line survives reduction
    assert (blocks[:, :] >= 0).all() and np.isfinite(blocks).all()  # padding never shows
    small, factor = _reduce(grid[:300, :200], 400)
    assert factor == 1 and (small == grid[:300, :200]).all()  # small fabrics: every PE
    empty = np.full((994, 750), np.nan)  # PEs of no kernel stay "nothing" (grey) ...
    empty[10, 10] = 0.0  # ... unless a block holds a PE that has a value, even zero
    blocks, _ = _reduce(empty, 400)
    assert np.isnan(blocks).sum() == blocks.size - 9 and (blocks[2:5, 2:5] == 0).all()


def plot_error(tmp_path: Path, capsys, text: str) -> str:
    path = tmp_path / "run.json"
    path.write_text(text)
    assert main(["plot", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    return err


def test_missing_file(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nope.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.json: cannot read run file" in err


def test_not_json(tmp_path, capsys):
    assert "not JSON" in plot_error(tmp_path, capsys, "{cycles: 3")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda r: r.pop("cycles"), "field cycles: Field required"),
        (lambda r: r["kernels"][1].pop("end_cycle"), "field kernels.1.end_cycle"),
        (lambda r: r["fabric"].update(width="wide"), "field fabric.width"),
        (lambda r: r["grids"]["utilization"].pop(), "field grids.utilization: expected 6 rows"),
        (lambda r: r["grids"]["link_wavelets"].pop("W"), "field grids.link_wavelets.W"),
        (lambda r: r["grids"]["sram_words"][0].append(1), "field grids.sram_words"),
        (lambda r: r["grids"]["link_wavelets"]["N"][2].__setitem__(0, "x"), "not numbers"),
        (lambda r: r["kernels"][0].update(x=7), "field kernels.0: kernel 'h0.matmul'"),
        (lambda r: r["grids"].update(sram_capacity_words=0), "grids.sram_capacity_words"),
        (lambda r: r["kernels"][1].update(end_cycle=3), "field kernels.1.end_cycle: kernel"),
        (lambda r: r.update(critical_path=[{"kernel": "h9", "input_cycle": None,
                                            "output_cycle": 5}]),
         "field critical_path.0.kernel: no kernel is named 'h9'"),
        (lambda r: r.update(critical_path=[{"kernel": "h0.matmul", "output_cycle": -2}]),
         "field critical_path.0.input_cycle: Field required"),
    ],
)
def test_bad_field_is_named(tmp_path, capsys, change, field):
    run = synthetic_run(9, 6, [(0, 0, 3, 2), (4, 1, 5, 4)])
    change(run)
    assert field in plot_error(tmp_path, capsys, json.dumps(run))


def test_top_level_must_be_an_object(tmp_path, capsys):
    assert "expected a JSON object" in plot_error(tmp_path, capsys, "[1, 2]")
