r"""Pure-PyTorch reference of the SARA loss: the executable specification.

Symbols (the Triton kernels in :mod:`sara_kernels.ops.triton.kernels` use the same ones):

* z ∈ R^E: one token's router logits in one layer, τ the temperature.
* s(z): the token's routing score, ``softmax(z / τ)`` or, for ``score="sigmoid"``,
  σ(z/τ) / Σ_e σ(z/τ)_e (normalised sigmoid of DeepSeek-V3 / GLM-4.5 style routers).
* P_{l,b} = (1 / n_b) Σ_{valid tokens of sequence b} s(z): the pooled routing distribution
  of layer l and sequence b, n_b its number of valid tokens (P = 0 when n_b = 0).
* D_{l,b}, the divergence of pair b in layer l (natural log, 0·log 0 = 0), by ``divergence``:
  ``"js"``: JS = ½ KL(P^a ‖ M) + ½ KL(P^t ‖ M) with M = ½ (P^a + P^t);
  ``"kl"``: KL(P^a ‖ P^t); ``"reverse_kl"``: KL(P^t ‖ P^a); KL(P ‖ Q) = Σ_e P_e log(P_e / Q_e).
* Zero probabilities in KL(P ‖ Q): a term with P_e = 0 is 0. P_e > 0 with Q_e = 0 makes the
  divergence +∞ mathematically; Q_e = 0 happens only where every token of the sequence scores
  expert e exactly 0 (−inf logits: a disabled or masked expert; or a score below float32's
  range). Rule: Q_e is floored at Q_MIN = 2^-126, the smallest normal float32, so that term is
  P_e log(P_e / 2^-126) ≤ 87.34·P_e, finite with finite gradients, and the floor has zero
  derivative (no gradient flows into a Q_e below it). Q_MIN being float32's smallest normal,
  a subnormal Q_e (which a GPU flushes to 0) gives the same value on every device.
* A pair is valid when both n^a_b > 0 and n^t_b > 0 (n^t_b > 0 with priors); an invalid pair has
  D = 0. π_b, the pair's weight: ``pair_weights[b]`` (1 without), 0 for an invalid pair.
* reduction ``"mean"``: Σ_l w_l · (Σ_b π_b D_{l,b} / Σ_b π_b) / Σ_l w_l, and 0 (with zero
  gradients) when Σ_b π_b = 0; ``"sum"``: Σ_l Σ_b w_l π_b D_{l,b}; ``"none"``: π_b D_{l,b} as an
  [L, B] tensor. The per-layer value logged beside the loss is Σ_b π_b D_{l,b} / Σ_b π_b.

Gradients come from autograd. Arithmetic is in the promotion of the logits' dtype with
float32 (float64 logits stay float64, which is how the tests build their ground truth).
"""

from __future__ import annotations

from typing import Optional

import torch

from ._inputs import RoutingSide, check_cu_seqlens_values

# The floor of the second distribution of a KL divergence (see the module docstring).
Q_MIN = 2.0**-126


DTYPES = MAX_EXPERTS = MAX_SEQS = None  # every floating dtype, any E and B (see sara_kernels.backends)


def available() -> bool:
    return True


def require() -> None:
    """Nothing to check: the reference is plain PyTorch."""


def runs_on(device: torch.device) -> bool:
    return True


