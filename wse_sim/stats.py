"""Counters of one run, all kept by the cycle loop (none estimated), as numpy arrays.

Per-PE arrays have shape (height, width), indexed [y, x]. Cycle classes (one per PE per
cycle, first that applies): compute, send, receive, move, stalled, idle; see
`wse_sim.engine` for their exact meaning. `idle = cycles - the other five`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from wse_sim.assemble import CLASSES, CT_FIRST, CT_LAST, CT_RD
from wse_sim.router import CT_RAMP_IN, CT_RAMP_OUT

PORT_NAMES = ("N", "E", "S", "W")  # the order of the first axis of Stats.link


@dataclass
class Stats:
    width: int
    height: int
    cycles: int
    compute: np.ndarray  # cycles per PE by class ...
    send: np.ndarray
    receive: np.ndarray
    move: np.ndarray
    stalled: np.ndarray
    idle: np.ndarray
    sram_read: np.ndarray  # 32-bit SRAM words read per PE
    sram_write: np.ndarray  # ... and written
    ops: np.ndarray  # arithmetic element-ops per PE
    flops: np.ndarray  # FLOPs per PE (FMA 2, other arithmetic 1, MOV 0)
    first_cycle: np.ndarray  # first cycle the PE did work, -1 if never
    last_cycle: np.ndarray  # last cycle the PE did work, -1 if never
    link: np.ndarray  # (4, height, width): wavelets leaving PE (x, y) through N/E/S/W
    ramp_in: np.ndarray  # wavelets the router delivered to the PE
    ramp_out: np.ndarray  # wavelets the PE (or packet source) put on its router
    color_hops: np.ndarray  # (colors,): mesh link crossings per color
    injected: int  # wavelets sent, counting each extra multicast copy
    delivered: int  # wavelets delivered to (consumed by) PEs

    @classmethod
    def from_state(cls, width: int, height: int, cycles: int, fb: Any, cs: Any | None, *,
                   injected: int, delivered: int) -> Stats:
        """Build from the engine's counter arrays: `fb.ctr` (per PE: wavelets out through
        N/E/S/W, ramp in, ramp out), `cs.ctr` (per PE: 5 cycle classes, SRAM reads, writes,
        ops, FLOPs, first, last); `cs` None for a run without PE programs."""
        shape = (height, width)

        def grid(column: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(column, np.int64).reshape(shape)

        pe_ctr = np.zeros((width * height, CT_LAST + 1), np.int64) if cs is None else cs.ctr
        if cs is None:
            pe_ctr[:, CT_FIRST:] = -1  # never worked
        classes = [grid(pe_ctr[:, k]) for k in range(len(CLASSES))]
        idle = cycles - sum(classes)
        link = np.ascontiguousarray(fb.ctr[:, :4].T, np.int64).reshape(4, *shape)
        return cls(width, height, cycles, *classes, idle,
                   *(grid(pe_ctr[:, k]) for k in range(CT_RD, CT_LAST + 1)), link,
                   grid(fb.ctr[:, CT_RAMP_IN]), grid(fb.ctr[:, CT_RAMP_OUT]),
                   fb.color_hops.copy(), injected, delivered)

    def utilization(self) -> np.ndarray:
        """Fraction of cycles each PE spent computing, (height, width)."""
        return self.compute / max(self.cycles, 1)

    def busy(self) -> np.ndarray:
        """Fraction of cycles each PE was not idle, (height, width)."""
        return 1.0 - self.idle / max(self.cycles, 1)

    def active_pes(self) -> np.ndarray:
        """Mask of PEs that did any work."""
        return self.first_cycle >= 0

    def totals(self) -> dict[str, int | float]:
        """Fabric-wide sums (JSON-ready)."""
        out: dict[str, int | float] = {"cycles": self.cycles, "pes": self.width * self.height,
                                       "active_pes": int(self.active_pes().sum())}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray) and f.name not in ("first_cycle", "last_cycle"):
                out[f.name] = int(value.sum())
        out["injected"] = self.injected
        out["delivered"] = self.delivered
        active = max(out["active_pes"], 1)
        out["mean_utilization_active"] = float(self.compute.sum() / active / max(self.cycles, 1))
        out["link_busiest"] = int(self.link.max()) if self.link.size else 0
        return out

    def summary(self) -> str:
        """A few lines for a terminal."""
        t = self.totals()
        share = ", ".join(f"{name} {t[name] / max(t['pes'] * self.cycles, 1):.1%}"
                          for name in ("compute", "send", "receive", "move", "stalled", "idle"))
        return (f"{self.cycles} cycles on {self.width} x {self.height} PEs "
                f"({t['active_pes']} active)\n"
                f"PE-cycles: {share}\n"
                f"{t['flops']} FLOPs, {t['sram_read']} SRAM words read, {t['sram_write']} "
                f"written, {t['link']} link crossings, {t['injected']} wavelets sent")
