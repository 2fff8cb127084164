"""The SARA layout of one micro-batch, as the in-model integrations are told it: which of the
micro-batch's sequences are anchors and targets, or the dataset index of each target whose
cached prior stands in for its anchor.

Megatron's :class:`~sara_kernels.megatron.sara_batch` and torchtitan's
:class:`~sara_kernels.torchtitan.SARAMicrobatch` each find their sequences in their own
framework's tensors (columns or packed ``cu_seqlens``; rows or documents of ``positions``), then
build a :class:`~sara_kernels.term.SequenceLayout` per side. What they share is here: the index
arguments and their checks (every message names the ``caller``), the pairs' weights (``pair_weights``,
``sara_anchor_filter``'s kept pairs from the priors, or for live anchors from the LM logits after the
forward: :class:`LivePairWeights`, :class:`WeightedMeanInBackward`), and one layer's cached priors.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._inputs import pair_weight_tensor
from .term import kept_pairs


class PairIndices(NamedTuple):
    """The checked index arguments of a micro-batch layout (1-D int64 tensors, or None)."""

    anchor: Optional[torch.Tensor]
    target: Optional[torch.Tensor]
    example_index: Optional[torch.Tensor]


def index_tensor(value, caller: str, arg: str) -> Optional[torch.Tensor]:
    """``value`` as a non-empty 1-D int64 tensor (on its own device), or None."""
    if value is None:
        return None
    tensor = torch.as_tensor(value)
    if tensor.dim() != 1 or tensor.numel() == 0 or tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise ValueError(f"{caller} {arg}: expected a non-empty 1-D sequence of integer indices, got {value!r}")
    return tensor.long()


def pair_indices(caller: str, anchor, target, example_index, unit: str) -> PairIndices:
    """The anchors and targets of live mode, or the example indices (and optional targets) of
    priors mode, checked as one: exactly one mode, pairs element by element."""
    if (anchor is None) == (example_index is None):
        raise ValueError(f"{caller}: give exactly one of anchor= (live anchors) and example_index= (cached priors)")
    if anchor is not None and target is None:
        raise ValueError(f"{caller}: anchor= needs target=, the {unit} each anchor is paired with")
    indices = PairIndices(*(index_tensor(value, caller, name)
                            for name, value in (("anchor", anchor), ("target", target), ("example_index", example_index))))
    paired = indices.anchor if indices.anchor is not None else indices.example_index
    if indices.target is not None and indices.target.numel() != paired.numel():
        name = "anchor" if indices.anchor is not None else "example_index"
        raise ValueError(f"{caller}: {name} has {paired.numel()} entries but target has {indices.target.numel()}")
    return indices


def pair_weights_of(pair_weights, indices: PairIndices, caller: str) -> Optional[torch.Tensor]:
    """``pair_weights`` checked as ``sara_loss`` checks them (finite, >= 0, one per pair of the
    micro-batch), as a floating tensor on its own device; None when not given."""
    if pair_weights is None:
        return None
    paired = indices.anchor if indices.anchor is not None else indices.example_index
    device = pair_weights.device if isinstance(pair_weights, torch.Tensor) else torch.device("cpu")
    try:
        return pair_weight_tensor(pair_weights, paired.numel(), device)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{caller} {error}") from None


def check_anchor_filter(options, priors, caller: str) -> None:
    """Refuse a ``sara_anchor_filter`` the integration cannot apply with cached ``priors`` (a
    :class:`~sara_kernels.hf.RoutingPriors`; None: live anchors, whose pairs :class:`LivePairWeights`
    weights by either filter): ``"correct"`` only, from priors that record each anchor's correctness."""
    anchor_filter = options.sara_anchor_filter
    if anchor_filter == "none" or priors is None:
        return
    if anchor_filter == "correct_anchor_wrong_target":
        raise ValueError(
            f"{caller}: sara_anchor_filter='correct_anchor_wrong_target' with cached priors is not supported (the "
            "target's answer is read from the LM logits, which exist only after the routers); use "
            "sara_anchor_filter='correct', or pass pair_weights= from your own check of the targets"
        )
    if priors.anchor_correct is None:
        raise ValueError(
            f"{caller}: sara_anchor_filter='correct' needs a priors file that records each anchor's correctness; "
            "extract it with `python -m sara_kernels priors --anchor_answers` (sara_kernels.hf.extract_routing_priors(..., "
            "anchor_answers=True); from a Megatron model, sara_kernels.megatron.extract_routing_priors(..., answer_masks=...))"
        )


