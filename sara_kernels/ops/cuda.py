"""The CUDA C++ backend (``csrc/``): the same fused op as :mod:`sara_kernels.ops.routing_js`, with
argument handling, launch planning and autograd in C++ (``torch.ops.sara_kernels.cuda_*``), so a
call costs microseconds of CPU. Same kernels structure, same math, same results up to float32
rounding; this module only loads the extension, registers the shapes torch.compile needs and
makes the calls.

The extension is optional: it is built by ``pip install --no-build-isolation -e .`` where torch
has CUDA and a CUDA toolkit is present (see setup.py). Without it ``backend="cuda"`` raises
:class:`CUDABackendUnavailable`, saying how to build it.
"""

from __future__ import annotations

import importlib

import torch

from .._inputs import RoutingSide
from ..distributed import all_reduce_sums_and_counts
from . import routing_js

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
    """Shapes for torch.compile. The halves take the arguments of the Triton backend's custom ops,
    so they share those ops' fake implementations."""
    ops = torch.ops.sara_kernels
    torch.library.register_fake(ops.cuda_sara_loss_fwd.default)(routing_js._sara_fwd_fake)
    torch.library.register_fake(ops.cuda_sara_loss_bwd.default)(routing_js._sara_bwd_fake)
    torch.library.register_fake(ops.cuda_routing_distribution_fwd.default)(routing_js._distribution_fwd_fake)
    torch.library.register_fake(ops.cuda_routing_distribution.default)(routing_js._distribution_fwd_fake)

    @torch.library.register_fake(ops.cuda_sara_loss.default)
    def _loss_fake(anchor, target, anchor_mask, anchor_cu_seqlens, target_mask, target_cu_seqlens, anchor_probs,
                   layer_weights, score, temperature, detach_anchor, reduction):
        return routing_js._sara_fwd_fake(anchor, target, anchor_mask, anchor_cu_seqlens, target_mask,
                                         target_cu_seqlens, anchor_probs, layer_weights, score, temperature,
                                         reduction)[:2]

    @torch.library.register_fake(ops.cuda_routing_distribution_bwd.default)
    def _distribution_bwd_fake(grad_probs, logits, mask, cu_seqlens, count, score, temperature, normalize):
        return routing_js._distribution_bwd_fake(grad_probs, logits, mask, cu_seqlens, count, score, temperature)


if _C is not None:
    _register_fakes()


def sara_loss(anchor, target: RoutingSide, anchor_probs, layer_weights, score: str, temperature: float,
              detach_anchor: bool, reduction: str):
    """(loss, detached per-layer mean JS [L]) with autograd into the logits (C++ autograd)."""
    if anchor_probs is not None:
        anchor_probs = anchor_probs.detach()
    if layer_weights is not None:
        layer_weights = layer_weights.detach()
    a_inputs, a_mask, a_cu = (list(anchor.inputs), anchor.mask, anchor.cu_seqlens) if anchor is not None else ([], None, None)
    op = torch.ops.sara_kernels.cuda_sara_loss.default
    return op(a_inputs, list(target.inputs), a_mask, a_cu, target.mask, target.cu_seqlens, anchor_probs, layer_weights,
              score, temperature, detach_anchor, reduction)


def pooled_distribution(side: RoutingSide, score: str, temperature: float, group=None):
    """(P [L, B, E], n_b [B]) with autograd into the logits. With a process ``group`` the op
    returns this rank's sums, which are all-reduced (gradient passing through) and normalised
    here, as in :mod:`sara_kernels.distributed`."""
    inputs = list(side.inputs)
    op = torch.ops.sara_kernels.cuda_routing_distribution.default
    if group is None:
        return op(inputs, side.mask, side.cu_seqlens, score, temperature, True)
    sums, count = op(inputs, side.mask, side.cu_seqlens, score, temperature, False)
    sums, count = all_reduce_sums_and_counts(sums, count, group)
    return sums / count.clamp(min=1.0)[None, :, None], count


def routing_distribution(side: RoutingSide, score: str, temperature: float, group=None):
    return pooled_distribution(side, score, temperature, group)[0]
