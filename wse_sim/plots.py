"""Pictures of one run, from the RUN.json the run command writes.

`write_plots(run, out_dir)` draws five PNGs (`PLOTS`): PE utilization, link traffic (one
panel per direction, their sum, and the totals per direction), the placement map (each
kernel's rectangle coloured by op family), SRAM occupancy (fraction of capacity) and the
kernel timeline (a Gantt chart of each kernel's first to last busy cycle, with the run's
critical path, `wse_sim.critical`, drawn over it).

Why it looks the way it does:

* Axes are wafer PE coordinates (the fabric's origin added to kernel positions), y down
  as rows are numbered, one square per PE, so pictures of different runs line up.
* Fixed figure sizes at a fixed dpi (`PNG_SIZES`), no tight bounding box: every PNG of a
  kind has the same pixel size whatever the fabric, so they can be compared and diffed.
* A large fabric (750 x 994 PEs) has more PEs than the picture has pixels. Heatmaps are
  reduced by blocks of f x f PEs first, f chosen so each block gets at least one pixel,
  and drawn with nearest-neighbour. Blocks take the max, never the mean (one busy PE,
  full SRAM or hot link must not be averaged away), and are widened by one block on each
  side so a lone hot spot still shows; the title says when blocks were reduced. Kernel
  rectangles are drawn at least `_MIN_PIXELS` pixels wide so a 1 x 1 kernel still shows.
* Link traffic uses a log colour scale (a few hot links would otherwise wash out the
  rest); links that carried nothing, and PEs of no kernel, are light grey, not the colour
  of "few". Utilization is scaled to the busiest PE (a run at 8% would otherwise be one
  dark colour; the colorbar says the scale); SRAM to the capacity (full is the limit).
* Only the Agg canvas of a private `Figure` is used (no pyplot global state). All five
  are drawn in memory first, then written as one set (`wse_sim.outputs.write_files`): an
  error or a Ctrl-C leaves the folder's old PNGs as they were, never half a PNG or a mix
  of two runs.

Bad input (missing file, not JSON, a missing or ill-typed field, a grid of the wrong
shape) is a UserError of one line naming the file and the field.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from wse_sim.errors import UserError
from wse_sim.outputs import write_files
from wse_sim.program import BYTES_PER_WORD
from wse_sim.userinput import read_user_file

PLOTS: tuple[str, ...] = ("utilization", "links", "placement", "sram", "timeline")
DPI = 100
_INCHES: dict[str, tuple[float, float]] = {
    "utilization": (9.0, 8.0),
    "links": (16.0, 10.0),
    "placement": (11.0, 8.0),
    "sram": (9.0, 8.0),
    "timeline": (12.0, 8.0),
}
PLOT_FILES: tuple[str, ...] = tuple(f"{name}.png" for name in PLOTS)
PNG_SIZES: dict[str, tuple[int, int]] = {
    name: (round(w * DPI), round(h * DPI)) for name, (w, h) in _INCHES.items()
}  # (width, height) in pixels of each PNG
DIRECTIONS = ("N", "E", "S", "W")
_HEATMAP_CELLS = 400  # at most this many blocks along a side of a one-panel heatmap
_PANEL_CELLS = 250  # ... and of a panel of the link figure
_MIN_PIXELS = 3.0  # smallest drawn size of a kernel rectangle, pixels
_NOTHING = "#e6e6e6"  # PEs outside every kernel, links that carried nothing
# fixed axes boxes (figure fractions: left, bottom, width, height) instead of a layout
# engine: the same place in every picture, and a layout engine doubled the drawing time
_MAP = (0.08, 0.07, 0.78, 0.83)
_TIMELINE_NAMES = 40  # name each timeline row up to this many kernels
CRITICAL = "black"  # the critical path and the outline of its kernels


class _Record(BaseModel):
    """The part of RUN.json the pictures use; the run command may write more."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class _Fabric(_Record):
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    origin: tuple[int, int]


class _Kernel(_Record):
    name: str
    op: str
    x: int = Field(ge=0)
    y: int = Field(ge=0)
    w: int = Field(gt=0)
    h: int = Field(gt=0)
    start_cycle: int = Field(ge=-1)  # first and last busy cycle; -1: never busy
    end_cycle: int = Field(ge=-1)

    @property
    def family(self) -> str:
        """The op family: "layernorm.bwd" and "layernorm" draw alike."""
        return self.op.split(".")[0]


