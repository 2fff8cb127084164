"""The fused backends against the float64 PyTorch reference: loss, per-layer JS and gradients.

Tests taking ``fused_backend`` run for Triton and for the CUDA extension. Without a GPU the Triton
kernels run under the Triton interpreter and the CUDA backend as its emulated build on CPU
tensors (tests/conftest.py), so shapes are small; with a GPU the same cases run the real kernels
(the CUDA ones where the extension is built).
"""

from __future__ import annotations

import functools
import inspect
import math

import pytest
import torch

import sara_kernels
from sara_kernels import testing
from sara_kernels.ops.triton import host as triton_host
from sara_kernels.ops.triton import kernels as triton_kernels

from sara_kernels.testing import LOSS_TOL, PROBS_TOL, assert_backend_matches_reference, assert_grads_close, run

from helpers import DEVICE, as_float64_leaves, as_leaves, ragged_mask, random_logits, reference_distribution, reference_loss

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's NumPy on padded −inf rows


@pytest.fixture(autouse=True)
def fresh_plans():
    """Launch plans are cached per shape; tests that patch the tile table or the split count
    must not see (or leave behind) plans made with other values."""
    triton_host.clear_plans()
    yield
    triton_host.clear_plans()


segmentation = functools.partial(testing.segmentation, device=DEVICE)


def check(backend, anchor, target, anchor_side=None, target_side=None, **options):
    """The backend against the float64 reference (:func:`sara_kernels.testing.assert_matches_reference`)
    on a random cotangent of the loss, so that every (layer, sequence) term's gradient counts."""
    return assert_backend_matches_reference(backend, anchor, target, anchor_side, target_side, upstream_seed=7, **options)


