"""The CUDA C++ backend (``csrc/``): the same fused op as :mod:`sara_kernels.ops.triton`, with
argument handling, launch planning and autograd in C++ (``torch.ops.sara_kernels.cuda_*``), so a
call costs microseconds of CPU. Same kernels structure, same math, same results up to float32
rounding; the ops' schemas and shapes are :mod:`sara_kernels.ops.contract`'s. This module only
loads the extension, registers the shapes torch.compile needs and makes the calls.

The extension is optional: it is built by ``pip install --no-build-isolation -e .`` where torch
has CUDA and a CUDA toolkit is present (see setup.py). Without it ``backend="cuda"`` raises
:class:`CUDABackendUnavailable`, saying how to build it.
"""

from __future__ import annotations

import importlib

import torch

from .._inputs import RoutingSide
from . import contract
from .contract import DTYPES, MAX_EXPERTS, MAX_SEQS  # noqa: F401  (what this backend takes: the contract's)

BUILD_HINT = (
    "build it on a machine with a CUDA toolkit (nvcc) and a CUDA build of PyTorch: "
    "`pip install --no-build-isolation -e .` from the repository, with SARA_KERNELS_NO_CUDA unset; "
    "`python -m sara_kernels selftest` then lists the cuda backend"
)


class CUDABackendUnavailable(RuntimeError):
    """``backend="cuda"`` was asked for, but the extension ``sara_kernels._C`` is not built."""


def _load():
    try:
        return importlib.import_module("sara_kernels._C"), None
    except ImportError as e:  # not built (CPU-only install) or built against another torch
        return None, e


_C, LOAD_ERROR = _load()


def available() -> bool:
    return _C is not None


def runs_on(device: torch.device) -> bool:
    """Whether the extension's ops take tensors on ``device``: CUDA tensors (the emulated build
    that tests/conftest.py makes, with a CPU stand-in of CUDA, takes CPU tensors)."""
    return _C is not None and device.type == _C.DEVICE_TYPE


def require() -> None:
    if _C is None:
        raise CUDABackendUnavailable(f"backend='cuda' needs the compiled extension sara_kernels._C ({LOAD_ERROR}); "
                                     f"{BUILD_HINT}")


def _register_fakes():
    """Shapes for torch.compile: the contract's, the same as the Triton backend's ops."""
    ops = torch.ops.sara_kernels
    for name, fake in (*contract.FAKES.items(), *contract.CUDA_AUTOGRAD_FAKES.items()):
        torch.library.register_fake(getattr(ops, f"cuda_{name}").default)(fake)


if _C is not None:
    _register_fakes()


def sara_loss(anchor, target: RoutingSide, anchor_probs, layer_weights, pair_weights, score: str, temperature: float,
              detach_anchor: bool, reduction: str, divergence: str):
    """(loss, detached per-layer weighted mean divergence [L]) with autograd into the logits (C++ autograd)."""
    if anchor_probs is not None:
        anchor_probs = anchor_probs.detach()
    if layer_weights is not None:
        layer_weights = layer_weights.detach()
    if pair_weights is not None:
        pair_weights = pair_weights.detach()
    a_inputs, a_mask, a_cu = (list(anchor.inputs), anchor.mask, anchor.cu_seqlens) if anchor is not None else ([], None, None)
    op = torch.ops.sara_kernels.cuda_sara_loss.default
    return op(a_inputs, list(target.inputs), a_mask, a_cu, target.mask, target.cu_seqlens, anchor_probs, layer_weights,
              pair_weights, score, temperature, detach_anchor, reduction, divergence)


def pooled_distribution(side: RoutingSide, score: str, temperature: float, normalize: bool = True):
    """(P [L, B, E], n_b [B]) with autograd into the logits; the sums n_b·P without ``normalize``
    (what context parallelism all-reduces, :mod:`sara_kernels.distributed`)."""
    op = torch.ops.sara_kernels.cuda_routing_distribution.default
    return op(list(side.inputs), side.mask, side.cu_seqlens, score, temperature, normalize)
