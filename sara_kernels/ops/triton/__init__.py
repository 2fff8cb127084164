"""The Triton backend, by layer: :mod:`.kernels` (the ``@triton.jit`` kernels and the math they
compute), :mod:`.host` (tile table, launch plans, caches, launches) and :mod:`.autograd` (custom
ops and autograd Functions). This module is its entry in :mod:`sara_kernels.backends`."""

from __future__ import annotations

import torch

from ..contract import DTYPES, MAX_EXPERTS, MAX_SEQS  # noqa: F401  (what this backend takes: the contract's)
from . import kernels
from .autograd import pooled_distribution, sara_loss  # noqa: F401  (the entry points)


def available() -> bool:
    return True


def require() -> None:
    """Nothing to check: Triton is a dependency of the package."""


def runs_on(device: torch.device) -> bool:
    """Whether the kernels take tensors on ``device``: CUDA, or any device under the interpreter."""
    return device.type == "cuda" or kernels.INTERPRET
