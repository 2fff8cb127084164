"""Test-suite glue: the device the tests run on, leaves for autograd, and the shared input
builders of :mod:`sara_kernels.testing` placed on that device. Tolerances and the oracle live
in :mod:`sara_kernels.testing` (one table for the tests, the GPU tests and the selftest)."""

from __future__ import annotations

import functools

import torch

from sara_kernels import testing

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

random_logits = functools.partial(testing.random_logits, device=DEVICE)
ragged_mask = functools.partial(testing.ragged_mask, device=DEVICE)
packed_cu_seqlens = functools.partial(testing.packed_cu_seqlens, device=DEVICE)


def as_float64_leaves(layers):
    """float64 copies of the (rounded) inputs that require grad: the reference's inputs."""
    return [t.detach().double().requires_grad_(True) for t in layers]


def as_leaves(layers):
    return [t.detach().clone().requires_grad_(True) for t in layers]
