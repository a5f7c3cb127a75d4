"""The check: the simulated step's numbers against the numpy reference in float64.

Every tensor is compared by its relative error ||sim - ref|| / ||ref|| (Frobenius): the
loss, the logits, every parameter gradient and every updated weight. A tensor passes when
its error is at most `TOLERANCE`: the simulated PEs compute in float32 (unit roundoff
6e-8), and a training step's dot products and reductions accumulate that over a few
hundred terms, which stays orders of magnitude below 1e-4 while any real bug (a wrong
lane, a missing term, a stale buffer) shows up far above it.

An updated weight can pass that test without any update (an SGD step is often smaller than
1e-4 of the weight), so each update is also checked on its own: `update:P` compares
Δsim = updated_sim - P32 (P32 the float32 initial weight the wafer started from) with
Δref = updated_ref - P. Its tolerance is derived, not chosen: the wafer forms the new
weight with one float32 rounding of at most u |w_new| per element (u = 2^-24), and the
update's other error is lr times the gradient's, at most TOLERANCE ||Δref||, so

    ||Δsim - Δref|| <= TOLERANCE ||Δref|| + u ||w_new||,

i.e. a relative tolerance of TOLERANCE + u ||w_new|| / ||Δref||. A skipped update has
relative error 1 and fails unless the update is below float32's resolution of the weight.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from compiler.graph import grad_name, updated_name
from compiler.reference import ReferenceResult
from compiler.routing import FinalSram, Linked

TOLERANCE = 1e-4
UNIT_ROUNDOFF_FP32 = 2.0**-24


def update_name(parameter: str) -> str:
    """The check's name for the update of `parameter`."""
    return f"update:{parameter}"


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
    tolerances: dict[str, float]  # tensor name -> its tolerance
    digest: str  # sha256 of every simulated tensor compared (float32 bits, by name)
    tolerance: float = TOLERANCE

    def failures(self) -> list[str]:
        return [name for name, err in self.errors.items() if not err <= self.tolerances[name]]


def read_results(linked: Linked, result: FinalSram, parameters: list[str]
                 ) -> dict[str, np.ndarray]:
    """The loss, logits, gradients and updated weights, read out of the simulated SRAM."""
    names = ["loss", "logits"] + [f(p) for p in parameters for f in (grad_name, updated_name)]
    return {name: linked.read_tensor(result, name) for name in names}


def compare(simulated: dict[str, np.ndarray], reference: ReferenceResult,
            initial: dict[str, np.ndarray]) -> CheckResult:
    """Every simulated tensor and every update against the reference (see the docstring);
    `initial` are the float64 weights both started from."""
    expected = {"loss": np.array([[reference.loss]]), "logits": reference.logits}
    for p in initial:
        expected[grad_name(p)] = reference.grads[p]
        expected[updated_name(p)] = reference.updated[p]
    errors = {name: relative_error(simulated[name], expected[name]) for name in expected}
    tolerances = dict.fromkeys(errors, TOLERANCE)
    for p, start in initial.items():
        new_sim = np.asarray(simulated[updated_name(p)], np.float64).reshape(start.shape)
        step_sim = new_sim - np.asarray(start, np.float32)
        step_ref = reference.updated[p] - start
        errors[update_name(p)] = relative_error(step_sim, step_ref)
        scale = np.linalg.norm(step_ref)
        rounding = UNIT_ROUNDOFF_FP32 * np.linalg.norm(new_sim)
        tolerances[update_name(p)] = TOLERANCE + (rounding / scale if scale > 0 else np.inf)
    passed = all(errors[name] <= tolerances[name] for name in errors)
    return CheckResult(passed, float(simulated["loss"].ravel()[0]), reference.loss, errors,
                       tolerances, results_digest(simulated))


def check_step(linked: Linked, result: FinalSram, reference: ReferenceResult,
               initial: dict[str, np.ndarray]) -> CheckResult:
    """Read the results out of the simulated SRAM and compare them with the reference."""
    return compare(read_results(linked, result, list(initial)), reference, initial)


def results_digest(tensors: dict[str, np.ndarray]) -> str:
    """A fingerprint of simulated results: sha256 over the names and float32 bits, in name
    order. Two runs with equal digests computed bit-identical numbers."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(tensors[name], np.float32).tobytes())
    return digest.hexdigest()
