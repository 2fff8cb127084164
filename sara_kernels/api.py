"""Public entry points: ``sara_loss``, ``SARALoss`` and ``routing_distribution``.

They validate the arguments, pick the backend and hand over to the reference (the
specification, :mod:`sara_kernels.reference`) or to a fused op: the Triton kernels
(:mod:`sara_kernels.ops.routing_js`) or the CUDA C++ extension (:mod:`sara_kernels.ops.cuda`),
which both also fold the final reduction into their kernels.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from . import reference
from ._inputs import RoutingSide, check_options, layer_weight_tensor, routing_side
from .distributed import check_group
from .ops import backend_choice, cuda, routing_js

# The fused backends; both handle the same dtypes, expert counts (E <= 512: one row of experts is
# one tile) and batch sizes (B <= 65535: the second grid axis).
_FUSED = {"triton": routing_js, "cuda": cuda}
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_EXPERTS, MAX_SEQS = routing_js.MAX_EXPERTS, routing_js.MAX_SEQS


def resolve_backend(backend: str, side: RoutingSide) -> str:
    """The backend that runs on ``side``'s logits: ``backend`` itself after checking it can, or
    what ``"auto"`` picks.

    ``"auto"``: the reference for CPU tensors and for dtypes or shapes the fused backends do not
    handle; on CUDA, Triton, or when the CUDA extension is built too, whichever of the two the
    benchmarks measured faster on this GPU architecture at the nearest measured expert count
    (:mod:`.ops.backend_choice`).
    """
    device, dtype, num_experts, num_seqs = side.device, side.dtype, side.num_experts, side.num_seqs
    if backend == "auto":
        if not (device.type == "cuda" and dtype in _FUSED_DTYPES and num_experts <= MAX_EXPERTS and num_seqs <= MAX_SEQS):
            return "reference"
        if not cuda.runs_on(device):
            return "triton"
        return backend_choice.faster_fused_backend(device, num_experts)
    if backend in _FUSED:
        if backend == "cuda":
            cuda.require()
        if dtype not in _FUSED_DTYPES:
            raise TypeError(f"backend={backend!r} takes float32, bfloat16 or float16 logits, got {dtype}; use backend='reference'")
        if num_experts > MAX_EXPERTS:
            raise ValueError(f"backend={backend!r} supports up to E = {MAX_EXPERTS} experts, got E = {num_experts}")
        if num_seqs > MAX_SEQS:
            raise ValueError(f"backend={backend!r} supports up to B = {MAX_SEQS} sequences per call, got B = {num_seqs}")
        if not _FUSED[backend].runs_on(device):
            hint = (" (set TRITON_INTERPRET=1 before importing sara_kernels to run the kernels on the CPU)"
                    if backend == "triton" else "")
            raise ValueError(f"backend={backend!r} needs CUDA tensors, got tensors on {device}{hint}")
    return backend


def sara_loss(
    anchor_logits,
    target_logits,
    anchor_mask: Optional[torch.Tensor] = None,
    target_mask: Optional[torch.Tensor] = None,
    *,
    anchor_cu_seqlens: Optional[torch.Tensor] = None,
    target_cu_seqlens: Optional[torch.Tensor] = None,
    anchor_probs: Optional[torch.Tensor] = None,
    layer_weights=None,
    temperature: float = 1.0,
    score: str = "softmax",
    detach_anchor: bool = True,
    reduction: str = "mean",
    return_per_layer: bool = False,
    backend: str = "auto",
    group=None,
):
    """SARA loss: symmetric Jensen-Shannon divergence between the pooled routing distributions
    of anchor and target sequences, over all given MoE layers.

    Args:
        anchor_logits, target_logits: L router-logit tensors [N, E] (a tuple/list, as in
            ``outputs.router_logits``) or one [L, N, E] tensor. N may differ between the sides.
        anchor_mask, target_mask: [B, S] attention masks, 1 = valid; row n of the logits is token
            (n // S, n % S). ``*_cu_seqlens``: packed sequences instead, an int tensor [B+1].
            With neither, a side is one sequence of N tokens.
        anchor_probs: cached anchor priors [L, B, E] used instead of ``anchor_logits`` (never
            receive gradient).
        layer_weights: w_l per layer (sequence or [L] tensor); default equal weights.
        temperature: τ > 0 dividing the logits before scoring.
        score: ``"softmax"`` or ``"sigmoid"`` (normalised sigmoid).
        detach_anchor: the anchor is a fixed target and gets no gradient (default).
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` ([L, B]).
        return_per_layer: also return the detached per-layer mean JS [L] for logging.
        backend: ``"auto"`` (on CUDA the fused backend measured faster, see :func:`resolve_backend`;
            the reference on CPU) | ``"triton"`` | ``"cuda"`` (the C++ extension, when built) |
            ``"reference"``.
        group: context parallelism: a ``torch.distributed`` process group whose ranks each hold a
            share of every sequence's tokens (the same B sequences, masks/cu_seqlens describing
            the local tokens). Per-sequence sums and token counts are all-reduced once in the
            forward; every rank gets the loss of whole sequences and the gradient for its own
            logits, with no communication in backward.

    A pair whose anchor or target has no valid token is excluded (JS = 0, not counted); with no
    valid pair at all the loss is 0 with zero gradients. The loss is float32 (float64 for float64
    logits on the reference); gradients have the logits' dtype.
    """
    check_options(temperature, score, reduction, backend)
    check_group(group)
    anchor, target, priors = reference.prepare_pair(
        anchor_logits, target_logits, anchor_mask, target_mask, anchor_cu_seqlens, target_cu_seqlens, anchor_probs,
        layers_checked_natively=backend == "cuda",
    )
    weights = layer_weight_tensor(layer_weights, target.num_layers, target.device)
    backend = resolve_backend(backend, target)
    if group is not None or backend == "reference":
        # Context parallel: the reduction over the group sits between pooling and JS, so a fused
        # backend pools with its kernels and the small [L, B, E] rest runs in PyTorch.
        module = _FUSED.get(backend, reference)
        pool = functools.partial(module.pooled_distribution, score=score, temperature=float(temperature), group=group)
        js, valid = reference.pair_js(anchor, target, priors, score, temperature, detach_anchor, pool)
        loss, per_layer = reference.reduce_pair_js(js, valid, weights, reduction)
    else:
        loss, per_layer = _FUSED[backend].sara_loss(
            anchor, target, priors, weights, score, float(temperature), bool(detach_anchor), reduction
        )
    return (loss, per_layer) if return_per_layer else loss


def routing_distribution(
    logits,
    mask: Optional[torch.Tensor] = None,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    score: str = "softmax",
    temperature: float = 1.0,
    backend: str = "auto",
    group=None,
) -> torch.Tensor:
    """Pooled routing distribution P [L, B, E] of each layer and sequence (float32 on Triton).

    A sequence without valid tokens gets P = 0 (never NaN). Differentiable in ``logits``.
    ``group``: context parallelism, as in :func:`sara_loss`.
    """
    check_options(temperature, score, None, backend)
    check_group(group)
    side = routing_side(logits, mask, cu_seqlens, "routing", layers_checked_natively=backend == "cuda")
    backend = resolve_backend(backend, side)
    if backend == "reference":
        return reference.pooled_distribution(side, score, temperature, group)[0]
    return _FUSED[backend].routing_distribution(side, score, float(temperature), group)


class SARALoss(torch.nn.Module):
    """``nn.Module`` form of :func:`sara_loss`; the constructor fixes the keyword options."""

    def __init__(
        self,
        layer_weights=None,
        temperature: float = 1.0,
        score: str = "softmax",
        detach_anchor: bool = True,
        reduction: str = "mean",
        backend: str = "auto",
    ):
        super().__init__()
        check_options(temperature, score, reduction, backend)
        self.layer_weights = layer_weights
        self.temperature = temperature
        self.score = score
        self.detach_anchor = detach_anchor
        self.reduction = reduction
        self.backend = backend

    def forward(self, anchor_logits, target_logits, anchor_mask=None, target_mask=None, **kwargs):
        options = dict(
            layer_weights=self.layer_weights,
            temperature=self.temperature,
            score=self.score,
            detach_anchor=self.detach_anchor,
            reduction=self.reduction,
            backend=self.backend,
        )
        options.update(kwargs)
        return sara_loss(anchor_logits, target_logits, anchor_mask, target_mask, **options)

    def extra_repr(self) -> str:
        return (
            f"score={self.score!r}, temperature={self.temperature}, detach_anchor={self.detach_anchor}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}"
        )
