"""Counters of one run, all kept by the cycle loop (none estimated), as numpy arrays.

Per-PE arrays have shape (height, width), indexed [y, x]. Cycle classes (one per PE per
cycle, first that applies): compute, send, receive, move, wait_output (stalled waiting for
room in a full RAMP FIFO), wait_input (stalled waiting for a wavelet), idle; see
`wse_sim.engine` for their exact meaning. `idle = cycles - the other six`; `stalled` is
the two waits together.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from wse_sim.program import PORT_OFFSET, Port
from wse_sim.router import fabric_counters
from wse_sim.state import CYCLE_CLASSES, PE_COUNTERS, RECV

PORT_NAMES = tuple(port.name for port in PORT_OFFSET)  # the order of Stats.link's first axis
# Stats.last_ramp: one record per (PE, color, direction) whose ramp carried a wavelet
LAST_RAMP = np.dtype([("x", np.int32), ("y", np.int32), ("color", np.int32),
                      ("sent", np.bool_),  # True: the PE sent on the color, False: received
                      ("cycle", np.int64)])  # the last cycle one left the PE's router / the
# PE consumed one


@dataclass
class Stats:
    width: int
    height: int
    cycles: int
    compute: np.ndarray  # cycles per PE by class ...
    send: np.ndarray
    receive: np.ndarray
    move: np.ndarray
    wait_output: np.ndarray
    wait_input: np.ndarray
    idle: np.ndarray
    sram_read: np.ndarray  # 32-bit SRAM words read per PE
    sram_write: np.ndarray  # ... and written
    ops: np.ndarray  # arithmetic element-ops per PE
    flops: np.ndarray  # FLOPs per PE (FMA 2, other arithmetic 1, MOV 0)
    first_cycle: np.ndarray  # first cycle the PE did work, -1 if never
    last_cycle: np.ndarray  # last cycle the PE did work, -1 if never
    control: np.ndarray  # control wavelets the PE sent (SWITCH_ADV)
    relayed: np.ndarray  # wavelets the PE relayed (MOV elements from FABIN to FABOUT)
    switch_changes: np.ndarray  # switch position changes of the PE's router, all colors
    control_sunk: np.ndarray  # control wavelets the PE's router consumed (at its RAMP output
    # or an outbound edge port)
    edge_in: np.ndarray  # words inbound edge ports at the PE put into its router
    edge_out: np.ndarray  # words outbound edge ports at the PE took from its router
    link: np.ndarray  # (4, height, width): wavelets leaving PE (x, y) through N/E/S/W
    ramp_in: np.ndarray  # wavelets the router delivered to the PE
    ramp_out: np.ndarray  # wavelets the PE (or packet source) put on its router
    color_hops: np.ndarray  # (colors,): mesh link crossings per color
    last_ramp: np.ndarray  # LAST_RAMP records, in no particular order
    injected: int  # wavelets sent (data and control), counting each extra multicast copy
    delivered: int  # wavelets delivered to (consumed by) PEs

    @classmethod
    def from_state(cls, width: int, height: int, cycles: int, fb: Any, wk: Any,
                   cs: Any | None = None) -> Stats:
        """Build from the engine's state: a Fabric (its FIFOs' push counts, see
        `wse_sim.router.fabric_counters`, and the last cycle each ramp FIFO and receive
        queue let a wavelet go), its Workers (multicast copies) and Cores (per-PE counters;
        None for a run without PE programs)."""
        npe = width * height

        def grid(values: np.ndarray, at: np.ndarray, empty: int = 0) -> np.ndarray:
            out = np.full(npe, empty, np.int64)
            out[at] = values
            return out.reshape(height, width)

        fabric = fabric_counters(fb)
        at = fb.router_pe
        per_pe = {}
        if cs is not None:
            slot_pe = at[cs.slot["router"]]
            for name in PE_COUNTERS.dtype.names:
                per_pe[name] = grid(cs.ctr[name], slot_pe, PE_COUNTERS.init.get(name, 0))
        else:
            for name in PE_COUNTERS.dtype.names:
                per_pe[name] = grid(np.zeros(0, np.int64), at[:0], PE_COUNTERS.init.get(name, 0))
        idle = cycles - sum(per_pe[name] for name in CYCLE_CLASSES)
        link = np.stack([grid(row, at) for row in fabric["link"]])
        ramp_in, ramp_out = grid(fabric["ramp_in"], at), grid(fabric["ramp_out"], at)
        port, last = fb.fifo["port"], fb.fifo["last_grant"]
        ramps = ((port == Port.RAMP) | (port == RECV)) & (last >= 0)
        pe = fb.router_pe[fb.fifo["router"][ramps]]
        last_ramp = np.zeros(len(pe), LAST_RAMP)
        last_ramp["x"], last_ramp["y"] = pe % width, pe // width
        last_ramp["color"] = fb.route["color"][fb.fifo["route"][ramps]]
        last_ramp["sent"] = port[ramps] == Port.RAMP
        last_ramp["cycle"] = last[ramps]
        sw = fb.switch[fb.switch["f_hi"] > fb.switch["f_lo"]]  # (others never switch)
        switches = np.zeros(len(fb.router), np.int64)
        np.add.at(switches, fb.fifo["router"][sw["f_lo"]], sw["switches"])
        ports = fb.port  # words each edge port moved, at its PE
        edge = {name: grid(np.bincount(ports["router"][sel], ports["done"][sel], len(at)
                                       ).astype(np.int64), at)
                for name, sel in (("edge_in", ports["inbound"] != 0),
                                  ("edge_out", ports["inbound"] == 0))}
        return cls(width, height, cycles, **per_pe, **edge, idle=idle, link=link,
                   ramp_in=ramp_in,
                   ramp_out=ramp_out, color_hops=fabric["color_hops"], last_ramp=last_ramp,
                   switch_changes=grid(switches, at), control_sunk=grid(fb.router["sunk"], at),
                   injected=int(ramp_out.sum()) + int(wk.stripe["copies"].sum()),
                   delivered=int(ramp_in.sum()))

    def then(self, later: Stats) -> Stats:
        """The counters of this run followed by `later`, a run on the same fabric that
        started when this one ended: counts add, `later`'s cycles are shifted by this run's
        (a first cycle is this run's if it has one, a last cycle `later`'s)."""
        shift = self.cycles
        out = {}
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(later, f.name)
            if f.name == "first_cycle":
                out[f.name] = np.where(mine >= 0, mine, np.where(theirs >= 0, theirs + shift, -1))
            elif f.name == "last_cycle":
                out[f.name] = np.where(theirs >= 0, theirs + shift, mine)
            elif f.name == "last_ramp":
                shifted = theirs.copy()
                shifted["cycle"] += shift
                both = np.concatenate([shifted, mine])  # later's first: np.unique keeps it
                keys = np.stack([both[k].astype(np.int64) for k in ("x", "y", "color", "sent")],
                                axis=1)
                out[f.name] = both[np.sort(np.unique(keys, axis=0, return_index=True)[1])]
            elif f.name in ("width", "height"):
                out[f.name] = mine
            else:
                out[f.name] = mine + theirs
        return Stats(**out)

    @property
    def stalled(self) -> np.ndarray:
        """Cycles each PE waited for the fabric: for output room or for input."""
        return self.wait_output + self.wait_input

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
            if isinstance(value, np.ndarray) and f.name not in ("first_cycle", "last_cycle",
                                                                "last_ramp"):
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
                          for name in ("compute", "send", "receive", "move", "wait_output",
                                       "wait_input", "idle"))
        return (f"{self.cycles} cycles on {self.width} x {self.height} PEs "
                f"({t['active_pes']} active)\n"
                f"PE-cycles: {share}\n"
                f"{t['flops']} FLOPs, {t['sram_read']} SRAM words read, {t['sram_write']} "
                f"written, {t['link']} link crossings, {t['injected']} wavelets sent"
                + (f", {t['edge_in']} words in and {t['edge_out']} out through edge ports"
                   if t["edge_in"] or t["edge_out"] else ""))
