"""SARA inside torchtitan's MoE routers: a ``TokenChoiceTopKRouter`` subclass placed by a model converter.

torchtitan builds every module from a config tree, and its model converters (quantization, LoRA)
rewrite that tree before the model is built. :class:`SARAConverter` does the same: it replaces
the ``TokenChoiceTopKRouter.Config`` of each selected MoE layer with a :class:`SARARouter.Config`.
The router computes the layer's SARA term from its gate's pre-score logits, scored with the
router's own ``score_func`` (expert bias and node-limited routing only pick experts, so they
do not enter SARA), and attaches it to those logits with :class:`_AttachTerm`, an autograd
Function that returns its input and backpropagates the term: the term's gradient enters
backward through the router's own output, so each pipeline stage trains its own routers, and
no loss function changes.

What a router cannot know about the batch (which rows or packed documents are anchors and
targets, the dataset index of each target for cached priors, the micro-batch's share of the
step's tokens) is given around the forward and backward of one step by :class:`sara_step`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torchtitan.models.common.moe import TokenChoiceTopKRouter
from torchtitan.protocols.model import ModelConfigConverter
from torchtitan.protocols.module import Module

from ..hf.priors import RoutingPriors, load_routing_priors
from ..hf.routing import answer_positions, answers_reproduced
from ..layer_selection import select_layers
from ..microbatch import (LayerPriors, LivePairWeights, PairIndices, WeightedMeanInBackward, check_anchor_filter,
                          check_answer_inputs, micro_batch_pair_weights, pair_indices, pair_weights_of, side_sequences)
from ..term import SARAOptions, SequenceLayout, check_layer_weights, sara_term

__all__ = ["SARAConverter", "SARARouter", "SARAMicrobatch", "sara_step", "sara_metrics"]

#: The model config tree names decoder blocks ``layers.{i}``; a router elsewhere (DeepSeek-V3's
#: multi-token-prediction blocks) is no decoder layer and gets no SARA.
_DECODER_ROUTER = re.compile(r"layers\.(\d+)\.moe\.router")


class _AttachTerm(torch.autograd.Function):
    """Returns ``logits`` unchanged; in backward, the gradient of ``term`` joins theirs (the
    same device as Megatron's ``MoEAuxLossAutoScaler``)."""

    @staticmethod
    def forward(ctx, logits, term):
        ctx.save_for_backward(term)
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad_logits):
        (term,) = ctx.saved_tensors
        return grad_logits, torch.ones_like(term)


