"""Running a backend beside the float64 reference on the same inputs, and judging the difference.

Two ways to judge, both with the tolerances of :mod:`.tolerances`:

* :func:`assert_backend_matches_reference` (the test suite): runs ``sara_loss`` through a backend
  and through the reference in float64 (and, where asked, float32) on the same rounded logits and
  asserts loss, per-layer JS and gradients element-wise (:func:`assert_matches_reference`).
* :func:`check_kernel` / :func:`check_reference` (the selftest and the GPU tests): one
  :class:`Case` from :mod:`.cases`, a :class:`CheckResult` with the errors measured, never raising.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Optional

import torch

from .. import api
from .cases import Case, PairInputs, Segmentation, Shape, make_inputs
from .oracle import numpy_pair_js
from .tolerances import GRAD_TOL, JS_TOL, LOSS_TOL, ORACLE_TOL, assert_grads_close, js_errors, on_device, relative_grad_error

# ---------------------------------------------------------------------------------------------
# One run of sara_loss and the element-wise comparison
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What one backend returned: the loss (detached), per-layer JS [L] and the gradients, target
    tensors first, then (``detach_anchor=False``) the anchor's; None where a tensor got none."""

    loss: torch.Tensor
    per_layer: Optional[torch.Tensor]
    grads: list


def _leaves(logits, dtype):
    """Fresh leaves holding the logits' values (in ``dtype`` when given), in the form sara_loss
    takes: one [L, N, E] tensor or a tuple of [N, E] tensors. A list holding one [L, N, E] tensor
    is the stacked form too."""
    layers = [logits] if isinstance(logits, torch.Tensor) else list(logits)
    leaves = [t.detach().to(dtype or t.dtype, copy=True).requires_grad_(True) for t in layers]
    arg = leaves[0] if len(leaves) == 1 and leaves[0].dim() == 3 else tuple(leaves)
    return leaves, arg


def run(backend: str, anchor, target, anchor_side: Optional[Segmentation] = None,
        target_side: Optional[Segmentation] = None, *, precision: Optional[torch.dtype] = None,
        upstream: Optional[torch.Tensor] = None, upstream_seed: Optional[int] = None, **options) -> Run:
    """``sara_loss(..., backend=backend, return_per_layer=True)`` on fresh leaves of the logits,
    recast to ``precision`` when given (the reference's float64 run), and the gradients of
    Σ loss·upstream: ``upstream``, or a float64 normal draw from ``upstream_seed`` in the loss's
    shape, or 1 (the loss itself). ``anchor`` None: priors mode, with ``anchor_probs`` among
    ``options`` (recast too)."""
    target_leaves, target_arg = _leaves(target, precision)
    anchor_leaves, anchor_arg = ([], None) if anchor is None else _leaves(anchor, precision)
    if precision is not None and options.get("anchor_probs") is not None:
        options["anchor_probs"] = options["anchor_probs"].to(precision)
    for name, side in (("anchor", anchor_side), ("target", target_side)):
        if side is not None:
            options.update({f"{name}_mask": side.mask, f"{name}_cu_seqlens": side.cu_seqlens})
    loss, per_layer = api.sara_loss(anchor_arg, target_arg, backend=backend, return_per_layer=True, **options)
    if upstream is None and upstream_seed is not None:
        upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(upstream_seed), dtype=torch.float64)
    wanted = target_leaves + ([] if options.get("detach_anchor", True) else anchor_leaves)
    scalar = loss if upstream is None else (loss.double() * upstream.to(loss.device)).sum()
    grads = torch.autograd.grad(scalar, wanted, allow_unused=True)
    return Run(loss.detach(), per_layer, list(grads))


