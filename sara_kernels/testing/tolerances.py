"""The tolerance table and the comparisons that apply it: how far a backend may be from the
float64 reference.

Every comparison of a backend against the float64 reference runs on the *same* (already
rounded) inputs, so only fp32 rounding of the backend's arithmetic (and one rounding of the
gradient to the logits' dtype) separates the two. The tolerances below say how much that is.
"""

from __future__ import annotations

import math

import torch

# A JS computed in fp32 carries an absolute error of a few fp32 epsilons whatever its size: each
# term p·log(p/m) rounds by about p·eps (quotient, log, product) and the terms sum to ~2 eps per
# KL, while the rounding of the pooled sums enters only through log(p/m), which is small where
# p ≈ m. So two nearly equal distributions (a JS of 1e-5, say) are compared at this absolute
# tolerance, never at a fraction of the value: a tighter one passes only on a CPU whose
# summation order happens to agree.
FP32_JS_ATOL = 4 * torch.finfo(torch.float32).eps
# JS and the loss: accumulated in fp32 from the exact input values. "short": sequences of up to
# a few hundred tokens, as in the test suite and the selftest's CPU grid; "long": sums over
# thousands to hundreds of thousands of tokens (the selftest's GPU grid and the > 2^31-element
# GPU test), where fp32 rounding of the sums grows with their length.
JS_TOL = {
    "short": dict(rtol=2e-5, atol=FP32_JS_ATOL),
    "long": dict(rtol=1e-4, atol=1e-6),
}
LOSS_TOL = JS_TOL["short"]
PROBS_TOL = JS_TOL["short"]
# Gradients are written in the logits' dtype: one rounding of that dtype on top of fp32 math.
# Two ways to compare, one row per dtype: element-wise (rtol, and atol relative to the largest
# reference entry, see assert_grads_close) and the selftest's max |got − ref| / max |ref|
# (``max_rel``: bf16 2^-8 relative, up to 2^-7 under the Triton interpreter, which truncates
# instead of rounding).
GRAD_TOL = {
    torch.float32: dict(rtol=2e-5, atol=2e-6, max_rel=2e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=8e-3, max_rel=1e-2),
    torch.float16: dict(rtol=2e-3, atol=1e-3, max_rel=2e-3),
    torch.float64: dict(rtol=1e-10, atol=1e-12, max_rel=1e-10),
}
# A greedy prediction compared between two fp32 forwards of one model that differ in batch shape,
# padding or the tokens' order of summation (a test's hand computation against the library's) is
# trusted only where the two largest LM logits are this far apart: the forwards' rounding moves a
# small model's logits by about 1e-6, and this leaves room for any CPU's summation order.
GREEDY_TOP1_MARGIN = 1e-3
# The float64 reference against the float64 NumPy oracle: both exact up to float64 rounding.
ORACLE_TOL = dict(rtol=1e-9, atol=1e-12)
# What a GPU adds to fp32 rounding. There the kernels take each exponential as ex2.approx.ftz and
# each reciprocal as rcp.approx.ftz (hardware approximations, a few ulp from the exact value),
# flush subnormals and contract a·b + c into FMAs; the CPU stand-ins (Triton's interpreter,
# tests/cuda_emulation) take exp2 and division correctly rounded. A score's relative error grows
# from under 2 ulp to about 4-5, so comparisons of fp32 results computed on a GPU allow this
# factor more (on_device); a bf16 or fp16 gradient's tolerance is its dtype's rounding and stays.
GPU_APPROXIMATION_FACTOR = 4.0
# Half the spacing of float16 subnormals: a gradient entry below ~6e-8 cannot be stored more
# exactly than this (training in fp16 relies on loss scaling to stay above it).
FP16_SUBNORMAL_ROUNDING = 2.0**-25


def on_device(tol: dict, device) -> dict:
    """``tol``, a tolerance of fp32 results, for results computed on ``device``: widened by
    GPU_APPROXIMATION_FACTOR on a CUDA device, as is elsewhere."""
    if torch.device(device).type != "cuda":
        return tol
    return {name: value * GPU_APPROXIMATION_FACTOR for name, value in tol.items()}


def assert_grads_close(actual, expected, dtype, fp32_baseline=None):
    """Kernel gradient vs float64 reference, atol scaled by the reference's largest entry.

    ``fp32_baseline``: the same gradient from the PyTorch reference run in float32. Where the
    problem itself is ill-conditioned (sharp temperatures, large E) even PyTorch's float32
    differs from float64 by more than the named tolerance; the kernel must then be no worse than
    twice PyTorch's own float32 error.
    """
    tol = on_device(GRAD_TOL[dtype], actual.device) if dtype == torch.float32 else GRAD_TOL[dtype]
    scale = expected.abs().max().item() if expected.numel() else 0.0
    atol = tol["atol"] * max(scale, 1e-30)
    if dtype == torch.float16:
        atol = max(atol, FP16_SUBNORMAL_ROUNDING)
    if fp32_baseline is not None and expected.numel():
        atol = max(atol, 2 * (fp32_baseline.double() - expected.double()).abs().max().item())
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol["rtol"], atol=atol)


def relative_grad_error(got, want) -> float:
    """max |got − ref| / max |ref| over all tensors; a gradient absent on one side counts as zeros.

    Computed where ``got`` lies (on a GPU: no multi-GB copies of large gradients to the host)."""
    worst = 0.0
    for g, w in zip(got, want):
        if g is None and w is None:
            continue
        g = torch.zeros_like(w) if g is None else g
        w = torch.zeros_like(g) if w is None else w
        g = g.detach().double()
        w = w.detach().to(device=g.device, dtype=torch.float64)
        if g.shape != w.shape or not bool(torch.isfinite(g).all()):
            return math.inf
        scale = float(w.abs().max()) if w.numel() else 0.0
        worst = max(worst, float((g - w).abs().max()) / max(scale, 1e-30) if w.numel() else 0.0)
    return worst


def js_errors(got: torch.Tensor, want: torch.Tensor, tol: dict):
    """(max |got − want|, whether every entry is within atol + rtol·|want|)."""
    got, want = got.double().cpu(), want.double().cpu()
    if got.shape != want.shape:
        return math.inf, False
    ok = bool(((got - want).abs() <= tol["atol"] + tol["rtol"] * want.abs()).all())
    return float((got - want).abs().max()) if got.numel() else 0.0, ok
