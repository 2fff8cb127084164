"""The reference itself: gradcheck in float64 and agreement with the independent NumPy oracle
(:func:`sara_kernels.testing.numpy_pair_js`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sara_kernels import reference, testing

from helpers import reference_distribution, reference_loss  # noqa: E402


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reference_matches_independent_numpy_computation(score, reduction):
    rng = np.random.default_rng(0)
    L, B, S, E = 3, 4, 5, 7
    anchor = [rng.normal(size=(B * S, E)) * 2 for _ in range(L)]
    target = [rng.normal(size=(B * S, E)) * 2 for _ in range(L)]
    mask_a = (rng.random((B, S)) > 0.3).astype(np.int64)
    mask_t = (rng.random((B, S)) > 0.3).astype(np.int64)
    mask_a[0] = 0  # pair 0 excluded
    mask_t[1:, 0] = 1
    mask_a[1:, 0] = 1
    weights = [0.2, 1.0, 3.0]
    member_a = testing.membership(B * S, mask=torch.from_numpy(mask_a)).numpy()
    member_t = testing.membership(B * S, mask=torch.from_numpy(mask_t)).numpy()
    js, _, _ = testing.numpy_pair_js(np.stack(anchor), np.stack(target), member_a, member_t, None, np.ones((L, B)),
                                     score, 0.8, anchor_grads=False)
    valid = mask_a.any(1) & mask_t.any(1)
    if reduction == "mean":
        expected = float(np.sum(np.array(weights) * js.sum(1) / valid.sum()) / np.sum(weights))
    else:
        expected = float(np.sum(np.array(weights)[:, None] * js))
    got = reference_loss(
        [torch.from_numpy(a) for a in anchor], [torch.from_numpy(t) for t in target],
        torch.from_numpy(mask_a), torch.from_numpy(mask_t),
        score=score, temperature=0.8, layer_weights=weights, reduction=reduction,
    )
    assert got.dtype == torch.float64
    assert math.isclose(got.item(), expected, rel_tol=1e-12, abs_tol=1e-15)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("seg", ["mask", "cu"])
def test_reference_gradcheck(score, seg):
    torch.manual_seed(0)
    L, B, S, E = 2, 2, 4, 5
    anchor = [torch.randn(B * S, E, dtype=torch.float64, requires_grad=True) for _ in range(L)]
    target = [torch.randn(B * S, E, dtype=torch.float64, requires_grad=True) for _ in range(L)]
    kwargs = {}
    if seg == "mask":
        mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
        args = (mask, mask)
    else:
        args = ()
        cu = torch.tensor([0, 3, 8])
        kwargs = dict(anchor_cu_seqlens=cu, target_cu_seqlens=cu)

    def fn(*tensors):
        return reference_loss(list(tensors[:L]), list(tensors[L:]), *args, score=score, temperature=0.9,
                                   detach_anchor=False, reduction="none", **kwargs)

    assert torch.autograd.gradcheck(fn, anchor + target, eps=1e-6, atol=1e-8)
    # Second derivatives too: the fused backends refuse double backward and point to this one.
    assert torch.autograd.gradgradcheck(fn, anchor + target, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_reference_in_float32_on_logits_far_below_zero(score):
    """Every z/τ of some tokens near −300: σ(z/τ) underflows in float32, and σ/Σσ computed as such
    would be 0/0; the float32 reference must agree with the float64 one there (τ = 0.5 keeps z/τ
    exact, so only the score's own arithmetic differs)."""
    gen = torch.Generator().manual_seed(3)
    L, B, S, E = 2, 2, 4, 6
    anchor = testing.random_logits(L, B * S, E, generator=gen)
    target = testing.random_logits(L, B * S, E, generator=gen)
    for z in anchor + target:
        z[1::2] -= 150.0  # in float32 first: both runs see the same rounded logits
    mask = torch.ones(B, S, dtype=torch.int64)
    results = {}
    for dtype in (torch.float32, torch.float64):
        a = [z.to(dtype).requires_grad_() for z in anchor]
        t = [z.to(dtype).requires_grad_() for z in target]
        loss = reference_loss(a, t, mask, mask, score=score, temperature=0.5, detach_anchor=False)
        results[dtype] = (loss, torch.autograd.grad(loss, a + t))
    loss32, grads32 = results[torch.float32]
    loss64, grads64 = results[torch.float64]
    torch.testing.assert_close(loss32.double(), loss64, **testing.LOSS_TOL)
    for g32, g64 in zip(grads32, grads64):
        testing.assert_grads_close(g32, g64, torch.float32)


def test_reference_in_float32_with_subnormal_pooled_probabilities():
    """P subnormal on both sides for one expert: ½(P^a + P^t) rounds to 0 at the smallest
    subnormals (the divergence was inf), and the quotient's derivative through total² overflowed
    (the gradient was NaN). The float32 reference must stay finite and agree with float64."""
    gen = torch.Generator().manual_seed(4)
    L, B, S, E = 2, 2, 4, 6
    tiny = torch.finfo(torch.float32).smallest_normal * 2.0**-23
    priors = torch.softmax(torch.randn(L, B, E, generator=gen), dim=-1)
    priors[..., 2] = tiny
    target = testing.random_logits(L, B * S, E, generator=gen)
    for z in target:
        z[:, 2] = z.max() - 100.0 - torch.rand(B * S, generator=gen)  # a subnormal softmax in float32
    mask = torch.ones(B, S, dtype=torch.int64)
    results = {}
    for dtype in (torch.float32, torch.float64):
        t = [z.to(dtype).requires_grad_() for z in target]
        loss = reference_loss(None, t, None, mask, anchor_probs=priors.to(dtype))
        results[dtype] = (loss, torch.autograd.grad(loss, t))
    (loss32, grads32), (loss64, grads64) = results[torch.float32], results[torch.float64]
    assert torch.isfinite(loss32)
    torch.testing.assert_close(loss32.double(), loss64, **testing.LOSS_TOL)
    for g32, g64 in zip(grads32, grads64):
        assert torch.isfinite(g32).all()
        testing.assert_grads_close(g32, g64, torch.float32)


def test_reference_js_properties():
    torch.manual_seed(1)
    p = torch.softmax(torch.randn(6, 9, dtype=torch.float64), -1)
    q = torch.softmax(torch.randn(6, 9, dtype=torch.float64), -1)
    js = reference.js_divergence(p, q)
    torch.testing.assert_close(js, reference.js_divergence(q, p))
    assert (js > 0).all() and (js <= math.log(2)).all()
    torch.testing.assert_close(reference.js_divergence(p, p), torch.zeros(6, dtype=torch.float64))
    disjoint = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(reference.js_divergence(disjoint[:1], disjoint[1:]),
                               torch.tensor([math.log(2)], dtype=torch.float64))


def test_reference_gradient_is_finite_with_zero_probabilities():
    logits = torch.randn(4, 6, dtype=torch.float64)
    logits[:, 2] = -math.inf
    a = logits.clone().requires_grad_(True)
    t = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    loss = reference_loss([a], [t], detach_anchor=False)
    ga, gt = torch.autograd.grad(loss, [a, t])
    assert torch.isfinite(loss) and torch.isfinite(ga).all() and torch.isfinite(gt).all()
    assert (ga[:, 2] == 0).all()


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
def test_divergence_kl_follows_its_definition_and_the_zero_probability_rule(divergence):
    """KL(P^a ‖ P^t) and KL(P^t ‖ P^a) from pooled distributions computed on their own, with an
    expert that one side never routes to (−inf logits): a term with P_e = 0 is 0, and one whose
    second argument is 0 is P_e·log(P_e / 2^-126) (the floor), finite with finite gradients."""
    gen = torch.Generator().manual_seed(8)
    L, B, S, E = 2, 3, 5, 7
    anchor = [z.double() for z in testing.random_logits(L, B * S, E, generator=gen)]
    target = [z.double() for z in testing.random_logits(L, B * S, E, generator=gen)]
    for z in target:
        z[:, 2] = -math.inf  # P^t_2 = 0 < P^a_2
    for z in anchor:
        z[:, 4] = -math.inf  # P^a_4 = 0 < P^t_4
    mask = testing.ragged_mask(B, S, gen)
    pooled_a = reference_distribution(anchor, mask).numpy()
    pooled_t = reference_distribution(target, mask).numpy()
    p, q = (pooled_a, pooled_t) if divergence == "kl" else (pooled_t, pooled_a)
    expected = np.zeros((L, B))
    for l, b, e in np.ndindex(L, B, E):
        if p[l, b, e] > 0:
            log_q = math.log(q[l, b, e]) if q[l, b, e] > 0 else -126 * math.log(2.0)
            expected[l, b] += p[l, b, e] * (math.log(p[l, b, e]) - log_q)
    a = [z.clone().requires_grad_() for z in anchor]
    t = [z.clone().requires_grad_() for z in target]
    got = reference_loss(a, t, mask, mask, divergence=divergence, reduction="none", detach_anchor=False)
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-12, atol=0)
    assert (got > 0).all()
    swapped = reference_loss(target, anchor, mask, mask, divergence="reverse_kl" if divergence == "kl" else "kl",
                             reduction="none")
    torch.testing.assert_close(swapped, got.detach(), rtol=1e-13, atol=0)
    grads = torch.autograd.grad(got.sum(), a + t)
    assert all(torch.isfinite(g).all() for g in grads)
    assert all((g[:, 4] == 0).all() for g in grads[:L]) and all((g[:, 2] == 0).all() for g in grads[L:])