def _gen(seed):
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("num_experts", [8, 60, 128, 384])
@pytest.mark.parametrize("seg_kind", testing.SEGMENTATIONS)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("detach_anchor", [True, False])
def test_loss_and_grads_match_reference(num_experts, seg_kind, score, detach_anchor, fused_backend):
    gen = _gen(num_experts * 7 + len(seg_kind) + len(score) + detach_anchor)
    L, B, S = 3, 3, 9
    side_a, side_t = segmentation(seg_kind, B, S, gen), segmentation(seg_kind, B, S + 2, gen)
    anchor = random_logits(L, side_a.num_tokens, num_experts, generator=gen)
    target = random_logits(L, side_t.num_tokens, num_experts, generator=gen)
    check(fused_backend, anchor, target, side_a, side_t, score=score, detach_anchor=detach_anchor, temperature=0.7)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_one_expert_gives_zero_loss_and_zero_gradients(score, fused_backend):
    """With E = 1 every routing distribution is [1]: the divergence is 0 and so are its gradients
    (a degenerate case, kept apart from the value comparisons above)."""
    gen = _gen(3 + len(score))
    L, B, S = 2, 3, 5
    side_a, side_t = segmentation("cu_seqlens", B, S, gen), segmentation("mask", B, S, gen)
    anchor = as_leaves(random_logits(L, side_a.num_tokens, 1, generator=gen))
    target = as_leaves(random_logits(L, side_t.num_tokens, 1, generator=gen))
    loss = sara_kernels.sara_loss(anchor, target, side_a.mask, side_t.mask, anchor_cu_seqlens=side_a.cu_seqlens,
                                  target_cu_seqlens=side_t.cu_seqlens, score=score, temperature=0.7,
                                  detach_anchor=False, backend=fused_backend)
    assert loss.item() == 0.0
    for g in torch.autograd.grad(loss, anchor + target):
        assert (g == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_experts", [16, 60, 512])
@pytest.mark.parametrize("seg_kind", ["mask", "cu_seqlens"])
def test_low_precision_inputs_match_reference_on_rounded_inputs(dtype, num_experts, seg_kind, fused_backend):
    gen = _gen(11 + num_experts)
    L, B, S = 2, 2, 10
    side_a, side_t = segmentation(seg_kind, B, S, gen), segmentation(seg_kind, B, S, gen)
    anchor = random_logits(L, side_a.num_tokens, num_experts, dtype, generator=gen)
    target = random_logits(L, side_t.num_tokens, num_experts, dtype, generator=gen)
    check(fused_backend, anchor, target, side_a, side_t, detach_anchor=False)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weights", [None, "list", "tensor"])
def test_reductions_and_layer_weights(reduction, weights, fused_backend):
    gen = _gen(3)
    L, B, S, E = 4, 3, 6, 16
    w = {None: None, "list": [0.5, 0.0, 2.0, 1.0], "tensor": torch.tensor([1.0, 3.0, 0.25, 0.5], device=DEVICE)}[weights]
    side_a, side_t = segmentation("mask", B, S, gen), segmentation("mask", B, S, gen, empty=(1,))
    anchor, target = random_logits(L, B * S, E, generator=gen), random_logits(L, B * S, E, generator=gen)
    runs = check(fused_backend, anchor, target, side_a, side_t, reduction=reduction, layer_weights=w)
    assert runs["kernel"].loss.shape == ((L, B) if reduction == "none" else ())


@pytest.mark.parametrize("seg_kind", testing.SEGMENTATIONS)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_cached_priors_mode(seg_kind, score, fused_backend):
    gen = _gen(5)
    L, B, S, E = 3, 4, 7, 24
    side_t = segmentation(seg_kind, B, S, gen, empty=(2,) if seg_kind != "none" else ())
    priors = torch.softmax(torch.randn(L, side_t.num_seqs, E, generator=gen), dim=-1).to(DEVICE)
    priors[0, 0, :3] = 0  # exact zeros in a prior: 0·log 0 terms
    priors[0, 0] /= priors[0, 0].sum()
    target = random_logits(L, side_t.num_tokens, E, generator=gen)
    check(fused_backend, None, target, target_side=side_t, anchor_probs=priors, score=score)


def test_subnormal_pooled_probabilities_give_a_finite_divergence(fused_backend):
    """An expert whose P is subnormal on both sides: M = ½(P^a + P^t) rounds to 0 at the smallest
    subnormals, and P·log(P/M) was then infinite (loss inf). The prior holds 2^-149 for expert 3,
    which the target never routes to (−∞), and 3·2^-149 for expert 4, whose target logits sit
    100 nats below the rest (a subnormal softmax on the CPU; flushed to 0 on a GPU)."""
    gen = _gen(31)
    L, B, S, E = 2, 2, 5, 16
    tiny = torch.finfo(torch.float32).smallest_normal * 2.0**-23
    priors = torch.softmax(torch.randn(L, B, E, generator=gen), dim=-1)
    priors[..., 3], priors[..., 4] = tiny, 3 * tiny
    priors = priors.to(DEVICE)
    target = random_logits(L, B * S, E, generator=gen)
    for z in target:
        z[:, 3] = -math.inf
        z[:, 4] = z.max() - 100.0 - torch.rand(B * S, generator=gen).to(z)
    runs = check(fused_backend, None, target, target_side=segmentation("mask", B, S, gen), anchor_probs=priors)
    assert torch.isfinite(runs["kernel"].loss).all()


def test_stacked_and_strided_layers(fused_backend):
    """One [L, N, E] tensor, and per-layer views with non-unit strides, read in place."""
    gen = _gen(9)
    L, B, S, E = 3, 2, 8, 20
    stacked = torch.randn(L, B * S, E, generator=gen).to(DEVICE)
    wide = torch.randn(B * S, 2 * E, generator=gen).to(DEVICE)
    transposed = torch.randn(E, B * S, generator=gen).to(DEVICE)
    target = [wide[:, ::2], transposed.t(), stacked[0] * 0.5 + 1]
    mask = ragged_mask(B, S, gen)
    for anchor in (stacked, list(stacked.unbind(0))):
        got = sara_kernels.sara_loss(anchor, target, mask, mask, backend=fused_backend)
        want = reference_loss([t.double() for t in anchor], [t.double() for t in target], mask, mask)
        torch.testing.assert_close(got.double(), want, **LOSS_TOL)
    leaf = stacked.clone().requires_grad_(True)
    loss = sara_kernels.sara_loss(stacked.flip(0), leaf, mask, mask, backend=fused_backend)
    (g,) = torch.autograd.grad(loss, leaf)
    ref_leaf = stacked.double().requires_grad_(True)
    (rg,) = torch.autograd.grad(reference_loss(stacked.flip(0).double(), ref_leaf, mask, mask), ref_leaf)
    assert g.shape == (L, B * S, E)
    assert_grads_close(g, rg, torch.float32)


@pytest.mark.parametrize("splits", [2, 5])
def test_split_sequences_give_the_same_result(monkeypatch, splits):
    """Cutting sequences into slices (as on a GPU with few sequences) changes nothing beyond rounding."""
    gen = _gen(13)
    L, B, S, E = 2, 2, 40, 16
    side_a = segmentation("mask", B, S, gen)
    side_t = segmentation("cu_seqlens", B, S, gen, num_tokens=B * S)
    anchor, target = random_logits(L, B * S, E, generator=gen), random_logits(L, B * S, E, generator=gen)
    monkeypatch.setattr(triton_host, "tile_config", lambda e: dict(BLOCK_N=4, BLOCK_E=16, STAGES=1, num_warps=4, enable_fp_fusion=True))
    monkeypatch.setattr(triton_host, "num_splits", lambda *args: splits)
    check("triton", anchor, target, side_a, side_t, detach_anchor=False, score="sigmoid")


@pytest.mark.parametrize("E", [12, 16], ids=["E_short_of_tile", "E_fills_tile"])
def test_minus_inf_logits_give_finite_loss_and_zero_gradients_where_probability_is_zero(fused_backend, E):
    gen = _gen(17)
    L, B, S = 2, 2, 6
    side = segmentation("mask", B, S, gen)
    anchor, target = random_logits(L, B * S, E, generator=gen), random_logits(L, B * S, E, generator=gen)
    for z in anchor + target:
        z[:, 5] = -math.inf  # an expert masked out everywhere
        z[::3, :4] = -math.inf  # some tokens with several masked experts
    anchor[0][:, 7] = -math.inf  # an expert only the target side routes to: P^a_e = 0 < P^t_e
    for score in ("softmax", "sigmoid"):
        runs = check(fused_backend, anchor, target, side, side, detach_anchor=False, score=score)
        assert torch.isfinite(runs["kernel"].loss)
        for g in runs["kernel"].grads:
            assert (g[:, 5] == 0).all()


@pytest.mark.parametrize("E", [12, 16], ids=["E_short_of_tile", "E_fills_tile"])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_tokens_whose_every_logit_is_far_below_zero_match_reference(fused_backend, score, E):
    """Tokens with every z/τ near −170, where σ(z/τ) underflows in float32: the sigmoid score's
    normalisation σ/Σσ must not become 0/0 (it did before the kernels shifted it by the row
    maximum). Logits of that size carry fp32 rounding of their own (z/τ is not exact), so the
    gradients are held to twice PyTorch's float32 error, as in the random configurations."""
    gen = _gen(29)
    L, B, S = 2, 2, 6
    side = segmentation("mask", B, S, gen)
    anchor, target = random_logits(L, B * S, E, generator=gen), random_logits(L, B * S, E, generator=gen)
    for z in anchor + target:
        z[::2] -= 120.0
    assert_backend_matches_reference(fused_backend, anchor, target, side, side, fp32_baseline=True, score=score,
                                     temperature=0.7, detach_anchor=False)


def test_empty_sequences_are_excluded(fused_backend):
    gen = _gen(19)
    L, B, S, E = 2, 4, 5, 8
    side_a, side_t = segmentation("mask", B, S, gen, empty=(1,)), segmentation("mask", B, S, gen, empty=(3,))
    anchor, target = random_logits(L, B * S, E, generator=gen), random_logits(L, B * S, E, generator=gen)
    runs = check(fused_backend, anchor, target, side_a, side_t, detach_anchor=False, reduction="none")
    js = runs["kernel"].loss
    assert (js[:, [1, 3]] == 0).all() and (js[:, [0, 2]] > 0).all()
    for g in runs["kernel"].grads:  # the excluded pairs' tokens get exactly zero gradient
        assert (g.view(B, S, E)[[1, 3]] == 0).all()


@pytest.mark.parametrize("seg_kind", ["mask", "cu_seqlens"])
def test_no_valid_pair_gives_zero_loss_and_zero_gradients(seg_kind, fused_backend):
    gen = _gen(23)
    L, B, S, E = 2, 2, 4, 8
    side_a, side_t = segmentation(seg_kind, B, S, gen, empty=(0,)), segmentation(seg_kind, B, S, gen, empty=(1,))
    n = side_a.num_tokens
    anchor, target = as_leaves(random_logits(L, n, E, generator=gen)), as_leaves(random_logits(L, n, E, generator=gen))
    loss = sara_kernels.sara_loss(anchor, target, side_a.mask, side_t.mask, anchor_cu_seqlens=side_a.cu_seqlens,
                                  target_cu_seqlens=side_t.cu_seqlens, detach_anchor=False, backend=fused_backend)
    assert loss.item() == 0.0
    for g in torch.autograd.grad(loss, anchor + target):
        assert (g == 0).all()


def test_empty_side_without_tokens(fused_backend):
    L, E = 2, 8
    anchor = random_logits(L, 5, E)
    target = [torch.empty(0, E, device=DEVICE, requires_grad=True) for _ in range(L)]
    loss = sara_kernels.sara_loss(anchor, target, backend=fused_backend)
    assert loss.item() == 0.0
    (g,) = torch.autograd.grad(loss, target[:1])
    assert g.shape == (0, E)


def test_nan_in_valid_token_propagates_and_nan_in_padding_does_not(fused_backend):
    gen = _gen(29)
    L, B, S, E = 1, 2, 4, 8
    mask = ragged_mask(B, S, gen)
    mask[0, -1] = 0
    anchor, target = random_logits(L, B * S, E, generator=gen), random_logits(L, B * S, E, generator=gen)
    clean = sara_kernels.sara_loss(anchor, target, mask, mask, backend=fused_backend)
    padded = [t.clone() for t in target]
    padded[0][S - 1, 2] = math.nan  # token (0, S-1) is padding
    assert sara_kernels.sara_loss(anchor, padded, mask, mask, backend=fused_backend).item() == clean.item()
    poisoned = [t.clone() for t in target]
    poisoned[0][0, 2] = math.nan  # token (0, 0) is valid
    assert math.isnan(sara_kernels.sara_loss(anchor, poisoned, mask, mask, backend=fused_backend).item())
    assert math.isnan(reference_loss(anchor, poisoned, mask, mask).item())


@pytest.mark.parametrize("seg_kind", testing.SEGMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routing_distribution_matches_reference(seg_kind, dtype, fused_backend):
    gen = _gen(31)
    L, B, S, E = 3, 3, 6, 60
    side = segmentation(seg_kind, B, S, gen, empty=(1,) if seg_kind != "none" else ())
    mask, cu = side.mask, side.cu_seqlens
    logits = random_logits(L, side.num_tokens, E, dtype, generator=gen)
    leaves, ref_leaves = as_leaves(logits), as_float64_leaves(logits)
    probs = sara_kernels.routing_distribution(leaves, mask, cu_seqlens=cu, score="sigmoid", temperature=1.3, backend=fused_backend)
    ref = reference_distribution(ref_leaves, mask, cu_seqlens=cu, score="sigmoid", temperature=1.3)
    assert probs.dtype == torch.float32 and probs.shape == ref.shape
    torch.testing.assert_close(probs.double(), ref, **PROBS_TOL)
    if seg_kind != "none":
        assert (probs[:, 1] == 0).all()
    weights = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    grads = torch.autograd.grad((probs.double() * weights).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * weights).sum(), ref_leaves)
    for g, rg in zip(grads, ref_grads):
        assert_grads_close(g, rg, dtype)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_gradient_ignores_a_common_offset_of_the_cotangent(score, fused_backend):
    """∂/∂z_j of Σ_e g_e P_e is (1/(τ n)) h_j (g_j − ⟨s, g⟩), the same for g and g + γ. With the
    offset γ far above the spread of g, ⟨s, g⟩ rounded to fp32 is off by more than the spread
    allows: the backward must lose only what the spread carries (the loss's G sits at ½ log 2 on
    every expert the anchor dominates, so its spread is small where a row peaks there)."""
    gen = _gen(53)
    side = segmentation("mask", 3, 5, gen)
    logits = random_logits(2, side.num_tokens, 100, scale=3.0, generator=gen)
    logits[0][:, 1] = -math.inf
    leaves, ref_leaves = as_leaves(logits), as_float64_leaves(logits)
    options = dict(score=score, temperature=0.3)
    probs = sara_kernels.routing_distribution(leaves, side.mask, backend=fused_backend, **options)
    ref = reference_distribution(ref_leaves, side.mask, **options)
    cotangent = (256.0 + torch.randn(ref.shape, generator=gen)).to(DEVICE)
    grads = torch.autograd.grad(probs, leaves, grad_outputs=cotangent)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_outputs=cotangent.double())
    for g, rg in zip(grads, ref_grads):
        assert_grads_close(g, rg, torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="without a GPU the kernels run each split in turn (interpreter, emulated build): equal by construction")