def assert_matches_reference(got: Run, want: Run, dtype: torch.dtype, fp32: Optional[Run] = None, rows=None):
    """``got`` (a backend on logits of ``dtype``) against ``want`` (the float64 reference on the
    same values): loss and per-layer JS within LOSS_TOL; every gradient present, of ``dtype``,
    finite and within :func:`assert_grads_close` (against PyTorch's own float32 error as well,
    ``fp32``, where the problem is ill-conditioned). ``rows``: compare only these rows of each
    gradient (the rest may be padding, where the reference's gradient is undefined)."""
    assert got.loss.dtype == torch.float32, got.loss.dtype
    loss_tol = on_device(LOSS_TOL, got.loss.device)
    torch.testing.assert_close(got.loss.double(), want.loss.double(), **loss_tol)
    if want.per_layer is not None:
        torch.testing.assert_close(got.per_layer.double(), want.per_layer.double(), **loss_tol)
    assert len(got.grads) == len(want.grads)
    for i, (g, w) in enumerate(zip(got.grads, want.grads)):
        assert g is not None and g.dtype == dtype, f"gradient {i}: {None if g is None else g.dtype}, wanted {dtype}"
        assert bool(torch.isfinite(g).all()), f"gradient {i}: an entry was not written or is not finite"
        baseline = None if fp32 is None else fp32.grads[i]
        if baseline is not None:
            assert bool(torch.isfinite(baseline).all()), f"gradient {i}: the float32 reference's is not finite"
        if rows is not None:
            g, w = g[rows], w[rows]
            baseline = None if baseline is None else baseline[rows]
        assert_grads_close(g, w, dtype, fp32_baseline=baseline)


def assert_backend_matches_reference(backend: str, anchor, target, anchor_side: Optional[Segmentation] = None,
                                     target_side: Optional[Segmentation] = None, *, fp32_baseline: bool = False,
                                     upstream: Optional[torch.Tensor] = None, upstream_seed: Optional[int] = None,
                                     **options) -> dict:
    """Runs ``backend`` and the reference in float64 (and in float32 with ``fp32_baseline``) on the
    same logits and asserts :func:`assert_matches_reference`. The cotangent: ``upstream``, or one
    drawn from ``upstream_seed`` in the loss's shape, or none (the loss itself). Returns the runs,
    {"kernel", "fp64"[, "fp32"]}, for the caller's own further checks."""
    options.update(upstream=upstream, upstream_seed=upstream_seed)
    runs = {"kernel": run(backend, anchor, target, anchor_side, target_side, **options)}
    for name, precision in (("fp64", torch.float64), ("fp32", torch.float32 if fp32_baseline else None)):
        if precision is not None:
            runs[name] = run("reference", anchor, target, anchor_side, target_side, precision=precision, **options)
    first = target if isinstance(target, torch.Tensor) else target[0]
    assert_matches_reference(runs["kernel"], runs["fp64"], first.dtype, fp32=runs.get("fp32"))
    return runs


# ---------------------------------------------------------------------------------------------
# The selftest's checks: one Case, errors measured and reported
# ---------------------------------------------------------------------------------------------


def evaluate(inputs: PairInputs, case: Case, backend: str, leaf_dtype: Optional[torch.dtype] = None):
    """(π·D [L, B], gradients of Σ upstream·π·D w.r.t. target then (both mode) anchor tensors).

    ``leaf_dtype`` re-casts the inputs first (float64 for the reference run).
    """
    result = run(backend, inputs.anchor, inputs.target, None if inputs.anchor is None else inputs.anchor_side,
                 inputs.target_side, precision=leaf_dtype, upstream=inputs.upstream, anchor_probs=inputs.priors,
                 score=case.score, temperature=case.temperature, detach_anchor=case.anchor != "both",
                 reduction="none", divergence=case.divergence, pair_weights=inputs.pair_weights)
    return result.loss, result.grads


