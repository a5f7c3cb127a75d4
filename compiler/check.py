"""The check: the simulated step's numbers against float64.

Every tensor is compared by its relative error ||sim - ref|| / ||ref|| (Frobenius). A
tensor passes when its error is at most `TOLERANCE`: the simulated PEs compute in float32
(unit roundoff 6e-8), and a training step's dot products and reductions accumulate that
over a few hundred terms, which stays orders of magnitude below 1e-4 while any real bug (a
wrong lane, a missing term, a stale buffer) shows up far above it.

What each tensor is compared with:

* the loss, the logits and every parameter gradient: the numpy reference's step from the
  same weights (`compiler.reference`); any other simulated tensor (a weight-streaming
  step's block outputs) likewise, the reference's tensor of its graph name;
* the optimizer's outputs, i.e. every updated weight and, for AdamW, every updated moment
  and the step count (`compiler.ops.update.state_names`): the optimizer of
  `compiler.optim` applied in float64 to the weights and optimizer state the wafer started
  from and to the wafer's own gradient. The gradient is checked against the reference
  above; this checks the update the wafer computed from it. (Against the reference's
  gradient instead, AdamW's step would not be checkable: it divides each gradient element
  by its own magnitude, so an element whose exact gradient is below float32's resolution
  of the gradient, as the key bias's is, exactly zero, gets a step of either sign.)

An updated weight can pass that test without any update (a step is often smaller than 1e-4
of the weight), so each update is also checked on its own: `update:P` compares
Δsim = updated_sim - P32 (P32 the float32 weight the wafer started from) with the float64
optimizer's Δ. Its tolerance is derived, not chosen: the wafer forms the new weight with
at most two float32 roundings of about u |w_new| per element (u = 2^-24; the final add,
and AdamW's weight decay), and computes the step itself with a few roundings relative to
the step (far below TOLERANCE of it), so

    ||Δsim - Δ|| <= TOLERANCE ||Δ|| + r u ||w_new||   (r = the roundings of the weight),

i.e. a relative tolerance of TOLERANCE + r u ||w_new|| / ||Δ||. A skipped update has
relative error 1 and fails unless the update is below float32's resolution of the weight.

Mixed precision (`compile.precision: mixed`). The reference rounds to fp16 exactly where
the wafer does (`compiler.ops.matmul`: x, W and the scaled dY of every linear layer and
of the tied LM head), so
it does not compare fp16 with float64. What remains is where a rounding point's input
differs, by the fp32 error of everything before it, across an fp16 rounding boundary:
the wafer's and the reference's rounded values are then one fp16 ulp apart, at most
2 u16 |a| (u16 = 2^-11, fp16's unit roundoff). A rounding point can thus add at most
2 u16 to its tensor's relative (Frobenius) difference, every element flipped; a product
of rounded factors, a sum of products over K terms, and the gradient ops after it carry
that relative difference on to first order (as they carry any relative perturbation of
their inputs). Flips are sparse: an element flips with probability p about its fp32
error over its fp16 ulp (~1e-3 here), so a rounding point adds about sqrt(p) 2 u16 and R
points about sqrt(R p) 2 u16, below 2 u16 while R p < 1. Every tensor's tolerance, and
the TOLERANCE term of every update's, is therefore TOLERANCE + 2 u16 (about 1.08e-3,
`tolerance_for`). Measured worst tensors: gpt_tiny (2 blocks) 2.1e-4, gpt_small (4
blocks) 6.0e-4: the difference grows with the rounding points on a tensor's path, as the
estimate says, so a much deeper model needs R counted; the numpy reference run in float32
instead of float64 differs from itself by as much (2.4e-4 on gpt_tiny), so this is the
fp16 roundings' sensitivity, not the wafer's.

Where float64 cannot tell. The estimate assumes a relative difference carries on without
growing; a sum whose terms cancel grows it by their cancellation (a bias gradient of a
4-feature LayerNorm summed over a few tokens). There a correct fp32 computation with the
same rounding points misses float64 by more than the tolerance, and float64 cannot tell
it from a wrong one. So when a tensor of a mixed step misses its tolerance, the reference
step runs again in float32 (`float32_reference`); a tensor that this float32 reference
misses by more than the tolerance as well is judged against the float32 reference instead,
at the fp32 TOLERANCE (a wrong lane or a missing term is still far above it), and the
report says so. Config 58 of the config campaign's seed 14 (d_model 4, 2 layers, mixed):
grad:h0.ln2.bias misses float64 by 1.81e-3 and so does numpy's float32 run of the
reference; the wafer misses that run by 2.1e-7.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from compiler.config import TrainingConfig
from compiler.graph import grad_name, updated_name
from compiler.ops.update import STEP_TENSOR, UpdateRule, moment_names, state_names
from compiler.optim import OptimizerState, init_state, optimizer_step
from compiler.reference import ReferenceResult
from compiler.routing import FinalSram, Linked

TOLERANCE = 1e-4
UNIT_ROUNDOFF_FP32 = 2.0**-24
UNIT_ROUNDOFF_FP16 = 2.0**-11


def tolerance_for(precision: str) -> float:
    """The relative tolerance of a tensor of a step compiled at `precision` (docstring):
    TOLERANCE, plus one fp16 ulp (2 u16) where the step rounds to fp16."""
    return TOLERANCE + (2 * UNIT_ROUNDOFF_FP16 if precision == "mixed" else 0.0)


def update_name(parameter: str) -> str:
    """The check's name for the update of `parameter`."""
    return f"update:{parameter}"