class _PathStep(_Record):
    kernel: str
    input_cycle: int | None = Field(ge=0)  # None: the first kernel, fed by no other
    output_cycle: int = Field(ge=0)


class _Grids(_Record):
    # rows of numbers, checked and converted by numpy in `_array` (pydantic per element
    # would take most of the time of a 750 x 994 run)
    utilization: list[Any]
    link_wavelets: dict[Literal["N", "E", "S", "W"], list[Any]]
    sram_words: list[Any]
    sram_capacity_words: int = Field(gt=0)


class _Run(_Record):
    config: str = "program"  # a compiled step's config and placement, if it says
    placement: str = "unknown"
    fabric: _Fabric
    cycles: int = Field(ge=0)
    kernels: list[_Kernel]
    critical_path: list[_PathStep] | None = None  # None: a stopped run, or an older file
    grids: _Grids


class _Data:
    """A validated run: its header plus the grids as (height, width) float arrays."""

    def __init__(self, run: _Run, source: str) -> None:
        self.run = run
        shape = (run.fabric.height, run.fabric.width)
        grids = run.grids
        self.utilization = _array(grids.utilization, shape, source, "grids.utilization")
        missing = [d for d in DIRECTIONS if d not in grids.link_wavelets]
        if missing:
            raise UserError(f"{source}: field grids.link_wavelets.{missing[0]}: missing")
        self.links = {
            d: _array(grids.link_wavelets[d], shape, source, f"grids.link_wavelets.{d}")
            for d in DIRECTIONS
        }
        words = _array(grids.sram_words, shape, source, "grids.sram_words")
        self.sram = words / grids.sram_capacity_words
        for i, k in enumerate(run.kernels):
            if k.x + k.w > run.fabric.width or k.y + k.h > run.fabric.height:
                raise UserError(
                    f"{source}: field kernels.{i}: kernel {k.name!r} ({k.w} x {k.h} at "
                    f"({k.x}, {k.y})) lies outside the {run.fabric.width} x "
                    f"{run.fabric.height} fabric"
                )
            if k.end_cycle < k.start_cycle:
                raise UserError(f"{source}: field kernels.{i}.end_cycle: kernel {k.name!r} "
                                f"ends at cycle {k.end_cycle}, before it starts")
        names = {k.name for k in run.kernels}
        for i, step in enumerate(run.critical_path or []):
            if step.kernel not in names:
                raise UserError(f"{source}: field critical_path.{i}.kernel: no kernel is "
                                f"named {step.kernel!r}")
        families = sorted({k.family for k in run.kernels})
        palette = colormaps["tab10" if len(families) <= 10 else "tab20"]
        self.colours = {f: palette(i % palette.N) for i, f in enumerate(families)}

    def outside_kernels(self, grid: np.ndarray) -> np.ndarray:
        """`grid` with NaN (drawn grey) at PEs of no kernel that have nothing to show."""
        inside = np.zeros(grid.shape, dtype=bool)
        for k in self.run.kernels:
            inside[k.y : k.y + k.h, k.x : k.x + k.w] = True
        return np.where(inside | (grid != 0), grid, np.nan)

    def subtitle(self) -> str:
        run = self.run
        return (
            f"{run.config} · placement {run.placement} · {run.fabric.width} x "
            f"{run.fabric.height} PEs · {run.cycles:,} cycles"
        )

    def extent(self) -> tuple[float, float, float, float]:
        """(left, right, bottom, top) of the fabric in wafer PE coordinates."""
        (x0, y0), fabric = self.run.fabric.origin, self.run.fabric
        return x0, x0 + fabric.width, y0 + fabric.height, y0


def _array(rows: list[Any], shape: tuple[int, int], source: str, field: str) -> np.ndarray:
    """`rows` as a (height, width) float array, or a UserError naming `field`."""
    if len(rows) != shape[0] or any(not isinstance(r, list) or len(r) != shape[1]
                                    for r in rows):
        lengths = sorted({len(r) if isinstance(r, list) else -1 for r in rows})
        raise UserError(
            f"{source}: field {field}: expected {shape[0]} rows of {shape[1]} values (the "
            f"fabric), got {len(rows)} rows of "
            f"{', '.join(str(n) if n >= 0 else 'non-list' for n in lengths) or 'no'} values"
        )
    try:
        grid = np.asarray(rows, dtype=np.float64)
    except (TypeError, ValueError):
        raise UserError(f"{source}: field {field}: has values that are not numbers") from None
    if not np.isfinite(grid).all():
        raise UserError(f"{source}: field {field}: has values that are not finite numbers")
    return grid