def test_deterministic_bitwise_on_gpu(fused_backend):
    gen = _gen(37)
    L, B, S, E = 3, 2, 16, 60
    mask = ragged_mask(B, S, gen)
    anchor, target = random_logits(L, B * S, E, torch.bfloat16, generator=gen), random_logits(L, B * S, E, torch.bfloat16, generator=gen)
    results = []
    for _ in range(2):
        a, t = as_leaves(anchor), as_leaves(target)
        loss = sara_kernels.sara_loss(a, t, mask, mask, detach_anchor=False, backend=fused_backend)
        results.append((loss.detach(), torch.autograd.grad(loss, a + t)))
    (l1, g1), (l2, g2) = results
    assert torch.equal(l1, l2)
    assert all(torch.equal(x, y) for x, y in zip(g1, g2))


def test_module_form_matches_function():
    gen = _gen(41)
    anchor, target = random_logits(2, 8, 16, generator=gen), random_logits(2, 8, 16, generator=gen)
    module = sara_kernels.SARALoss(temperature=0.5, score="sigmoid", backend="triton")
    assert "sigmoid" in repr(module)
    torch.testing.assert_close(
        module(anchor, target), sara_kernels.sara_loss(anchor, target, temperature=0.5, score="sigmoid", backend="triton")
    )