@dataclass(frozen=True)
class SARAMicrobatch:
    """The SARA layout of one micro-batch (the rows one model call sees on this rank).

    Args:
        valid_tokens: the micro-batch's label tokens that count in the LM loss
            (``(labels != IGNORE_INDEX).sum()``): with ``global_valid_tokens`` it gives the
            micro-batch's SARA the weight torchtitan gives its LM loss.
        anchor: rows (or, with ``positions``, documents) of the anchors (live mode).
        target: rows / documents of the targets, paired with ``anchor`` / ``example_index``
            element by element; default: all of them (priors mode only).
        example_index: the dataset index of each target, the row of its cached prior.
        pair_weights: one weight per pair (finite, >= 0), each pair's π in ``sara_loss``'s weighted
            mean over the pairs of the micro-batch (0 with zero gradients when every weight is 0); the
            same on every tensor-parallel rank. With ``sara_anchor_filter="correct"`` they multiply
            the priors' kept pairs.
        positions: the micro-batch's ``positions`` [B, L] as torchtitan's packing dataloader
            gives them: a document starts where its position is 0 (and at each row start);
            documents are numbered in row-major order.

    Exactly one of ``anchor`` and ``example_index``. With ``sara_anchor_filter`` and live anchors,
    the loss function calls :meth:`set_answers` before backward.
    """

    valid_tokens: Union[int, torch.Tensor]
    anchor: Optional[Sequence[int]] = None
    target: Optional[Sequence[int]] = None
    example_index: Optional[Sequence[int]] = None
    pair_weights: Optional[Union[Sequence[float], torch.Tensor]] = None
    positions: Optional[torch.Tensor] = None
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _live: LivePairWeights = field(default_factory=lambda: LivePairWeights("SARAMicrobatch.set_answers"), init=False,
                                   repr=False, compare=False)

    def __post_init__(self):
        indices = pair_indices("SARAMicrobatch", self.anchor, self.target, self.example_index, "rows")
        # On the host: the layouts are found there, once per micro-batch.
        indices = PairIndices(*(None if t is None else t.detach().to("cpu") for t in indices))
        for name, tensor in zip(PairIndices._fields, indices):
            object.__setattr__(self, name, tensor)
        object.__setattr__(self, "pair_weights", pair_weights_of(self.pair_weights, indices, "SARAMicrobatch"))
        if self.positions is not None and (not isinstance(self.positions, torch.Tensor) or self.positions.dim() != 2):
            raise ValueError("SARAMicrobatch positions: expected the micro-batch's positions tensor [B, L]")
        valid = torch.as_tensor(self.valid_tokens)
        if valid.numel() != 1 or valid.dtype.is_floating_point or valid.dtype == torch.bool:
            raise ValueError(f"SARAMicrobatch valid_tokens: expected an integer count, got {self.valid_tokens!r}")

    def _sequences(self, side: str, count: int, unit: str) -> torch.Tensor:
        return side_sequences(PairIndices(self.anchor, self.target, self.example_index), side, count, "SARAMicrobatch",
                              unit)

    def side(self, name: str, logits: torch.Tensor):
        """(the logits [N, E] of one side of logits [B, L, E], its :class:`~sara_kernels.term.SequenceLayout`)."""
        rows, seq_len, num_experts = logits.shape
        key = (name, rows, seq_len, logits.device)
        if key not in self._cache:  # read once per micro-batch, not again by each layer
            found = self._packed(name, rows, seq_len) if self.positions is not None else (self._sequences(name, rows, "rows"),)
            self._cache[key] = tuple(t.to(logits.device) for t in found)
        if self.positions is None:
            (picked_rows,) = self._cache[key]
            picked = logits.index_select(0, picked_rows)
            mask = torch.ones(picked.shape[:2], dtype=torch.bool, device=logits.device)
            return [picked.reshape(-1, num_experts)], SequenceLayout(mask=mask)
        tokens, cu = self._cache[key]
        return [logits.reshape(-1, num_experts).index_select(0, tokens)], SequenceLayout(cu_seqlens=cu)

    def set_answers(self, logits: torch.Tensor, tokens: torch.Tensor, answer_mask: torch.Tensor) -> None:
        """Which pairs ``sara_anchor_filter`` keeps, with live anchors, from the micro-batch's final LM
        logits: call it in the loss function, after the model's forward and before backward (the
        SARA gradient of every router waits for it).

        ``logits`` [B, L, V]: the model's output (the whole vocabulary, a plain tensor) for its input
        ``tokens`` [B, L]; ``answer_mask`` [B, L]: 1 on the answer tokens of each anchor row or
        document (and of each target, for ``"correct_anchor_wrong_target"``), never on a row's or
        document's first token. A sequence is answered when the greedy prediction reproduces each of
        its answer tokens, teacher-forced (:func:`~sara_kernels.hf.routing.answers_reproduced`, the
        Hugging Face trainers' rule). π_b is 1 where pair b's anchor is answered (and, with
        ``"correct_anchor_wrong_target"``, its target is not), else 0, times ``pair_weights``; the
        logged per-layer values and ``sara_anchor_kept`` are those of this π.
        """
        if isinstance(logits, DTensor):
            raise ValueError(
                f"SARAMicrobatch.set_answers logits: a DTensor placed as {logits.placements}; pass the whole "
                "vocabulary's logits as a plain tensor (torchtitan's loss parallelism shards them over the vocabulary)")
        check_answer_inputs("SARAMicrobatch.set_answers", logits, tokens, answer_mask, "B, L")
        self._live.check_settable()
        answered, has_answer = self._answered(logits.detach(), tokens.to(logits.device), answer_mask.to(logits.device))
        self._live.set(answered, has_answer, PairIndices(self.anchor, self.target, self.example_index), self.pair_weights)

    def _answered(self, logits: torch.Tensor, tokens: torch.Tensor, answer_mask: torch.Tensor):
        """([num sequences] answers reproduced, [num sequences] has answer tokens) of the rows, or of the
        documents of one packed row in row-major order (a row's last logit then predicts the next
        row's first token, which no answer holds)."""
        rows, seq_len, vocab = logits.shape
        mask = answer_mask.bool()
        starts = torch.zeros(rows, seq_len, dtype=torch.bool, device=mask.device)
        if self.positions is not None:
            starts = self.positions.to(mask.device) == 0
        starts[:, 0] = True
        if (mask & starts).any():
            raise ValueError("SARAMicrobatch.set_answers answer_mask: marks a row's or document's first token, which no "
                             "logit predicts")
        if self.positions is None:
            positions = answer_positions(mask)
            return answers_reproduced(logits[:, positions], tokens, mask, positions), mask.any(dim=1)
        flat_starts = starts.reshape(-1).nonzero().squeeze(1)
        cu = torch.cat([flat_starts, torch.tensor([rows * seq_len], device=mask.device)])
        flat_mask = mask.reshape(1, -1)
        positions = answer_positions(flat_mask)
        answered = answers_reproduced(logits.reshape(1, -1, vocab)[:, positions], tokens.reshape(1, -1), flat_mask,
                                      positions, cu)
        of_token = torch.searchsorted(cu[1:], torch.arange(rows * seq_len, device=mask.device), right=True)
        counts = torch.zeros(cu.numel() - 1, device=mask.device).index_add_(0, of_token, flat_mask[0].float())
        return answered, counts > 0

    def _packed(self, name: str, rows: int, seq_len: int):
        """(token rows [T] of the flattened [B*L] micro-batch, cu_seqlens) of ``name``'s documents."""
        positions = self.positions.detach().to("cpu")
        if tuple(positions.shape) != (rows, seq_len):
            raise ValueError(f"SARAMicrobatch positions: shape {tuple(positions.shape)}, the router sees {rows} x {seq_len} tokens")
        starts = positions == 0
        starts[:, 0] = True
        flat_starts = starts.reshape(-1).nonzero().squeeze(1)
        flat_ends = torch.cat([flat_starts[1:], torch.tensor([rows * seq_len])])  # each row starts a document
        docs = self._sequences(name, flat_starts.numel(), "documents")
        tokens = torch.cat([torch.arange(int(flat_starts[d]), int(flat_ends[d])) for d in docs.tolist()])
        cu = torch.cat([torch.zeros(1, dtype=torch.long), (flat_ends - flat_starts)[docs].cumsum(0)])
        return tokens, cu.to(torch.int32)