def load_run(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The RUN.json at `path` as a dict; UserError naming the file if unreadable."""
    text = read_user_file(path, "run file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not JSON: {err.msg} at line {err.lineno}") from None
    except RecursionError:
        raise UserError(f"{path}: not a run record: nested too deeply") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a run record: expected a JSON object")
    return data


def write_plots(run: Mapping[str, Any], out_dir: str | os.PathLike[str],
                source: str = "run") -> list[Path]:
    """Draw the five PNGs of `run` (a RUN.json object) into `out_dir`; returns their paths.
    `source` names the run in error messages (the file it came from)."""
    try:
        data = _Data(_Run.model_validate(run), source)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise UserError(f"{source}: field {field}: {first['msg']}") from None
    pngs = {}
    for name in PLOTS:
        fig = Figure(figsize=_INCHES[name], dpi=DPI)
        FigureCanvasAgg(fig)
        _DRAW[name](fig, data)
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=DPI)
        pngs[Path(out_dir) / f"{name}.png"] = png.getvalue()
    return write_files(pngs)


def plot_file(path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> list[Path]:
    """`write_plots` of the RUN.json at `path`."""
    return write_plots(load_run(path), out_dir, source=str(path))


# --- heatmaps ------------------------------------------------------------------------------


def _reduce(grid: np.ndarray, cells: int) -> tuple[np.ndarray, int]:
    """Blocks of f x f PEs reduced by max, f the smallest factor leaving at most `cells`
    blocks per side; returns (blocks, f). Edge blocks are partial. Each block also takes
    the max of its 8 neighbours, so a lone hot PE or link, or a one-PE-wide line, is at
    least 3 blocks wide and stays visible."""
    factor = max(1, math.ceil(max(grid.shape) / cells))
    if factor == 1:
        return grid, 1
    rows, cols = (math.ceil(n / factor) for n in grid.shape)
    padded = np.full((rows * factor, cols * factor), -np.inf)  # NaN (no kernel) too
    padded[: grid.shape[0], : grid.shape[1]] = np.where(np.isnan(grid), -np.inf, grid)
    peak = padded.reshape(rows, factor, cols, factor).max(axis=(1, 3))
    around = np.pad(peak, 1, constant_values=-np.inf)
    shifts = [around[dy : dy + rows, dx : dx + cols] for dy in range(3) for dx in range(3)]
    blocks = np.max(shifts, axis=0)
    return np.where(blocks == -np.inf, np.nan, blocks), factor


def _heatmap(ax: Axes, data: _Data, grid: np.ndarray, *, cells: int, cmap: str,
             norm: Normalize, title: str) -> AxesImage:
    """Draw `grid` (the fabric) on `ax` in wafer coordinates, reduced to at most `cells`
    blocks per side."""
    blocks, factor = _reduce(grid, cells)
    left, _, _, top = extent = data.extent()
    palette = colormaps[cmap].with_extremes(bad=_NOTHING)
    shown = np.ma.masked_less_equal(blocks, 0) if isinstance(norm, LogNorm) else blocks
    image = ax.imshow(
        shown, cmap=palette, norm=norm, interpolation="nearest", aspect="equal",
        extent=(left, left + blocks.shape[1] * factor, top + blocks.shape[0] * factor, top),
    )
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    _axes_labels(ax)
    if factor > 1:
        title += f"\n(each pixel: max of {factor} x {factor} PEs, widened by one)"
    ax.set_title(title, fontsize=10)
    return image


def _bar_beside(fig: Figure, ax: Axes) -> Axes:
    """Axes for a colorbar just right of the box of `ax` (as its aspect leaves it)."""
    ax.apply_aspect()
    box = ax.get_position()
    return fig.add_axes((box.x1 + 0.008, box.y0, 0.008, box.height))


def _axes_labels(ax: Axes) -> None:
    ax.set_xlabel("x (PE column)")
    ax.set_ylabel("y (PE row)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _outline_kernels(ax: Axes, data: _Data) -> None:
    """Thin outlines of the kernels over a heatmap, to tell which kernel a hot spot is."""
    x0, y0 = data.run.fabric.origin
    width = 0.6 if max(data.run.fabric.width, data.run.fabric.height) <= 256 else 0.3
    for k in data.run.kernels:
        ax.add_patch(Rectangle((x0 + k.x, y0 + k.y), k.w, k.h, fill=False,
                               edgecolor="white", linewidth=width, alpha=0.7))


def _draw_utilization(fig: Figure, data: _Data) -> None:
    ax = fig.add_axes(_MAP)
    busiest = float(data.utilization.max())
    top = min(1.0, max(0.05, math.ceil(busiest * 20) / 20))  # the busiest PE, up to 5%
    image = _heatmap(ax, data, data.outside_kernels(data.utilization), cells=_HEATMAP_CELLS,
                     cmap="viridis", norm=Normalize(0.0, top),
                     title=f"PE utilization — {data.subtitle()}")
    fig.colorbar(image, cax=_bar_beside(fig, ax),
                 label=f"fraction of cycles computing (scale to the busiest PE: {busiest:.1%})")
    _outline_kernels(ax, data)


def _draw_sram(fig: Figure, data: _Data) -> None:
    ax = fig.add_axes(_MAP)
    capacity = data.run.grids.sram_capacity_words
    image = _heatmap(ax, data, data.outside_kernels(data.sram), cells=_HEATMAP_CELLS,
                     cmap="magma",
                     norm=Normalize(0.0, 1.0), title=f"SRAM occupancy — {data.subtitle()}")
    fig.colorbar(image, cax=_bar_beside(fig, ax),
                 label=f"fraction of SRAM used ({capacity:,} words = "
                       f"{capacity * BYTES_PER_WORD / 1024:g} KiB)")
    _outline_kernels(ax, data)


def _log_norm(grids: list[np.ndarray]) -> Normalize:
    """Log scale from 1 wavelet to the busiest link; linear 0..1 when nothing moved."""
    peak = max(float(g.max()) for g in grids)
    return LogNorm(1.0, max(peak, 10.0)) if peak > 0 else Normalize(0.0, 1.0)


def _draw_links(fig: Figure, data: _Data) -> None:
    axes = fig.subplots(2, 3, gridspec_kw={"left": 0.05, "right": 0.95, "bottom": 0.06,
                                           "top": 0.91, "wspace": 0.6, "hspace": 0.3})
    panels = [axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1]]
    norm = _log_norm(list(data.links.values()))
    for ax, d in zip(panels, DIRECTIONS, strict=True):
        image = _heatmap(ax, data, data.links[d], cells=_PANEL_CELLS, cmap="inferno",
                         norm=norm, title=f"leaving each PE to the {d}")
    fig.colorbar(image, cax=_bar_beside(fig, axes[1, 1]),
                 label="wavelets per link (N, E, S, W: one scale)")
    total = sum(data.links.values())
    image = _heatmap(axes[0, 2], data, total, cells=_PANEL_CELLS, cmap="inferno",
                     norm=_log_norm([total]), title="all four directions")
    fig.colorbar(image, cax=_bar_beside(fig, axes[0, 2]), label="wavelets leaving the PE")
    bars = axes[1, 2]
    sums = [float(data.links[d].sum()) for d in DIRECTIONS]
    bars.bar(DIRECTIONS, sums, color=colormaps["inferno"](0.55))
    bars.set_xlabel("direction")
    bars.set_ylabel("wavelets (all links)")
    bars.set_title(f"total link crossings: {sum(sums):,.0f}", fontsize=10)
    fig.suptitle(f"Link traffic — {data.subtitle()}", fontsize=12, y=0.98)


def _draw_placement(fig: Figure, data: _Data) -> None:
    ax = fig.add_axes((0.07, 0.07, 0.72, 0.83))
    left, right, bottom, top = data.extent()
    x0, y0 = data.run.fabric.origin
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    ax.set_aspect("equal")
    ax.set_facecolor("#f4f4f4")
    _axes_labels(ax)
    ax.apply_aspect()  # the axes box is final: data units per pixel are known
    corner, step = ax.transData.inverted().transform([(0.0, 0.0), (1.0, 1.0)])
    pixel = np.abs(step - corner)  # PEs per pixel along x and y
    crowded = max(data.run.fabric.width, data.run.fabric.height) > 256  # edges would merge
    for k in data.run.kernels:
        w, h = max(k.w, _MIN_PIXELS * pixel[0]), max(k.h, _MIN_PIXELS * pixel[1])
        cx, cy = x0 + k.x + k.w / 2, y0 + k.y + k.h / 2
        ax.add_patch(Rectangle((cx - w / 2, cy - h / 2), w, h, facecolor=data.colours[k.family],
                               edgecolor="none" if crowded else "black", linewidth=0.5))
        _label(ax, k.name, (cx, cy), (k.w / pixel[0], k.h / pixel[1]))
    used = sum(k.w * k.h for k in data.run.kernels)
    fabric = data.run.fabric.width * data.run.fabric.height
    ax.set_title(f"Placement — {data.subtitle()}\n{len(data.run.kernels)} kernels on "
                 f"{used:,} of {fabric:,} PEs ({100 * used / fabric:.3g}%)", fontsize=10)
    _family_legend(ax, data)


def _label(ax: Axes, name: str, centre: tuple[float, float], pixels: tuple[float, float]) -> None:
    """Name a kernel inside its rectangle if the name (or its last part) fits."""
    size = 7.0
    char = size * DPI / 72 * 0.62  # average glyph width of the default font, pixels
    if pixels[1] < size * DPI / 72 * 1.3:
        return
    for text in (name, name.rsplit(".", 1)[-1]):
        if len(text) * char <= pixels[0] - 2:
            ax.text(*centre, text, ha="center", va="center", fontsize=size, clip_on=True)
            return


def _family_legend(ax: Axes, data: _Data, *extra: Line2D) -> None:
    handles = [Patch(color=colour, label=family) for family, colour in data.colours.items()]
    handles += extra
    if handles:
        ax.legend(handles=handles, title="op family", loc="upper left",
                  bbox_to_anchor=(1.02, 1.0), fontsize=8, title_fontsize=9)


def _draw_timeline(fig: Figure, data: _Data) -> None:
    ax = fig.add_axes((0.15, 0.07, 0.69, 0.87))
    kernels = data.run.kernels
    horizon = max([data.run.cycles, 1, *(k.end_cycle for k in kernels)])
    shortest = horizon / 800  # a bar is at least about one pixel long
    rows = np.arange(len(kernels))
    busy = [(row, k) for row, k in zip(rows, kernels, strict=True) if k.start_cycle >= 0]
    path = data.run.critical_path or []
    on_path = {step.kernel for step in path}
    ax.barh([row for row, _ in busy],
            [max(k.end_cycle - k.start_cycle, shortest) for _, k in busy],
            left=[k.start_cycle for _, k in busy], height=0.8,
            color=[data.colours[k.family] for _, k in busy],
            edgecolor=[CRITICAL if k.name in on_path else "none" for _, k in busy],
            linewidth=1.5)
    # each kernel of the path from its last input (the first: from cycle 0) to its last
    # output, on its row, joined to the next kernel's input
    row_of = {k.name: row for row, k in zip(rows, kernels, strict=True)}
    xs = [c for step in path for c in (step.input_cycle or 0, step.output_cycle)]
    ax.plot(xs, [row_of[step.kernel] for step in path for _ in range(2)], color=CRITICAL,
            linewidth=2.0)
    ax.axvline(data.run.cycles, color="black", linestyle="--", linewidth=0.8)
    ax.set_xlim(0, horizon * 1.02)
    ax.set_ylim(max(len(kernels), 1) - 0.5, -0.5)  # a program without kernels: one empty row
    ax.set_xlabel("cycle")
    if len(kernels) <= _TIMELINE_NAMES:
        ax.set_yticks(rows, [k.name for k in kernels], fontsize=7)
    else:
        ax.set_ylabel("kernel (op order)")
    ax.set_title(f"Kernel timeline (first to last busy cycle) — {data.subtitle()}", fontsize=10)
    _family_legend(ax, data, *([Line2D([], [], color=CRITICAL, linewidth=2.0,
                                       label="critical path")] if path else []))


_DRAW = {
    "utilization": _draw_utilization,
    "links": _draw_links,
    "placement": _draw_placement,
    "sram": _draw_sram,
    "timeline": _draw_timeline,
}
