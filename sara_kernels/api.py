"""Public entry points: ``sara_loss``, ``SARALoss`` and ``routing_distribution``.

They validate the arguments, pick the backend and hand over to the reference (the
specification, :mod:`sara_kernels.reference`) or to a fused op: the Triton kernels
(:mod:`sara_kernels.ops.triton`) or the CUDA C++ extension (:mod:`sara_kernels.ops.cuda`),
which both also fold the final reduction into their kernels. The backends are those of the
registry :mod:`sara_kernels.backends`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import backends, distributed
from ._inputs import (RoutingSide, SequenceLayout, check_layers, check_options, layer_weight_tensor, pair_weight_tensor,
                      prepare_pair, routing_side)
from .distributed import check_group
from .ops import backend_choice


class _Resolved(NamedTuple):
    """A registry entry with its module imported and its limits read once: the checks below run per call."""

    entry: backends.Backend
    module: object
    dtypes: Optional[tuple]
    max_experts: Optional[int]
    max_seqs: Optional[int]

    def handles(self, dtype, num_experts: int, num_seqs: int) -> bool:
        return ((self.dtypes is None or dtype in self.dtypes)
                and (self.max_experts is None or num_experts <= self.max_experts)
                and (self.max_seqs is None or num_seqs <= self.max_seqs))


def _resolve(entry: backends.Backend) -> _Resolved:
    module = entry.module
    return _Resolved(entry, module, module.DTYPES, module.MAX_EXPERTS, module.MAX_SEQS)


_BACKENDS = {name: _resolve(entry) for name, entry in backends.REGISTRY.items()}
_AUTO_CANDIDATES = tuple(_BACKENDS[name] for name in backends.FUSED)


def _dtype_names(dtypes) -> str:
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def resolve_backend(backend: str, side: RoutingSide) -> str:
    """The backend that runs on ``side``'s logits: ``backend`` itself after checking it can, or
    what ``"auto"`` picks.

    ``"auto"``: the reference for CPU tensors and for dtypes or shapes the fused backends do not
    handle; on CUDA the one fused backend that runs there, or of several (Triton and the CUDA
    extension, when built), whichever the benchmarks measured faster on this GPU architecture at
    the nearest measured expert count (:mod:`.ops.backend_choice`).
    """
    device, dtype, num_experts, num_seqs = side.device, side.dtype, side.num_experts, side.num_seqs
    if backend == "auto":
        if device.type != "cuda":
            return "reference"
        candidates = [b.entry.name for b in _AUTO_CANDIDATES
                      if b.handles(dtype, num_experts, num_seqs) and b.module.runs_on(device)]
        if len(candidates) > 1:
            return backend_choice.faster_fused_backend(device, num_experts, candidates)
        return candidates[0] if candidates else "reference"
    b = _BACKENDS[backend]
    b.module.require()
    if b.dtypes is not None and dtype not in b.dtypes:
        raise TypeError(f"backend={backend!r} takes {_dtype_names(b.dtypes)} logits, got {dtype}; "
                        "use backend='reference'")
    if b.max_experts is not None and num_experts > b.max_experts:
        raise ValueError(f"backend={backend!r} supports up to E = {b.max_experts} experts, got E = {num_experts}")
    if b.max_seqs is not None and num_seqs > b.max_seqs:
        raise ValueError(f"backend={backend!r} supports up to B = {b.max_seqs} sequences per call, got B = {num_seqs}")
    if not b.module.runs_on(device):
        raise ValueError(f"backend={backend!r} needs CUDA tensors, got tensors on {device}{b.entry.device_hint}")
    return backend


def _backend_module(backend: str, target: RoutingSide, anchor: Optional[RoutingSide] = None):
    """The module of the backend that runs on these sides, after the check of every layer of a
    tuple against the first, which a backend whose entry says ``checks_layers`` makes itself."""
    b = _BACKENDS[resolve_backend(backend, target)]
    if not b.entry.checks_layers:
        check_layers(target)
        if anchor is not None:
            check_layers(anchor)
    return b.module


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
    pair_weights=None,
    temperature: float = 1.0,
    score: str = "softmax",
    detach_anchor: bool = True,
    reduction: str = "mean",
    divergence: str = "js",
    return_per_layer: bool = False,
    backend: str = "auto",
    group=None,
):
    """SARA loss: a divergence (symmetric Jensen-Shannon by default) between the pooled routing
    distributions of anchor and target sequences, over all given MoE layers. The math, the
    zero-probability rule of the KL divergences included, is :mod:`sara_kernels.reference`'s.

    Args:
        anchor_logits, target_logits: L router-logit tensors [N, E] (a tuple/list, as in
            ``outputs.router_logits``) or one [L, N, E] tensor. N may differ between the sides.
        anchor_mask, target_mask: [B, S] attention masks, 1 = valid; row n of the logits is token
            (n // S, n % S). ``*_cu_seqlens``: packed sequences instead, an int tensor [B+1].
            With neither, a side is one sequence of N tokens.
        anchor_probs: cached anchor priors [L, B, E] used instead of ``anchor_logits`` (never
            receive gradient).
        layer_weights: w_l per layer (sequence or [L] tensor); default equal weights.
        pair_weights: π_b per pair (sequence or [B] tensor, finite, >= 0); default 1. "mean" is
            then Σ_b π_b D_{l,b} / Σ_b π_b per layer (0 with zero gradients when no weight is
            left), "sum" Σ_b π_b D_{l,b}, "none" π_b D_{l,b}. Values on a GPU are checked by a
            device assertion (no host sync).
        temperature: τ > 0 dividing the logits before scoring.
        score: ``"softmax"`` or ``"sigmoid"`` (normalised sigmoid).
        detach_anchor: the anchor is a fixed target and gets no gradient (default).
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` ([L, B]).
        divergence: ``"js"`` (symmetric Jensen-Shannon) | ``"kl"``: KL(P_anchor ‖ P_target) |
            ``"reverse_kl"``: KL(P_target ‖ P_anchor).
        return_per_layer: also return the detached per-layer mean divergence [L] for logging.
        backend: ``"auto"`` (on CUDA the fused backend measured faster, see :func:`resolve_backend`;
            the reference on CPU) or a backend's name: :data:`sara_kernels.backends.CHOICES`, each
            described in ``sara_kernels.backends.HELP``.
        group: context parallelism: a ``torch.distributed`` process group whose ranks each hold a
            share of every sequence's tokens (the same B sequences, masks/cu_seqlens describing
            the local tokens). Per-sequence sums and token counts are all-reduced once in the
            forward; every rank gets the loss of whole sequences and the gradient for its own
            logits, with no communication in backward.

    A pair whose anchor or target has no valid token is excluded (divergence 0, not counted); with
    no valid (or no weighted) pair at all the loss is 0 with zero gradients. The loss is float32 (float64 for float64
    logits on the reference); gradients have the logits' dtype.
    """
    loss, per_layer = sara_loss_of_layouts(
        anchor_logits, target_logits, SequenceLayout(anchor_mask, anchor_cu_seqlens),
        SequenceLayout(target_mask, target_cu_seqlens), anchor_probs, layer_weights, pair_weights, temperature, score,
        detach_anchor, reduction, divergence, backend, group)
    return (loss, per_layer) if return_per_layer else loss


def sara_loss_of_layouts(anchor_logits, target_logits, anchor_layout: SequenceLayout, target_layout: SequenceLayout,
                         anchor_probs=None, layer_weights=None, pair_weights=None, temperature: float = 1.0,
                         score: str = "softmax", detach_anchor: bool = True, reduction: str = "mean",
                         divergence: str = "js", backend: str = "auto", group=None):
    """:func:`sara_loss` with each side's layout given as a :class:`~sara_kernels.term.SequenceLayout`
    (what the integrations build, through :func:`sara_kernels.term.sara_term`); returns
    (loss, detached per-layer divergence [L])."""
    check_options(temperature, score, reduction, backend, divergence)
    check_group(group)
    temperature = float(temperature)  # as every backend takes it, down to the kernels' 1/τ
    anchor, target, priors = prepare_pair(anchor_logits, target_logits, anchor_layout, target_layout, anchor_probs)
    weights = layer_weight_tensor(layer_weights, target.num_layers, target.device)
    pair_weights = pair_weight_tensor(pair_weights, target.num_seqs, target.device)
    module = _backend_module(backend, target, anchor)
    if group is None:
        loss, per_layer = module.sara_loss(anchor, target, priors, weights, pair_weights, score, temperature,
                                           bool(detach_anchor), reduction, divergence)
    else:
        # Context parallel: the reduction over the group sits between pooling and the divergence,
        # so a fused backend pools with its kernels and the small [L, B, E] rest runs in PyTorch.
        loss, per_layer = distributed.sara_loss(module.pooled_distribution, anchor, target, priors, weights,
                                                pair_weights, score, temperature, bool(detach_anchor), reduction,
                                                divergence, group)
    return loss, per_layer


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
    temperature = float(temperature)
    side = routing_side(logits, SequenceLayout(mask, cu_seqlens), "routing")
    module = _backend_module(backend, side)
    return distributed.pooled_distribution(module.pooled_distribution, side, score, temperature, group)[0]


class SARALoss(torch.nn.Module):
    """``nn.Module`` form of :func:`sara_loss`; the constructor fixes the keyword options (per-call
    ones, ``pair_weights`` among them, go to ``forward`` as keywords)."""

    def __init__(
        self,
        layer_weights=None,
        temperature: float = 1.0,
        score: str = "softmax",
        detach_anchor: bool = True,
        reduction: str = "mean",
        backend: str = "auto",
        divergence: str = "js",
    ):
        super().__init__()
        check_options(temperature, score, reduction, backend, divergence)
        self.layer_weights = layer_weights
        self.temperature = temperature
        self.score = score
        self.detach_anchor = detach_anchor
        self.reduction = reduction
        self.backend = backend
        self.divergence = divergence

    def forward(self, anchor_logits, target_logits, anchor_mask=None, target_mask=None, **kwargs):
        options = dict(
            layer_weights=self.layer_weights,
            temperature=self.temperature,
            score=self.score,
            detach_anchor=self.detach_anchor,
            reduction=self.reduction,
            backend=self.backend,
            divergence=self.divergence,
        )
        options.update(kwargs)
        return sara_loss(anchor_logits, target_logits, anchor_mask, target_mask, **options)

    def extra_repr(self) -> str:
        return (
            f"score={self.score!r}, temperature={self.temperature}, detach_anchor={self.detach_anchor}, "
            f"reduction={self.reduction!r}, divergence={self.divergence!r}, backend={self.backend!r}"
        )
