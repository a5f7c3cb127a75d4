"""The wafer's hardware parameters: one pydantic model, every number a field.

The published wafers are data files in `wse_sim/presets/` (`wse2.yaml`, `wse3.yaml`), each
number with its source in a comment; a user copies one, edits it and names the copy as
the preset. A config's `wafer` is a preset name or file, or a mapping with `preset` and
field overrides (`{preset: wse2, sram_bytes_per_pe: 98304}`); `preset: null` gives every
field explicitly. README "Hardware model" tabulates the defaults and their sources.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from wse_sim.errors import UserError
from wse_sim.userinput import FiniteFloat, read_user_yaml

BYTES_PER_WORD = 4  # an SRAM word, a register and a wavelet's payload are 32 bits
PRESET_DIR = Path(__file__).resolve().parent / "presets"
PRESETS: tuple[str, ...] = tuple(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))


def preset_fields(preset: str) -> dict[str, Any]:
    """The fields of a preset: a name in PRESETS or the path of a YAML file of fields."""
    path = PRESET_DIR / f"{preset}.yaml" if preset in PRESETS else Path(preset)
    if not path.exists():
        raise _preset_error(f"unknown preset {preset!r}: not one of {', '.join(PRESETS)} and "
                            "no such file")
    try:
        data = read_user_yaml(path, "preset file")
    except UserError as err:
        raise _preset_error(f"bad preset file: {err}") from None
    if not isinstance(data, dict) or "preset" in data:
        raise _preset_error(f"preset file {preset!r} must be a mapping of wafer fields (and "
                            "name no preset itself)")
    return data


def _preset_error(message: str) -> PydanticCustomError:
    # ctx "field" lets a run config's error name `wafer.preset`, not just `wafer`
    return PydanticCustomError("preset", message, {"field": "wafer.preset"})


class WaferConfig(BaseModel):
    """Hardware of one wafer: a `preset` (name or file) and overrides, or all fields."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    preset: str | None = Field(
        default="wse2",
        description="A published wafer (wse2, wse3) or a YAML file of fields to start from; "
        "explicit fields override it. null: every field is given.")
    width: int = Field(gt=0, description="PEs per row (x extent).")
    height: int = Field(gt=0, description="PEs per column (y extent).")
    clock_hz: FiniteFloat = Field(gt=0, description="Core clock; cycles -> seconds.")
    sram_bytes_per_pe: int = Field(gt=0, multiple_of=BYTES_PER_WORD,
                                   description="SRAM per PE, bytes.")
    sram_reads_per_cycle: int = Field(gt=0, description="32-bit SRAM reads per cycle.")
    sram_writes_per_cycle: int = Field(gt=0, description="32-bit SRAM writes per cycle.")
    fp32_ops_per_cycle: FiniteFloat = Field(
        gt=0, description="fp32 arithmetic elements (an FMAC counts one) per cycle.")
    fp16_simd_width: int = Field(
        gt=0, description="fp16 elements per cycle of an all-fp16 vector op (fmach, faddh, "
        "fmulh, fmovh), bounded by the SRAM ports and the fabric (wse_sim.engine).")
    mixed_simd_width: int = Field(
        gt=0, description="Elements per cycle of an fp16-source, fp32-destination op "
        "(fmachs: fp16 multiply, fp32 accumulate; faddhs).")
    fp16_convert_simd_width: int = Field(
        gt=0, description="Elements per cycle of a conversion between fp32 and fp16 (fs2h, "
        "fh2s).")
    colors: int = Field(gt=0, le=64, description="Routable colors (virtual channels).")
    queue_depth: int = Field(gt=0, description="Wavelets buffered per (router input port, "
                             "color).")
    hop_latency: int = Field(gt=0, description="Cycles for a wavelet to cross a link.")
    switch_positions: int = Field(
        gt=0, description="Switch positions per (router, color), the base route included "
        "(control wavelets advance them).")
    switch_both_sides: bool = Field(
        description="A switch position may change both rx and tx of the base route (false: "
        "exactly one side, as on WSE-2).")
    switch_latency: int = Field(
        ge=0, description="Extra cycles after a control wavelet leaves a router before that "
        "color moves again under the new position (0: from the next cycle).")
    ramp_in_per_cycle: int = Field(gt=0, description="Wavelets router -> PE per cycle.")
    ramp_out_per_cycle: int = Field(gt=0, description="Wavelets PE -> router per cycle.")
    edge_bytes_per_s: FiniteFloat = Field(
        gt=0, description="Memory-service bandwidth into the wafer through its edge ports, "
        "bytes per second, shared by all inbound ports; the same again out of it (full "
        "duplex), shared by the outbound ports (wse_sim.engine, \"Edge ports\").")
    edge_latency_cycles: int = Field(
        ge=0, description="Cycles from the memory service sending a word to it being able to "
        "enter the edge router, and from a word leaving the fabric to its arrival at the "
        "memory service.")
    optimizer_params_per_s: FiniteFloat = Field(
        gt=0, description="Parameters a second the memory service's optimizer updates "
        "(weight streaming: the update runs there, off the wafer; compiler.streaming.service).")
    microthreads: int = Field(gt=0, description="Tasks that may run at once on a PE.")
    max_tasks: int = Field(gt=0, description="Task ids per PE.")
    registers: int = Field(gt=0, description="fp32 scalar registers per PE.")
    deadlock_cycles: int = Field(
        gt=0, description="Cycles without progress before a deadlock is declared.")
    # Energy per counted event (`wse_sim.energy`), picojoules; the presets give the sources.
    energy_fma_pj: FiniteFloat = Field(
        ge=0, description="Energy of one fp32 FMA element (fp16 elements are charged the "
        "same), pJ.")
    energy_fp_op_pj: FiniteFloat = Field(
        ge=0, description="Energy of one other arithmetic element (add, sub, mul, max, exp, "
        "1/sqrt, ...: every op but FMA and MOV), pJ.")
    energy_sram_read_pj: FiniteFloat = Field(
        ge=0, description="Energy of one 32-bit SRAM word read, pJ.")
    energy_sram_write_pj: FiniteFloat = Field(
        ge=0, description="Energy of one 32-bit SRAM word written, pJ.")
    energy_hop_pj: FiniteFloat = Field(
        ge=0, description="Energy of one wavelet (32 bits) crossing one PE-to-PE link, the "
        "router it leaves included, pJ.")
    energy_edge_byte_pj: FiniteFloat = Field(
        ge=0, description="Energy of one byte through the wafer's edge I/O (SerDes, both "
        "ends of the link), pJ.")
    system_power_w: FiniteFloat = Field(
        gt=0, description="Published power of the whole system the wafer sits in (CS-2, "
        "CS-3); only the report's comparison uses it, no energy figure does.")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = {"preset": data}
        if not isinstance(data, dict):
            return data
        preset = data.get("preset", "wse2")
        if preset is None or not isinstance(preset, str):
            return data  # no preset, or the type check names the field
        return {**preset_fields(preset), **data}

    @property
    def sram_words_per_pe(self) -> int:
        return self.sram_bytes_per_pe // BYTES_PER_WORD

    @property
    def edge_words_per_cycle(self) -> float:
        """32-bit words per cycle each direction of the edge carries (all ports together)."""
        return self.edge_bytes_per_s / self.clock_hz / BYTES_PER_WORD

    @property
    def num_pes(self) -> int:
        return self.width * self.height

    def peak_flops(self, pes: int | None = None, precision: str = "fp32") -> float:
        """FLOP/s of `pes` PEs (default: the whole fabric) at `precision`: fp32 (one FMAC
        element per cycle), or mixed (fp16 multiply, fp32 accumulate: `mixed_simd_width`
        FMACs per cycle); an FMAC is 2 FLOPs."""
        count = self.num_pes if pes is None else pes
        per_cycle = {"fp32": self.fp32_ops_per_cycle, "mixed": self.mixed_simd_width}[precision]
        return 2.0 * per_cycle * self.clock_hz * count
