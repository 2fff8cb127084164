"""Shared inputs and tolerances for the kernel tests (tolerances are named once, here)."""

from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Loss: the kernels accumulate in fp32 from the exact input values, so only fp32 rounding
# separates them from the float64 reference on the same (rounded) inputs.
LOSS_TOL = dict(rtol=2e-5, atol=1e-7)
PROBS_TOL = dict(rtol=2e-5, atol=1e-7)
# Gradients are written in the logits' dtype: one rounding of that dtype on top of fp32 math.
# atol is relative to the largest gradient entry (see assert_grads_close).
GRAD_TOL = {
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=8e-3),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
}


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


def random_logits(num_layers, num_tokens, num_experts, dtype=torch.float32, scale=2.0, generator=None):
    """L tensors [N, E] of fresh random logits in ``dtype`` (never zeros)."""
    return [
        (scale * torch.randn(num_tokens, num_experts, generator=generator)).to(dtype).to(DEVICE)
        for _ in range(num_layers)
    ]


def ragged_mask(num_seqs, seq_len, generator=None, empty=()):
    """[B, S] int64 mask with random right padding (at least one valid token unless in ``empty``)."""
    lengths = torch.randint(1, seq_len + 1, (num_seqs,), generator=generator)
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    for b in empty:
        mask[b] = 0
    return mask.to(DEVICE)


def packed_cu_seqlens(num_seqs, num_tokens, generator=None, empty=()):
    """[B+1] int32 cu_seqlens over exactly ``num_tokens`` rows, sequences in ``empty`` of length 0."""
    weights = torch.rand(num_seqs, generator=generator) + 0.2
    for b in empty:
        weights[b] = 0
    lengths = torch.floor(weights / weights.sum() * num_tokens).long()
    lengths[int(torch.argmax(weights))] += num_tokens - int(lengths.sum())
    cu = torch.zeros(num_seqs + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    return cu.to(DEVICE)


def as_float64_leaves(layers):
    """float64 copies of the (rounded) inputs that require grad: the reference's inputs."""
    return [t.detach().double().requires_grad_(True) for t in layers]


def as_leaves(layers):
    return [t.detach().clone().requires_grad_(True) for t in layers]