def test_vector_width_only_when_every_layer_allows_aligned_vector_loads():
    def vec(logits):
        return triton_host.layer_addressing(logits, torch.device("cpu"))[1]

    x = torch.randn(8, 32)
    assert vec([x, x.clone()]) == 4
    assert vec([x.bfloat16()]) == 8
    assert vec([torch.randn(8, 60).bfloat16()]) == 0  # 120-byte rows
    assert vec([x, x[:, 1:17]]) == 0  # misaligned base
    assert vec([x[:, ::2]]) == 0  # column stride 2
    assert vec(torch.randn(3, 8, 32)) == 4  # one [L, N, E] tensor
    assert vec(torch.randn(3, 8, 36)[:, :, :32]) == 4  # row stride 36 = 9 vectors
    assert vec(torch.randn(3, 8, 33)[:, :, :32]) == 0  # row stride 33
    assert vec(torch.randn(3, 8, 32)[:, 1:]) == 4  # offset by one 128-byte row
    assert vec(torch.randn(3, 9, 4)[:, :, :2].bfloat16()) == 0  # layer stride 36 elements, not a multiple of 8


def test_in_place_change_of_the_logits_before_backward_is_an_error():
    gen = _gen(43)
    anchor, target = random_logits(2, 8, 16, generator=gen), as_leaves(random_logits(2, 8, 16, generator=gen))
    scaled = [t * 1.0 for t in target]
    loss = sara_kernels.sara_loss(anchor, scaled, backend="triton")
    with torch.no_grad():
        scaled[0].add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def _valid_pairs(side_a, side_t) -> int:
    """How many pairs have a token on both sides (the pairs whose divergence counts)."""
    return int((side_a.membership().any(dim=1) & side_t.membership().any(dim=1)).sum())


