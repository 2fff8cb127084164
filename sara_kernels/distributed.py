"""Context parallelism: the tokens of each sequence split across the ranks of a process group.

Pooling is a sum over a sequence's tokens, so each rank pools the tokens it holds and one
all-reduce of the per-sequence sums and token counts (``[L, B, E]`` and ``[B]`` per side) gives
every rank the pooled distributions of whole sequences. Every rank then computes the same
loss, and the gradient of that loss with respect to a rank's own logits needs no
communication: the all-reduce passes the gradient through unchanged in backward (an
all-reduce of the gradient would count it once per rank).

The collective is a functional one (``torch.distributed._functional_collectives``), which
``torch.compile`` traces as a graph node.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol

from . import reference


def check_group(group) -> None:
    if group is None:
        return
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group: expected a torch.distributed ProcessGroup (or None), got {type(group).__name__}")


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    return funcol.wait_tensor(funcol.all_reduce(x, "sum", group))


class _AllReduceSum(torch.autograd.Function):
    """Σ over the ranks in forward; the gradient passes through (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def all_reduce_sums_and_counts(sums: torch.Tensor, counts: torch.Tensor, group):
    """(Σ_ranks sums, Σ_ranks counts) in one all-reduce of a flat buffer in ``sums``' dtype
    (token counts stay exact: below 2^24 in fp32). Differentiable in ``sums`` (pass-through);
    inside a fused op's forward, where grad mode is off, it is a plain all-reduce."""
    flat = torch.cat([sums.reshape(-1), counts.to(sums.dtype)])
    reduced = _AllReduceSum.apply(flat, group)
    return reduced[: sums.numel()].view(sums.shape), reduced[sums.numel() :].detach()


def pooled_distribution(pool, side, score: str, temperature: float, group=None):
    """(P [L, B, E], n_b [B]) of whole sequences, with autograd into this rank's logits: ``pool``
    is a backend's ``pooled_distribution`` (:mod:`sara_kernels.backends`), run on this rank's share
    of the tokens for the sums, which one all-reduce completes before normalising."""
    if group is None:
        return pool(side, score, temperature)
    sums, counts = pool(side, score, temperature, False)
    sums, counts = all_reduce_sums_and_counts(sums, counts, group)
    return sums / counts.clamp(min=1)[None, :, None], counts


def sara_loss(pool, anchor, target, anchor_probs, layer_weights, pair_weights, score: str, temperature: float,
              detach_anchor: bool, reduction: str, divergence: str, group):
    """(loss, detached per-layer weighted mean divergence [L]) of whole sequences from this rank's
    share of their tokens: each side pooled with ``pool`` over the group, then the reference's
    [L, B, E] rest (every rank holds the same B pairs, so the same ``pair_weights``)."""
    pooled_a = pooled_distribution(pool, anchor, score, temperature, group) if anchor is not None else None
    pooled_t = pooled_distribution(pool, target, score, temperature, group)
    d, weight = reference.pair_divergence(pooled_a, pooled_t, anchor_probs, pair_weights, detach_anchor, divergence)
    return reference.reduce_pair_divergence(d, weight, layer_weights, reduction)
