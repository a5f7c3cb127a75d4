"""Energy of one run: the simulator's event counters times the wafer's energy per event.

Every count is one the cycle loop kept (`Stats`); the energies per event are wafer fields
(`WaferConfig.energy_*_pj`, sources in the presets), so the joules are an estimate built
on measured counts. The classes (`CLASSES`):

- `fma`: FMA elements, `flops - ops` (an FMA is 2 FLOPs and one op; other arithmetic 1
  and 1; MOV 0 and 0). fp16 elements are in the same counters (an fp16 SIMD step counts
  each of its elements), so they are charged as fp32 ones.
- `fp_other`: every other arithmetic element, `2 * ops - flops`.
- `sram_read`, `sram_write`: 32-bit SRAM words the PEs read and wrote.
- `hop`: wavelets crossing a PE-to-PE link (`Stats.link`), the router they leave included.
- `edge_io`: bytes through the wafer's edge I/O, given by the caller (`edge_bytes`).

Not counted: static/leakage power, clocking, idle PEs, instruction issue, the router-to-PE
ramps, power delivery and cooling, whatever is off the wafer. `seconds` and `tokens` are
the caller's (simulated time, units of work per run): this module knows no workload.
"""

from __future__ import annotations

from dataclasses import dataclass

from wse_sim.hardware import BYTES_PER_WORD, WaferConfig
from wse_sim.stats import Stats

CLASSES = ("fma", "fp_other", "sram_read", "sram_write", "hop", "edge_io")
PICO = 1e-12


def energy_per_event_pj(wafer: WaferConfig) -> dict[str, float]:
    """The wafer's energy of one event of each class, picojoules."""
    return {"fma": wafer.energy_fma_pj, "fp_other": wafer.energy_fp_op_pj,
            "sram_read": wafer.energy_sram_read_pj, "sram_write": wafer.energy_sram_write_pj,
            "hop": wafer.energy_hop_pj, "edge_io": wafer.energy_edge_byte_pj}


def event_counts(stats: Stats, edge_bytes: int) -> dict[str, int]:
    """Events of each class in the run `stats` counted, plus the caller's edge bytes."""
    if edge_bytes < 0:
        raise ValueError(f"edge_bytes must be >= 0, not {edge_bytes}")
    ops, flops = int(stats.ops.sum()), int(stats.flops.sum())
    return {"fma": flops - ops, "fp_other": 2 * ops - flops,
            "sram_read": int(stats.sram_read.sum()), "sram_write": int(stats.sram_write.sum()),
            "hop": int(stats.link.sum()), "edge_io": int(edge_bytes)}


@dataclass(frozen=True)
class Energy:
    """Counts and joules per class of one run; with `seconds` (simulated time) the average
    power, with `tokens` (per run) the joules per token. Either is None when not given or
    not positive."""

    events: dict[str, int]
    joules_by_class: dict[str, float]
    seconds: float | None = None
    tokens: float | None = None

    @property
    def joules(self) -> float:
        return sum(self.joules_by_class.values())

    @property
    def joules_per_token(self) -> float | None:
        return self.joules / self.tokens if self.tokens else None

    @property
    def average_power_watts(self) -> float | None:
        return self.joules / self.seconds if self.seconds else None


def run_energy(stats: Stats, wafer: WaferConfig, edge_bytes: int, *,
               seconds: float | None = None, tokens: float | None = None) -> Energy:
    """The energy of the run `stats` counted on `wafer`, plus `edge_bytes` of edge I/O."""
    events = event_counts(stats, edge_bytes)
    per_event = energy_per_event_pj(wafer)
    joules = {name: events[name] * per_event[name] * PICO for name in CLASSES}
    return Energy(events, joules, _positive(seconds), _positive(tokens))


def events_joules(events: dict[str, int], wafer: WaferConfig) -> float:
    """Joules of modelled events (`compiler.streaming.linear.phase_events`: the classes
    above, edge I/O in 32-bit words as `edge_words`)."""
    counted = {**events, "edge_io": events.get("edge_words", 0) * BYTES_PER_WORD}
    return PICO * sum(counted.get(name, 0) * pj
                       for name, pj in energy_per_event_pj(wafer).items())


def _positive(value: float | None) -> float | None:
    return value if value is not None and value > 0 else None