@dataclass
class CheckResult:
    check: str  # what is compared with what
    case: Case
    js_err: float = math.nan  # max |got − ref| over JS [L, B]
    js_ok: bool = False
    grad_err: float = math.nan  # max over tensors of max |got − ref| / max |ref|
    grad_tol: float = math.nan
    deterministic: Optional[bool] = None  # bitwise equal over two runs (kernel checks only)
    error: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        grads_ok = self.grad_err <= self.grad_tol  # False for NaN
        return not self.error and self.js_ok and grads_ok and self.deterministic is not False

    def describe(self) -> str:
        """One line: the check, the case and what was measured (an assertion's message)."""
        if self.error:
            return f"{self.check}, {self.case.label}: {self.error}"
        return (f"{self.check}, {self.case.label}: JS max err {self.js_err:.1e} ({'within' if self.js_ok else 'OUTSIDE'}"
                f" tolerance), grad err {self.grad_err:.1e} (tolerance {self.grad_tol:.0e}), deterministic "
                f"{'-' if self.deterministic is None else self.deterministic}")


def check_kernel(case: Case, shape: Shape, backend: str, device, seed: int) -> CheckResult:
    """Kernel ``backend`` on ``device`` vs the float64 reference on the same rounded inputs,
    plus bitwise determinism over a second run."""
    grad_tol = on_device(GRAD_TOL[case.dtype], device) if case.dtype == torch.float32 else GRAD_TOL[case.dtype]
    result = CheckResult(f"{backend} vs fp64 reference", case, grad_tol=grad_tol["max_rel"])
    start = time.perf_counter()
    try:
        inputs = make_inputs(case, shape, device, seed)
        js, grads = evaluate(inputs, case, backend)
        ref_js, ref_grads = evaluate(inputs, case, "reference", leaf_dtype=torch.float64)
        result.js_err, result.js_ok = js_errors(js, ref_js, on_device(JS_TOL["long"], device))
        result.grad_err = relative_grad_error(grads, ref_grads)
        js2, grads2 = evaluate(inputs, case, backend)
        result.deterministic = torch.equal(js, js2) and all(
            (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b)) for a, b in zip(grads, grads2)
        )
    except Exception as exc:  # a failing backend is a result to report, not a crash
        result.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    result.seconds = time.perf_counter() - start
    return result


def check_reference(case: Case, shape: Shape, seed: int) -> CheckResult:
    """The float64 reference (autograd) vs :func:`numpy_pair_js`, on the CPU."""
    result = CheckResult("reference vs NumPy", replace(case, dtype=torch.float64), grad_tol=GRAD_TOL[torch.float64]["max_rel"])
    start = time.perf_counter()
    try:
        inputs = make_inputs(case, shape, "cpu", seed, dtype=torch.float64)
        js, grads = evaluate(inputs, case, "reference")

        def stacked(layers):
            return None if layers is None else torch.stack([t for t in layers]).reshape(shape.layers, -1, case.experts).numpy()

        priors = None if inputs.priors is None else inputs.priors.double().numpy()
        pair_weights = None if inputs.pair_weights is None else inputs.pair_weights.double().numpy()
        np_js, np_gt, np_ga = numpy_pair_js(
            stacked(inputs.anchor), stacked(inputs.target), inputs.anchor_side.membership().numpy(),
            inputs.target_side.membership().numpy(), priors, inputs.upstream.numpy(), case.score, case.temperature,
            anchor_grads=case.anchor == "both", divergence=case.divergence, pair_weights=pair_weights,
        )
        result.js_err, result.js_ok = js_errors(js, torch.from_numpy(np_js), ORACLE_TOL)
        want = [torch.from_numpy(np_gt)] + ([torch.from_numpy(np_ga)] if np_ga is not None else [])
        got = [torch.stack(grads[: len(inputs.target)]).reshape(want[0].shape)]
        if np_ga is not None:
            got.append(torch.stack(grads[len(inputs.target) :]).reshape(want[1].shape))
        result.grad_err = relative_grad_error(got, want)
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    result.seconds = time.perf_counter() - start
    return result
