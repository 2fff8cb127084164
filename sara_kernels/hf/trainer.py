"""``transformers.Trainer`` integration: SARA options and ``SARATrainer`` (batches come from
:class:`~sara_kernels.hf.collate.SARACollator`).

Loss per micro-batch (what the gradients see, summed over an optimiser step):

    LM(target [+ anchor]) + sara_weight × SARA(anchor routing, target routing)

**Batch layout.** :class:`SARACollator` stacks the anchors on top of the targets: rows
``[0, B)`` are anchors, rows ``[B, 2B)`` their targets (or only the B targets when the anchor
is not needed: cached priors, or ``sara_weight == 0``), right-padded, with ``labels`` = -100 on
anchor rows unless ``lm_on_anchor``. Because ``labels`` covers every row the LM is trained on,
the Trainer's own token count (``num_items_in_batch``) is right in every mode. With
``sara_packing`` the same sequences, in the same order, are packed into one row without padding
(see :mod:`~sara_kernels.hf.collate`), and SARA pairs sequence b of the targets with sequence b
of the anchors through per-side ``cu_seqlens``: loss and gradients equal the padded step's.

**One or two forwards.** When the anchor needs no gradient (``detach_anchor=True`` and no LM
on the anchor — the default), the anchor rows run in a separate ``torch.no_grad()`` forward
(with ``logits_to_keep=1``: no vocabulary projection) and only the target rows build a graph:
no anchor activations are stored and the backward pass covers B rows, not 2B. When the anchor
needs gradient, all 2B rows run in one forward, so DDP sees a single forward per backward.

**LM loss.** The target forward gets the ``labels`` and the LM loss is the one the model's
forward returns, so whatever loss path the model has — transformers' own, a fused linear
cross-entropy that never builds the ``[B, S, V]`` logits (Liger's ``use_liger_kernel``, TRL's) —
is the one used. It is asked for the token *sum* (``num_items_in_batch=1``) when the model takes
loss kwargs, else it is the micro-batch mean; the router aux loss that transformers' MoE models
add to it (``router_aux_loss_coef × aux_loss``, when ``output_router_logits``) is taken out and
scaled separately.

**Scaling.** ``training_step`` divides a returned loss by the number of accumulation steps
k unless the loss is "already scaled" (``model_accepts_loss_kwargs`` with
``num_items_in_batch``), and ``compute_loss`` multiplies it by the world size W when tokens are
averaged across devices. A term added to a token-normalised LM loss (as transformers does with
its MoE aux loss) is therefore never divided by k and is multiplied by W. ``SARATrainer`` sets
``loss_is_scaled_for_ga = True`` and scales each term itself: the LM term exactly as the
Trainer would, the SARA term (and the model's aux loss) as ``λ · SARA / k`` on every rank
(:mod:`sara_kernels.hf.term`, shared with ``SARASFTTrainer``), so after DDP's gradient averaging
the step's gradient is ``λ ×`` the mean per-micro-batch SARA loss, independent of k and W.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import unwrap_peft_model

from ..term import SARAOptions, SARATerm, SequenceLayout
from .capture import CapturedRouterLogits
from .checkpoint import SARACheckpointing
from .collate import IGNORE_INDEX, SARACollator
from .data import PairDataset, anchors_fingerprint
from .priors import RoutingPriors, load_routing_priors
from .routing import answer_positions, answers_reproduced, forward_kwargs
from .term import SARATermMixin, check_trainer_scaling, prepare_sara_model

__all__ = ["SARAOptions", "SARATrainer", "SARATrainingArguments", "prepare_sara_model"]


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


@dataclass
class SARATrainingArguments(SARAOptions, TrainingArguments):
    """``TrainingArguments`` plus the SARA options (:class:`SARAOptions`)."""

    sara_max_length: Optional[int] = field(default=None, metadata={"help": "Truncate each side to this many tokens."})
    sara_packing: bool = field(
        default=False,
        metadata={"help": "Pack each batch into one row without padding (position_ids restart per sequence)."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Must stay False: the collator tokenises the raw 'anchor'/'target' columns."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.sara_max_length is not None and (not isinstance(self.sara_max_length, int) or self.sara_max_length < 1):
            raise ValueError(f"sara_max_length must be a positive int or None, got {self.sara_max_length!r}")


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------


def _wrap_pairs(dataset, name: str):
    """Lists (and other map-style sequences of dicts) become a validated :class:`PairDataset`."""
    if dataset is None or isinstance(dataset, (PairDataset, torch.utils.data.IterableDataset)):
        return dataset
    if isinstance(dataset, dict):
        return {k: _wrap_pairs(v, f"{name}[{k!r}]") for k, v in dataset.items()}
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        try:
            return PairDataset(dataset)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{name}: {e}") from None
    return dataset


def _trim(ids: torch.Tensor, mask: torch.Tensor, labels: Optional[torch.Tensor]):
    """Drop trailing columns that are padding in every row (the other side may have been longer).

    Reading the length is a host sync (one scalar per step), accepted because the columns it
    drops would otherwise go through every layer's forward and backward.
    """
    cols = torch.nonzero(mask.any(dim=0))
    length = int(cols.max()) + 1 if cols.numel() else 1
    return ids[:, :length], mask[:, :length], None if labels is None else labels[:, :length]


# Forward options that only concern the LM loss (Liger's ``skip_logits`` needs labels), kept out
# of the label-free anchor forward.
_LM_ONLY_KWARGS = ("skip_logits",)


def _router_aux_coef(model) -> float:
    """The coefficient with which the model adds its router aux loss to ``loss`` when given labels.

    transformers' MoE causal LMs read it from ``router_aux_loss_coef`` (``aux_loss_coef`` for
    JetMoE), on the config or its ``text_config`` for vision-language MoE models.
    """
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        for name in ("router_aux_loss_coef", "aux_loss_coef"):
            value = getattr(cfg, name, None)
            if value is not None:
                return float(value)
    raise ValueError(
        "the model returns an aux_loss but its config has no router_aux_loss_coef: SARATrainer cannot tell its "
        "part in the model's loss; set output_router_logits=False or give the config router_aux_loss_coef"
    )


@dataclass
class _PairBatch:
    """A :class:`SARACollator` batch taken apart. Padded: rows ``[0, num_pairs)`` are the anchors
    when ``has_anchor``, then the targets. Packed (``cu_seqlens`` given): one row whose sequences
    are, in that order, the anchors and the targets. ``extra`` holds the other forward inputs."""

    index: torch.Tensor
    input_ids: torch.Tensor
    labels: torch.Tensor
    extra: dict
    attention_mask: Optional[torch.Tensor] = None  # padded
    position_ids: Optional[torch.Tensor] = None  # packed
    cu_seqlens: Optional[torch.Tensor] = None  # packed
    answer_mask: Optional[torch.Tensor] = None  # sara_anchor_filter: input_ids' shape, 1 on answer tokens

    @property
    def num_pairs(self) -> int:
        return int(self.index.shape[0])

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.shape[0] - 1 if self.cu_seqlens is not None else self.input_ids.shape[0]

    @property
    def has_anchor(self) -> bool:
        return self.num_sequences == 2 * self.num_pairs

    @classmethod
    def from_inputs(cls, inputs) -> "_PairBatch":
        extra = dict(inputs)
        if "sara_example_index" not in extra:
            raise ValueError(
                "batch has no 'sara_example_index': SARATrainer needs batches from SARACollator "
                f"(got keys {sorted(extra)})"
            )
        if extra.get("labels") is None:
            raise ValueError(
                "batch has no 'labels': SARATrainer runs the LM loss through the model's own loss path, which needs "
                "them (SARACollator provides them; -100 everywhere trains SARA alone)"
            )
        batch = cls(index=extra.pop("sara_example_index"), input_ids=extra.pop("input_ids"), labels=extra.pop("labels"),
                    extra=extra, cu_seqlens=extra.pop("sara_cu_seqlens", None),
                    answer_mask=extra.pop("sara_answer_mask", None))
        if batch.cu_seqlens is None:
            batch.attention_mask = extra.pop("attention_mask")
            what = "rows"
        else:
            if "attention_mask" in extra or "position_ids" not in extra or batch.input_ids.shape[0] != 1:
                raise ValueError(
                    "packed batch (with 'sara_cu_seqlens'): expected one row of input_ids with 'position_ids' and no "
                    f"'attention_mask' (SARACollator(packing=True)), got keys {sorted(inputs)} and input_ids of shape "
                    f"{tuple(batch.input_ids.shape)}"
                )
            batch.position_ids = extra.pop("position_ids")
            what = "packed sequences"
        if batch.num_sequences not in (batch.num_pairs, 2 * batch.num_pairs):
            raise ValueError(
                f"batch has {batch.num_sequences} {what} for {batch.num_pairs} pairs; expected anchors + targets or "
                "targets only"
            )
        return batch

    def whole(self):
        """(forward inputs, labels) of the whole batch."""
        layout = {"attention_mask": self.attention_mask} if self.cu_seqlens is None else {"position_ids": self.position_ids}
        return {"input_ids": self.input_ids, **layout}, self.labels

    def side(self, anchor: bool):
        """(forward inputs, labels, :class:`SequenceLayout`) of the anchor or the target sequences.

        Padded: their rows, trailing padding dropped. Packed: their tokens, and ``cu_seqlens``
        relative to them; finding the split reads one boundary on the host (a sync per step).
        """
        if self.cu_seqlens is None:
            rows = slice(0, self.num_pairs) if anchor else slice(self.num_sequences - self.num_pairs, None)
            ids, mask, labels = _trim(self.input_ids[rows], self.attention_mask[rows], self.labels[rows])
            return {"input_ids": ids, "attention_mask": mask}, labels, SequenceLayout(mask=mask)
        first = 0 if anchor else self.num_sequences - self.num_pairs
        cu = self.cu_seqlens[first : first + self.num_pairs + 1]
        start, end = (int(x) for x in cu[[0, -1]].tolist())
        tokens = slice(start, end)
        inputs = {"input_ids": self.input_ids[:, tokens], "position_ids": self.position_ids[:, tokens]}
        return inputs, self.labels[:, tokens], SequenceLayout(cu_seqlens=cu - cu[0])

    def answers(self, anchor: bool) -> torch.Tensor:
        """The answer mask of the anchor or the target sequences, cut as :meth:`side` cuts their inputs."""
        if self.cu_seqlens is None:
            rows = slice(0, self.num_pairs) if anchor else slice(self.num_sequences - self.num_pairs, None)
            width = _trim(self.input_ids[rows], self.attention_mask[rows], None)[0].shape[1]
            return self.answer_mask[rows, :width]
        first = 0 if anchor else self.num_sequences - self.num_pairs
        start, end = (int(x) for x in self.cu_seqlens[[first, first + self.num_pairs]].tolist())
        return self.answer_mask[:, start:end]

    def split(self, logits: tuple):
        """(anchor logits, target logits, anchor layout, target layout) of router logits over the whole batch."""
        if not self.has_anchor:
            layout = SequenceLayout(self.attention_mask, self.cu_seqlens)  # one of them is None
            return None, logits, SequenceLayout(), layout
        if self.cu_seqlens is None:
            split = self.num_pairs * self.input_ids.shape[1]
            anchor = SequenceLayout(mask=self.attention_mask[: self.num_pairs])
            target = SequenceLayout(mask=self.attention_mask[self.num_pairs :])
        else:
            cu = self.cu_seqlens
            split = int(cu[self.num_pairs])
            anchor = SequenceLayout(cu_seqlens=cu[: self.num_pairs + 1])
            target = SequenceLayout(cu_seqlens=cu[self.num_pairs :] - split)
        return tuple(z[:split] for z in logits), tuple(z[split:] for z in logits), anchor, target


@dataclass
class _Routing:
    """What the SARA term is computed from: the target capture, the anchor logits (None without
    anchor rows), each side's layout, and the pairs' weights."""

    target: CapturedRouterLogits
    anchor_logits: Optional[tuple]
    target_logits: tuple
    anchor_layout: SequenceLayout
    target_layout: SequenceLayout
    pair_weights: Optional[torch.Tensor] = None  # sara_anchor_filter's kept pairs


class SARATrainer(SARACheckpointing, SARATermMixin, Trainer):
    """``Trainer`` that adds ``sara_weight`` × SARA to the LM loss on parallel pairs.

    Args (beyond ``Trainer``'s):
        args: :class:`SARATrainingArguments`.
        train_dataset / eval_dataset: pairs ``{"anchor", "target", optional "lang"}``; a list is
            wrapped in :class:`~sara_kernels.hf.data.PairDataset` (validated, indexed).
        processing_class: the tokenizer, used to build the default :class:`SARACollator`.
        routing_priors: cached anchor priors (a :class:`~sara_kernels.hf.priors.RoutingPriors`
            or a path to a file written by ``extract_routing_priors``) for ``train_dataset`` in
            its order, extracted with ``max_length`` = ``sara_max_length``; training then skips
            the anchor forward. Evaluation never uses them (eval examples are indexed in another
            dataset): its batches carry the anchors, and SARA is measured on live anchors.

    Logged (train, and ``eval_``-prefixed in evaluation): ``lm_loss`` (in training the LM part of
    the logged ``loss``: token-weighted over the micro-batches and ranks of each step, averaged
    over the steps since the last log; in evaluation the mean over micro-batches of their token
    means), ``sara_loss`` (unweighted, mean over micro-batches and ranks since the last log) and
    ``sara_js/layer_{i}`` (mean JS of decoder layer i). In training ``loss`` = ``lm_loss`` +
    ``sara_weight`` × ``sara_loss`` (+ the model's router aux term when it returns one).
    """

    # compute_loss scales every term for gradient accumulation itself (see the module docstring).
    loss_is_scaled_for_ga = True

    def __init__(self, model=None, args: Optional[SARATrainingArguments] = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, *,
                 routing_priors=None, **kwargs):
        if args is None:
            args = SARATrainingArguments()
        if not isinstance(args, SARATrainingArguments):
            raise TypeError(
                f"args: SARATrainer needs SARATrainingArguments (TrainingArguments plus the sara_* options), "
                f"got {type(args).__name__}"
            )
        if args.remove_unused_columns:
            raise ValueError(
                "args.remove_unused_columns must be False for SARATrainer: the collator tokenises the raw "
                "'anchor'/'target' columns, which the model's forward signature does not list"
            )
        if args.n_gpu > 1:
            raise ValueError(
                f"SARATrainer does not support torch.nn.DataParallel ({args.n_gpu} GPUs in one process): "
                "launch one process per GPU (torchrun / accelerate launch)"
            )
        if model is None:
            raise ValueError("model: SARATrainer needs a Mixture-of-Experts causal LM")
        # compute_loss composes the loss itself, so these Trainer options would be ignored silently.
        if args.label_smoothing_factor != 0:
            raise ValueError(
                f"args.label_smoothing_factor must be 0 for SARATrainer (got {args.label_smoothing_factor}): "
                "its LM term is the loss the model's forward returns"
            )
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("compute_loss_func: SARATrainer computes the loss itself (LM + sara_weight × SARA)")
        if args.sara_weight > 0:
            prepare_sara_model(model, args)
        train_dataset = _wrap_pairs(train_dataset, "train_dataset")
        eval_dataset = _wrap_pairs(eval_dataset, "eval_dataset")

        if isinstance(routing_priors, (str, bytes)) or hasattr(routing_priors, "__fspath__"):
            routing_priors = load_routing_priors(routing_priors, model=model, layers=args.sara_layers, score=args.sara_score)
        if routing_priors is not None:
            self._check_priors(routing_priors, args, train_dataset)
            if args.sara_anchor_filter == "correct_anchor_wrong_target":
                raise ValueError(
                    "sara_anchor_filter='correct_anchor_wrong_target' with routing_priors: not supported yet; train "
                    "with live anchors (drop routing_priors) or use sara_anchor_filter='correct'"
                )
            if args.sara_anchor_filter == "correct" and routing_priors.anchor_correct is None:
                raise ValueError(
                    "sara_anchor_filter='correct' with routing_priors: the priors file records no anchor correctness; "
                    "extract it with extract_routing_priors(..., anchor_answers=True) (priors --anchor_answers)"
                )

        eval_collator = None
        if data_collator is None:
            if processing_class is None:
                raise ValueError("processing_class: give the tokenizer (or a data_collator) so pairs can be tokenised")
            data_collator = SARACollator(
                processing_class,
                max_length=args.sara_max_length,
                include_anchor=args.sara_lm_on_anchor or (args.sara_weight > 0 and routing_priors is None),
                lm_on_anchor=args.sara_lm_on_anchor,
                packing=args.sara_packing,
                anchor_filter=args.sara_anchor_filter if args.sara_weight > 0 and routing_priors is None else "none",
            )
            if args.sara_weight > 0 and not data_collator.include_anchor:
                # Priors cover the training pairs only: evaluation measures SARA on live anchors.
                eval_collator = SARACollator(processing_class, max_length=args.sara_max_length, include_anchor=True,
                                             packing=args.sara_packing, anchor_filter=args.sara_anchor_filter)
        self._eval_collator = eval_collator
        self.routing_priors: Optional[RoutingPriors] = routing_priors
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        check_trainer_scaling(self)

    def get_eval_dataloader(self, eval_dataset=None):
        """With priors the training batches carry no anchors; evaluation batches do (see __init__)."""
        if self._eval_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        train_collator, self.data_collator = self.data_collator, self._eval_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    @staticmethod
    def _check_priors(priors, args, train_dataset):
        if not isinstance(priors, RoutingPriors):
            raise TypeError(f"routing_priors: expected RoutingPriors or a path, got {type(priors).__name__}")
        if not args.sara_detach_anchor:
            raise ValueError(
                "routing_priors are fixed tensors and cannot pass gradient to the anchor: "
                "sara_detach_anchor=False needs live anchors (drop routing_priors)"
            )
        if abs(priors.temperature - float(args.sara_temperature)) > 1e-12:
            raise ValueError(
                f"routing_priors were computed at temperature {priors.temperature}, "
                f"but sara_temperature = {args.sara_temperature}"
            )
        if args.sara_score is not None and args.sara_score != priors.score:
            raise ValueError(f"routing_priors use score={priors.score!r}, but sara_score = {args.sara_score!r}")
        if priors.max_length != args.sara_max_length:
            raise ValueError(
                f"routing_priors were extracted with max_length={priors.max_length}, but sara_max_length = "
                f"{args.sara_max_length}: cached anchors would be truncated differently from live ones; "
                f"re-extract with max_length={args.sara_max_length}"
            )
        if isinstance(train_dataset, torch.utils.data.IterableDataset):
            raise ValueError(
                "routing_priors need a map-style train_dataset (a list or PairDataset): priors are looked up by "
                "each example's index, which an IterableDataset does not have; train with live anchors "
                "(drop routing_priors) or materialise the pairs as a list"
            )
        if isinstance(train_dataset, PairDataset):
            if len(train_dataset) != priors.num_examples:
                raise ValueError(
                    f"routing_priors hold {priors.num_examples} examples but train_dataset has {len(train_dataset)}"
                )
            if priors.fingerprint and priors.fingerprint != anchors_fingerprint(train_dataset.pairs):
                raise ValueError(
                    "routing_priors were extracted from other anchors (or the same in another order) than "
                    "train_dataset's: priors are looked up by example index, so re-extract them for this dataset"
                )

    # ---- loss -----------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """LM + λ·SARA for one micro-batch, already scaled for accumulation and world size."""
        batch = _PairBatch.from_inputs(inputs)
        training = model.training
        use_sara = self._uses_sara(batch, training)
        outputs, lm_labels, routing = self._forward(model, batch, use_sara)
        lm_mean, lm_step, aux_term = self._lm_terms(model, outputs, lm_labels, training, num_items_in_batch)
        term = self._sara_from(routing, batch.index, training) if use_sara else None
        scale = self._sara_step_scale(training, num_items_in_batch)
        loss = lm_step
        if term is not None:
            loss = loss + (self.args.sara_weight * scale) * term.loss.to(lm_mean.dtype)
        if aux_term is not None:
            loss = loss + scale * aux_term
        # lm_loss is the LM part of the loss the Trainer logs (token-weighted over the step's
        # micro-batches and ranks), so that loss = lm_loss + sara_weight * sara_loss (+ the model's
        # aux term); the micro-batches' own means would differ from it wherever their token counts do.
        lm_logged = lm_step / scale if training else lm_mean
        self._sara_record(training, {"lm_loss": lm_logged, **(term.metrics() if term is not None else {})})
        return (loss, outputs) if return_outputs else loss

    def _uses_sara(self, batch: _PairBatch, training: bool) -> bool:
        """Whether this micro-batch gets a SARA term: anchors in the batch, or priors in training."""
        if self.args.sara_weight == 0:
            return False
        if batch.has_anchor or (training and self.routing_priors is not None):
            return True
        if training:
            raise ValueError("batch has no anchor rows and no routing priors were given: SARA needs one of them")
        return False

    def _forward(self, model, batch: _PairBatch, use_sara: bool):
        """Run the model on the batch: (outputs, the labels of its LM loss, the routing SARA needs or None).

        Two forwards when the anchor needs no gradient (a graph-free anchor pass, then the target
        pass, see the module docstring), else one over all rows.
        """
        args = self.args
        unwrapped = unwrap_peft_model(self.accelerator.unwrap_model(model))
        lm_kwargs = dict(batch.extra, **forward_kwargs(unwrapped, lm_head=True))
        if self.model_accepts_loss_kwargs:
            # The model then returns its token *sum* (+ its aux term): each term is scaled in compute_loss.
            lm_kwargs["num_items_in_batch"] = batch.input_ids.new_ones(())
        anchor_needs_grad = args.sara_lm_on_anchor or not args.sara_detach_anchor
        priors = self.routing_priors if model.training else None
        if use_sara and batch.has_anchor and priors is None and not anchor_needs_grad:
            anchor_inputs, _, anchor_layout = batch.side(anchor=True)
            target_inputs, target_labels, target_layout = batch.side(anchor=False)
            # The anchor forward has no labels: LM-only flags (the Trainer's skip_logits) stay out of it.
            routing_inputs = {k: v for k, v in batch.extra.items() if k not in _LM_ONLY_KWARGS}
            filtered = self._answer_mask(batch) is not None
            anchor, anchor_correct = self._sara_anchor_routing(
                model, answer_mask=batch.answers(anchor=True) if filtered else None,
                cu_seqlens=anchor_layout.cu_seqlens, **anchor_inputs, **routing_inputs)
            with self._sara_capture(model) as target:
                outputs = model(**target_inputs, labels=target_labels, **lm_kwargs)
            weights = None
            if filtered:
                target_correct = None
                if self.args.sara_anchor_filter == "correct_anchor_wrong_target":
                    target_correct = self._reproduced(outputs, target_inputs["input_ids"], batch.answers(anchor=False),
                                                      target_layout.cu_seqlens)
                weights = self._sara_kept_pairs(anchor_correct, target_correct)
            return outputs, target_labels, _Routing(target, anchor.logits, target.logits, anchor_layout, target_layout,
                                                    weights)
        inputs, labels = batch.whole()
        with self._sara_capture(model, use_sara) as captured:
            outputs = model(**inputs, labels=labels, **lm_kwargs)
        if not use_sara:
            return outputs, labels, None
        weights = None
        answer_mask = self._answer_mask(batch) if batch.has_anchor else None  # else priors: their flags decide
        if answer_mask is not None:
            correct = self._reproduced(outputs, inputs["input_ids"], answer_mask, batch.cu_seqlens)
            weights = self._sara_kept_pairs(correct[: batch.num_pairs], correct[batch.num_pairs :])
        return outputs, labels, _Routing(captured, *batch.split(captured.logits), pair_weights=weights)

    def _answer_mask(self, batch: _PairBatch) -> Optional[torch.Tensor]:
        """The batch's answer mask when ``sara_anchor_filter`` is on (a one-line error if the batch lacks it)."""
        if self.args.sara_anchor_filter == "none":
            return None
        if batch.answer_mask is None:
            raise ValueError(
                f"sara_anchor_filter={self.args.sara_anchor_filter!r}: the batch has no 'sara_answer_mask'; build the "
                "collator with SARACollator(anchor_filter=...) (the default collator does)"
            )
        return batch.answer_mask

    def _reproduced(self, outputs, input_ids, answer_mask, cu_seqlens) -> torch.Tensor:
        """:func:`answers_reproduced` from the logits of a training forward (every position)."""
        logits = outputs.get("logits") if isinstance(outputs, dict) else None
        if logits is None:
            raise ValueError(
                f"sara_anchor_filter={self.args.sara_anchor_filter!r} reads the model's logits, but its forward "
                "returned none (a fused LM loss such as use_liger_kernel skips them); turn that off"
            )
        positions = answer_positions(answer_mask)
        return answers_reproduced(logits[:, positions], input_ids, answer_mask, positions, cu_seqlens)

    def _lm_terms(self, model, outputs, lm_labels, training: bool, num_items_in_batch):
        """(LM mean of this micro-batch, the LM term of the step's loss, the model's aux term or None).

        The LM term comes from the model's own loss (so a fused linear-cross-entropy path never
        builds the [B, S, V] logits). With labels, transformers' MoE models add coef × aux_loss to
        it: taken out here, and scaled like SARA in compute_loss (subtracting the same product
        makes its gradient through the LM term cancel exactly).
        """
        model_loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        aux = outputs.get("aux_loss") if isinstance(outputs, dict) else None
        aux_term = None
        if aux is not None:
            aux_term = _router_aux_coef(self.accelerator.unwrap_model(model)) * aux.to(model_loss.device)
            model_loss = model_loss - aux_term
        # Counted as the Trainer counts num_items_in_batch (shifted for causal LM losses).
        counted = lm_labels[:, 1:] if getattr(self, "_loss_shifts_labels", True) else lm_labels
        local_items = (counted != IGNORE_INDEX).sum()
        if self.model_accepts_loss_kwargs:
            lm_mean = model_loss / local_items.clamp(min=1)  # model_loss is the token sum
        else:
            # The model's mean over this micro-batch's tokens: NaN (0 / 0) when it has none.
            lm_mean = torch.where(local_items > 0, model_loss, model_loss.new_zeros(()))
        if training and num_items_in_batch is not None:
            # 0 tokens (e.g. one-token targets): the sum is 0 then, and 0 / 0 would be NaN.
            items = num_items_in_batch.clamp(min=1) if torch.is_tensor(num_items_in_batch) else max(num_items_in_batch, 1)
            lm_step = model_loss / items
            if self.args.average_tokens_across_devices:
                lm_step = lm_step * (self.accelerator.num_processes // self.get_tp_size())
        else:
            lm_step = lm_mean * self._sara_step_scale(training, num_items_in_batch)
        return lm_mean, lm_step, aux_term

    def _sara_from(self, routing: _Routing, index: torch.Tensor, training: bool) -> SARATerm:
        """The SARA term on live anchors, or in training with priors on the cached anchor routing."""
        anchor_logits, anchor_layout, probs = routing.anchor_logits, routing.anchor_layout, None
        weights = routing.pair_weights
        if training and self.routing_priors is not None:
            target = routing.target
            self.routing_priors.check_against(target.layers, int(routing.target_logits[0].shape[-1]), target.score)
            # gather() validates the indices on the host (a device-to-host copy of B ints per step):
            # an index of -1 (an example without "index") must be a clear error, not a wrong prior.
            probs = self.routing_priors.gather(index, target.layers).to(routing.target_logits[0].device)
            anchor_logits, anchor_layout = None, SequenceLayout()
            if self.args.sara_anchor_filter == "correct":  # the flags recorded at extraction (index checked by gather)
                weights = self.routing_priors.anchor_correct[index.detach().cpu()].float().to(probs.device)
        return self._sara_term(routing.target, anchor_logits, routing.target_logits, anchor_layout=anchor_layout,
                               target_layout=routing.target_layout, anchor_probs=probs, pair_weights=weights)
