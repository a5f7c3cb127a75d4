"""The wafer's hardware parameters: one pydantic model, every number a field.

Defaults and their sources are the table in DESIGN.md (README "Hardware model"):

* PE SRAM 48 KiB in 8 banks; 2 reads + 1 write of 32 bits per cycle (Cerebras SDK,
  CSL appendix; Jacquelin et al. 2022, arXiv:2204.03775).
* fp32 multiply-accumulate 1 element/cycle (SDK SIMD table: fp32 is not SIMD; a silicon
  study measured 0.5, so it is a field).
* Router: 5 ports, 24 routable colors, one 32-bit wavelet per link per direction per
  cycle, hop latency 1 (a silicon study measured 2), per-color input queues whose depth is
  not published (a field).
* Up to 64 task ids, 8 microthreads (WSE-3).
* Clock 850 MHz (the SDK examples' cycle-to-seconds conversion).
* Fabric: WSE-2 750 x 994 usable PEs, WSE-3 762 x 1172.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PRESETS: dict[str, dict[str, Any]] = {
    "wse2": {"width": 750, "height": 994, "clock_hz": 850e6, "fp16_simd_width": 4},
    "wse3": {"width": 762, "height": 1172, "clock_hz": 850e6, "fp16_simd_width": 8},
}


class WaferConfig(BaseModel):
    """Hardware of one wafer. Give a `preset` and override any field, or give all fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: Literal["wse2", "wse3"] | None = Field(
        default="wse2", description="Start from a published wafer; explicit fields override it."
    )
    width: int = Field(default=750, gt=0, description="PEs per row (x extent).")
    height: int = Field(default=994, gt=0, description="PEs per column (y extent).")
    clock_hz: float = Field(default=850e6, gt=0, description="Core clock; cycles -> seconds.")
    sram_bytes_per_pe: int = Field(default=48 * 1024, gt=0, description="SRAM per PE, bytes.")
    sram_banks: int = Field(default=8, gt=0, description="SRAM banks per PE (reported only).")
    sram_reads_per_cycle: int = Field(default=2, gt=0, description="32-bit SRAM reads/cycle.")
    sram_writes_per_cycle: int = Field(default=1, gt=0, description="32-bit SRAM writes/cycle.")
    fp32_ops_per_cycle: float = Field(
        default=1.0, gt=0, description="fp32 arithmetic elements (an FMAC counts one) per cycle."
    )
    fp16_simd_width: int = Field(default=4, gt=0, description="fp16 SIMD lanes (reported only).")
    colors: int = Field(default=24, gt=0, le=64, description="Routable colors (virtual channels).")
    queue_depth: int = Field(
        default=4, gt=0, description="Wavelets buffered per (router input port, color)."
    )
    hop_latency: int = Field(default=1, gt=0, description="Cycles for a wavelet to cross a link.")
    ramp_in_per_cycle: int = Field(default=1, gt=0, description="Wavelets router->PE per cycle.")
    ramp_out_per_cycle: int = Field(default=1, gt=0, description="Wavelets PE->router per cycle.")
    microthreads: int = Field(default=8, gt=0, description="Tasks that may run at once on a PE.")
    max_tasks: int = Field(default=64, gt=0, description="Task ids per PE.")
    registers: int = Field(default=16, gt=0, description="fp32 scalar registers per PE.")
    deadlock_cycles: int = Field(
        default=20_000, gt=0, description="Cycles without progress before a deadlock is declared."
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = {"preset": data}
        if not isinstance(data, dict):
            return data
        preset = data.get("preset", "wse2")
        if preset is None:
            return data
        if preset not in PRESETS:
            return data  # the Literal check names the field
        return {**PRESETS[preset], **data}

    @property
    def sram_words_per_pe(self) -> int:
        return self.sram_bytes_per_pe // 4

    @property
    def num_pes(self) -> int:
        return self.width * self.height

    def peak_flops(self, pes: int | None = None) -> float:
        """fp32 FLOP/s of `pes` PEs (default: the whole fabric); an FMAC is 2 FLOPs."""
        count = self.num_pes if pes is None else pes
        return 2.0 * self.fp32_ops_per_cycle * self.clock_hz * count