class sara_step:
    """The SARA layouts of one forward-backward call of torchtitan's trainer, open around it.

    >>> with sara_step([SARAMicrobatch(valid_tokens=n, anchor=[0, 1], target=[2, 3])], global_valid_tokens=n):
    ...     loss = loss_fn(model(tokens), labels, global_valid_tokens)
    ...     loss.backward()
    >>> with sara_step(layouts, global_valid_tokens=n, pipeline_metadata_inference=first_step):  # one layout per micro-batch
    ...     schedule.step(tokens, target=labels, losses=losses, loss_kwargs={"global_valid_tokens": n})

    ``microbatches``: one :class:`SARAMicrobatch` per micro-batch of the call, in order (one
    without pipeline parallelism; ``n_microbatches`` under a pipeline schedule, which runs each
    stage's micro-batches in order). ``global_valid_tokens``: the step's count, the one
    torchtitan's trainer divides the LM loss by. Each micro-batch's SARA is then scaled exactly
    as its LM loss is: by ``valid_tokens / global_valid_tokens``.
    ``pipeline_metadata_inference``: ``True`` on a pipeline schedule's first ``step`` (and on any
    step after which it infers shapes again), which first runs every stage once more, forward
    and backward to the stage's inputs, to infer shapes (``torch.distributed.pipelining``,
    ``PipelineStage._forward_metadata_inference``); that extra call gets no SARA.

    The block must hold the backward too: under activation checkpointing the routers run again
    in backward (in the same micro-batch order) and recompute their term from the same layout.
    """

    _open: list = []

    def __init__(self, microbatches: Sequence[SARAMicrobatch], *, global_valid_tokens,
                 pipeline_metadata_inference: bool = False):
        if isinstance(microbatches, SARAMicrobatch):
            microbatches = [microbatches]
        microbatches = list(microbatches)
        if not microbatches or not all(isinstance(m, SARAMicrobatch) for m in microbatches):
            raise ValueError("sara_step microbatches: expected a non-empty list of SARAMicrobatch")
        total = torch.as_tensor(global_valid_tokens)
        if total.numel() != 1 or total.dtype.is_floating_point or total.dtype == torch.bool:
            raise ValueError(f"sara_step global_valid_tokens: expected an integer count, got {global_valid_tokens!r}")
        if not isinstance(pipeline_metadata_inference, bool):
            raise TypeError(f"sara_step pipeline_metadata_inference: expected a bool, got {pipeline_metadata_inference!r}")
        self.microbatches = microbatches
        self.global_valid_tokens = total
        self.pipeline_metadata_inference = pipeline_metadata_inference
        self._calls: dict = {}
        self._inferred: set = set()  # routers whose metadata-inference forward has passed

    @classmethod
    def current(cls, layer: int) -> "sara_step":
        if not cls._open:
            raise RuntimeError(
                f"SARA router of layer {layer} ran in training without a sara_step: wrap each forward-backward call in "
                "`with sara_kernels.torchtitan.sara_step(...)`, or call model.eval() / torch.no_grad()"
            )
        return cls._open[-1]

    def microbatch(self, router: "SARARouter") -> Optional[SARAMicrobatch]:
        """The layout of the micro-batch this call of ``router`` belongs to (``None``: a pipeline
        stage's metadata inference, which gets no SARA).

        Forward calls and the recomputations of activation checkpointing (which run inside
        backward) are counted apart: each runs the stage's micro-batches in order.
        """
        phase = "recompute" if torch._C._current_graph_task_id() != -1 else "forward"
        if self.pipeline_metadata_inference and self._calls.get((id(router), "forward"), 0) == 0:
            # The schedule's first step runs each stage forward (and backward, to the stage's
            # inputs only) before its micro-batches, to infer shapes; nothing of it reaches a parameter.
            if phase == "forward" and id(router) not in self._inferred:
                self._inferred.add(id(router))
                return None
            if phase == "recompute":
                return None
        key = (id(router), phase)
        index = self._calls.get(key, 0)
        if index >= len(self.microbatches):
            raise RuntimeError(
                f"SARA router of layer {router.sara_layer} ran {index + 1} times ({phase}) in a sara_step of "
                f"{len(self.microbatches)} micro-batches: give one SARAMicrobatch per micro-batch (and "
                "pipeline_metadata_inference=True on a pipeline schedule's first step)"
            )
        self._calls[key] = index + 1
        return self.microbatches[index]

    def __enter__(self):
        sara_step._open.append(self)
        return self

    def __exit__(self, *exc):
        sara_step._open.remove(self)
        return None


