"""An independent float64 NumPy evaluation of the loss and its closed-form gradient: the check
on the PyTorch reference, which every other check trusts. Shares no code with the reference:
own membership, own scores, no autograd."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch


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


def _numpy_kl(p, q):
    """(KL(p ‖ q), ∂/∂p, ∂/∂q) with the reference's zero rule: q floored at 2^-126 (no derivative
    below it), 0 where p = 0."""
    floor = 2.0**-126
    floored = q < floor
    qf = np.where(floored, floor, q)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_ratio = np.where(p > 0, np.log(p / qf), 0.0)
    return np.sum(p * log_ratio), np.where(p > 0, log_ratio + 1.0, 0.0), np.where(floored, 0.0, -p / qf)


def numpy_pair_js(anchor, target, member_a, member_t, priors, upstream, score, temperature, anchor_grads,
                  divergence="js", pair_weights=None):
    """Independent float64 NumPy evaluation of π_b·D [L, B] (0 for pairs with an empty side; D the
    ``divergence``, π_b ``pair_weights`` or 1) and the closed-form gradients of Σ upstream·π·D
    (formula in :mod:`sara_kernels.ops.triton.kernels`), one token loop at a time.
    ``anchor``/``target``: [L, N, E]; ``member_*``: bool [B, N]; ``priors`` [L, B, E] replaces the
    anchor when ``anchor`` is None.

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
            if divergence == "js":
                m = 0.5 * (p_a + p_t)
                with np.errstate(divide="ignore", invalid="ignore"):
                    g_a = np.where(p_a > 0, 0.5 * np.log(p_a / m), 0.0)
                    g_t = np.where(p_t > 0, 0.5 * np.log(p_t / m), 0.0)
                d = np.sum(p_a * g_a) + np.sum(p_t * g_t)
            elif divergence == "kl":
                d, g_a, g_t = _numpy_kl(p_a, p_t)
            else:
                d, g_t, g_a = _numpy_kl(p_t, p_a)
            weight = 1.0 if pair_weights is None else pair_weights[b]
            js[l, b] = weight * d
            for rows, s, h, g, out in ((rows_t, s_t, h_t, g_t, grad_t), (rows_a, s_a, h_a, g_a, grad_a)):
                if out is None:
                    continue
                c = weight * upstream[l, b] / (temperature * len(rows))
                centred = g[None, :] - (s[rows] * g[None, :]).sum(axis=1, keepdims=True)
                out[l, rows] = c * h[rows] * centred
    return js, grad_t, grad_a
