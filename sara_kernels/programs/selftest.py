r"""Check the installed SARA kernels on this machine: ``python -m sara_kernels selftest``.

Why: the Triton kernels are compiled on the user's machine, by the user's Triton, for the
user's GPU. A new cluster (driver, Triton release, GPU generation) can miscompile or reject
them without any error in the library itself, so this module runs a small grid of cases and
compares every kernel backend against a float64 evaluation of the PyTorch reference on the
*same* (already rounded) inputs. Only fp32 rounding of the kernels' arithmetic, plus one
rounding of the gradient to the logits' dtype, separates the two, so the tolerances (in
:mod:`sara_kernels.testing`, shared with the test suite)
are tight enough to catch a wrong result and loose enough never to flag a correct one.

What runs depends on the machine:

* CUDA device: every kernel backend installed (``triton``, and ``cuda`` when the C++ extension
  is built) on the GPU, the full grid.
* no CUDA device, ``TRITON_INTERPRET=1`` set before importing ``sara_kernels``: the same
  checks at tiny shapes under the Triton interpreter (slow, but exercises the kernel code).
* neither: the kernels cannot run; this is said clearly and only the reference itself is
  checked against an independent NumPy computation (forward and the closed-form gradient).

The NumPy check always runs too: it guards the reference, which every other check trusts.
The command prints one table row per check and exits 1 when any check fails.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton

from .. import api, backends, reference
from ..ops import cuda, routing_js
from ..testing import (
    GRAD_TOL,
    JS_TOL,
    ORACLE_TOL,
    js_errors,
    membership,
    numpy_pair_js,
    packed_cu_seqlens,
    ragged_mask,
    relative_grad_error,
)
from .table import format_table

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}

@dataclass(frozen=True)
class Shape:
    """Layers, sequences per side and the (target) sequence length of every case."""

    layers: int
    seqs: int
    seq_len: int


GPU_SHAPE = Shape(layers=4, seqs=6, seq_len=200)
TINY_SHAPE = Shape(layers=2, seqs=3, seq_len=8)  # the Triton interpreter: seconds, not minutes


@dataclass(frozen=True)
class Case:
    """One configuration of the op; ``anchor`` is "detached" | "both" (gradients) | "priors"."""

    experts: int
    segmentation: str  # "none" (one sequence per side) | "mask" | "cu_seqlens"
    score: str
    dtype: torch.dtype
    anchor: str
    layout: str = "tuple"  # "tuple": L tensors [N, E] (Hugging Face); "stacked": one [L, N, E]
    temperature: float = 1.0
    minus_inf: bool = False  # some logits are −inf (an expert disabled, some tokens' experts masked)

    @property
    def label(self) -> str:
        extra = (f" τ={self.temperature:g}" if self.temperature != 1.0 else "") + (" −inf" if self.minus_inf else "")
        return f"E={self.experts} {self.segmentation} {self.score} {DTYPE_NAMES[self.dtype]} {self.anchor} {self.layout}{extra}"


def case_grid(quick: bool = False) -> list:
    """Every (E, segmentation, score) combination; dtype, anchor mode, layout, τ and −inf logits
    rotate through the grid so each value of each option meets several of the others.

    ``quick`` keeps a covering subset (each E, segmentation, score, dtype and anchor mode once).
    """
    dtypes = (torch.bfloat16, torch.float32)
    anchors = ("detached", "both", "priors")
    layouts = ("tuple", "stacked")
    cases = []
    for i, (experts, seg, score) in enumerate(itertools.product((8, 60, 128), ("none", "mask", "cu_seqlens"), ("softmax", "sigmoid"))):
        cases.append(Case(
            experts=experts, segmentation=seg, score=score,
            dtype=dtypes[(i // 2) % 2],  # meets both scores and every segmentation
            anchor=anchors[(i + i // 6) % 3],  # shifted per E so it meets every segmentation
            layout=layouts[(i // 4) % 2],
            temperature=0.7 if i % 5 == 0 else 1.0,
            minus_inf=experts == 60 and seg == "mask",
        ))
    if quick:
        cases = [cases[i] for i in (1, 5, 8, 10, 14, 16)]
    return cases


# ----------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------


@dataclass
class PairInputs:
    """Rounded inputs of one case, shared by the kernel and the float64 reference."""

    anchor: Optional[list]  # L tensors [Na, E] in the case's dtype, or None in priors mode
    target: list
    anchor_mask: Optional[torch.Tensor]
    target_mask: Optional[torch.Tensor]
    anchor_cu: Optional[torch.Tensor]
    target_cu: Optional[torch.Tensor]
    priors: Optional[torch.Tensor]  # float32 [L, B, E]
    upstream: torch.Tensor  # float64 [L, B]: cotangent of JS, so every (l, b) gradient is checked


def _segmentation(kind: str, seqs: int, seq_len: int, empty: Optional[int], gen: torch.Generator):
    """(mask, cu_seqlens, N, member [B, N] bool) of one side; sequence ``empty`` has no token."""
    empty = () if empty is None else (empty,)
    if kind == "none":
        return None, None, seq_len, membership(seq_len)
    if kind == "mask":
        mask = ragged_mask(seqs, seq_len, gen, empty)
        return mask, None, seqs * seq_len, membership(seqs * seq_len, mask=mask)
    num_tokens = seqs * seq_len - 3  # packed rows: no multiple of anything
    cu = packed_cu_seqlens(seqs, num_tokens, gen, empty)
    return None, cu, num_tokens, membership(num_tokens, cu_seqlens=cu)


def _logits(case: Case, layers: int, member: torch.Tensor, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """[L, N, E] logits; rows that belong to no sequence (padding) hold large garbage the op must ignore."""
    num_tokens = member.shape[1]
    z = 2.0 * torch.randn(layers, num_tokens, case.experts, generator=gen, dtype=torch.float64)
    z[:, ~member.any(dim=0)] = 40.0
    if case.minus_inf:
        z[0, :, 3] = -math.inf  # an expert disabled in layer 0 on this side
        z[:, ::3, :2] = -math.inf  # some tokens with masked experts
    return z.to(dtype)


def make_inputs(case: Case, shape: Shape, device, seed: int, dtype: Optional[torch.dtype] = None):
    """(PairInputs, (member_a, member_t)) for ``case``; ``dtype`` overrides the case's (NumPy check)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = dtype or case.dtype
    seqs = 1 if case.segmentation == "none" else shape.seqs
    # Sequence 1 of the target and (priors aside) 0 of the anchor are empty: pairs the loss must exclude.
    segmented = case.segmentation != "none"
    empty_a = 0 if segmented and case.anchor != "priors" else None
    mask_t, cu_t, _, member_t = _segmentation(case.segmentation, seqs, shape.seq_len, 1 if segmented else None, gen)
    mask_a, cu_a, _, member_a = _segmentation(case.segmentation, seqs, shape.seq_len + 3, empty_a, gen)
    target = _logits(case, shape.layers, member_t, gen, dtype)
    anchor = _logits(case, shape.layers, member_a, gen, dtype)
    priors = None
    if case.anchor == "priors":
        priors = reference.routing_distribution(anchor.double(), mask_a, cu_seqlens=cu_a, score=case.score,
                                                temperature=case.temperature).float()
        priors[0, :, 0] = 0.0  # exact zeros in a prior (0·log 0 terms)
        priors[0] /= priors[0].sum(dim=-1, keepdim=True)
    # ∂JS/∂z is O(1 / (n_b·E)): at real sizes fp16 gradients would fall into the subnormal range
    # and lose their digits. Scaling the cotangent, as AMP's loss scaling does, keeps them normal.
    loss_scale = shape.seq_len * case.experts / 16
    upstream = loss_scale * (torch.rand(shape.layers, seqs, generator=gen, dtype=torch.float64) + 0.5)

    def to_device(t):
        return None if t is None else t.to(device)

    def as_layout(z):
        z = z.to(device)
        return [z] if case.layout == "stacked" else list(z.unbind(0))

    inputs = PairInputs(
        anchor=None if case.anchor == "priors" else as_layout(anchor),
        target=as_layout(target),
        anchor_mask=None if case.anchor == "priors" else to_device(mask_a),
        target_mask=to_device(mask_t),
        anchor_cu=None if case.anchor == "priors" else to_device(cu_a),
        target_cu=to_device(cu_t),
        priors=to_device(priors),
        upstream=upstream.to(device),
    )
    return inputs, (member_a, member_t)


