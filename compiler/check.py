"""The check: the simulated step's numbers against the numpy reference in float64.

Every tensor is compared by its relative error ||sim - ref|| / ||ref|| (Frobenius): the
loss, the logits, every parameter gradient and every updated weight. A tensor passes when
its error is at most `TOLERANCE`: the simulated PEs compute in float32 (unit roundoff
6e-8), and a training step's dot products and reductions accumulate that over a few
hundred terms, which stays orders of magnitude below 1e-4 while any real bug (a wrong
lane, a missing term, a stale buffer) shows up far above it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from compiler.graph import grad_name, updated_name
from compiler.reference import ReferenceResult
from compiler.routing import FinalSram, Linked

TOLERANCE = 1e-4


def relative_error(sim: np.ndarray, ref: np.ndarray) -> float:
    ref64 = np.asarray(ref, np.float64)
    diff = np.linalg.norm(np.asarray(sim, np.float64).reshape(ref64.shape) - ref64)
    scale = np.linalg.norm(ref64)
    return float(diff / scale) if scale > 0 else float(diff)


@dataclass
class CheckResult:
    passed: bool
    loss_sim: float
    loss_ref: float
    errors: dict[str, float]  # tensor name -> relative error
    digest: str  # sha256 of every simulated tensor compared (float32 bits, by name)
    tolerance: float = TOLERANCE

    def failures(self) -> list[str]:
        return [name for name, err in self.errors.items() if not err <= self.tolerance]


def check_step(linked: Linked, result: FinalSram, reference: ReferenceResult,
               parameters: list[str]) -> CheckResult:
    """Read the loss, logits, gradients and updated weights out of the simulated SRAM and
    compare each with the reference."""
    expected = {"loss": np.array([[reference.loss]]), "logits": reference.logits}
    for p in parameters:
        expected[grad_name(p)] = reference.grads[p]
        expected[updated_name(p)] = reference.updated[p]
    simulated = {name: linked.read_tensor(result, name) for name in expected}
    errors = {name: relative_error(simulated[name], expected[name]) for name in expected}
    passed = all(err <= TOLERANCE for err in errors.values())
    return CheckResult(passed, float(simulated["loss"].ravel()[0]), reference.loss, errors,
                       results_digest(simulated))


def results_digest(tensors: dict[str, np.ndarray]) -> str:
    """A fingerprint of simulated results: sha256 over the names and float32 bits, in name
    order. Two runs with equal digests computed bit-identical numbers."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(tensors[name], np.float32).tobytes())
    return digest.hexdigest()
