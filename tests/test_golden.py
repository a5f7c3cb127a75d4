"""gpt_tiny's counters equal the committed golden file exactly (see tests/golden.py)."""

from __future__ import annotations

import json

from golden import GOLDEN, golden_counters, run_report


def test_gpt_tiny_counters_equal_the_golden_file():
    expected = json.loads(GOLDEN.read_text())
    actual = golden_counters(run_report())
    for key in expected:
        if key == "kernels":
            for want, got in zip(expected["kernels"], actual["kernels"], strict=True):
                assert got == want, f"kernel {want['name']}"
        else:
            assert actual[key] == expected[key], key
    assert set(actual) == set(expected)