def _logit_args(layers):
    """The layout as sara_loss takes it: one [L, N, E] tensor or a tuple of [N, E] tensors."""
    return layers[0] if len(layers) == 1 and layers[0].dim() == 3 else tuple(layers)


def evaluate(inputs: PairInputs, case: Case, backend: str, leaf_dtype: Optional[torch.dtype] = None):
    """(JS [L, B], gradients of Σ upstream·JS w.r.t. target then (both mode) anchor tensors).

    ``leaf_dtype`` re-casts the inputs first (float64 for the reference run).
    """

    def leaves(layers):
        return [t.detach().to(leaf_dtype or t.dtype).requires_grad_(True) for t in layers]

    target = leaves(inputs.target)
    anchor = None if inputs.anchor is None else leaves(inputs.anchor)
    priors = inputs.priors
    if priors is not None and leaf_dtype is not None:
        priors = priors.to(leaf_dtype)
    js = api.sara_loss(
        None if anchor is None else _logit_args(anchor), _logit_args(target),
        inputs.anchor_mask, inputs.target_mask,
        anchor_cu_seqlens=inputs.anchor_cu, target_cu_seqlens=inputs.target_cu, anchor_probs=priors,
        score=case.score, temperature=case.temperature, detach_anchor=case.anchor != "both",
        reduction="none", backend=backend,
    )
    wanted = target + (anchor if case.anchor == "both" else [])
    grads = torch.autograd.grad((js * inputs.upstream.to(js.dtype)).sum(), wanted, allow_unused=True)
    return js.detach(), [None if g is None else g.detach() for g in grads]


# ----------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------


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