class SARARouter(TokenChoiceTopKRouter):
    """torchtitan's ``TokenChoiceTopKRouter`` that also attaches the SARA term of its layer.

    Built from :class:`SARARouter.Config`, which :class:`SARAConverter` puts in place of a selected
    layer's router config. Routing is unchanged. In training with grad enabled the router needs
    an open :class:`sara_step`; in eval, or under ``torch.no_grad()``, it is ``TokenChoiceTopKRouter``.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(TokenChoiceTopKRouter.Config):
        sara: SARAOptions
        sara_layer: int
        """0-based decoder-layer index of this router."""
        sara_share: float
        """This layer's share of ``sara_weight x sara_loss`` (its weight in the weighted mean over layers)."""
        _priors: Optional[RoutingPriors] = None  # leading underscore: left out of torchtitan's config dump

    def __init__(self, config: Config):
        super().__init__(config)
        self.sara = dataclasses.replace(config.sara, sara_layer_weights=None)
        self.sara_layer = config.sara_layer
        self.sara_share = config.sara_share
        self.priors = config._priors
        self._layer_priors = None if self.priors is None else LayerPriors(self.priors, "SARAMicrobatch")
        self._js_sum = None  # this layer's JS summed over the micro-batches since sara_metrics last read it
        self._js_count = 0
        self._kept_sum = None  # the fraction of pairs sara_anchor_filter kept, summed likewise
        self.gate.register_forward_hook(self._attach_sara)

    def _attach_sara(self, gate, inputs, logits):
        if not (self.training and torch.is_grad_enabled() and self.sara.sara_weight > 0):
            return None
        if isinstance(logits, DTensor):
            if not all(placement.is_replicate() for placement in logits.placements):
                raise NotImplementedError(
                    f"SARARouter: the router logits are a DTensor sharded as {logits.placements} (tensor parallelism "
                    "with expert parallelism); SARA pools whole sequences and supports tensor parallelism only "
                    "where the logits are replicated"
                )
            # Tensor parallelism without expert parallelism: every rank holds the whole batch's logits,
            # and their gradient is replicated too, so each rank adds the full term to its replica.
            attached = self._attach_sara(gate, inputs, logits.to_local())
            if attached is None:
                return None
            return DTensor.from_local(attached, logits.device_mesh, logits.placements, run_check=False)
        step = sara_step.current(self.sara_layer)
        batch = step.microbatch(self)
        if batch is None:
            return None
        scale = torch.as_tensor(batch.valid_tokens, device=logits.device) / step.global_valid_tokens.to(logits.device)
        recorded_now = torch._C._current_graph_task_id() == -1  # a recomputation in backward is not a new micro-batch
        if self.sara.sara_anchor_filter != "none" and batch.example_index is None:
            anchor_logits, anchor_layout = batch.side("anchor", logits)
            target_logits, target_layout = batch.side("target", logits)
            # Every row and document has tokens, so every pair is valid and D holds each pair's divergence.
            divergence = sara_term(self.sara, anchor_logits, target_logits, anchor_layout=anchor_layout,
                                   target_layout=target_layout, layers=(self.sara_layer,), score=self.score_func,
                                   reduction="none").loss[0]
            if recorded_now:
                batch._live.defer(self.sara.sara_anchor_filter, self._record, divergence, None)
            weighted = WeightedMeanInBackward.apply(divergence, batch._live, self.sara_layer, None)
            return _AttachTerm.apply(logits, weighted * (self.sara_share * scale))
        anchor_probs = None
        if batch.example_index is not None:
            if self.priors is None:
                raise ValueError("SARAMicrobatch(example_index=...) needs cached priors: SARAConverter.Config(priors=...)")
            anchor_logits, anchor_layout = None, SequenceLayout()
            anchor_probs = self._layer_priors.anchor_probs(self.sara_layer, batch.example_index, logits.device)
        else:
            anchor_logits, anchor_layout = batch.side("anchor", logits)
        target_logits, target_layout = batch.side("target", logits)
        pair_weights, kept = micro_batch_pair_weights(self.sara, self._layer_priors, batch.example_index,
                                                      batch.pair_weights, logits.device)
        term = sara_term(self.sara, anchor_logits, target_logits, anchor_layout=anchor_layout, target_layout=target_layout,
                         anchor_probs=anchor_probs, pair_weights=pair_weights, layers=(self.sara_layer,),
                         score=self.score_func)
        if recorded_now:
            self._record(term.per_layer[0].detach(), kept)
        return _AttachTerm.apply(logits, term.loss * (self.sara_share * scale))

    def _record(self, value: torch.Tensor, kept: Optional[torch.Tensor]) -> None:
        """Add one micro-batch's value (and kept fraction) to what :func:`sara_metrics` reads."""
        self._js_sum = value if self._js_sum is None else self._js_sum + value
        self._js_count += 1
        if kept is not None:
            self._kept_sum = kept if self._kept_sum is None else self._kept_sum + kept