def relative_error(sim: np.ndarray, ref: np.ndarray) -> float:
    ref64 = np.asarray(ref, np.float64)
    # values that overflowed give inf - inf and inf / inf: NaN, which the report names
    with np.errstate(invalid="ignore"):
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
    # tensor name -> the float32 reference's own error, for each tensor judged against the
    # float32 reference (its error and tolerance above are against it)
    float32_judged: dict[str, float] = field(default_factory=dict)

    def failures(self) -> list[str]:
        return [name for name, err in self.errors.items() if not err <= self.tolerances[name]]


def read_results(linked: Linked, result: FinalSram, parameters: list[str]
                 ) -> dict[str, np.ndarray]:
    """The loss, logits, gradients, updated weights and updated optimizer state, read out of
    the simulated SRAM."""
    names = (["loss", "logits", *map(grad_name, parameters)]
             + state_names(linked.program.tensors, parameters))
    return {name: linked.read_tensor(result, name) for name in names}


def optimizer_expected(training: TrainingConfig, initial: dict[str, np.ndarray],
                       grads: dict[str, np.ndarray], state: OptimizerState
                       ) -> dict[str, np.ndarray]:
    """The optimizer's outputs in float64, by their names after the step, from the weights
    `initial`, the gradients `grads` and the state `state` before it."""
    params, after = optimizer_step(training, initial, grads, state)
    expected = {updated_name(p): value for p, value in params.items()}
    if training.optimizer == "adamw":
        expected[updated_name(STEP_TENSOR)] = np.array([[after.step]], np.float64)
        for p in params:
            for name, moments in zip(moment_names(p), (after.m, after.v), strict=True):
                expected[updated_name(name)] = moments[p]
    return expected


def _reference_values(reference: ReferenceResult, parameters: Iterable[str],
                      names: Iterable[str]) -> dict[str, np.ndarray]:
    """The reference's value of each simulated tensor it computes (all but the optimizer's
    outputs): the loss, the logits, the gradients, any other by graph name."""
    known = {"loss": np.array([[reference.loss]]), "logits": reference.logits,
             **{grad_name(p): reference.grads[p] for p in parameters}}
    return {name: known[name] if name in known else reference.tensors[name]
            for name in names}


def compare(simulated: dict[str, np.ndarray], reference: ReferenceResult,
            initial: dict[str, np.ndarray], training: TrainingConfig,
            state: OptimizerState | None = None, precision: str = "fp32",
            float32_reference: Callable[[], ReferenceResult] | None = None) -> CheckResult:
    """Every simulated tensor and every update against float64 (see the docstring);
    `initial` are the float64 weights and `state` the optimizer state (None: the first
    step's) both started from; `precision` the step's `compile.precision`;
    `float32_reference` the same reference step run in float32, called only if a mixed
    step's tensor misses float64 (the docstring, "Where float64 cannot tell")."""
    base = tolerance_for(precision)
    state = state or init_state(training.optimizer, initial)
    grads = {p: np.asarray(simulated[grad_name(p)], np.float64).reshape(start.shape)
             for p, start in initial.items()}
    optimizer = optimizer_expected(training, initial, grads, state)
    referenced = [name for name in simulated if name not in optimizer]
    expected = {**_reference_values(reference, initial, referenced), **optimizer}
    errors = {name: relative_error(simulated[name], expected[name]) for name in simulated}
    tolerances = dict.fromkeys(errors, base)
    missed = [name for name in referenced if not errors[name] <= base]
    float32_judged: dict[str, float] = {}
    if precision == "mixed" and missed and float32_reference is not None:
        float32 = _reference_values(float32_reference(), initial, missed)
        for name in missed:
            own = relative_error(float32[name], expected[name])
            if own > base:  # float64 cannot tell a right fp32 computation from a wrong one
                float32_judged[name] = own
                errors[name] = relative_error(simulated[name], float32[name])
                tolerances[name] = TOLERANCE
    step_errors, step_tolerances = update_checks(
        {p: simulated[updated_name(p)] for p in initial}, initial,
        {p: expected[updated_name(p)] for p in initial}, UpdateRule.of(training), base)
    errors |= step_errors
    tolerances |= step_tolerances
    passed = all(errors[name] <= tolerances[name] for name in errors)
    return CheckResult(passed, float(simulated["loss"].ravel()[0]), reference.loss, errors,
                       tolerances, results_digest(simulated), base, float32_judged)


def update_checks(updated: dict[str, np.ndarray], initial: dict[str, np.ndarray],
                  expected: dict[str, np.ndarray], rule: UpdateRule, base: float
                  ) -> tuple[dict[str, float], dict[str, float]]:
    """`update:P` of every parameter P (the docstring): the error of the simulated step
    `updated[P] - P32` against the float64 optimizer's `expected[P] - P`, and its derived
    tolerance."""
    errors: dict[str, float] = {}
    tolerances: dict[str, float] = {}
    for p, start in initial.items():
        new_sim = np.asarray(updated[p], np.float64).reshape(start.shape)
        step_sim = new_sim - np.asarray(start, np.float32)
        step = expected[p] - start
        errors[update_name(p)] = relative_error(step_sim, step)
        scale = np.linalg.norm(step)
        roundings = 2 if rule.decay_of(p) else 1
        rounding = roundings * UNIT_ROUNDOFF_FP32 * np.linalg.norm(new_sim)
        tolerances[update_name(p)] = base + (rounding / scale if scale > 0 else np.inf)
    return errors, tolerances


def results_digest(tensors: dict[str, np.ndarray]) -> str:
    """A fingerprint of simulated results: sha256 over the names and float32 bits, in name
    order. Two runs with equal digests computed bit-identical numbers."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(tensors[name], np.float32).tobytes())
    return digest.hexdigest()
