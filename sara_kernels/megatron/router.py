"""SARA inside Megatron-core's router: a ``TopKRouter`` subclass placed through the layer spec.

Megatron computes each MoE layer's logits in ``TopKRouter.gating`` (a method, no submodule a
hook could reach) and hands them to ``routing``, which attaches the z-loss and the
load-balancing losses to the routing tensors with ``MoEAuxLossAutoScaler``. :class:`SARARouter`
overrides ``routing`` to do the same with the layer's SARA term, computed from the pre-top-k
logits: the term's gradient enters backward through the router's own output, so it is right
per pipeline stage, and the schedule's scale (loss scale x CP size / number of micro-batches, or
the per-token rule) applies to it exactly as to Megatron's own aux losses. The user's loss
function does not change.

What a router cannot know about the micro-batch (which sequences are anchors and targets, the
dataset index of each target for cached priors, packed-sequence boundaries) is given around the
model call by :class:`sara_batch`. Under activation recomputation of the MoE layers the router
keeps that for the recomputation in backward, when the block is closed (see ``SARARouter``).
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses
import functools
import os
from typing import Optional, Union

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, save_to_aux_losses_tracker
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec

try:  # megatron-core 0.19 records aux losses in a MoEMetricsTracker; save_to_aux_losses_tracker is deprecated there
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    def _track(*args, **kwargs):
        get_moe_metrics_tracker().record(*args, **kwargs)
except ImportError:  # megatron-core 0.16 has save_to_aux_losses_tracker only
    _track = save_to_aux_losses_tracker

from ..hf.priors import RoutingPriors, load_routing_priors
from ..hf.routing import answer_positions, answers_reproduced
from ..layer_selection import select_layers
from ..microbatch import (LayerPriors, LivePairWeights, WeightedMeanInBackward, check_anchor_filter, check_answer_inputs,
                          micro_batch_pair_weights, pair_indices, pair_weights_of, side_sequences)
from ..reference import layer_shares
from ..term import SARAOptions, SequenceLayout, check_layer_weights, sara_term

__all__ = ["SARARouter", "with_sara", "sara_batch", "moe_layer_indices", "TRACKER_NAME", "KEPT_TRACKER_NAME"]

#: Name of the per-layer SARA value in Megatron's aux-loss tracker (next to ``load_balancing_loss``).
#: List it in the ``track_names`` given to ``track_moe_metrics``: Megatron reduces only the listed
#: names across pipeline stages and data-parallel ranks before logging.
TRACKER_NAME = "sara_loss"
#: Name of the fraction of pairs ``sara_anchor_filter`` keeps in the same tracker (with the filter on).
KEPT_TRACKER_NAME = "sara_anchor_kept"


def moe_layer_indices(config) -> tuple:
    """0-based decoder-layer indices of the MoE layers, from ``config.moe_layer_freq`` (the rule
    Megatron's own aux-loss logging counts MoE layers with)."""
    freq, num_layers = config.moe_layer_freq, config.num_layers
    if isinstance(freq, int):
        return tuple(i for i in range(num_layers) if i % freq == 0)
    return tuple(i for i, is_moe in enumerate(freq) if is_moe)


class SARARouter(TopKRouter):
    """Megatron's ``TopKRouter`` that also attaches SARA for the selected layers.

    Built by the spec :func:`with_sara` returns (``functools.partial(SARARouter, sara=options,
    priors=priors)`` in ``MoESubmodules.router``). Routing itself is unchanged. In training with grad enabled a
    selected layer needs an open :class:`sara_batch` and, unless the micro-batch is packed or said
    unpadded, the call's ``padding_mask``; in eval, or under ``torch.no_grad()``, it routes exactly
    as ``TopKRouter`` (Megatron skips its aux losses there too). When Megatron recomputes the MoE
    layers, the checkpoint's forward (under no_grad) queues the open :class:`sara_batch` and the
    recomputation in backward attaches the term for the oldest queued one.
    """

    def __init__(self, config, pg_collection=None, *, sara: SARAOptions, priors: Optional[RoutingPriors] = None,
                 **router_kwargs):
        # router_kwargs: what this megatron-core's MoELayer passes on to TopKRouter beyond config and
        # pg_collection (0.19 adds is_mtp_layer=; 0.16 passes nothing more), forwarded unchanged.
        if not isinstance(sara, SARAOptions):
            raise TypeError(f"sara: expected sara_kernels.term.SARAOptions, got {type(sara).__name__}")
        if sara.sara_anchor_filter != "none" and priors is None:
            _check_live_filter_parallelism(config, sara.sara_anchor_filter)
        super().__init__(config=config, pg_collection=pg_collection, **router_kwargs)
        score = config.moe_router_score_function
        if score not in ("softmax", "sigmoid"):
            raise ValueError(f"moe_router_score_function={score!r}: SARA scores logits with 'softmax' or 'sigmoid' (normalised)")
        if sara.sara_score is not None and sara.sara_score != score:
            raise ValueError(
                f"sara_score={sara.sara_score!r} but the router scores with moe_router_score_function={score!r}: "
                "SARA follows the router (leave sara_score=None)"
            )
        if sara.sara_lm_on_anchor:
            raise ValueError(
                "sara_lm_on_anchor has no meaning here: the LM loss is your loss_func's (mask the anchor rows in "
                "loss_mask to keep the LM off them)"
            )
        recomputed = config.recompute_granularity == "full" or (
            config.recompute_granularity == "selective" and "moe" in (config.recompute_modules or ())
        )
        if recomputed and (config.fp8 or config.fp4):
            raise ValueError(
                "SARARouter does not support activation recomputation of MoE layers with fp8/fp4: Megatron then "
                "recomputes through Transformer Engine's checkpoint, whose order of runs SARARouter is not tested "
                "with (it needs CUDA); recompute other modules with fp8/fp4 (e.g. recompute_modules=['core_attn'])"
            )
        self.sara = sara
        self.sara_score = score
        self.sara_layers = select_layers(moe_layer_indices(config), sara.sara_layers)
        check_layer_weights(sara, self.sara_layers)
        weights = sara.sara_layer_weights
        shares = layer_shares(None if weights is None else torch.tensor(weights, dtype=torch.float64),
                              len(self.sara_layers))
        self._layer_share = dict(zip(self.sara_layers, (sara.sara_weight * shares).tolist()))
        self._layer_options = dataclasses.replace(sara, sara_layer_weights=None)
        # Under activation recomputation Megatron runs the router twice per micro-batch: in forward
        # under no_grad inside its checkpoint, and again in backward, after forward_step has closed
        # the micro-batch's sara_batch. The first run queues (sara_batch, logits shape); the
        # recomputation takes the oldest, since every Megatron schedule runs a model chunk's
        # backward passes in the order of its forward passes.
        self._recomputed = recomputed
        self._awaiting_recompute: collections.deque = collections.deque()
        if priors is not None:
            if not isinstance(priors, RoutingPriors):
                raise TypeError(f"priors: expected RoutingPriors or None, got {type(priors).__name__}")
            priors.check_against(self.sara_layers, config.num_moe_experts, score)
            if float(priors.temperature) != float(sara.sara_temperature):
                raise ValueError(
                    f"the priors were computed with temperature={priors.temperature}, SARA uses "
                    f"sara_temperature={sara.sara_temperature}"
                )
        check_anchor_filter(sara, priors, "with_sara")
        self.priors = priors
        self._layer_priors = None if priors is None else LayerPriors(priors, "sara_batch")
        # Megatron logs a tracked name as its sum over layers / the MoE layers (MTP included): each
        # SARA layer records the kept fraction times this, so that the logged value is the fraction.
        self._kept_per_layer = (len(moe_layer_indices(config)) + (config.mtp_num_layers or 0)) / len(self.sara_layers)

    @property
    def sara_layer(self) -> Optional[int]:
        """This router's 0-based decoder-layer index when SARA is applied here, else ``None``."""
        # megatron-core 0.19 numbers the layers of multi-token prediction from 1, as decoder layers
        # (0.16 numbers them after the decoder's, so none is selected), and says so by is_mtp_layer.
        if self.layer_number is None or getattr(self, "is_mtp_layer", False):
            return None
        layer = self.layer_number - 1
        return layer if layer in self.sara_layers else None

    def _sara_group(self):
        # With sequence parallelism each TP rank holds a share of every sequence's tokens, as
        # each CP rank does; without it the TP ranks hold the same tokens.
        group = self.tp_cp_group if self.config.sequence_parallel else self.cp_group
        return group if group is not None and group.size() > 1 else None

    def _micro_batch_term(self, batch: "sara_batch", logits: torch.Tensor, padding_mask: Optional[torch.Tensor]):
        """(this layer's share of ``sara_weight * sara_loss``, the layer's mean divergence, the fraction
        of pairs ``sara_anchor_filter`` keeps or None) for logits [s, b, E]."""
        group = self._sara_group()
        seq_len, num_cols, num_experts = logits.shape
        if batch.packed:
            if num_cols != 1:
                raise ValueError(f"packed sequences need logits [t, 1, E] (qkv_format 'thd'), got {tuple(logits.shape)}")
            if group is not None:
                raise NotImplementedError(
                    "SARA on packed sequences with context or sequence parallelism is not supported: the local token "
                    "layout of each packed sequence is not known to the router"
                )
        if padding_mask is None and not batch.packed and not batch.unpadded:
            raise ValueError(
                f"SARA router of layer {self.sara_layer} got no padding_mask, so SARA would pool over padding: pass "
                "padding_mask=(True at padding) to the model call, or sara_batch(..., unpadded=True) if no sequence "
                "of the micro-batch is padded"
            )
        valid = (~padding_mask.bool()) if padding_mask is not None and not batch.packed else None

        def side(name: str):
            """(one side's logits [N, E], its layout)."""
            if batch.packed:
                rows, cu = batch.packed_side(name, seq_len, logits.device)
                return [logits.view(seq_len, num_experts).index_select(0, rows)], SequenceLayout(cu_seqlens=cu)
            cols = batch.columns(name, num_cols, logits.device)
            return ([logits.index_select(1, cols).transpose(0, 1).reshape(-1, num_experts)],
                    SequenceLayout(mask=_side_mask(valid, cols, seq_len)))

        if self.sara.sara_anchor_filter != "none" and batch.example_index is None:
            _check_live_filter_parallelism(self.config, self.sara.sara_anchor_filter)
            if batch.packed:
                raise ValueError(f"sara_batch: sara_anchor_filter={self.sara.sara_anchor_filter!r} with live anchors in "
                                 "packed sequences (packed_seq_params) is not supported; use padded micro-batches, or "
                                 "priors with answers and example_index=")
            (anchor_logits, anchor_layout), (target_logits, target_layout) = side("anchor"), side("target")
            divergence = sara_term(self._layer_options, anchor_logits, target_logits, anchor_layout=anchor_layout,
                                   target_layout=target_layout, layers=(self.sara_layer,), score=self.sara_score,
                                   reduction="none").loss[0]
            valid = _nonempty(anchor_layout) & _nonempty(target_layout)  # π_b = 0 for a pair with an empty side
            batch._live.defer(self.sara.sara_anchor_filter, self._track_values, divergence, valid)
            weighted = WeightedMeanInBackward.apply(divergence, batch._live, self.sara_layer, valid)
            return weighted * self._layer_share[self.sara_layer], None, None
        anchor_probs = None
        if batch.example_index is not None:
            if self.priors is None:
                raise ValueError("sara_batch(example_index=...) needs cached priors: with_sara(spec, options, priors=...)")
            anchor_logits, anchor_layout = None, SequenceLayout()
            anchor_probs = self._layer_priors.anchor_probs(self.sara_layer, batch.example_index, logits.device)
        else:
            anchor_logits, anchor_layout = side("anchor")
        target_logits, target_layout = side("target")
        pair_weights, kept = micro_batch_pair_weights(self.sara, self._layer_priors, batch.example_index,
                                                      batch.pair_weights, logits.device)
        term = sara_term(self._layer_options, anchor_logits, target_logits, anchor_layout=anchor_layout,
                         target_layout=target_layout, anchor_probs=anchor_probs, pair_weights=pair_weights,
                         layers=(self.sara_layer,), score=self.sara_score, group=group)
        return term.loss * self._layer_share[self.sara_layer], term.per_layer[0], kept

    def _batch_to_attach(self, logits: torch.Tensor) -> Optional["sara_batch"]:
        """The micro-batch whose term this call attaches, or ``None`` when it attaches none (not
        training, a plain forward under no_grad, or a checkpoint's forward, whose micro-batch is
        queued for the recomputation)."""
        if self.sara_layer is None:
            return None
        if self.sara.sara_weight <= 0 or not self.training or (not self._recomputed and not torch.is_grad_enabled()):
            # Megatron's evaluation runs the same forward_step, whose loss function calls set_answers.
            batch = sara_batch.opened()
            if batch is not None:
                batch._live.without_term()
            return None
        if not self._recomputed:
            return sara_batch.current(self.layer_number)
        if not torch.is_grad_enabled():  # inside the checkpoint's forward, or a plain no_grad forward
            batch = sara_batch.opened()
            if batch is not None:
                self._awaiting_recompute.append((batch, logits.shape))
                if self.sara.sara_anchor_filter != "none" and batch.example_index is None:
                    batch._live.expect(self.sara.sara_anchor_filter)
            return None
        # A recomputation runs inside autograd's backward (the graph task id of
        # torch.utils.checkpoint's own check); a layer the checkpoint leaves out runs as usual.
        if torch._C._current_graph_task_id() == -1:
            return sara_batch.current(self.layer_number)
        if not self._awaiting_recompute:
            raise RuntimeError(
                f"SARA router of layer {self.sara_layer} was recomputed in backward, but no checkpointed forward of "
                "it ran inside a sara_batch: wrap each micro-batch's model call in sara_batch"
            )
        batch, shape = self._awaiting_recompute.popleft()
        if shape != logits.shape:
            raise RuntimeError(
                f"SARA router of layer {self.sara_layer}: the recomputed logits {tuple(logits.shape)} are not those of "
                f"the oldest checkpointed forward {tuple(shape)}: backward passes must run in the order of their "
                "forward passes, and a training-mode forward under torch.no_grad() inside sara_batch needs model.eval()"
            )
        return batch

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """SARA attached to the logits (as Megatron attaches its z-loss), then ``TopKRouter.routing``."""
        batch = self._batch_to_attach(logits)
        if batch is not None:
            term, layer_js, kept = self._micro_batch_term(batch, logits, padding_mask)
            if self.calculate_per_token_loss:
                # Megatron then divides every gradient by the global token count, so aux losses
                # are multiplied by the local one (as its z-loss and load-balancing loss are).
                num_tokens = (~padding_mask.bool()).sum() if padding_mask is not None else logits.shape[0] * logits.shape[1]
                term = term * num_tokens
            logits = MoEAuxLossAutoScaler.apply(logits, term)
            if layer_js is not None:  # else (live anchors under sara_anchor_filter) tracked when π is set
                self._track_values(layer_js, kept)
        return super().routing(logits, padding_mask=padding_mask)

    def _track_values(self, layer_js: torch.Tensor, kept: Optional[torch.Tensor]) -> None:
        """This layer's value (and the kept fraction) into Megatron's aux-loss tracker."""
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        _track(TRACKER_NAME, layer_js, self.layer_number, num_layers, avg_group=self.tp_dp_cp_group)
        if kept is not None:
            _track(KEPT_TRACKER_NAME, kept * self._kept_per_layer, self.layer_number, num_layers,
                   avg_group=self.tp_dp_cp_group)


def _check_live_filter_parallelism(config, anchor_filter: str) -> None:
    """Refuse ``sara_anchor_filter`` on live anchors where the LM logits that decide π are not the
    whole of each sequence and vocabulary on the rank whose routers read them."""
    reasons = {"pipeline_model_parallel_size": "the LM logits are on the last stage only",
               "tensor_model_parallel_size": "the output layer's logits are sharded over the vocabulary",
               "context_parallel_size": "each rank holds part of every sequence"}
    for name, why in reasons.items():
        if (getattr(config, name, 1) or 1) > 1:
            raise ValueError(f"sara_anchor_filter={anchor_filter!r} with live anchors is not supported with {name} > 1 "
                             f"({why}); extract priors with answers (extract_routing_priors(..., answer_masks=...)) "
                             "and give sara_batch(example_index=...)")


def _nonempty(layout: SequenceLayout) -> torch.Tensor:
    """[num sequences] bool: which sequences of ``layout`` (a mask or packed cu_seqlens) have tokens."""
    if layout.mask is not None:
        return layout.mask.any(dim=1)
    return layout.cu_seqlens[1:] > layout.cu_seqlens[:-1]


def _side_mask(valid: Optional[torch.Tensor], cols: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[P, s] validity of the selected columns (all valid without a padding mask)."""
    if valid is None:
        return torch.ones(cols.numel(), seq_len, dtype=torch.bool, device=cols.device)
    return valid.index_select(1, cols).transpose(0, 1)


class sara_batch:
    """The SARA layout of one micro-batch, open around its model call.

    >>> with sara_batch(anchor=[0, 1], target=[2, 3]):        # live anchors in the micro-batch
    ...     output = model(tokens, position_ids, attention_mask, labels=labels, padding_mask=padding_mask)
    >>> with sara_batch(example_index=batch["index"]):         # cached priors of each target
    ...     output = model(...)

    Sequences are the micro-batch's columns (``[b, s]`` input, ``[s, b]`` inside Megatron), or,
    with ``packed_seq_params``, the packed sequences of ``cu_seqlens_q`` (tokens at
    ``cu_seqlens_q_padded`` offsets when it is given).

    Args:
        anchor: sequence indices of the anchors (live mode; detached, no gradient).
        target: sequence indices of the targets, paired with ``anchor`` / ``example_index``
            element by element; default: every sequence (priors mode only).
        example_index: dataset index of each target, the row of its cached prior.
        pair_weights: one weight per pair (finite, >= 0), each pair's π in ``sara_loss``'s weighted
            mean over the pairs of the micro-batch (0 with zero gradients when every weight is 0); the
            same on every context- and tensor-parallel rank. With ``sara_anchor_filter="correct"``
            they multiply the priors' kept pairs.
        packed_seq_params: Megatron's ``PackedSeqParams`` of the micro-batch, or ``None``.
        unpadded: ``True`` when no sequence of a (not packed) micro-batch is padded, so the model
            call may omit ``padding_mask``; without it a SARA router given no ``padding_mask``
            refuses to pool (it would pool over the padding).

    Exactly one of ``anchor`` and ``example_index``. Blocks nest (the innermost is used).
    Packed boundaries are read to the host once per block (one device sync for GPU tensors).
    With ``sara_anchor_filter`` and live anchors, the loss function calls :meth:`set_answers`
    before backward.
    """

    def __init__(self, *, anchor=None, target=None, example_index=None, pair_weights=None, packed_seq_params=None,
                 unpadded: bool = False):
        self._indices = pair_indices("sara_batch", anchor, target, example_index, "sequences")
        self.anchor, self.target, self.example_index = self._indices
        self.pair_weights = pair_weights_of(pair_weights, self._indices, "sara_batch")
        if not isinstance(unpadded, bool):
            raise TypeError(f"sara_batch unpadded: expected True or False, got {unpadded!r}")
        self.unpadded = unpadded
        self.packed = packed_seq_params is not None
        self._starts = self._lengths = None
        if self.packed:
            cu = packed_seq_params.cu_seqlens_q
            if cu is None:
                raise ValueError("sara_batch packed_seq_params: cu_seqlens_q is None")
            cu = cu.detach().to("cpu", torch.long)
            padded = packed_seq_params.cu_seqlens_q_padded
            starts = (padded.detach().to("cpu", torch.long) if padded is not None else cu)[:-1]
            self._starts, self._lengths = starts.tolist(), (cu[1:] - cu[:-1]).tolist()
        self._cache: dict = {}
        self._reset_token = None
        self._live = LivePairWeights("sara_batch.set_answers")

    def set_answers(self, logits: torch.Tensor, tokens: torch.Tensor, answer_mask: torch.Tensor) -> None:
        """Which pairs ``sara_anchor_filter`` keeps, with live anchors, from the micro-batch's final LM
        logits: call it in the loss function, after the model call and before backward (the SARA
        gradient of every router waits for it).

        ``logits`` [b, s, V]: the model's output called without ``labels`` (the whole vocabulary),
        for its input ``tokens`` [b, s] (not packed); ``answer_mask`` [b, s]: 1 on the answer tokens
        of each anchor (and of each target, for ``"correct_anchor_wrong_target"``), never on a
        sequence's first token, 0 on padding. A sequence is answered when the greedy
        prediction reproduces each of its answer tokens, teacher-forced
        (:func:`~sara_kernels.hf.routing.answers_reproduced`, the Hugging Face trainers' rule). π_b
        is 1 where pair b's anchor is answered (and, with ``"correct_anchor_wrong_target"``, its
        target is not), else 0, times ``pair_weights``; the tracked values and ``sara_anchor_kept``
        are those of this π. Where the routers attached no term (eval, as in Megatron's evaluation,
        which runs the same ``forward_step``; ``torch.no_grad()``; ``sara_weight`` 0) it does nothing.
        """
        check_answer_inputs("sara_batch.set_answers", logits, tokens, answer_mask, "b, s")
        if not self._live.needs_answers():
            return
        tokens, mask = tokens.to(logits.device), answer_mask.to(logits.device).bool()
        if mask[:, 0].any():
            raise ValueError("sara_batch.set_answers answer_mask: marks a sequence's first token, which no logit predicts")
        positions = answer_positions(mask)
        answered = answers_reproduced(logits.detach()[:, positions], tokens, mask, positions)
        self._live.set(answered, mask.any(dim=1), self._indices, self.pair_weights)

    @staticmethod
    def opened() -> Optional["sara_batch"]:
        """The innermost open block of this thread / task, or ``None``."""
        blocks = _OPEN_BLOCKS.get()
        return blocks[-1] if blocks else None

    @staticmethod
    def current(layer_number=None) -> "sara_batch":
        """The innermost open block; an error naming the layer when there is none."""
        batch = sara_batch.opened()
        if batch is None:
            where = f"layer {layer_number - 1} " if layer_number is not None else ""
            raise RuntimeError(
                f"SARA router of {where}ran in training without a sara_batch: wrap each micro-batch's model call in "
                "`with sara_kernels.megatron.sara_batch(...)` (in forward_step), or call model.eval() / torch.no_grad()"
            )
        return batch

    def __enter__(self):
        if self._reset_token is not None:
            raise RuntimeError("sara_batch: this block is already open (open a new sara_batch per model call)")
        self._reset_token = _OPEN_BLOCKS.set(_OPEN_BLOCKS.get() + (self,))
        return self

    def __exit__(self, *exc):
        _OPEN_BLOCKS.reset(self._reset_token)
        self._reset_token = None
        return None

    def columns(self, side: str, num_cols: int, device) -> torch.Tensor:
        """Batch columns of ``side`` ([s, b] layout), on ``device``."""
        key = (side, num_cols, device)
        if key not in self._cache:
            self._cache[key] = side_sequences(self._indices, side, num_cols, "sara_batch", "sequences").to(device)
        return self._cache[key]

    def packed_side(self, side: str, num_tokens: int, device):
        """(token rows [T], cu_seqlens [P+1]) of ``side``'s packed sequences, on ``device``."""
        key = (side, num_tokens, device)
        if key not in self._cache:
            seqs = side_sequences(self._indices, side, len(self._lengths), "sara_batch", "sequences").tolist()
            ends = [self._starts[i] + self._lengths[i] for i in seqs]
            if max(ends) > num_tokens:
                raise ValueError(f"sara_batch packed_seq_params: sequences reach token {max(ends)}, the pack has {num_tokens}")
            rows = torch.cat([torch.arange(self._starts[i], end) for i, end in zip(seqs, ends)])
            cu = torch.tensor([0] + [self._lengths[i] for i in seqs]).cumsum(0)
            self._cache[key] = (rows.to(device), cu.to(device=device, dtype=torch.int32))
        return self._cache[key]


# The open sara_batch blocks, innermost last: a tuple per context, so that threads and asyncio
# tasks each see their own blocks and nothing is shared between them.
_OPEN_BLOCKS: contextvars.ContextVar = contextvars.ContextVar("sara_batch_open_blocks", default=())


def _is_moe_layer(module) -> bool:
    return isinstance(module, type) and issubclass(module, MoELayer)


def _with_router(submodules: MoESubmodules, builder) -> MoESubmodules:
    current = submodules.router  # a class, or a partial / ModuleSpec of one
    current_class = current.func if isinstance(current, functools.partial) else getattr(current, "module", current)
    if isinstance(current_class, type) and issubclass(current_class, SARARouter):
        raise ValueError("with_sara: this spec's MoE layers already use a SARARouter (with_sara applied twice)")
    if current_class is not TopKRouter:
        raise ValueError(
            f"with_sara: the spec's router is {getattr(current_class, '__name__', current_class)!r}, not Megatron's "
            "TopKRouter; make a class deriving from both SARARouter and it, and pass router_class="
        )
    return dataclasses.replace(submodules, router=builder)


def _transform(node, builder, found: list):
    """``node`` with every MoE layer's router replaced by ``builder`` (new objects, ``node`` untouched)."""
    if isinstance(node, ModuleSpec):
        if _is_moe_layer(node.module) and isinstance(node.submodules, MoESubmodules):
            found.append(node)
            return dataclasses.replace(node, submodules=_with_router(node.submodules, builder))
        return dataclasses.replace(node, submodules=_transform(node.submodules, builder, found))
    if isinstance(node, functools.partial):  # megatron-core >= 0.19 builds layers as partials
        keywords = dict(node.keywords)
        if _is_moe_layer(node.func) and isinstance(keywords.get("submodules"), MoESubmodules):
            found.append(node)
            keywords["submodules"] = _with_router(keywords["submodules"], builder)
        else:
            keywords = {k: _transform(v, builder, found) for k, v in keywords.items()}
        return functools.partial(node.func, *node.args, **keywords)
    if isinstance(node, (list, tuple)):
        return type(node)(_transform(item, builder, found) for item in node)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        changes = {f.name: _transform(getattr(node, f.name), builder, found) for f in dataclasses.fields(node) if f.init}
        return dataclasses.replace(node, **changes)
    return node


def with_sara(
    spec,
    options: SARAOptions,
    *,
    priors: Union[None, RoutingPriors, str, os.PathLike] = None,
    router_class: type = SARARouter,
):
    """A copy of a Megatron layer or block spec whose MoE layers route with :class:`SARARouter`.

    ``spec``: what ``GPTModel(transformer_layer_spec=...)`` takes: a layer ``ModuleSpec``
    (``get_gpt_layer_local_spec(num_experts=...)``, ``get_gpt_layer_with_transformer_engine_spec``),
    a block spec (``get_gpt_decoder_block_spec``), or the ``functools.partial`` form of
    megatron-core 0.19. ``options``: :class:`sara_kernels.term.SARAOptions`; per micro-batch the
    selected layers add ``sara_weight * sara_loss`` (weighted mean over the layers, mean over the
    pairs); ``sara_layers`` counts 0-based decoder layers (Megatron's ``layer_number - 1``);
    the score is the router's ``moe_router_score_function``. ``priors``: a
    :class:`~sara_kernels.hf.RoutingPriors` or a priors file (see
    :func:`~sara_kernels.megatron.extract_routing_priors`); ``None`` for live anchors.
    ``router_class``: a :class:`SARARouter` subclass (e.g. one combined with your own router).
    """
    if not isinstance(options, SARAOptions):
        raise TypeError(f"options: expected sara_kernels.term.SARAOptions, got {type(options).__name__}")
    if not (isinstance(router_class, type) and issubclass(router_class, SARARouter)):
        raise TypeError(f"router_class: expected a subclass of SARARouter, got {router_class!r}")
    if isinstance(priors, (str, os.PathLike)):
        priors = load_routing_priors(priors)
    found: list = []
    out = _transform(spec, functools.partial(router_class, sara=options, priors=priors), found)
    if not found:
        raise ValueError(
            "with_sara: the spec has no MoELayer (with MoESubmodules): build it with num_experts= "
            "(e.g. get_gpt_layer_local_spec(num_experts=8))"
        )
    return out