@pytest.mark.parametrize("seed", range(24))
def test_random_configurations_match_reference(monkeypatch, seed):
    """Random shapes (odd E, ragged sequences, empty ones among them, forced split counts), scores,
    sharp and flat temperatures, dtypes and −inf experts; gradients must be as accurate as PyTorch's
    own float32 where the problem is ill-conditioned (see assert_grads_close). Sides are redrawn
    until at least 2 pairs are valid, so every seed compares values across pairs (no valid pair:
    test_no_valid_pair_gives_zero_loss_and_zero_gradients; one unsegmented pair: the "none" cases of
    test_loss_and_grads_match_reference)."""
    import random

    rng = random.Random(seed)
    torch.manual_seed(seed)
    L, E, B, S = rng.randint(1, 4), rng.choice([2, 3, 17, 31, 100, 129, 255, 300, 512]), rng.randint(2, 6), rng.randint(1, 9)
    score, tau, detach = rng.choice(["softmax", "sigmoid"]), rng.choice([0.3, 1.0, 2.5]), rng.random() < 0.5
    seg_kind = rng.choice(["mask", "cu_seqlens"])
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
    monkeypatch.setattr(triton_host, "num_splits", lambda *args, k=rng.choice([1, 2, 3, 7]): k)
    side_a = side_t = None
    while side_a is None or _valid_pairs(side_a, side_t) < 2:
        side_a = testing.random_segmentation(rng, seg_kind, B, S, DEVICE)
        side_t = testing.random_segmentation(rng, seg_kind, B, S, DEVICE)
    anchor = [(3 * torch.randn(side_a.num_tokens, E)).to(dtype).to(DEVICE) for _ in range(L)]
    target = [(3 * torch.randn(side_t.num_tokens, E)).to(dtype).to(DEVICE) for _ in range(L)]
    if E > 2 and rng.random() < 0.3:
        for z in anchor + target:
            z[:, 1] = -math.inf
    cotangent = torch.randn(L, B, dtype=torch.float64, device=DEVICE)
    assert_backend_matches_reference("triton", anchor, target, side_a, side_t, fp32_baseline=True, upstream=cotangent,
                                     score=score, temperature=tau, detach_anchor=detach, reduction="none")


