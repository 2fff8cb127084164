"""Padding never leaks, whatever it holds: NaN or ±inf in the rows a mask marks invalid give the
loss and gradients of the same inputs with clean padding, and exactly 0 gradient in the padding
rows, on every backend of the registry (the reference and auto on the CPU included)."""

import math

import pytest
import torch

import sara_kernels
from sara_kernels import backends, testing

from helpers import DEVICE, random_logits  # noqa: E402

L, B, S, E = 2, 3, 5, 6
# conftest's any_backend runs each registry name; "auto" is added here (what backend= accepts), since it
# is the default a user gets and dispatches on its own (to the reference off CUDA, a fused backend on it).
every_choice = pytest.mark.parametrize("any_backend", backends.CHOICES, indirect=True)


def _padded_mask(gen):
    """[B, S] with right padding in every sequence (1 to S − 1 valid tokens)."""
    return testing.padding_mask(torch.randint(1, S, (B,), generator=gen), S, DEVICE)


def _poisoned(layers, mask, gen):
    """Copies of ``layers`` with NaN, +inf and −inf spread over the rows ``mask`` marks invalid."""
    invalid = (mask.reshape(-1) == 0).nonzero().flatten().tolist()
    assert invalid, "the mask must have padding"
    out = []
    for z in layers:
        z = z.detach().clone()
        for i, row in enumerate(invalid):
            z[row] = (math.nan, math.inf, -math.inf)[(i + int(torch.randint(3, (1,), generator=gen))) % 3]
        out.append(z)
    return out


def _loss_and_grads(backend, anchor, target, segments, score):
    a_leaves = [z.detach().requires_grad_(True) for z in anchor]
    t_leaves = [z.detach().requires_grad_(True) for z in target]
    loss = sara_kernels.sara_loss(a_leaves, t_leaves, **segments, score=score, detach_anchor=False, backend=backend)
    grads = torch.autograd.grad(loss, a_leaves + t_leaves)
    return loss, grads


@every_choice
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("anchor_form", ["mask", "cu_seqlens"])
def test_nan_and_inf_padding_give_zero_gradient_and_the_clean_loss(any_backend, anchor_form, score):
    gen = torch.Generator().manual_seed(31 + (anchor_form == "mask") + 2 * (score == "sigmoid"))
    t_mask = _padded_mask(gen)
    target = random_logits(L, B * S, E, generator=gen)
    poisoned_t = _poisoned(target, t_mask, gen)
    if anchor_form == "mask":
        a_mask = _padded_mask(gen)
        anchor = random_logits(L, B * S, E, generator=gen)
        poisoned_a = _poisoned(anchor, a_mask, gen)
        segments = dict(anchor_mask=a_mask, target_mask=t_mask)
    else:  # packed: no padding on this side, the target's padding must not leak through the pair
        a_cu = torch.tensor([0, 2, 2, 7], dtype=torch.int32, device=DEVICE)
        anchor = random_logits(L, 7, E, generator=gen)
        poisoned_a = anchor
        segments = dict(anchor_cu_seqlens=a_cu, target_mask=t_mask)
    loss, grads = _loss_and_grads(any_backend, poisoned_a, poisoned_t, segments, score)
    clean_loss, clean_grads = _loss_and_grads("reference", [z.double() for z in anchor], [z.double() for z in target],
                                              segments, score)
    assert torch.isfinite(loss) and clean_loss > 0
    torch.testing.assert_close(loss.double(), clean_loss, **testing.LOSS_TOL)
    pads = [a_mask.reshape(-1) == 0 if anchor_form == "mask" else None] * L + [t_mask.reshape(-1) == 0] * L
    for grad, clean, pad in zip(grads, clean_grads, pads):
        assert torch.isfinite(grad).all()
        if pad is not None:
            assert torch.equal(grad[pad], torch.zeros_like(grad[pad]))
        assert clean.abs().max() > 0
        torch.testing.assert_close(grad.double(), clean, rtol=1e-4, atol=1e-6)


@every_choice
def test_nan_padding_gives_zero_gradient_through_routing_distribution(any_backend):
    gen = torch.Generator().manual_seed(7)
    mask = _padded_mask(gen)
    logits = random_logits(L, B * S, E, generator=gen)
    leaves = [z.detach().requires_grad_(True) for z in _poisoned(logits, mask, gen)]
    cotangent = torch.randn(L, B, E, generator=gen).to(DEVICE)
    probs = sara_kernels.routing_distribution(leaves, mask, score="sigmoid", backend=any_backend)
    grads = torch.autograd.grad((probs * cotangent).sum(), leaves)
    clean_leaves = [z.detach().double().requires_grad_(True) for z in logits]
    clean = sara_kernels.routing_distribution(clean_leaves, mask, score="sigmoid", backend="reference")
    clean_grads = torch.autograd.grad((clean * cotangent.double()).sum(), clean_leaves)
    torch.testing.assert_close(probs.double(), clean, rtol=1e-5, atol=1e-7)
    pad = mask.reshape(-1) == 0
    for grad, want in zip(grads, clean_grads):
        assert torch.equal(grad[pad], torch.zeros_like(grad[pad]))
        torch.testing.assert_close(grad.double(), want, rtol=1e-4, atol=1e-6)