def sara_metrics(model_parts, mesh=None) -> dict:
    """``{"sara_js/layer_{i}": mean JS}`` of the micro-batches since the last call, and with
    ``sara_anchor_filter`` ``"sara_anchor_kept"`` (the mean fraction of pairs kept), for torchtitan's
    ``MetricsProcessor.log(..., extra_metrics=...)``; each router's sums restart.

    ``model_parts``: the trainer's ``model_parts`` (a model or a list of pipeline stages).
    ``mesh``: a device mesh (or process group) over which the values are averaged (the trainer's
    ``parallel_dims.get_optional_mesh("loss")``, and the pipeline ranks, whose stages hold other
    layers: a layer no rank of the group holds averages to nothing and is left out).
    """
    parts = model_parts if isinstance(model_parts, (list, tuple)) else [model_parts]
    local = []  # (layer, name, mean over this rank's micro-batches); every layer saw the same kept pairs
    for part in parts:
        for module in part.modules():
            if isinstance(module, SARARouter) and module._js_count:
                local.append((module.sara_layer, f"sara_js/layer_{module.sara_layer}",
                              float(module._js_sum / module._js_count)))
                if module._kept_sum is not None:
                    local.append((-1, "sara_anchor_kept", float(module._kept_sum / module._js_count)))
                module._js_sum, module._js_count, module._kept_sum = None, 0, None
    entries = [local]
    if mesh is not None:
        group = mesh.get_group() if hasattr(mesh, "get_group") else mesh
        entries = [None] * dist.get_world_size(group)
        dist.all_gather_object(entries, local, group=group)
    sums: dict = {}
    for order, name, value in sorted(entry for rank_entries in entries for entry in rank_entries):
        total, count = sums.get(name, (0.0, 0))
        sums[name] = (total + value, count + 1)
    return {name: total / count for name, (total, count) in sums.items()}


