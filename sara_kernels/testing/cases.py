"""What the kernels are checked on: input builders (never zeros: fresh random logits, ragged
masks, packed sequences, empty sequences), the :class:`Case` table of op configurations and the
rounded inputs of one case (:func:`make_inputs`).

Every segmentation of a side (a [B, S] mask, packed cu_seqlens, or none) is built here, by
:func:`segmentation`; tests, the selftest and the benchmarks take it from here.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .. import api
from .oracle import membership

# ---------------------------------------------------------------------------------------------
# Logits and segmentations
# ---------------------------------------------------------------------------------------------


def random_logits(num_layers, num_tokens, num_experts, dtype=torch.float32, scale=2.0, generator=None, device="cpu"):
    """L tensors [N, E] of fresh random logits in ``dtype``, drawn in float32 where ``generator``
    lives (on ``device`` without one: a benchmark's large inputs are not drawn on the host)."""
    where = generator.device if generator is not None else device
    return [
        (scale * torch.randn(num_tokens, num_experts, generator=generator, device=where)).to(dtype).to(device)
        for _ in range(num_layers)
    ]


def padding_mask(lengths: Sequence[int], seq_len: int, device="cpu") -> torch.Tensor:
    """[B, S] int64 mask (a Hugging Face attention mask): the first ``lengths[b]`` tokens of row b valid."""
    lengths = torch.as_tensor(lengths, device=device)
    return (torch.arange(seq_len, device=device)[None, :] < lengths[:, None]).long()


def ragged_mask(num_seqs, seq_len, generator=None, empty=(), device="cpu"):
    """[B, S] int64 mask with random right padding (at least one valid token unless in ``empty``)."""
    lengths = torch.randint(1, seq_len + 1, (num_seqs,), generator=generator)
    for b in empty:
        lengths[b] = 0
    return padding_mask(lengths, seq_len).to(device)


def packed_cu_seqlens(num_seqs, num_tokens, generator=None, empty=(), device="cpu"):
    """[B+1] int32 cu_seqlens over exactly ``num_tokens`` rows, sequences in ``empty`` of length 0."""
    weights = torch.rand(num_seqs, generator=generator) + 0.2
    for b in empty:
        weights[b] = 0
    lengths = torch.floor(weights / weights.sum() * num_tokens).long()
    lengths[int(torch.argmax(weights))] += num_tokens - int(lengths.sum())
    cu = torch.zeros(num_seqs + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    return cu.to(device)


SEGMENTATIONS = ("none", "mask", "cu_seqlens")


@dataclass(frozen=True)
class Segmentation:
    """A test case's side: how many rows (``num_tokens``) to draw logits for, and how they are cut
    into sequences (a mask, cu_seqlens, or neither: one sequence).

    Not :class:`sara_kernels.term.SequenceLayout`, the layout the integrations hand to the loss:
    that one takes its row count from the logits it comes with, while a case is described before
    its logits exist (``num_tokens`` sizes them; a whole side has no other record of it), and
    it is also what the oracle reads (:meth:`membership`) and what moves to a device (:meth:`to`).
    """

    mask: Optional[torch.Tensor]
    cu_seqlens: Optional[torch.Tensor]
    num_tokens: int

    @property
    def num_seqs(self) -> int:
        if self.mask is not None:
            return self.mask.shape[0]
        return 1 if self.cu_seqlens is None else self.cu_seqlens.numel() - 1

    def membership(self) -> torch.Tensor:
        """Bool [B, N] on the CPU, from :func:`sara_kernels.testing.oracle.membership`."""
        return membership(self.num_tokens, self.mask, self.cu_seqlens)

    def to(self, device) -> "Segmentation":
        def move(t):
            return None if t is None else t.to(device)

        return Segmentation(move(self.mask), move(self.cu_seqlens), self.num_tokens)


def segmentation(kind: str, num_seqs: int, seq_len: int, generator=None, empty=(), num_tokens: Optional[int] = None,
                 device="cpu") -> Segmentation:
    """One side of ``num_seqs`` sequences, those in ``empty`` without a token.

    ``kind``: "mask" (a [B, S] :func:`ragged_mask`, B·S rows), "cu_seqlens" (B sequences packed
    over ``num_tokens`` rows, by default B·S − 3: no multiple of anything) or "none" (one
    sequence of ``num_tokens`` rows, by default ``seq_len``).
    """
    if kind == "mask":
        if num_tokens not in (None, num_seqs * seq_len):
            raise ValueError(f"a mask side has num_seqs * seq_len = {num_seqs * seq_len} rows, got num_tokens={num_tokens}")
        return Segmentation(ragged_mask(num_seqs, seq_len, generator, empty, device), None, num_seqs * seq_len)
    if kind == "cu_seqlens":
        rows = num_seqs * seq_len - 3 if num_tokens is None else num_tokens
        return Segmentation(None, packed_cu_seqlens(num_seqs, rows, generator, empty, device), rows)
    if kind == "none":
        return Segmentation(None, None, seq_len if num_tokens is None else num_tokens)
    raise ValueError(f"kind must be one of {SEGMENTATIONS}, got {kind!r}")


def random_segmentation(rng, kind: str, num_seqs: int, seq_len: int, device="cpu") -> Segmentation:
    """A side of random raggedness, empty sequences and empty sides included: a mask of random
    density (``torch``'s global generator), or cut points and row counts drawn from ``rng``
    (a :class:`random.Random`)."""
    if kind == "mask":
        keep = rng.random()
        return Segmentation((torch.rand(num_seqs, seq_len) < keep).long().to(device), None, num_seqs * seq_len)
    if kind == "cu_seqlens":
        n = rng.randint(0, 3 * num_seqs * seq_len)
        cuts = sorted(rng.randint(0, n) for _ in range(num_seqs - 1))
        return Segmentation(None, torch.tensor([0, *cuts, n], device=device), n)
    return Segmentation(None, None, rng.randint(0, 20))


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
ANCHORS = ("detached", "both", "priors")
DIVERGENCES = ("js", "kl", "reverse_kl")
LAYOUTS = ("tuple", "stacked")


@dataclass(frozen=True)
class Shape:
    """Layers, sequences per side and the (target) sequence length of every case."""

    layers: int
    seqs: int
    seq_len: int


@dataclass(frozen=True)
class Case:
    """One configuration of the op; ``anchor`` is "detached" | "both" (gradients) | "priors"."""

    experts: int
    segmentation: str  # "none" (one sequence per side) | "mask" | "cu_seqlens"
    score: str
    dtype: torch.dtype
    anchor: str
    layout: str = "tuple"  # "tuple": L tensors [N, E] (Hugging Face); "stacked": one [L, N, E]
    temperature: float = 1.0
    minus_inf: bool = False  # some logits are −inf (an expert disabled, some tokens' experts masked)
    divergence: str = "js"
    pair_weights: bool = False  # random per-pair weights, one of them 0 where there are 4 pairs or more

    @property
    def label(self) -> str:
        extra = (f" τ={self.temperature:g}" if self.temperature != 1.0 else "") + (" −inf" if self.minus_inf else "")
        extra += (f" {self.divergence}" if self.divergence != "js" else "") + (" π" if self.pair_weights else "")
        return f"E={self.experts} {self.segmentation} {self.score} {DTYPE_NAMES[self.dtype]} {self.anchor} {self.layout}{extra}"


def case_grid(quick: bool = False) -> list:
    """The selftest's grid: every (E, segmentation, score) combination; dtype, anchor mode,
    layout, τ and −inf logits rotate through the grid so each value of each option meets
    several of the others.

    ``quick`` keeps a covering subset (each E, segmentation, score, dtype and anchor mode once).
    """
    dtypes = (torch.bfloat16, torch.float32)
    cases = []
    for i, (experts, seg, score) in enumerate(itertools.product((8, 60, 128), SEGMENTATIONS, ("softmax", "sigmoid"))):
        cases.append(Case(
            experts=experts, segmentation=seg, score=score,
            dtype=dtypes[(i // 2) % 2],  # meets both scores and every segmentation
            anchor=ANCHORS[(i + i // 6) % 3],  # shifted per E so it meets every segmentation
            layout=LAYOUTS[(i // 4) % 2],
            temperature=0.7 if i % 5 == 0 else 1.0,
            minus_inf=experts == 60 and seg == "mask",
            divergence=DIVERGENCES[(i // 2) % 3],  # meets both scores; the quick subset meets all three
            pair_weights=(i // 3) % 2 == 1,
        ))
    if quick:
        cases = [cases[i] for i in (1, 5, 8, 10, 14, 16)]
    return cases


def rotating_case(index: int, experts: int, dtype: torch.dtype) -> Case:
    """Case ``index`` of a grid over (E, dtype): segmentation, score, anchor mode, layout and τ
    rotate with the index so the grid meets each."""
    return Case(
        experts=experts,
        segmentation=("mask", "cu_seqlens")[index % 2],
        score=("softmax", "sigmoid")[(index // 2) % 2],
        dtype=dtype,
        anchor=ANCHORS[index % 3],
        layout=LAYOUTS[(index // 3) % 2],
        temperature=(1.0, 0.7)[(index // 4) % 2],
        divergence=DIVERGENCES[(index // 2) % 3],
        pair_weights=index % 4 >= 2,
    )


# ---------------------------------------------------------------------------------------------
# The inputs of one case
# ---------------------------------------------------------------------------------------------


@dataclass
class PairInputs:
    """Rounded inputs of one case, shared by the backend and the float64 reference."""

    anchor: Optional[list]  # L tensors [Na, E] in the case's dtype, one [L, Na, E] if stacked; None: priors
    target: list
    anchor_side: Segmentation  # the priors' segmentation in priors mode
    target_side: Segmentation
    priors: Optional[torch.Tensor]  # float32 [L, B, E]
    upstream: torch.Tensor  # float64 [L, B]: cotangent of the divergence, so every (l, b) gradient is checked
    pair_weights: Optional[torch.Tensor] = None  # float32 [B]


def case_logits(case: Case, layers: int, member: torch.Tensor, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """[L, N, E] logits; rows that belong to no sequence (padding) hold large garbage the op must ignore."""
    num_tokens = member.shape[1]
    z = 2.0 * torch.randn(layers, num_tokens, case.experts, generator=gen, dtype=torch.float64)
    z[:, ~member.any(dim=0)] = 40.0
    if case.minus_inf:
        z[0, :, 3] = -math.inf  # an expert disabled in layer 0 on this side
        z[:, ::3, :2] = -math.inf  # some tokens with masked experts
    return z.to(dtype)


def make_inputs(case: Case, shape: Shape, device, seed: int, dtype: Optional[torch.dtype] = None) -> PairInputs:
    """Inputs of ``case`` at ``shape`` on ``device``; ``dtype`` overrides the case's (the NumPy check).

    Sequence 1 of the target and (priors aside) 0 of the anchor are empty: pairs the loss must
    exclude. The anchor's sequences are 3 tokens longer than the target's."""
    gen = torch.Generator().manual_seed(seed)
    dtype = dtype or case.dtype
    segmented = case.segmentation != "none"
    seqs = shape.seqs if segmented else 1
    empty_a = (0,) if segmented and case.anchor != "priors" else ()
    target_side = segmentation(case.segmentation, seqs, shape.seq_len, gen, (1,) if segmented else ())
    anchor_side = segmentation(case.segmentation, seqs, shape.seq_len + 3, gen, empty_a)
    target = case_logits(case, shape.layers, target_side.membership(), gen, dtype)
    anchor = case_logits(case, shape.layers, anchor_side.membership(), gen, dtype)
    priors = None
    if case.anchor == "priors":
        priors = api.routing_distribution(anchor.double(), anchor_side.mask, cu_seqlens=anchor_side.cu_seqlens,
                                          score=case.score, temperature=case.temperature, backend="reference").float()
        priors[0, :, 0] = 0.0  # exact zeros in a prior (0·log 0 terms)
        priors[0] /= priors[0].sum(dim=-1, keepdim=True)
    # ∂JS/∂z is O(1 / (n_b·E)): at real sizes fp16 gradients would fall into the subnormal range
    # and lose their digits. Scaling the cotangent, as AMP's loss scaling does, keeps them normal.
    loss_scale = shape.seq_len * case.experts / 16
    upstream = loss_scale * (torch.rand(shape.layers, seqs, generator=gen, dtype=torch.float64) + 0.5)
    pair_weights = None
    if case.pair_weights:
        pair_weights = torch.rand(seqs, generator=gen) * 1.75 + 0.25
        if seqs > 3:  # pairs 0 and 1 may be empty: another valid pair keeps a weight (no weight left is its own test)
            pair_weights[2] = 0.0  # a valid pair that no longer counts

    def as_layout(z):
        z = z.to(device)
        return [z] if case.layout == "stacked" else list(z.unbind(0))

    return PairInputs(
        anchor=None if case.anchor == "priors" else as_layout(anchor),
        target=as_layout(target),
        anchor_side=anchor_side.to(device),
        target_side=target_side.to(device),
        priors=None if priors is None else priors.to(device),
        upstream=upstream.to(device),
        pair_weights=None if pair_weights is None else pair_weights.to(device),
    )
