"""The op contract that both fused backends implement: the Triton kernels (:mod:`sara_kernels.ops.triton`)
and the CUDA C++ extension (:mod:`sara_kernels.ops.cuda`, ``csrc/routing_js_ops.cpp``).

One home for what the two must agree on: the limits on the inputs, the op schemas (the Triton
backend registers its custom ops with them; the C++ ``m.def`` strings must match them, which
tests/ops/test_contract.py checks against csrc/ and the emulated build), the shapes the ops return
(the fake implementations torch.compile traces with) and the rule that cuts a sequence into slices.
"""

from __future__ import annotations

import functools

import torch

MAX_EXPERTS = 512  # one row of experts is one tile
MAX_SEQS = 65535  # B is the second grid axis, which CUDA limits to 65535
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_SIDE = "Tensor[] {0}, Tensor? {0}_mask, Tensor? {0}_cu_seqlens"

# The op halves (forward, backward) by name: the Triton op is ``sara_kernels::<name>``, the C++ one
# ``sara_kernels::cuda_<name>``. A side is a list of [N, E] tensors or a one-element list holding one
# [L, N, E] tensor; ``anchor`` is empty with priors.
SCHEMAS = {
    "sara_loss_fwd": (
        "(Tensor[] anchor, Tensor[] target, Tensor? anchor_mask, Tensor? anchor_cu_seqlens, Tensor? target_mask, "
        "Tensor? target_cu_seqlens, Tensor? anchor_probs, Tensor? layer_weights, Tensor? pair_weights, str score, "
        "float temperature, str reduction, str divergence) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "sara_loss_bwd": (
        "(Tensor grad_loss, Tensor[] anchor, Tensor[] target, Tensor? anchor_mask, Tensor? anchor_cu_seqlens, "
        "Tensor? target_mask, Tensor? target_cu_seqlens, Tensor ga, Tensor gt, Tensor stats, Tensor layer_coef, "
        "str score, float temperature, bool anchor_grad) -> (Tensor, Tensor)"
    ),
    "routing_distribution_fwd": (
        "(Tensor[] logits, Tensor? mask, Tensor? cu_seqlens, str score, float temperature, bool normalize) "
        "-> (Tensor, Tensor)"
    ),
    "routing_distribution_bwd": (
        "(Tensor grad_probs, Tensor[] logits, Tensor? mask, Tensor? cu_seqlens, Tensor count, str score, "
        "float temperature, bool normalize) -> Tensor"
    ),
}
# The C++ backend's autograd ops (its Functions are in C++; the Triton backend's in Python).
CUDA_AUTOGRAD_SCHEMAS = {
    "sara_loss": (
        "(Tensor[] anchor, Tensor[] target, Tensor? anchor_mask, Tensor? anchor_cu_seqlens, Tensor? target_mask, "
        "Tensor? target_cu_seqlens, Tensor? anchor_probs, Tensor? layer_weights, Tensor? pair_weights, str score, "
        "float temperature, bool detach_anchor, str reduction, str divergence) -> (Tensor, Tensor)"
    ),
    "routing_distribution": SCHEMAS["routing_distribution_fwd"],
}


def num_splits(num_tokens: int, num_seqs: int, num_layers: int, sm_count: int, rows_per_iteration: int) -> int:
    """How many slices each sequence is cut into: enough programs for ~4 waves on ``sm_count`` SMs,
    but never slices shorter than 4 iterations of ``rows_per_iteration`` rows (the partials would
    cost more than they save). csrc/routing_js.h ``split_rule`` is the same rule."""
    wanted = -(-4 * sm_count // (num_layers * num_seqs))
    rows_per_seq = -(-num_tokens // num_seqs)
    return max(1, min(wanted, -(-rows_per_seq // (4 * rows_per_iteration)), 1024))


def num_seqs(mask, cu_seqlens) -> int:
    if mask is not None:
        return mask.shape[0]
    return cu_seqlens.shape[0] - 1 if cu_seqlens is not None else 1


def side_shape(logits) -> tuple:
    """(L, N, E) of a side given as a list of [N, E] tensors or as [one [L, N, E] tensor]."""
    first = logits[0]
    return tuple(first.shape) if first.dim() == 3 else (len(logits), *first.shape)


# ----------------------------------------------------------------------------------------
# Fake implementations: the ops' output shapes, for torch.compile
# ----------------------------------------------------------------------------------------


def sara_loss_fwd_fake(anchor, target, anchor_mask, anchor_cu_seqlens, target_mask, target_cu_seqlens, anchor_probs,
                       layer_weights, pair_weights, score, temperature, reduction, divergence):
    """(loss, per-layer weighted mean divergence [L], G^a, G^t [L, B, E], stats [3, B], k [L]);
    loss [L, B] for "none"."""
    L, _, E = side_shape(target)
    B = num_seqs(target_mask, target_cu_seqlens)
    new = functools.partial(target[0].new_empty, dtype=torch.float32)
    loss = new((L, B)) if reduction == "none" else new(())
    return loss, new(L), new((L, B, E)), new((L, B, E)), new((3, B)), new(L)


def sara_loss_bwd_fake(grad_loss, anchor, target, anchor_mask, anchor_cu_seqlens, target_mask, target_cu_seqlens,
                       ga, gt, stats, layer_coef, score, temperature, anchor_grad):
    """(∂/∂anchor [L, N_a, E] or an empty tensor, ∂/∂target [L, N_t, E]) in the logits' dtype."""
    grad_t = target[0].new_empty(side_shape(target))
    grad_a = anchor[0].new_empty(side_shape(anchor)) if anchor_grad else grad_loss.new_empty(0)
    return grad_a, grad_t


def routing_distribution_fwd_fake(logits, mask, cu_seqlens, score, temperature, normalize):
    """(P [L, B, E], n_b [B]), float32 (the sums n_b·P without ``normalize``)."""
    L, _, E = side_shape(logits)
    B = num_seqs(mask, cu_seqlens)
    return logits[0].new_empty((L, B, E), dtype=torch.float32), logits[0].new_empty(B, dtype=torch.float32)


def routing_distribution_bwd_fake(grad_probs, logits, mask, cu_seqlens, count, score, temperature, normalize):
    """∂/∂logits [L, N, E] in the logits' dtype."""
    return logits[0].new_empty(side_shape(logits))


def sara_loss_fake(anchor, target, anchor_mask, anchor_cu_seqlens, target_mask, target_cu_seqlens, anchor_probs,
                   layer_weights, pair_weights, score, temperature, detach_anchor, reduction, divergence):
    """(loss, per-layer weighted mean divergence [L]) of the C++ autograd op."""
    return sara_loss_fwd_fake(anchor, target, anchor_mask, anchor_cu_seqlens, target_mask, target_cu_seqlens,
                              anchor_probs, layer_weights, pair_weights, score, temperature, reduction, divergence)[:2]


FAKES = {
    "sara_loss_fwd": sara_loss_fwd_fake,
    "sara_loss_bwd": sara_loss_bwd_fake,
    "routing_distribution_fwd": routing_distribution_fwd_fake,
    "routing_distribution_bwd": routing_distribution_bwd_fake,
}
CUDA_AUTOGRAD_FAKES = {"sara_loss": sara_loss_fake, "routing_distribution": routing_distribution_fwd_fake}
