"""tests/config_campaign.py, the long run over random configs: how it classifies a run's
ending, and one config through it end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from config_campaign import draw_config, outcome

from compiler.config import parse_config

SCRIPT = Path(__file__).with_name("config_campaign.py")


@pytest.mark.parametrize("code, stderr, ended", [
    (0, "", "passed"),
    (2, "config.yaml: model.n_heads: ...\n", "refused"),
    (2, "Traceback (most recent call last):\n  File ...\nValueError: x\n", "not one line"),
    (2, "error: PE (0, 0) task 0 instr 936: field n: a vector op needs n > 0 (got 0)\n",
     "invalid program"),
    (1, "", "check failed"),
    (-11, "", "crashed"),
    (None, "", "hung"),
])
def test_a_run_ends_as_its_exit_code_and_error_lines_say(code, stderr, ended):
    assert outcome(code, stderr) == ended


def test_drawn_configs_are_valid_and_drawn_again_alike():
    for k in range(20):
        parse_config(draw_config(7, k))
        assert draw_config(7, k) == draw_config(7, k)
    assert draw_config(7, 0) != draw_config(8, 0)


@pytest.mark.parametrize("options, expected", [
    (["--configs", "0"], "--configs: must be >= 1"),
    (["--seed", "-1"], "--seed: must be >= 0"),
    (["--timeout", "x"], "--timeout: not an integer"),
    (["--out", "FILE"], "is not a folder"),
])
def test_a_bad_option_ends_in_one_line_before_any_run(options, expected, tmp_path):
    file = tmp_path / "a file"
    file.write_text("")
    options = [str(file) if o == "FILE" else o for o in options]
    run = subprocess.run([sys.executable, str(SCRIPT), *options], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 2 and expected in run.stderr.splitlines()[0], run.stderr
    assert "Traceback" not in run.stderr and run.stdout == ""


def test_the_campaign_runs_a_config_as_a_user_does(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--configs", "1", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["outcomes"] == {"passed": 1} and summary["bugs"] == []
    assert not list(tmp_path.glob("config-*"))  # a config that passed is not kept