def check_kernel(case: Case, shape: Shape, backend: str, device, seed: int) -> CheckResult:
    """Kernel ``backend`` on ``device`` vs the float64 reference on the same rounded inputs,
    plus bitwise determinism over a second run."""
    result = CheckResult(f"{backend} vs fp64 reference", case, grad_tol=GRAD_TOL[case.dtype]["max_rel"])
    start = time.perf_counter()
    try:
        inputs, _ = make_inputs(case, shape, device, seed)
        js, grads = evaluate(inputs, case, backend)
        ref_js, ref_grads = evaluate(inputs, case, "reference", leaf_dtype=torch.float64)
        result.js_err, result.js_ok = js_errors(js, ref_js, JS_TOL["long"])
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
        inputs, (member_a, member_t) = make_inputs(case, shape, "cpu", seed, dtype=torch.float64)
        js, grads = evaluate(inputs, case, "reference")

        def stacked(layers):
            return None if layers is None else torch.stack([t for t in layers]).reshape(shape.layers, -1, case.experts).numpy()

        priors = None if inputs.priors is None else inputs.priors.double().numpy()
        np_js, np_gt, np_ga = numpy_pair_js(
            stacked(inputs.anchor), stacked(inputs.target), member_a.numpy(), member_t.numpy(), priors,
            inputs.upstream.numpy(), case.score, case.temperature, anchor_grads=case.anchor == "both",
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


# ----------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------


def kernel_backends() -> list:
    """Every fused backend this installation offers: ``triton``, and ``cuda`` when the C++
    extension is built."""
    return backends.available_fused()


def backends_line() -> str:
    """Which backends are installed, and why the CUDA extension is not, for the report's header."""
    built = "built" if cuda.available() else f"NOT built ({cuda.LOAD_ERROR}); {cuda.BUILD_HINT}"
    return f"backends: triton (Triton {triton.__version__}); cuda (C++ extension {built}); reference"


def plan(device: torch.device):
    """(shape, kernel backends to check, a line saying what is checked and why)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return GPU_SHAPE, kernel_backends(), f"CUDA device {name}: kernels vs float64 reference"
    if routing_js.INTERPRET:
        return TINY_SHAPE, ["triton"], "no GPU; TRITON_INTERPRET=1: kernels under the Triton interpreter, tiny shapes"
    return TINY_SHAPE, [], (
        "NO GPU: the kernels cannot run here, so they are NOT checked. Only the reference is checked "
        "against an independent NumPy computation. (Set TRITON_INTERPRET=1 to run the kernels on the CPU.)"
    )


def run_checks(device=None, quick: bool = False, max_cases: Optional[int] = None, log=print) -> list:
    """Run the grid and return one :class:`CheckResult` per check (no printing beyond ``log``)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape, backends, what = plan(device)
    log(what)
    cases = case_grid(quick or (shape is TINY_SHAPE and bool(backends)))
    if max_cases is not None:
        cases = cases[:max_cases]
    # The NumPy loop is cheap at tiny shapes; with no kernel to check it covers the whole grid.
    reference_cases = case_grid(quick=True) if backends else cases
    results = [check_reference(case, TINY_SHAPE, seed) for seed, case in enumerate(reference_cases)]
    for backend in backends:
        for seed, case in enumerate(cases):
            results.append(check_kernel(case, shape, backend, device, seed))
            log(f"  {'PASS' if results[-1].passed else 'FAIL'}  {backend}  {case.label}  ({results[-1].seconds:.1f} s)")
    return results


RESULT_COLUMNS = [("check", "check"), ("case", "case"), ("JS max err", "js"), ("grad err/tol", "grad"),
                  ("determ.", "det"), ("result", "result")]


def results_table(results) -> str:
    rows = [dict(check=r.check, case=r.case.label, js="error" if r.error else f"{r.js_err:.1e}",
                 grad="error" if r.error else f"{r.grad_err:.1e}/{r.grad_tol:.0e}",
                 det="-" if r.deterministic is None else ("yes" if r.deterministic else "NO"),
                 result="PASS" if r.passed else "FAIL") for r in results]
    return "\n".join([format_table(rows, RESULT_COLUMNS)] + [f"  {r.case.label}: {r.error}" for r in results if r.error])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sara_kernels selftest", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--quick", action="store_true", help="a covering subset of the grid")
    parser.add_argument("--max-cases", type=int, default=None, help="check only the first N cases of the grid")
    args = parser.parse_args(argv)
    print(f"sara_kernels selftest: torch {torch.__version__}, triton {triton.__version__}, python {sys.version.split()[0]}")
    print(backends_line())
    start = time.perf_counter()
    results = run_checks(args.device, args.quick, args.max_cases)
    print(results_table(results))
    failed = [r for r in results if not r.passed]
    kernels_checked = any(r.check != "reference vs NumPy" for r in results)
    verdict = "FAIL" if failed else "PASS"
    scope = "" if kernels_checked else " (reference only: no kernel was checked)"
    print(f"{verdict}: {len(results) - len(failed)}/{len(results)} checks passed in {time.perf_counter() - start:.1f} s{scope}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
