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


def test_the_campaign_runs_a_config_as_a_user_does(tmp_path):
    script = Path(__file__).with_name("config_campaign.py")
    run = subprocess.run([sys.executable, str(script), "--configs", "1", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["outcomes"] == {"passed": 1} and summary["bugs"] == []
    assert not list(tmp_path.glob("config-*"))  # a config that passed is not kept
