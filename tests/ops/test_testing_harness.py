"""sara_kernels.testing checked itself: the segmentation builder keeps its promises, and the
comparison helper every kernel test relies on fails on a wrong loss, per-layer JS or gradient
(reference backend only: no kernel, fast)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sara_kernels import testing


@pytest.mark.parametrize("kind", testing.SEGMENTATIONS)
def test_segmentation_builds_the_rows_and_empty_sequences_asked_for(kind):
    gen = torch.Generator().manual_seed(3)
    side = testing.segmentation(kind, 4, 9, gen, empty=(1,) if kind != "none" else ())
    member = side.membership()
    assert member.shape == (side.num_seqs, side.num_tokens)
    if kind == "none":
        assert side.num_seqs == 1 and side.num_tokens == 9 and bool(member.all())
        return
    assert side.num_seqs == 4 and side.num_tokens == (36 if kind == "mask" else 33)
    counts = member.sum(dim=1)
    assert counts[1] == 0 and bool((counts[[0, 2, 3]] > 0).all())
    assert int(member.sum(dim=0).max()) == 1  # a row belongs to at most one sequence
    if kind == "cu_seqlens":
        assert int(side.cu_seqlens[-1]) == side.num_tokens


def test_segmentation_errors_name_the_argument():
    with pytest.raises(ValueError, match="kind must be one of"):
        testing.segmentation("packed", 2, 4)
    with pytest.raises(ValueError, match="num_tokens"):
        testing.segmentation("mask", 2, 4, num_tokens=7)


def _runs():
    gen = torch.Generator().manual_seed(5)
    side = testing.segmentation("mask", 3, 7, gen, empty=(1,))
    anchor, target = testing.random_logits(2, 21, 8, generator=gen), testing.random_logits(2, 21, 8, generator=gen)
    options = dict(anchor_side=side, target_side=side, upstream_seed=7, detach_anchor=False)
    want = testing.run("reference", anchor, target, precision=torch.float64, **options)
    got = testing.run("reference", anchor, target, **options)
    return got, want


def test_the_comparison_passes_float32_against_float64():
    got, want = _runs()
    testing.assert_matches_reference(got, want, torch.float32)


@pytest.mark.parametrize("wrong", ["loss", "per_layer", "gradient", "missing gradient", "gradient dtype"])
def test_the_comparison_fails_on_a_wrong_result(wrong):
    got, want = _runs()
    grads = list(got.grads)
    if wrong == "loss":
        got = dataclasses.replace(got, loss=got.loss * 1.001)
    elif wrong == "per_layer":
        got = dataclasses.replace(got, per_layer=got.per_layer * 1.001)
    elif wrong == "gradient":
        grads[-1] = grads[-1] * 1.01
    elif wrong == "missing gradient":
        grads[0] = None
    else:
        grads[0] = grads[0].double()
    got = dataclasses.replace(got, grads=grads)
    with pytest.raises(AssertionError):
        testing.assert_matches_reference(got, want, torch.float32)


def test_results_computed_on_a_gpu_get_the_gpu_arithmetic_allowance():
    """The fp32 tolerances widen by GPU_APPROXIMATION_FACTOR for results on a CUDA device (the
    kernels' ex2/rcp approximations there) and only there; a bf16 gradient's stays its rounding."""
    assert testing.on_device(testing.LOSS_TOL, "cpu") == testing.LOSS_TOL
    assert testing.on_device(testing.LOSS_TOL, "cuda") == {
        name: value * testing.GPU_APPROXIMATION_FACTOR for name, value in testing.LOSS_TOL.items()}
    assert testing.GPU_APPROXIMATION_FACTOR > 1
    # An fp32 gradient off by twice its CPU rtol fails on the CPU, and is within the GPU allowance.
    want = torch.linspace(1.0, 2.0, 8, dtype=torch.float64)
    got = (want * (1 + 2 * testing.GRAD_TOL[torch.float32]["rtol"])).float()
    with pytest.raises(AssertionError):
        testing.assert_grads_close(got, want, torch.float32)
    assert testing.on_device(testing.GRAD_TOL[torch.float32], "cuda")["rtol"] > 2 * testing.GRAD_TOL[torch.float32]["rtol"]