@pytest.mark.parametrize("divergence", ["js", "kl", "reverse_kl"])
def test_pair_weights_follow_the_mean_and_sum_formulas(divergence):
    """"mean" = Σ_l w_l (Σ_b π_b D_{l,b} / Σ_b π_b) / Σ_l w_l, "sum" = Σ_l Σ_b w_l π_b D_{l,b},
    "none" = π_b D_{l,b}, with π_b = 0 for a pair with an empty side, from the unweighted D."""
    gen = torch.Generator().manual_seed(9)
    L, B, S, E = 3, 4, 5, 6
    anchor = [z.double() for z in testing.random_logits(L, B * S, E, generator=gen)]
    target = [z.double() for z in testing.random_logits(L, B * S, E, generator=gen)]
    mask_a, mask_t = testing.ragged_mask(B, S, gen, empty=(0,)), testing.ragged_mask(B, S, gen)
    d = reference_loss(anchor, target, mask_a, mask_t, divergence=divergence, reduction="none")
    pair_weights = torch.tensor([3.0, 0.5, 2.0, 0.25], dtype=torch.float64)
    pi = pair_weights * torch.tensor([0.0, 1.0, 1.0, 1.0], dtype=torch.float64)  # pair 0: empty anchor
    w = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)
    expected = {
        "mean": ((w * (d * pi).sum(1) / pi.sum()).sum() / w.sum()).item(),
        "sum": (w[:, None] * pi * d).sum().item(),
    }
    for reduction, want in expected.items():
        got = reference_loss(anchor, target, mask_a, mask_t, divergence=divergence, reduction=reduction,
                             layer_weights=w.tolist(), pair_weights=pair_weights)
        assert math.isclose(got.item(), want, rel_tol=1e-12), reduction
    got = reference_loss(anchor, target, mask_a, mask_t, divergence=divergence, reduction="none",
                         pair_weights=pair_weights)
    torch.testing.assert_close(got, d * pi, rtol=1e-13, atol=0)


def test_divergence_and_pair_weights_gradcheck():
    torch.manual_seed(2)
    L, B, S, E = 2, 2, 4, 5
    anchor = [torch.randn(B * S, E, dtype=torch.float64, requires_grad=True) for _ in range(L)]
    target = [torch.randn(B * S, E, dtype=torch.float64, requires_grad=True) for _ in range(L)]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    for divergence in ("kl", "reverse_kl"):
        def fn(*tensors):
            return reference_loss(list(tensors[:L]), list(tensors[L:]), mask, mask, detach_anchor=False,
                                  divergence=divergence, pair_weights=torch.tensor([0.3, 1.7], dtype=torch.float64))

        assert torch.autograd.gradcheck(fn, anchor + target, eps=1e-6, atol=1e-8)
