"""Numerics for checking the kernels: the tolerance table, input builders and an independent
NumPy oracle, shared by the test suite, the GPU tests and ``python -m sara_kernels selftest``.

Every comparison of a backend against the float64 reference runs on the *same* (already
rounded) inputs, so only fp32 rounding of the backend's arithmetic (and one rounding of the
gradient to the logits' dtype) separates the two. The tolerances below say how much that is.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------
# Tolerances (the one table)
# ---------------------------------------------------------------------------------------------

# JS and the loss: accumulated in fp32 from the exact input values. "short": sequences of up to
# a few hundred tokens, as in the test suite and the selftest's CPU grid; "long": sums over
# thousands to hundreds of thousands of tokens (the selftest's GPU grid and the > 2^31-element
# GPU test), where fp32 rounding of the sums grows with their length.
JS_TOL = {
    "short": dict(rtol=2e-5, atol=1e-7),
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
# The float64 reference against the float64 NumPy oracle: both exact up to float64 rounding.
ORACLE_TOL = dict(rtol=1e-9, atol=1e-12)
# Half the spacing of float16 subnormals: a gradient entry below ~6e-8 cannot be stored more
# exactly than this (training in fp16 relies on loss scaling to stay above it).
FP16_SUBNORMAL_ROUNDING = 2.0**-25


def assert_grads_close(actual, expected, dtype, fp32_baseline=None):
    """Kernel gradient vs float64 reference, atol scaled by the reference's largest entry.

    ``fp32_baseline``: the same gradient from the PyTorch reference run in float32. Where the
    problem itself is ill-conditioned (sharp temperatures, large E) even PyTorch's float32
    differs from float64 by more than the named tolerance; the kernel must then be no worse than
    twice PyTorch's own float32 error.
    """
    tol = GRAD_TOL[dtype]
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


# ---------------------------------------------------------------------------------------------
# Inputs (never zeros: fresh random values, ragged masks, packed sequences, empty sequences)
# ---------------------------------------------------------------------------------------------


def random_logits(num_layers, num_tokens, num_experts, dtype=torch.float32, scale=2.0, generator=None, device="cpu"):
    """L tensors [N, E] of fresh random logits in ``dtype``."""
    return [
        (scale * torch.randn(num_tokens, num_experts, generator=generator)).to(dtype).to(device)
        for _ in range(num_layers)
    ]


def ragged_mask(num_seqs, seq_len, generator=None, empty=(), device="cpu"):
    """[B, S] int64 mask with random right padding (at least one valid token unless in ``empty``)."""
    lengths = torch.randint(1, seq_len + 1, (num_seqs,), generator=generator)
    for b in empty:
        lengths[b] = 0
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    return mask.to(device)


def packed_cu_seqlens(num_seqs, num_tokens, generator=None, empty=(), device="cpu"):
    """[B+1] int32 cu_seqlens over exactly ``num_tokens`` rows, sequences in ``empty`` of length 0."""
    weights = torch.rand(num_seqs, generator=generator) + 0.2
    for b in empty:
        weights[b] = 0
    lengths = torch.floor(weights / weights.sum() * num_tokens).long()
    lengths[int(torch.argmax(weights))] += num_tokens - int(lengths.sum())
    cu = torch.zeros(num_seqs + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    return cu.to(device)


def membership(num_tokens: int, mask: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None):
    """Bool [B, N] on the CPU, built row by row (no code shared with the reference): entry (b, n)
    says token n is a valid token of sequence b."""
    if mask is not None:
        seqs, seq_len = mask.shape
        member = torch.zeros(seqs, num_tokens, dtype=torch.bool)
        for b in range(seqs):
            member[b, b * seq_len : (b + 1) * seq_len] = mask[b].cpu() != 0
        return member
    if cu_seqlens is not None:
        cu = [int(x) for x in cu_seqlens.cpu()]
        member = torch.zeros(len(cu) - 1, num_tokens, dtype=torch.bool)
        for b in range(len(cu) - 1):
            member[b, cu[b] : cu[b + 1]] = True
        return member
    return torch.ones(1, num_tokens, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------
# The NumPy oracle
# ---------------------------------------------------------------------------------------------


def numpy_scores(z: np.ndarray, score: str, temperature: float):
    """(s, h) per row of z [N, E]: routing score and its slope (∂s_e/∂z_j = h_j (δ_ej − s_e) / τ)."""
    z = z / temperature
    if score == "softmax":
        row_max = np.max(z, axis=-1, keepdims=True)
        e = np.exp(z - row_max)
        s = e / e.sum(axis=-1, keepdims=True)
        return s, s
    with np.errstate(over="ignore"):  # z = −inf: exp(inf) = inf, σ = 0 as it should be
        sig = 1.0 / (1.0 + np.exp(-z))
    s = sig / sig.sum(axis=-1, keepdims=True)
    return s, s * (1.0 - sig)


def numpy_pair_js(anchor, target, member_a, member_t, priors, upstream, score, temperature, anchor_grads):
    """Independent float64 NumPy evaluation of JS [L, B] (0 for pairs with an empty side) and the
    closed-form gradients of Σ upstream·JS (formula in :mod:`sara_kernels.ops.routing_js`), one
    token loop at a time. ``anchor``/``target``: [L, N, E]; ``member_*``: bool [B, N];
    ``priors`` [L, B, E] replaces the anchor when ``anchor`` is None.

    Shares no code with the reference: own membership, own scores, no autograd.
    """
    layers, seqs = upstream.shape
    js = np.zeros((layers, seqs))
    grad_t = np.zeros_like(target)
    grad_a = np.zeros_like(anchor) if anchor_grads else None
    for l in range(layers):
        s_t, h_t = numpy_scores(target[l], score, temperature)
        s_a, h_a = (None, None) if anchor is None else numpy_scores(anchor[l], score, temperature)
        for b in range(seqs):
            rows_t = np.flatnonzero(member_t[b])
            if anchor is None:
                p_a, rows_a = priors[l, b], None
            else:
                rows_a = np.flatnonzero(member_a[b])
                if len(rows_a) == 0:
                    continue
                p_a = s_a[rows_a].mean(axis=0)
            if len(rows_t) == 0:
                continue
            p_t = s_t[rows_t].mean(axis=0)
            m = 0.5 * (p_a + p_t)
            with np.errstate(divide="ignore", invalid="ignore"):
                g_a = np.where(p_a > 0, 0.5 * np.log(p_a / m), 0.0)
                g_t = np.where(p_t > 0, 0.5 * np.log(p_t / m), 0.0)
            js[l, b] = np.sum(p_a * g_a) + np.sum(p_t * g_t)
            for rows, s, h, g, out in ((rows_t, s_t, h_t, g_t, grad_t), (rows_a, s_a, h_a, g_a, grad_a)):
                if out is None:
                    continue
                c = upstream[l, b] / (temperature * len(rows))
                centred = g[None, :] - (s[rows] * g[None, :]).sum(axis=1, keepdims=True)
                out[l, rows] = c * h[rows] * centred
    return js, grad_t, grad_a