@pytest.mark.parametrize("seed", range(12))
def test_extreme_logits_give_a_finite_loss_and_gradients(fused_backend, seed):
    """Sharp temperatures, logit spreads of hundreds and large offsets, where scores underflow,
    pooled probabilities turn subnormal and distributions saturate: the fused backend and the
    float32 reference stay finite, and the loss agrees with float64. (Gradients there are
    ill-conditioned: how close they come is the random configurations' test, at sane scales.)"""
    import random

    rng = random.Random(1000 + seed)
    torch.manual_seed(1000 + seed)
    L, N, E = 2, rng.randint(2, 12), rng.choice([3, 8, 17, 64, 128])
    tau, spread, offset = rng.choice([0.05, 0.3, 1.0]), rng.choice([10.0, 50.0, 200.0]), rng.choice([0.0, -100.0, 50.0])
    score = rng.choice(["softmax", "sigmoid"])
    anchor = [(spread * torch.randn(N, E) + offset).to(DEVICE) for _ in range(L)]
    target = [(spread * torch.randn(N, E) + offset).to(DEVICE) for _ in range(L)]
    runs = {name: run(backend, anchor, target, precision=precision, score=score, temperature=tau, detach_anchor=False)
            for name, backend, precision in (("kernel", fused_backend, None), ("fp32", "reference", torch.float32),
                                             ("fp64", "reference", torch.float64))}
    for name in ("kernel", "fp32"):
        assert torch.isfinite(runs[name].loss), name
        assert all(torch.isfinite(g).all() for g in runs[name].grads), name
    torch.testing.assert_close(runs["kernel"].loss.double(), runs["fp64"].loss, **LOSS_TOL)

