"""Run configuration: one YAML file with sections `model`, `training`, `wafer`, `compile`,
`data`.

Every section is a strict pydantic model (unknown keys are rejected). `load_config(path)`
turns any problem with the file (missing, malformed YAML, a bad field) into a
`wse_sim.errors.UserError` whose message is one line naming the file and the field path:

    models/x.yaml: model.n_heads: d_model (100) must be divisible by n_heads (3)

The `wafer` section is `wse_sim.hardware.WaferConfig`: a preset name (`wse2`, `wse3`) or a
mapping with `preset` and field overrides. Hardware fields are defined only there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from wse_sim.errors import UserError
from wse_sim.hardware import PRESETS, WaferConfig
from wse_sim.userinput import FiniteFloat, Fp32, read_user_yaml

Placement = Literal["linear", "snake", "random", "greedy", "anneal", "partition"]
PLACEMENTS: tuple[str, ...] = get_args(Placement)

# Strict (wse_sim.userinput): no float, bool or string is taken for an int, nor a bool
# for a float; every float field is a FiniteFloat.
_STRICT = ConfigDict(extra="forbid", frozen=True, strict=True)


def _cross_field_error(field: str, message: str) -> PydanticCustomError:
    """An error about `field` (a dotted path from the root) found by a validator on an
    enclosing model, whose own location would otherwise not name the field."""
    return PydanticCustomError("cross_field", message, {"field": field})


class ModelConfig(BaseModel):
    """Shape of a GPT-2 / Cerebras-GPT style decoder (pre-LN, learned positions)."""

    model_config = _STRICT

    vocab_size: int = Field(gt=0, description="Tokens in the vocabulary.")
    n_ctx: int = Field(gt=0, description="Learned positions (maximum sequence length).")
    d_model: int = Field(gt=0, description="Width of the residual stream.")
    n_layers: int = Field(gt=0, description="Transformer blocks.")
    n_heads: int = Field(gt=0, description="Attention heads; must divide d_model.")
    d_ffn: int = Field(gt=0, description="Hidden width of the MLP.")
    activation: Literal["gelu", "gelu_tanh"] = Field(
        default="gelu", description="MLP activation: `gelu` (exact, erf) or `gelu_tanh`."
    )
    ln_eps: Fp32 = Field(default=1e-5, gt=0, description="LayerNorm epsilon.")
    tie_embeddings: bool = Field(
        default=True, description="LM head reuses the token embedding (no separate weight)."
    )

    @field_validator("n_heads")
    @classmethod
    def _heads_divide_width(cls, n_heads: int, info: ValidationInfo) -> int:
        d_model = info.data.get("d_model")  # absent if d_model itself failed validation
        if d_model is not None and d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        return n_heads

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


class TrainingConfig(BaseModel):
    """The training step: batch shape, optimizer and step size, the seed for weights and data."""

    model_config = _STRICT

    batch_size: int = Field(gt=0, description="Sequences per step (B).")
    micro_batch_size: int | None = Field(
        default=None, gt=0,
        description="Layer-pipelined: sequences per micro-batch, a divisor of batch_size. The "
        "step runs its micro-batches one after another through the same program, the weight "
        "gradients accumulating in SRAM, and updates once after the last; SRAM holds one "
        "micro-batch's activations. null = the whole batch at once.")
    # A step predicts tokens 1..T-1 from 0..T-2, so it needs at least two tokens.
    seq_len: int = Field(ge=2, description="Tokens per sequence (T); at most model.n_ctx.")
    lr: Fp32 = Field(gt=0, description="Learning rate (of SGD or AdamW).")
    seed: int = Field(default=0, ge=0, description="Seed of the initial weights and the batch.")
    init_std: Fp32 = Field(default=0.02, gt=0, description="Std of the normal weight init.")
    # AdamW defaults are Cerebras-GPT's (model zoo configs, Dey et al. 2023, arXiv:2304.03208).
    optimizer: Literal["sgd", "adamw"] = Field(
        default="sgd",
        description="`sgd` (p -= lr g) or `adamw` (torch.optim.AdamW); see compiler/optim.py.",
    )
    beta1: FiniteFloat = Field(
        default=0.9, ge=0, lt=1, description="AdamW only: decay of the first moment, in [0, 1)."
    )
    beta2: FiniteFloat = Field(
        default=0.95, ge=0, lt=1, description="AdamW only: decay of the second moment, in [0, 1)."
    )
    eps: FiniteFloat = Field(
        default=1e-8, gt=0, description="AdamW only: added to sqrt(v_hat) in the denominator."
    )
    weight_decay: FiniteFloat = Field(
        default=0.1,
        ge=0,
        description="AdamW only: decoupled weight decay (p *= 1 - lr * weight_decay) of the "
        "parameters `compiler.optim.decays` names (not biases, not LayerNorm).",
    )

    @model_validator(mode="after")
    def _micro_batch_divides(self) -> TrainingConfig:
        if self.batch_size % self.micro_batch:
            raise _cross_field_error(
                "training.micro_batch_size", f"must divide batch_size ({self.batch_size}), "
                f"got {self.micro_batch}")
        return self

    @property
    def micro_batch(self) -> int:
        """Sequences per micro-batch (the whole batch unless `micro_batch_size` is set)."""
        return self.micro_batch_size or self.batch_size

    @property
    def micro_batches(self) -> int:
        """Micro-batches per step."""
        return self.batch_size // self.micro_batch


class DataConfig(BaseModel):
    """Where training text comes from and how it becomes tokens (see compiler/data.py)."""

    model_config = _STRICT

    tokenizer: Literal["byte", "bpe"] = Field(
        default="byte",
        description="`byte` (UTF-8 bytes, needs model.vocab_size >= 256) or `bpe` (byte-level "
        "BPE trained on the corpus to exactly model.vocab_size tokens, saved as tokenizer.json).",
    )
    val_fraction: FiniteFloat = Field(
        default=0.1,
        gt=0,
        lt=1,
        description="Fraction of the corpus's tokens held out for validation (the tail).",
    )
    path: str | None = Field(
        default=None,
        min_length=1,
        description="UTF-8 text file to train on (relative to the working directory); null = "
        "the default corpus, the Python documentation topics in pydoc_data.topics.",
    )


class CompileConfig(BaseModel):
    """Choices of the compiler (execution mode, placement, stream width)."""

    model_config = _STRICT

    mode: Literal["layer_pipelined", "weight_streaming"] = Field(
        default="layer_pipelined",
        description="layer_pipelined: every op a kernel of its own, all weights resident in "
        "SRAM. weight_streaming: the whole step on one rectangle, a sequence per PE row, the "
        "weights streaming in through the wafer's edge and the gradients out to the memory "
        "service, which runs the optimizer (README, \"Execution modes\").")

    placement: Placement = Field(
        default="linear", description=f"Placement strategy, one of {', '.join(PLACEMENTS)}."
    )
    lane_width: int | None = Field(
        default=None,
        gt=0,
        description="fp32 columns one fabric stream / PE column-chunk carries; null = "
        "d_head, or what `pes` allows.",
    )
    pes: int | None = Field(
        default=None,
        gt=0,
        description="PE budget of the step: the lowering takes the narrowest lanes whose "
        "kernels fit in this many PEs (more PEs, faster rows); relays the routing adds sit on "
        "PEs no kernel uses and come on top; null = lane_width's kernels.",
    )
    seed: int = Field(default=0, ge=0, description="Seed of randomised placement strategies.")
    precision: Literal["fp32", "mixed"] = Field(
        default="fp32",
        description="fp32: every op in fp32. mixed: the linear layers (matmul) and the tied "
        "LM head multiply in fp16 with fp32 accumulation (fp16 copies of the weights and of "
        "the x and dY rows; fp32 master weights and update); every other op stays fp32.")
    loss_scale: int = Field(
        default=4096, gt=0,
        description="mixed: the static gradient scale S (a power of two): a matmul's dY is "
        "multiplied by S before its fp16 rounding (so small gradients stay normal fp16 "
        "numbers) and its dX, dW and db divided by S (both exact).")

    @field_validator("loss_scale")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"must be a power of two (scaling is then exact), got {value}")
        return value

    @model_validator(mode="after")
    def _one_sizing(self) -> CompileConfig:
        if self.lane_width is not None and self.pes is not None:
            raise _cross_field_error("compile.pes", "give lane_width or pes, not both")
        if self.mode == "weight_streaming":
            for name in ("placement", "lane_width", "pes"):
                if name in self.model_fields_set and getattr(self, name) is not None:
                    raise _cross_field_error(
                        f"compile.{name}", "weight streaming lays the step out itself (a "
                        "sequence per PE row, a feature slice per column); leave it out")
            if self.precision != "fp32":
                raise _cross_field_error(
                    "compile.precision", "weight streaming lowers the GPT step in fp32 "
                    "only (mixed precision is built for linear stacks)")
        return self


def _preset_name_allowed(schema: dict[str, Any]) -> None:
    """WaferConfig also accepts a bare preset name or file; say so in the JSON Schema."""
    ref = {"$ref": schema.pop("$ref")}
    schema["anyOf"] = [ref, {"type": "string", "examples": list(PRESETS)}]


class RunConfig(BaseModel):
    """Everything one run needs: the model, the training step, the wafer, compiler options."""

    model_config = _STRICT

    model: ModelConfig
    training: TrainingConfig
    wafer: WaferConfig = Field(
        default_factory=WaferConfig,
        description="A preset (`wse2`, `wse3` or a YAML file of wafer fields) or a mapping "
        "with `preset` and overrides.",
        json_schema_extra=_preset_name_allowed,
    )
    compile: CompileConfig = Field(default_factory=CompileConfig)
    data: DataConfig = Field(default_factory=DataConfig)

    @model_validator(mode="after")
    def _micro_batches_lowered(self) -> RunConfig:
        if self.training.micro_batches > 1:
            if self.compile.mode == "weight_streaming":
                raise _cross_field_error(
                    "training.micro_batch_size", "weight streaming runs the whole batch at "
                    "once (a sequence per PE row); leave it out")
            if self.compile.precision == "mixed":
                raise _cross_field_error(
                    "training.micro_batch_size", "micro-batches are built for fp32 only (a "
                    "mixed-precision matmul unscales its gradient after each micro-batch)")
        return self

    @model_validator(mode="after")
    def _sequence_fits_context(self) -> RunConfig:
        if self.training.seq_len > self.model.n_ctx:
            raise _cross_field_error(
                "training.seq_len",
                f"seq_len ({self.training.seq_len}) must be <= model.n_ctx ({self.model.n_ctx})",
            )
        return self


def format_validation_error(err: ValidationError) -> str:
    """One line for the first error: `field.path: message`, the value the user wrote if
    it is a scalar (strict types make "32.0" for an int an error: show it), and how many
    more errors there were."""
    errors = err.errors(include_url=False)
    first = errors[0]
    field = (first.get("ctx") or {}).get("field") or ".".join(str(p) for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    value, shown = first.get("input"), repr(first.get("input"))
    got = (f" (got {shown if len(shown) <= 40 else shown[:36] + ' ...'})"
           if first["type"] not in ("missing", "value_error")
           and isinstance(value, str | int | float | bool) else "")
    extra = len(errors) - 1
    more = f" (and {extra} more error{'s' if extra > 1 else ''})" if extra else ""
    return f"{field or '<root>'}: {message}{got}{more}"


def parse_config(data: Any, source: str = "<config>") -> RunConfig:
    """Validate an already-parsed mapping; errors become one-line UserErrors naming `source`."""
    if not isinstance(data, dict):
        raise UserError(
            f"{source}: expected a mapping with sections model, training, wafer, compile, data"
        )
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise UserError(f"{source}: {format_validation_error(err)}") from None


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a run config YAML file; any problem raises a one-line UserError."""
    return parse_config(read_config_data(path), str(path))


def read_config_data(path: str | Path) -> Any:
    """The mapping of a run config YAML file, not yet validated (a sweep merges overrides
    into it first), its wafer preset file resolved beside it; unreadable or malformed YAML
    raises a one-line UserError."""
    data = read_user_yaml(path, "config")
    if isinstance(data, dict):
        data["wafer"] = preset_beside(data.get("wafer", {}), Path(path).parent)
    return data


def preset_beside(wafer: Any, folder: Path) -> Any:
    """A wafer section whose preset file, if named relative, is found in `folder` (beside
    the file that names it)."""
    preset = wafer if isinstance(wafer, str) else (
        wafer.get("preset") if isinstance(wafer, dict) else None)
    if not isinstance(preset, str) or preset in PRESETS or Path(preset).is_absolute():
        return wafer
    resolved = str(folder / preset)
    return resolved if isinstance(wafer, str) else {**wafer, "preset": resolved}