class SARAConverter(ModelConfigConverter):
    """A torchtitan model converter that routes the selected MoE layers with :class:`SARARouter`.

    >>> spec = qwen3.model_registry("debugmodel_moe", converters=[SARAConverter.Config(options=SARAOptions(sara_weight=0.1))])

    ``options``: :class:`sara_kernels.term.SARAOptions`; per micro-batch the selected layers add
    ``sara_weight * sara_loss`` (weighted mean over the layers, mean over the pairs), with
    ``sara_layers`` counting 0-based decoder layers among those with an MoE; the score is each
    router's ``score_func`` (``sara_score`` must be ``None`` or equal it). ``priors``: a priors
    file (the :mod:`sara_kernels.hf.priors` format) for cached anchors; ``None`` for live ones.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(ModelConfigConverter.Config):
        options: SARAOptions = field(default_factory=SARAOptions)
        priors: Optional[str] = None

    def __init__(self, config: Config, **kwargs):
        if not isinstance(config.options, SARAOptions):
            raise TypeError(f"SARAConverter options: expected sara_kernels.term.SARAOptions, got {type(config.options).__name__}")
        if config.options.sara_lm_on_anchor:
            raise ValueError(
                "sara_lm_on_anchor has no meaning here: the LM loss is torchtitan's (set the anchor rows' labels to "
                "IGNORE_INDEX to keep the LM off them)"
            )
        self.options = config.options
        self.priors = None
        if config.priors is not None:
            if not isinstance(config.priors, (str, os.PathLike)):
                raise TypeError(f"SARAConverter priors: expected a priors file path or None, got {config.priors!r}")
            self.priors = load_routing_priors(config.priors)
            if float(self.priors.temperature) != float(self.options.sara_temperature):
                raise ValueError(
                    f"the priors were computed with temperature={self.priors.temperature}, SARA uses "
                    f"sara_temperature={self.options.sara_temperature}"
                )
        check_anchor_filter(self.options, self.priors, "SARAConverter")

    def convert(self, model_config: Module.Config) -> Module.Config:
        routers = {}
        for fqn, cfg, parent, attr in model_config.traverse(TokenChoiceTopKRouter.Config):
            match = _DECODER_ROUTER.fullmatch(fqn)
            if match is None:
                continue
            if isinstance(cfg, SARARouter.Config):
                raise ValueError("SARAConverter: the model's routers already use SARARouter (the converter applied twice)")
            routers[int(match.group(1))] = (cfg, parent, attr)
        if not routers:
            raise ValueError("SARAConverter: the model config has no TokenChoiceTopKRouter under layers.{i}.moe.router")
        options = self.options
        layers = select_layers(sorted(routers), options.sara_layers)
        check_layer_weights(options, layers)
        weights = options.sara_layer_weights or [1.0] * len(layers)
        for layer, weight in zip(layers, weights):
            cfg, parent, attr = routers[layer]
            if options.sara_score is not None and options.sara_score != cfg.score_func:
                raise ValueError(
                    f"sara_score={options.sara_score!r} but the router of layer {layer} scores with "
                    f"score_func={cfg.score_func!r}: SARA follows the router (leave sara_score=None)"
                )
            if self.priors is not None:
                self.priors.check_against([layer], cfg.num_experts, cfg.score_func)
            fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}
            new = SARARouter.Config(**fields, sara=options, sara_layer=layer,
                                    sara_share=options.sara_weight * weight / sum(weights), _priors=self.priors)
            if isinstance(parent, list):
                parent[attr] = new
            else:
                setattr(parent, attr, new)
        return model_config