def routing_scores(logits: torch.Tensor, score: str = "softmax", temperature: float = 1.0) -> torch.Tensor:
    """s(z) for each row of ``logits`` [..., E], in float32 or wider."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    if score == "softmax":
        return torch.softmax(z, dim=-1)
    # σ/Σσ as the softmax of log σ: the same quotient, but no 0/0 where every σ(z/τ) of a row
    # underflows (z/τ ≲ −88 in float32, −745 in float64).
    return torch.softmax(torch.nn.functional.logsigmoid(z), dim=-1)


def sequence_membership(side: RoutingSide) -> torch.Tensor:
    """Bool [B, N]: entry (b, n) says token n is a valid token of sequence b."""
    check_cu_seqlens_values(side)
    n = torch.arange(side.num_tokens, device=side.device)
    b = torch.arange(side.num_seqs, device=side.device)
    if side.cu_seqlens is not None:
        cu = side.cu_seqlens.to(torch.int64)
        return (n[None, :] >= cu[:-1, None]) & (n[None, :] < cu[1:, None])
    member = (n[None, :] // side.seq_len) == b[:, None]
    if side.mask is not None:
        member = member & (side.mask.reshape(-1) != 0)[None, :]
    return member


def pooled_sums(side: RoutingSide, score: str, temperature: float):
    """(Σ s over each sequence's valid tokens [L, B, E], n_b [B])."""
    member = sequence_membership(side)
    token_valid = member.any(dim=0)
    sums = []
    for z in side.layers:
        # Padding may hold anything (NaN, ±inf): replaced before the score, so that neither the
        # sums nor the score's backward (NaN from a NaN row, even where its output is dropped)
        # see it, and its gradient is exactly 0.
        z = torch.where(token_valid[:, None], z, torch.zeros((), dtype=z.dtype, device=z.device))
        s = routing_scores(z, score, temperature)
        sums.append(member.to(s.dtype) @ s)
    return torch.stack(sums), member.sum(dim=1)


def pooled_distribution(side: RoutingSide, score: str, temperature: float, normalize: bool = True):
    """(P [L, B, E], n_b [B]); P is 0 for a sequence with no valid token. Without ``normalize``
    the sums n_b·P (what context parallelism all-reduces, :mod:`sara_kernels.distributed`)."""
    sums, counts = pooled_sums(side, score, temperature)
    if not normalize:
        return sums, counts
    return sums / counts.clamp(min=1).to(sums.dtype)[None, :, None], counts


def _kl_to_mixture(p: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Σ_e p_e log(p_e / m_e) with m = total/2 and 0·log 0 = 0; NaN in p propagates.

    p/m is taken as 2p/total: where both distributions sit at the smallest subnormals, ½·total
    rounds to 0 and p/m would make the divergence infinite. The value of log(2p/total) comes
    from the quotient (accurate where p ≈ m, where log(2p) − log(total) cancels), its derivatives
    from log(2p) − log(total): the quotient's own derivative passes through 2p/total², which
    overflows where total is subnormal and turns the gradient into NaN."""
    zero = p == 0
    one = torch.ones((), dtype=p.dtype, device=p.device)
    # The masked branch takes 1 and 1, so neither the value nor its gradient can be NaN.
    p, total = torch.where(zero, one, p), torch.where(zero, one, total)
    log_diff = torch.log(2 * p) - torch.log(total)
    log_ratio = torch.log(2 * p / total).detach() + (log_diff - log_diff.detach())
    return torch.where(zero, torch.zeros_like(p), p * log_ratio).sum(dim=-1)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Symmetric Jensen-Shannon divergence over the last dimension, natural log."""
    total = p + q
    return 0.5 * (_kl_to_mixture(p, total) + _kl_to_mixture(q, total))


def layer_shares(layer_weights: Optional[torch.Tensor], num_layers: int) -> torch.Tensor:
    """Each layer's share [L] of the loss's mean over layers: w / Σw, or 1/L without weights.

    Also what a router that computes one layer's term alone (the Megatron integration) weights
    it by, so that the layers' terms add up to the loss."""
    if layer_weights is None:
        return torch.full((num_layers,), 1.0 / num_layers, dtype=torch.float64)
    return layer_weights / layer_weights.sum()


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) over the last dimension with the module's zero rule (q floored at Q_MIN, 0 where
    p = 0). Value from log(p/q) (accurate where p ≈ q), derivatives from log p − log q (the
    quotient's own derivative passes through p/q², which underflows q² at the floor)."""
    zero = p == 0
    one = torch.ones((), dtype=p.dtype, device=p.device)
    q = torch.where(q < Q_MIN, torch.full((), Q_MIN, dtype=q.dtype, device=q.device), q)
    p, q = torch.where(zero, one, p), torch.where(zero, one, q)
    log_diff = torch.log(p) - torch.log(q)
    log_ratio = torch.log(p / q).detach() + (log_diff - log_diff.detach())
    return torch.where(zero, torch.zeros_like(p), p * log_ratio).sum(dim=-1)


def divergence_of(p_anchor: torch.Tensor, p_target: torch.Tensor, divergence: str) -> torch.Tensor:
    """D over the last dimension for ``divergence`` "js" | "kl" | "reverse_kl" (module docstring)."""
    if divergence == "js":
        return js_divergence(p_anchor, p_target)
    if divergence == "kl":
        return _kl(p_anchor, p_target)
    return _kl(p_target, p_anchor)


def reduce_pair_divergence(divergence: torch.Tensor, pair_weight: torch.Tensor, layer_weights: Optional[torch.Tensor],
                           reduction: str):
    """Reduce D [L, B] (0 for invalid pairs) with the pairs' weights π [B] (0 for invalid pairs)
    to the loss; also the detached per-layer weighted mean [L].

    Shared by every backend, so the reduction is written once.
    """
    weighted = divergence * pair_weight.to(divergence.dtype)[None, :]
    total = pair_weight.sum().to(divergence.dtype)
    per_layer = weighted.sum(dim=1) / torch.where(total > 0, total, torch.ones_like(total))
    if reduction == "none":
        loss = weighted
    elif reduction == "sum":
        loss = weighted.sum() if layer_weights is None else (layer_weights.to(weighted.dtype)[:, None] * weighted).sum()
    elif layer_weights is None:
        loss = per_layer.mean()
    else:
        loss = (layer_shares(layer_weights.to(weighted.dtype), len(per_layer)) * per_layer).sum()
    return loss, per_layer.detach()


def pair_divergence(pooled_anchor, pooled_target, anchor_probs: Optional[torch.Tensor], pair_weights: Optional[torch.Tensor],
                    detach_anchor: bool, divergence: str):
    """(D [L, B] with 0 for invalid pairs, π [B]: ``pair_weights`` or 1, 0 for invalid pairs) from
    each side's pooled (P [L, B, E], n_b [B]); ``pooled_anchor`` is None with priors
    ``anchor_probs`` [L, B, E]."""
    p_t, n_t = pooled_target
    if pooled_anchor is None:
        p_a, valid = anchor_probs.to(p_t.dtype), n_t > 0
    else:
        p_a, n_a = pooled_anchor
        valid = (n_a > 0) & (n_t > 0)
    if detach_anchor or pooled_anchor is None:
        p_a = p_a.detach()
    d = divergence_of(p_a, p_t, divergence)
    weight = valid.to(d.dtype)
    if pair_weights is not None:
        weight = torch.where(valid, pair_weights.detach().to(d.dtype), torch.zeros_like(weight))
    return torch.where(valid[None, :], d, torch.zeros_like(d)), weight


def sara_loss(anchor: Optional[RoutingSide], target: RoutingSide, anchor_probs: Optional[torch.Tensor],
              layer_weights: Optional[torch.Tensor], pair_weights: Optional[torch.Tensor], score: str,
              temperature: float, detach_anchor: bool, reduction: str, divergence: str):
    """(loss, detached per-layer weighted mean divergence [L]) of validated sides (the backend entry
    point of :mod:`sara_kernels.backends`; users call :func:`sara_kernels.sara_loss`)."""
    pooled_a = pooled_distribution(anchor, score, temperature) if anchor is not None else None
    d, weight = pair_divergence(pooled_a, pooled_distribution(target, score, temperature), anchor_probs, pair_weights,
                                detach_anchor, divergence)
    return reduce_pair_divergence(d, weight, layer_weights, reduction)
