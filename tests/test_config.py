"""Run configs: the zoo loads, bad files end in one line naming the field (exit code 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from compiler.config import PLACEMENTS, RunConfig, load_config, parse_config
from wse_sim.errors import UserError
from wse_sim.hardware import PRESET_DIR, PRESETS, WaferConfig
from wse_sim.userinput import load_yaml

ROOT = Path(__file__).resolve().parents[1]
ZOO = sorted((ROOT / "models").glob("*.yaml"))


def _tiny() -> dict:
    return yaml.safe_load((ROOT / "models" / "gpt_tiny.yaml").read_text())


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wse_sim", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("path", ZOO, ids=lambda p: p.stem)
def test_zoo_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.training.seq_len <= cfg.model.n_ctx
    assert cfg.model.d_model == cfg.model.n_heads * cfg.model.d_head


def test_zoo_is_complete() -> None:
    names = {p.stem for p in ZOO}
    sizes = ("111m", "256m", "590m", "1p3b", "2p7b", "6p7b", "13b")
    assert {"gpt_tiny", "gpt_small"} | {f"cerebras_gpt_{s}" for s in sizes} <= names


def test_tiny_keeps_heads_wide_enough() -> None:
    assert load_config(ROOT / "models" / "gpt_tiny.yaml").model.d_head >= 16


@pytest.mark.parametrize(
    ("section", "change", "expected"),
    [
        ("model", {"colour": 1}, "model.colour: Extra inputs are not permitted"),
        ("model", {"n_heads": 3}, "model.n_heads: d_model (32) must be divisible by n_heads (3)"),
        ("model", {"d_ffn": -4}, "model.d_ffn: Input should be greater than 0"),
        ("training", {"seq_len": 17}, "training.seq_len: seq_len (17) must be <= model.n_ctx"),
        ("training", {"lr": 0}, "training.lr: Input should be greater than 0"),
        ("wafer", {"width": 0}, "wafer.width: Input should be greater than 0"),
        ("compile", {"placement": "spiral"}, "compile.placement: Input should be"),
        ("compile", {"lane_width": 0}, "compile.lane_width: Input should be greater than 0"),
        ("compile", {"pes": 0}, "compile.pes: Input should be greater than 0"),
        ("compile", {"lane_width": 8, "pes": 100}, "compile.pes: give lane_width or pes, not both"),
        ("training", {"optimizer": "adam"}, "training.optimizer: Input should be 'sgd' or 'adamw'"),
        ("training", {"beta1": 1.0}, "training.beta1: Input should be less than 1"),
        ("training", {"beta2": -0.5}, "training.beta2: Input should be greater than or equal to 0"),
        ("training", {"eps": 0}, "training.eps: Input should be greater than 0"),
        ("training", {"eps": float("inf")}, "training.eps: Input should be a finite number"),
        ("training", {"beta2": float("nan")}, "training.beta2: Input should be a finite number"),
        ("training", {"weight_decay": -0.1}, "training.weight_decay: Input should be greater than"),
        ("training", {"beta1": True}, "training.beta1: Input should be a valid number"),
        ("data", {"tokenizer": "char"}, "data.tokenizer: Input should be 'byte' or 'bpe'"),
        ("data", {"val_fraction": 1}, "data.val_fraction: Input should be less than 1"),
        ("data", {"val_fraction": False}, "data.val_fraction: Input should be a valid number"),
        ("data", {"path": 7}, "data.path: Input should be a valid string"),
        ("data", {"colour": 1}, "data.colour: Extra inputs are not permitted"),
        # strict types: nothing is converted to what the field wants
        ("model", {"n_layers": 2.0}, "model.n_layers: Input should be a valid integer (got 2.0)"),
        ("training", {"batch_size": True}, "training.batch_size: Input should be a valid integer"),
        ("model", {"d_model": "32"}, "model.d_model: Input should be a valid integer (got '32')"),
        ("model", {"tie_embeddings": 1}, "model.tie_embeddings: Input should be a valid boolean"),
        ("training", {"lr": "0.1"}, "training.lr: Input should be a valid number (got '0.1')"),
        ("compile", {"seed": 1.5}, "compile.seed: Input should be a valid integer (got 1.5)"),
        ("compile", {"precision": "fp16"}, "compile.precision: Input should be 'fp32' or "
         "'mixed'"),
        ("compile", {"loss_scale": 1000}, "compile.loss_scale: must be a power of two"),
        ("wafer", {"width": 750.0}, "wafer.width: Input should be a valid integer (got 750.0)"),
        # every float is finite
        ("training", {"lr": float("inf")}, "training.lr: Input should be a finite number"),
        ("training", {"init_std": float("nan")}, "training.init_std: Input should be a finite"),
        ("model", {"ln_eps": float("inf")}, "model.ln_eps: Input should be a finite number"),
        ("wafer", {"clock_hz": float("inf")}, "wafer.clock_hz: Input should be a finite number"),
        # what the PEs compute with must be a normal float32
        ("training", {"init_std": 1e200}, "training.init_std: 1e+200 is not a normal float32"),
        ("training", {"lr": 1e-50}, "training.lr: 1e-50 is not a normal float32"),
        ("model", {"ln_eps": 1e-40}, "model.ln_eps: 1e-40 is not a normal float32"),
    ],
)
def test_bad_field_is_named(tmp_path: Path, section: str, change: dict, expected: str) -> None:
    data = _tiny()
    if not isinstance(data.get(section), dict):
        data[section] = {}  # `wafer: wse2` becomes a mapping of overrides
    data[section].update(change)
    path = _write(tmp_path, data)
    with pytest.raises(UserError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: {expected}")


@pytest.mark.parametrize(
    ("section", "change", "field"),
    [
        ("model", {"colour": 1}, "model.colour"),
        ("model", {"n_heads": 3}, "model.n_heads"),
        ("model", {"n_layers": -2}, "model.n_layers"),
    ],
)
def test_cli_reports_bad_config_in_one_line(
    tmp_path: Path, section: str, change: dict, field: str
) -> None:
    data = _tiny()
    data[section].update(change)
    path = _write(tmp_path, data)
    result = _cli("graph", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert field in lines[0] and str(path) in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_file_and_malformed_yaml(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nope\.yaml: cannot read config"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {vocab_size: 3\n")
    with pytest.raises(UserError, match=r"broken\.yaml: invalid YAML at line \d+") as err:
        load_config(broken)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="expected a mapping"):
        parse_config(["not", "a", "mapping"], "list.yaml")


def test_missing_section_is_named() -> None:
    data = _tiny()
    del data["training"]
    with pytest.raises(UserError, match="x.yaml: training: Field required"):
        parse_config(data, "x.yaml")


def test_wafer_preset_name_or_mapping() -> None:
    data = _tiny()
    data["wafer"] = "wse3"
    assert parse_config(data).wafer.width == 762
    data["wafer"] = {"preset": "wse3", "sram_bytes_per_pe": 96 * 1024}
    wafer = parse_config(data).wafer
    assert (wafer.height, wafer.sram_bytes_per_pe) == (1172, 96 * 1024)
    del data["wafer"]
    assert parse_config(data).wafer.preset == "wse2"


def test_a_copied_preset_file_beside_the_config(tmp_path: Path) -> None:
    """A user copies a preset, edits it, and names the copy relative to the config."""
    text = (PRESET_DIR / "wse2.yaml").read_text().replace("sram_bytes_per_pe: 49152",
                                                         "sram_bytes_per_pe: 98304")
    (tmp_path / "big_sram.yaml").write_text(text)
    data = _tiny()
    data["wafer"] = {"preset": "big_sram.yaml", "colors": 16}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(data))
    wafer = load_config(config).wafer
    assert (wafer.width, wafer.sram_bytes_per_pe, wafer.colors) == (750, 98304, 16)


@pytest.mark.parametrize(("wafer", "expected"), [
    ("wse9", "wafer.preset: unknown preset 'wse9': not one of wse2, wse3 and no such file"),
    ({"preset": None, "width": 4}, "wafer.height: Field required"),
    ({"sram_bytes_per_pe": 1001}, "wafer.sram_bytes_per_pe: Input should be a multiple of 4"),
])
def test_bad_wafer_is_one_line_naming_the_field(wafer, expected) -> None:
    data = _tiny()
    data["wafer"] = wafer
    with pytest.raises(UserError) as err:
        parse_config(data, "x.yaml")
    assert str(err.value).startswith(f"x.yaml: {expected}")


def test_preset_files_hold_every_field() -> None:
    fields = set(WaferConfig.model_fields) - {"preset"}
    for name in PRESETS:
        assert set(yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text())) == fields


def test_compile_section_defaults() -> None:
    data = _tiny()
    del data["compile"]
    compile_cfg = parse_config(data).compile
    assert (compile_cfg.placement, compile_cfg.lane_width, compile_cfg.seed) == ("linear", None, 0)
    assert (compile_cfg.precision, compile_cfg.loss_scale) == ("fp32", 4096)
    assert PLACEMENTS == ("linear", "snake", "random", "greedy", "anneal", "partition")


def test_optimizer_and_data_defaults() -> None:
    cfg = parse_config(_tiny())
    training = cfg.training
    assert training.optimizer == "sgd"  # every shipped config trains with plain SGD
    # Cerebras-GPT's AdamW settings.
    assert (training.beta1, training.beta2, training.eps, training.weight_decay) == (
        0.9,
        0.95,
        1e-8,
        0.1,
    )
    assert (cfg.data.tokenizer, cfg.data.val_fraction, cfg.data.path) == ("byte", 0.1, None)


def test_exponent_without_dot_is_a_number(tmp_path: Path) -> None:
    # PyYAML reads `1e-8` as a string (YAML 1.1 wants `1.0e-8`); the user meant the number.
    text = (ROOT / "models" / "gpt_tiny.yaml").read_text()
    text = text.replace("  seed: 0\n  init_std", "  seed: 0\n  eps: 1e-6\n  init_std", 1)
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    assert load_config(path).training.eps == 1e-6
    data = _tiny()
    data["training"]["eps"] = "tiny"
    with pytest.raises(UserError, match="training.eps: Input should be a valid number"):
        parse_config(data)


def test_yaml_numbers_follow_yaml_1_2_floats() -> None:
    data = load_yaml("a: 1e-8\nb: 1.0e8\nc: 1E5\nd: -.5e3\ne: '1e-8'\nf: 1_000\ng: 0.25\n", "x")
    assert data == {"a": 1e-8, "b": 1e8, "c": 1e5, "d": -500.0, "e": "1e-8", "f": 1000,
                    "g": 0.25}
    assert [type(v) for v in data.values()] == [float] * 4 + [str, int, float]
    assert yaml.safe_load("a: 1e-8") == {"a": "1e-8"}  # PyYAML's own loader is untouched


def test_config_that_is_not_utf8_names_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes((ROOT / "models" / "gpt_tiny.yaml").read_bytes() + b"# caf\xe9\n")
    with pytest.raises(UserError, match=r"latin1\.yaml: not UTF-8 text: byte 0xe9 at offset"):
        load_config(path)
    preset = tmp_path / "wafer.yaml"
    preset.write_bytes(b"width: 4 # \xff\n")
    data = _tiny()
    data["wafer"] = {"preset": "wafer.yaml"}
    config = _write(tmp_path, data)
    with pytest.raises(UserError, match=r"wafer\.preset: bad preset file: .*wafer\.yaml: not "
                                        r"UTF-8 text: byte 0xff at offset 11"):
        load_config(config)


def test_schema_command_prints_json_schema() -> None:
    result = _cli("schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert schema["type"] == "object"
    assert set(schema["properties"]) == {"model", "training", "wafer", "compile", "data"}
    assert schema == json.loads(json.dumps(RunConfig.model_json_schema()))
