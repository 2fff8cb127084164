"""The SARA layout of one micro-batch, as the in-model integrations are told it: which of the
micro-batch's sequences are anchors and targets, or the dataset index of each target whose
cached prior stands in for its anchor.

Megatron's :class:`~sara_kernels.megatron.sara_batch` and torchtitan's
:class:`~sara_kernels.torchtitan.SARAMicrobatch` each find their sequences in their own
framework's tensors (columns or packed ``cu_seqlens``; rows or documents of ``positions``), then
build a :class:`~sara_kernels.term.SequenceLayout` per side. What they share is here: the index
arguments and their checks (every message names the ``caller``), the pairs' weights (``pair_weights``
and ``sara_anchor_filter``'s kept pairs), and one layer's cached priors.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._inputs import pair_weight_tensor


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


# Why the in-model integrations filter only with cached priors, and what to do instead.
_LIVE_FILTER_ADVICE = (
    "live anchors run in the same forward as their targets, and the LM logits that say whether the model answers an "
    "anchor exist only after the routers have attached SARA (on the last pipeline stage); extract priors with "
    "`python -m sara_kernels priors --anchor_answers` (or sara_kernels.megatron.extract_routing_priors(..., "
    "answer_masks=...)) and give example_index=, or pass pair_weights= from your own "
    "greedy check of the anchors (sara_kernels.hf.routing.answers_reproduced on a graph-free forward)"
)


def check_anchor_filter(options, priors, caller: str, live_answers: bool = False) -> None:
    """Refuse a ``sara_anchor_filter`` the integration cannot apply: ``"correct"`` read from cached
    priors that record each anchor's correctness (``priors``: a :class:`~sara_kernels.hf.RoutingPriors`
    or None), and, where the integration weights live pairs from the micro-batch's LM logits
    (``live_answers``), either filter without priors."""
    anchor_filter = options.sara_anchor_filter
    if anchor_filter == "none" or (priors is None and live_answers):
        return
    if priors is None:
        raise ValueError(f"{caller}: sara_anchor_filter={anchor_filter!r} needs cached priors here: {_LIVE_FILTER_ADVICE}")
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
                             pair_weights: Optional[torch.Tensor], device, caller: str):
    """(π [P] on ``device`` for ``sara_term``, or None; the fraction of pairs ``sara_anchor_filter``
    keeps, or None without the filter). With the filter π is the priors' anchor correctness of each
    ``example_index`` times ``pair_weights``; ``check_anchor_filter`` has passed."""
    weights = None if pair_weights is None else pair_weights.to(device)
    if options.sara_anchor_filter == "none":
        return weights, None
    if example_index is None:
        raise ValueError(
            f"{caller}: sara_anchor_filter={options.sara_anchor_filter!r} filters the pairs of cached priors "
            f"(example_index=), not live anchors: {_LIVE_FILTER_ADVICE}"
        )
    kept = layer_priors.anchor_kept(example_index, device)
    return (kept if weights is None else kept * weights), kept.mean()


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