KERNELS = ("pool_routing_fwd", "pool_routing_bwd", "pair_js_fwd", "reduce_pair_loss", "pooled_routing_fwd", "check_segments")


@pytest.mark.parametrize("name", KERNELS)
def test_constexprs_come_last_in_every_kernel(name):
    """``launch`` passes the compiled launcher the runtime arguments followed by the constexpr
    values: that is the signature order only if no runtime argument follows a constexpr."""
    params = inspect.signature(getattr(triton_kernels, name).fn).parameters.values()
    kinds = ["constexpr" in str(p.annotation) for p in params]
    assert any(kinds) and kinds == sorted(kinds), f"{name}: a runtime argument follows a constexpr"


class _FakeParam:
    def __init__(self, name, is_constexpr):
        self.name, self.is_constexpr = name, is_constexpr


class _FakeCompiled:
    def __init__(self, calls):
        self.calls = calls

    def __getitem__(self, grid):
        return lambda *args: self.calls.append(("compiled", grid, args))


class _FakeKernel:
    """Records how ``launch`` calls a Triton kernel, without compiling anything."""

    params = [_FakeParam("x_ptr", False), _FakeParam("n", False), _FakeParam("BLOCK", True)]

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.calls.append(("jit", grid, args, meta))
            return _FakeCompiled(self.calls)

        return run


def test_launch_goes_through_the_compiled_launcher_after_the_first_call(monkeypatch):
    """The fast launch path runs only on a GPU; its bookkeeping is checked here: the first call of a
    specialisation compiles through ``kernel[grid]``, later ones call the compiled kernel with a
    three-axis grid and the constexpr values appended; a new dtype or an int that needs 64 bits
    is a new specialisation."""
    monkeypatch.setattr(triton_host, "INTERPRET", False)
    monkeypatch.setattr(triton_host, "_COMPILED", {})
    kernel, device = _FakeKernel(), torch.device("cpu")
    x = torch.zeros(4)
    meta = dict(BLOCK=16, num_warps=4)
    triton_host.launch(kernel, (3, 2), (x, 5), meta, device)
    triton_host.launch(kernel, (3, 2), (x, 7), meta, device)
    triton_host.launch(kernel, (1,), (x, 7), meta, device)
    assert kernel.calls == [
        ("jit", (3, 2), (x, 5), meta),
        ("compiled", (3, 2, 1), (x, 7, 16)),
        ("compiled", (1, 1, 1), (x, 7, 16)),
    ]
    triton_host.launch(kernel, (1,), (x.double(), 7), meta, device)  # another pointer type
    triton_host.launch(kernel, (1,), (x, 2**40), meta, device)  # an i64 argument
    triton_host.launch(kernel, (1,), (x, 7), dict(meta, BLOCK=32), device)  # another constexpr
    assert [c[0] for c in kernel.calls[3:]] == ["jit", "jit", "jit"]