def micro_batch_pair_weights(options, layer_priors: Optional["LayerPriors"], example_index: Optional[torch.Tensor],
                             pair_weights: Optional[torch.Tensor], device):
    """(π [P] on ``device`` for ``sara_term``, or None; the fraction of pairs ``sara_anchor_filter``
    keeps, or None without the filter). With the filter (priors mode: live anchors weight their pairs
    through :class:`LivePairWeights`) π is the priors' anchor correctness of each ``example_index``
    times ``pair_weights``; ``check_anchor_filter`` has passed."""
    weights = None if pair_weights is None else pair_weights.to(device)
    if options.sara_anchor_filter == "none":
        return weights, None
    kept = layer_priors.anchor_kept(example_index, device)
    return (kept if weights is None else kept * weights), kept.mean()


def check_answer_inputs(method: str, logits, tokens, answer_mask, dims: str) -> None:
    """``set_answers``' arguments: ``logits`` [*dims, V] and ``tokens``, ``answer_mask`` [*dims]
    (``dims``: the integration's names of the batch and sequence axes, for the messages)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"{method} logits: expected the LM logits [{dims}, V], got {logits!r}")
    for name, value in (("tokens", tokens), ("answer_mask", answer_mask)):
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(logits.shape[:2]):
            raise ValueError(f"{method} {name}: expected a tensor of shape {list(logits.shape[:2])} "
                             f"(the logits' [{dims}]), got {value!r}")


class LivePairWeights:
    """π of ``sara_anchor_filter`` with live anchors, for one micro-batch: the LM logits that decide it
    exist only after the routers have run, so each router's per-pair divergences wait here (and
    in :class:`WeightedMeanInBackward`'s backward) until the loss function gives each sequence's
    answers (``method``, the integration's name for that call, is what the errors name)."""

    def __init__(self, method: str):
        self.method = method
        self.anchor_filter = None
        self.weights = None  # π [P], once set
        self.kept = None  # the fraction of pairs kept, once set
        self._pending = []  # (record, divergence [P], valid [P] or None) of routers that ran before π
        self._routed_without_term = False

    def expect(self, anchor_filter: str) -> None:
        """A router will weight this micro-batch's pairs by ``anchor_filter`` (in a recomputation in
        backward, when its forward ran inside a checkpoint), so π may be set."""
        self.anchor_filter = anchor_filter

    def without_term(self) -> None:
        """A router ran on this micro-batch without attaching the term (eval, no_grad, ``sara_weight``
        0), so :meth:`needs_answers` is False unless another router attaches it."""
        self._routed_without_term = True

    def defer(self, anchor_filter: str, record, divergence: torch.Tensor, valid: Optional[torch.Tensor]) -> None:
        """``record(value, kept)`` of a router's divergences [P] (``valid``: pairs with both sides
        non-empty, None for all), called with the π-weighted mean when π is set (now, if it is)."""
        self.expect(anchor_filter)
        self._pending.append((record, divergence.detach(), valid))
        if self.weights is not None:
            self._flush()

    def set(self, answered: torch.Tensor, has_answer: torch.Tensor, indices: PairIndices, pair_weights) -> None:
        """π from whether each sequence of the micro-batch is answered (``answered`` [N] bool) and has
        answer tokens (``has_answer`` [N]): 1 where the pair's anchor is answered (and, for
        ``"correct_anchor_wrong_target"``, its target is not), times ``pair_weights``."""
        self.check_settable()
        sides = [("anchor", indices.anchor)]
        if self.anchor_filter == "correct_anchor_wrong_target":
            sides.append(("target", indices.target))
        for side, seqs in sides:
            missing = seqs[~has_answer.cpu()[seqs.cpu()]].tolist()
            if missing:
                raise ValueError(f"{self.method} answer_mask: {side} sequences {missing[:5]} have no answer token; "
                                 f"sara_anchor_filter={self.anchor_filter!r} needs each {side}'s answer")
        target_answered = None if indices.target is None else answered[indices.target.to(answered.device)]
        kept = kept_pairs(self.anchor_filter, answered[indices.anchor.to(answered.device)], target_answered)
        self.kept = kept.float().mean()
        self.weights = kept.float() if pair_weights is None else kept.float() * pair_weights.to(kept.device)
        self._flush()

    def needs_answers(self) -> bool:
        """Whether :meth:`set` has π to set: False when the micro-batch's routers ran without the
        term (nothing waits for π); a RuntimeError when no router has run, or π is set already."""
        if self.anchor_filter is None and self._routed_without_term:
            return False
        self.check_settable()
        return True

    def check_settable(self) -> None:
        """A RuntimeError unless a router has run with the filter and π is not set yet."""
        if self.anchor_filter is None:
            raise RuntimeError(f"{self.method}: no SARA router has run on this micro-batch with live anchors and "
                               "sara_anchor_filter; call it after the model's forward")
        if self.weights is not None:
            raise RuntimeError(f"{self.method}: already called for this micro-batch")

    def weights_for(self, layer: int, valid: Optional[torch.Tensor]) -> torch.Tensor:
        """π [P] (0 where ``valid`` is False); a RuntimeError naming :attr:`method` before it is set."""
        if self.weights is None:
            raise RuntimeError(
                f"SARA router of layer {layer}: sara_anchor_filter={self.anchor_filter!r} with live anchors weights "
                f"the pairs in backward, but {self.method}(logits, tokens, answer_mask) was not called for this "
                "micro-batch: call it in the loss function, before backward (under pipeline parallelism the LM "
                "logits are on the last stage only, which this does not support)")
        return self.weights if valid is None else self.weights * valid.to(self.weights.device)

    def _flush(self) -> None:
        for record, divergence, valid in self._pending:
            weights = self.weights_for(-1, valid).to(divergence.device, divergence.dtype)
            total = weights.sum()
            record((weights * divergence).sum() / torch.where(total > 0, total, torch.ones_like(total)), self.kept)
        self._pending = []


class WeightedMeanInBackward(torch.autograd.Function):
    """Σ_b π_b D_b / Σ_b π_b (0 when no weight is left) of the pairs' divergences D [P] in backward,
    with π read only then from a :class:`LivePairWeights`. Its forward value, the unweighted mean,
    is for autograd only: the integrations attach it with a Function that backpropagates it and
    never reads it (``MoEAuxLossAutoScaler``, torchtitan's ``_AttachTerm``); the logged values are
    :meth:`LivePairWeights.defer`'s."""

    @staticmethod
    def forward(ctx, divergence, live: LivePairWeights, layer: int, valid: Optional[torch.Tensor]):
        ctx.live, ctx.layer, ctx.valid = live, layer, valid
        ctx.dtype, ctx.device = divergence.dtype, divergence.device
        return divergence.detach().mean()

    @staticmethod
    def backward(ctx, grad):
        weights = ctx.live.weights_for(ctx.layer, ctx.valid).to(ctx.device, ctx.dtype)
        total = weights.sum()
        share = torch.where(total > 0, weights / torch.where(total > 0, total, torch.ones_like(total)), 0.0)
        return grad * share, None, None, None


def side_sequences(indices: PairIndices, side: str, count: int, caller: str, unit: str) -> torch.Tensor:
    """The indices of ``side``'s sequences among the micro-batch's ``count`` ``unit``; in priors
    mode without ``target=``, all of them. A micro-batch with no sequence gives an empty side, refused
    here (no pair is left to align) with the example-index count it does not match."""
    seqs = getattr(indices, side)
    if seqs is None:  # priors mode, default targets
        seqs = torch.arange(count)
    if seqs.numel() and (int(seqs.min()) < 0 or int(seqs.max()) >= count):
        raise ValueError(f"{caller} {side}: indices must lie in [0, {count}), the micro-batch's {unit}")
    if indices.example_index is not None and seqs.numel() != indices.example_index.numel():
        raise ValueError(
            f"{caller}: example_index has {indices.example_index.numel()} entries but the micro-batch has {seqs.numel()} "
            f"target {unit}; pass target= to say which they are"
        )
    return seqs


class LayerPriors:
    """One layer's cached anchor priors (``priors``: a :class:`~sara_kernels.hf.RoutingPriors`),
    copied once to the device of the logits that read them."""

    def __init__(self, priors, caller: str):
        self.priors = priors
        self.caller = caller
        self._probs = None  # [num_examples, E] of the layer last asked for, on its device
        self._layer = None
        self._correct = None  # [num_examples] float anchor_correct, on the device last asked for

    def anchor_probs(self, layer: int, example_index: torch.Tensor, device) -> torch.Tensor:
        """The priors [1, P, E] of decoder layer ``layer`` for the ``example_index`` [P] of the targets.
        The indices are checked on the host when they are there, by a device assertion otherwise
        (no host sync)."""
        num_examples = self.priors.num_examples
        if example_index.device.type == "cpu":
            if int(example_index.min()) < 0 or int(example_index.max()) >= num_examples:
                raise ValueError(
                    f"{self.caller} example_index: values must lie in [0, {num_examples}) (the cached priors' rows)")
        else:
            torch._assert_async(((example_index >= 0) & (example_index < num_examples)).all(),
                                f"{self.caller} example_index: values must lie in [0, {num_examples})")
        if self._probs is None or self._probs.device != device or self._layer != layer:
            row = self.priors.layers.index(layer)
            self._probs = self.priors.probs[:, row, :].to(device=device, dtype=torch.float32)
            self._layer = layer
        return self._probs.index_select(0, example_index.to(device))[None]

    def anchor_kept(self, example_index: torch.Tensor, device) -> torch.Tensor:
        """[P] float32: 1 where the priors file records that the model answers the anchor of each
        ``example_index`` correctly, else 0 (the indices as :meth:`anchor_probs` checks them)."""
        if self._correct is None or self._correct.device != device:
            self._correct = self.priors.anchor_correct.to(device=device, dtype=torch.float32)
        return self._correct.index_select(0, example_index.to(device))
