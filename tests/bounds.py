"""fp32 error bounds the kernel tests share."""

from __future__ import annotations

import numpy as np

EPS32 = 2.0 ** -23


def assert_sums_close(got: np.ndarray, ref: np.ndarray, abs_terms: np.ndarray, terms: int):
    """|got - ref| within the fp32 rounding bound of a `terms`-term sum whose absolute
    terms add up to `abs_terms` (the classical (n + 1) eps sum |a_i| bound)."""
    bound = (terms + 1) * EPS32 * abs_terms + 1e-30
    worst = np.max(np.abs(got - ref) / bound)
    assert worst <= 1.0, f"error {worst:.2f} x the fp32 bound"
