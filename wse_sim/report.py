"""Reports of one run, built only from the simulator's counters (`Stats`).

The simulator knows nothing of what the PEs compute: the caller names rectangular
`Region`s of the fabric (a compiler's kernels) and gets per-region start/end cycles and
utilization, plus fabric-wide figures and per-PE grids for plots. Everything here is a
count the cycle loop kept, never an estimate.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wse_sim.stats import PORT_NAMES, Stats


@dataclass(frozen=True)
class Region:
    """A named rectangle of PEs in program coordinates (e.g. one compiled kernel)."""

    name: str
    op: str
    x: int
    y: int
    width: int
    height: int


def region_report(stats: Stats, region: Region) -> dict[str, Any]:
    """Start/end cycle (first and last cycle any of its PEs worked) and utilization: compute
    cycles over PE-cycles of the whole run, and over its own start-to-end span."""
    window = np.s_[region.y:region.y + region.height, region.x:region.x + region.width]
    first, last = stats.first_cycle[window], stats.last_cycle[window]
    worked = first >= 0
    pes = region.width * region.height
    compute = int(stats.compute[window].sum())
    start = int(first[worked].min()) if worked.any() else -1
    end = int(last[worked].max()) if worked.any() else -1
    span = end - start + 1 if worked.any() else 0
    return {
        "name": region.name, "op": region.op,
        "x": region.x, "y": region.y, "w": region.width, "h": region.height, "pes": pes,
        "start_cycle": start, "end_cycle": end,
        "utilization": compute / (pes * max(stats.cycles, 1)),
        "active_utilization": compute / (pes * span) if span else 0.0,
        "flops": int(stats.flops[window].sum()),
    }


def hottest_links(link: np.ndarray, count: int = 5) -> list[dict[str, Any]]:
    """The `count` links that carried the most wavelets: PE, direction, wavelets."""
    flat = np.argsort(link, axis=None)[::-1][:count]
    out = []
    for index in flat:
        port, y, x = np.unravel_index(index, link.shape)
        if link[port, y, x] == 0:
            break
        out.append({"x": int(x), "y": int(y), "dir": PORT_NAMES[port],
                    "wavelets": int(link[port, y, x])})
    return out


def fabric_report(stats: Stats, clock_hz: float, used: np.ndarray) -> dict[str, Any]:
    """Fabric-wide figures; `used` marks the PEs that hold a program (height, width)."""
    used_pes = int(used.sum())
    link = stats.link
    return {
        "cycles": stats.cycles,
        "simulated_seconds": stats.cycles / clock_hz,
        "pes_simulated": stats.width * stats.height,
        "pes_used": used_pes,
        "pe_utilization": float(stats.compute[used].sum()) / max(used_pes * stats.cycles, 1),
        "pe_cycles": {name: int(getattr(stats, name)[used].sum()) for name in
                      ("compute", "send", "receive", "move", "stalled", "idle")},
        "flops_counted": int(stats.flops.sum()),
        "sram_bytes_read": 4 * int(stats.sram_read.sum()),
        "sram_bytes_written": 4 * int(stats.sram_write.sum()),
        "fabric_wavelet_hops": int(link.sum()),
        "wavelets_injected": stats.injected,
        "max_link_load": int(link.max()) if link.size else 0,
        "mean_link_load": float(link[link > 0].mean()) if (link > 0).any() else 0.0,
        "hottest_links": hottest_links(link),
    }


def grids(stats: Stats, sram_words: np.ndarray, sram_capacity_words: int) -> dict[str, Any]:
    """Per-PE arrays for plots, [y][x] lists."""
    return {
        "utilization": stats.utilization().round(4).tolist(),
        "link_wavelets": {name: stats.link[i].tolist() for i, name in enumerate(PORT_NAMES)},
        "sram_words": sram_words.tolist(),
        "sram_capacity_words": sram_capacity_words,
    }


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write `data` whole: to a temporary file beside `path`, then an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