@pytest.mark.parametrize("divergence,reduction", [("js", "sum"), ("kl", "mean"), ("reverse_kl", "none")])
def test_divergence_and_pair_weights_match_reference(divergence, reduction, fused_backend):
    """Each divergence with pair weights (one of them 0) against the float64 reference: ragged masks
    with an empty sequence on each side, E = 60, −inf logits on both sides (P_e = 0 in either
    argument of a KL: the zero rule), layer weights, gradients into both sides."""
    gen = _gen(41)
    L, B, S, E = 2, 4, 6, 60
    side_a, side_t = segmentation("mask", B, S, gen, empty=(0,)), segmentation("mask", B, S + 1, gen, empty=(3,))
    anchor = random_logits(L, side_a.num_tokens, E, generator=gen)
    target = random_logits(L, side_t.num_tokens, E, generator=gen)
    for z in target:
        z[:, 5] = -math.inf  # an expert the target never routes to
    anchor[1][:, 9] = -math.inf  # and one the anchor never routes to
    anchor[0][::2, :3] = -math.inf
    pair_weights = torch.tensor([0.7, 1.9, 0.0, 1.3], device=DEVICE)
    runs = check(fused_backend, anchor, target, side_a, side_t, detach_anchor=False, divergence=divergence,
                 reduction=reduction, pair_weights=pair_weights, layer_weights=[0.5, 2.0])
    assert bool(torch.isfinite(runs["kernel"].loss).all())
    if reduction == "none":  # pair 2 weighs 0, pairs 0 and 3 have an empty side
        assert (runs["kernel"].loss[:, [0, 2, 3]] == 0).all() and (runs["kernel"].loss[:, 1] > 0).all()


@pytest.mark.parametrize("divergence", ["js", "kl", "reverse_kl"])
def test_divergence_and_pair_weights_with_priors_and_packed_sequences(divergence, fused_backend):
    """Priors with exact zeros (0·log 0, and a floored Q for reverse_kl), packed target sequences with
    an empty one, E = 24, pair weights given as a Python list."""
    gen = _gen(43)
    L, B, S, E = 2, 3, 7, 24
    side_t = segmentation("cu_seqlens", B, S, gen, empty=(1,))
    priors = torch.softmax(torch.randn(L, B, E, generator=gen), dim=-1).to(DEVICE)
    priors[0, 0, :3] = 0
    priors[0, 0] /= priors[0, 0].sum()
    target = random_logits(L, side_t.num_tokens, E, generator=gen)
    check(fused_backend, None, target, target_side=side_t, anchor_probs=priors, divergence=divergence,
          pair_weights=[0.5, 0.5, 0.25], score="sigmoid")  # Σ π < 1 on the valid pairs


@pytest.mark.parametrize("divergence", ["js", "kl", "reverse_kl"])
def test_pair_weights_all_zero_give_zero_loss_and_zero_gradients(divergence, any_backend):
    gen = _gen(47)
    L, B, S, E = 2, 3, 4, 12
    side_a, side_t = segmentation("mask", B, S, gen), segmentation("mask", B, S, gen, empty=(1,))
    anchor = as_leaves(random_logits(L, side_a.num_tokens, E, generator=gen))
    target = as_leaves(random_logits(L, side_t.num_tokens, E, generator=gen))
    # Pair 1 (an empty target) keeps a weight, which counts as 0: no weight is left.
    pair_weights = torch.tensor([0.0, 2.0, 0.0], device=DEVICE)
    for reduction in ("mean", "sum"):
        loss, per_layer = sara_kernels.sara_loss(
            anchor, target, side_a.mask, side_t.mask, pair_weights=pair_weights, divergence=divergence,
            reduction=reduction, detach_anchor=False, return_per_layer=True, backend=any_backend)
        assert loss.item() == 0.0 and (per_layer == 0).all()
        for g in torch.autograd.grad(loss, anchor + target):
            assert (g == 0).all()


def test_module_form_takes_divergence_and_pair_weights():
    gen = _gen(53)
    L, B, S, E = 2, 3, 4, 10
    mask = ragged_mask(B, S, gen)
    anchor, target = random_logits(L, B * S, E, generator=gen), random_logits(L, B * S, E, generator=gen)
    pair_weights = torch.tensor([0.5, 0.0, 2.0], device=DEVICE)
    module = sara_kernels.SARALoss(divergence="kl", reduction="sum", backend="reference")
    assert "divergence='kl'" in repr(module)
    got = module(anchor, target, mask, mask, pair_weights=pair_weights)
    want = reference_loss(anchor, target, mask, mask, divergence="kl", reduction="sum", pair_weights=pair_weights)
    assert torch.equal(got, want) and got != reference_loss(anchor, target, mask, mask, reduction="sum")
    with pytest.raises(ValueError, match="divergence: expected one of"):
        sara_kernels.SARALoss(divergence="jensen")
