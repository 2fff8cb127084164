"""``transformers.Trainer`` integration: SARA options and ``SARATrainer`` (batches come from
:class:`~sara_kernels.hf.collate.SARACollator`).

Loss per micro-batch (what the gradients see, summed over an optimiser step):

    LM(target [+ anchor]) + sara_weight × SARA(anchor routing, target routing)

**Batch layout.** :class:`SARACollator` stacks the anchors on top of the targets: rows
``[0, B)`` are anchors, rows ``[B, 2B)`` their targets (or only the B targets when the anchor
is not needed: cached priors, or ``sara_weight == 0``), right-padded, with ``labels`` = -100 on
anchor rows unless ``lm_on_anchor``. Because ``labels`` covers every row the LM is trained on,
the Trainer's own token count (``num_items_in_batch``) is right in every mode.

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
Trainer would, the SARA term (and the model's aux loss) as ``λ · SARA / k`` on every rank, so
after DDP's gradient averaging the step's gradient is ``λ ×`` the mean per-micro-batch SARA
loss, independent of k and W.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import unwrap_peft_model

from .._inputs import BACKENDS, SCORES
from ..api import sara_loss
from .capture import capture_router_logits, install_router_hooks, resolve_layers_spec, router_hooks_installed
from .collate import IGNORE_INDEX, SARACollator
from .data import PairDataset, anchors_fingerprint
from .priors import RoutingPriors, load_routing_priors
from .routing import forward_kwargs


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


@dataclass
class SARAOptions:
    """The SARA options (all prefixed ``sara_``, parseable by HfArgumentParser), shared by
    :class:`SARATrainingArguments` and ``SARASFTConfig`` (:mod:`sara_kernels.hf.trl`); a mixin
    placed before the ``TrainingArguments`` subclass it extends."""

    sara_weight: float = field(default=1.0, metadata={"help": "λ: weight of the SARA loss added to the LM loss (0 = LM only)."})
    # str for HfArgumentParser; a list of ints is accepted too (normalised in __post_init__).
    sara_layers: str = field(
        default="all",
        metadata={"help": "MoE layers to align: 'all', 'middle', or comma-separated decoder-layer indices."},
    )
    sara_score: Optional[str] = field(
        default=None, metadata={"help": "Routing score: 'softmax' or 'sigmoid'; default: the model family's."}
    )
    sara_temperature: float = field(default=1.0, metadata={"help": "τ dividing the router logits before scoring."})
    sara_layer_weights: Optional[str] = field(
        default=None, metadata={"help": "Per-layer weights w_l (comma-separated or a list); default equal."}
    )
    sara_detach_anchor: bool = field(
        default=True, metadata={"help": "The anchor routing is a fixed target (no gradient through it)."}
    )
    sara_lm_on_anchor: bool = field(default=False, metadata={"help": "Also train the LM on the anchor side."})
    sara_backend: str = field(default="auto", metadata={"help": "'auto' (on CUDA the fused backend measured faster, see sara_kernels.ops.backend_choice), 'triton', 'cuda' (the C++ extension) or 'reference'."})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.sara_weight, bool) or not isinstance(self.sara_weight, (int, float)) or not (
            self.sara_weight >= 0 and math.isfinite(self.sara_weight)
        ):
            raise ValueError(f"sara_weight must be a finite number >= 0, got {self.sara_weight!r}")
        self.sara_layers = resolve_layers_spec(self.sara_layers, "sara_layers")
        if self.sara_score is not None and self.sara_score not in SCORES:
            raise ValueError(f"sara_score must be one of {SCORES} or None, got {self.sara_score!r}")
        if isinstance(self.sara_temperature, bool) or not isinstance(self.sara_temperature, (int, float)) or not (
            self.sara_temperature > 0 and math.isfinite(self.sara_temperature)
        ):
            raise ValueError(f"sara_temperature must be a finite number > 0, got {self.sara_temperature!r}")
        if isinstance(self.sara_layer_weights, str):
            try:
                self.sara_layer_weights = [float(x) for x in self.sara_layer_weights.split(",") if x.strip()]
            except ValueError:
                raise ValueError(
                    f"sara_layer_weights: expected comma-separated numbers, got {self.sara_layer_weights!r}"
                ) from None
        if self.sara_backend not in BACKENDS:
            raise ValueError(f"sara_backend must be one of {BACKENDS}, got {self.sara_backend!r}")


@dataclass
class SARATrainingArguments(SARAOptions, TrainingArguments):
    """``TrainingArguments`` plus the SARA options (:class:`SARAOptions`)."""

    sara_max_length: Optional[int] = field(default=None, metadata={"help": "Truncate each side to this many tokens."})
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


def prepare_sara_model(model, args) -> None:
    """What a trainer with SARA does to its (unwrapped) model when it is built, so that mistakes
    fail there, with the capture's message, instead of at the first training step: router hooks
    installed before the Trainer compiles the model (compiled code ignores hooks registered after
    its first call), the selected layers found, one layer weight per selected layer."""
    if args.torch_compile and not router_hooks_installed(model):
        install_router_hooks(model)
    probe = capture_router_logits(model, layers=args.sara_layers, score=args.sara_score)
    weights = args.sara_layer_weights
    if weights is not None and len(weights) != len(probe.layers):
        raise ValueError(
            f"sara_layer_weights has {len(weights)} weights but sara_layers={args.sara_layers!r} selects "
            f"{len(probe.layers)} MoE layers (decoder layers {list(probe.layers)}): give one weight per layer"
        )


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


class SARATrainer(Trainer):
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

    Logged (train, and ``eval_``-prefixed in evaluation): ``lm_loss``, ``sara_loss`` (unweighted,
    mean over micro-batches since the last log) and ``sara_js/layer_{i}`` (mean JS of decoder
    layer i).
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

        eval_collator = None
        if data_collator is None:
            if processing_class is None:
                raise ValueError("processing_class: give the tokenizer (or a data_collator) so pairs can be tokenised")
            data_collator = SARACollator(
                processing_class,
                max_length=args.sara_max_length,
                include_anchor=args.sara_lm_on_anchor or (args.sara_weight > 0 and routing_priors is None),
                lm_on_anchor=args.sara_lm_on_anchor,
            )
            if args.sara_weight > 0 and not data_collator.include_anchor:
                # Priors cover the training pairs only: evaluation measures SARA on live anchors.
                eval_collator = SARACollator(processing_class, max_length=args.sara_max_length, include_anchor=True)
        self._eval_collator = eval_collator
        self.routing_priors: Optional[RoutingPriors] = routing_priors
        self._sara_metrics: dict = {}
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)

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

    def _capture(self, model, enabled: bool):
        if not enabled:
            return contextlib.nullcontext(None)
        return capture_router_logits(model, layers=self.args.sara_layers, score=self.args.sara_score)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """LM + λ·SARA for one micro-batch, already scaled for accumulation and world size."""
        args = self.args
        inputs = dict(inputs)
        if "sara_example_index" not in inputs:
            raise ValueError(
                "batch has no 'sara_example_index': SARATrainer needs batches from SARACollator "
                f"(got keys {sorted(inputs)})"
            )
        index = inputs.pop("sara_example_index")
        input_ids, attention_mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError(
                "batch has no 'labels': SARATrainer runs the LM loss through the model's own loss path, which needs "
                "them (SARACollator provides them; -100 everywhere trains SARA alone)"
            )
        num_pairs, rows = index.shape[0], input_ids.shape[0]
        if rows not in (num_pairs, 2 * num_pairs):
            raise ValueError(f"batch has {rows} rows for {num_pairs} pairs; expected anchors + targets or targets only")
        has_anchor = rows == 2 * num_pairs
        training = model.training
        priors = self.routing_priors if training else None
        use_sara = args.sara_weight > 0 and (has_anchor or priors is not None)
        if args.sara_weight > 0 and training and not use_sara:
            raise ValueError("batch has no anchor rows and no routing priors were given: SARA needs one of them")

        unwrapped = self.accelerator.unwrap_model(model)
        # A PEFT wrapper's forward hides the model's options (logits_to_keep) behind **kwargs; it passes them on.
        lm_kwargs = dict(inputs, **forward_kwargs(unwrap_peft_model(unwrapped), lm_head=True))
        if self.model_accepts_loss_kwargs:
            # The model then returns its token *sum* (+ its aux term): each term is scaled below.
            lm_kwargs["num_items_in_batch"] = input_ids.new_ones(())
        # The anchor forward has no labels: LM-only flags (the Trainer's skip_logits) stay out of it.
        routing_kwargs = {k: v for k, v in inputs.items() if k not in _LM_ONLY_KWARGS}
        routing_kwargs.update(forward_kwargs(unwrap_peft_model(unwrapped), lm_head=False))
        anchor_needs_grad = args.sara_lm_on_anchor or not args.sara_detach_anchor
        anchor_logits = anchor_mask = anchor_probs = None
        if use_sara and has_anchor and priors is None and not anchor_needs_grad:
            # Two forwards: a graph-free anchor pass, then the target pass (see module docstring).
            a_ids, a_mask, _ = _trim(input_ids[:num_pairs], attention_mask[:num_pairs], None)
            t_ids, t_mask, t_labels = _trim(input_ids[num_pairs:], attention_mask[num_pairs:], labels[num_pairs:])
            with torch.no_grad(), self._capture(unwrapped, True) as cap_a:
                model(input_ids=a_ids, attention_mask=a_mask, **routing_kwargs)
            with self._capture(unwrapped, True) as cap:
                outputs = model(input_ids=t_ids, attention_mask=t_mask, labels=t_labels, **lm_kwargs)
            anchor_logits, anchor_mask = cap_a.logits, a_mask
            target_logits, target_mask, lm_labels = cap.logits, t_mask, t_labels
        else:
            with self._capture(unwrapped, use_sara) as cap:
                outputs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **lm_kwargs)
            lm_labels = labels
            if use_sara:
                seq = input_ids.shape[1]
                if has_anchor:
                    anchor_logits = tuple(z[: num_pairs * seq] for z in cap.logits)
                    target_logits = tuple(z[num_pairs * seq :] for z in cap.logits)
                    anchor_mask, target_mask = attention_mask[:num_pairs], attention_mask[num_pairs:]
                else:
                    target_logits, target_mask = cap.logits, attention_mask
        if use_sara and priors is not None:
            num_experts = int(target_logits[0].shape[-1])
            priors.check_against(cap.layers, num_experts, cap.score)
            # gather() validates the indices on the host (a device-to-host copy of B ints per step):
            # an index of -1 (an example without "index") must be a clear error, not a wrong prior.
            anchor_probs = priors.gather(index, cap.layers).to(target_logits[0].device)
            anchor_logits = anchor_mask = None

        # LM term, from the model's own loss (so a fused linear-cross-entropy path never builds the
        # [B, S, V] logits). With labels, transformers' MoE models add coef × aux_loss to it: taken
        # out here, and scaled below like SARA (subtracting the same product makes its gradient
        # through the LM term cancel exactly).
        model_loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        device = model_loss.device
        aux = outputs.get("aux_loss") if isinstance(outputs, dict) else None
        aux_term = None
        if aux is not None:
            aux_term = _router_aux_coef(unwrapped) * aux.to(device)
            model_loss = model_loss - aux_term
        # Counted as the Trainer counts num_items_in_batch (shifted for causal LM losses).
        counted = lm_labels[:, 1:] if getattr(self, "_loss_shifts_labels", True) else lm_labels
        local_items = (counted != IGNORE_INDEX).sum()
        if self.model_accepts_loss_kwargs:
            lm_sum = model_loss
            lm_mean = lm_sum / local_items.clamp(min=1)
        else:
            # The model's mean over this micro-batch's tokens: NaN (0 / 0) when it has none.
            lm_sum = None
            lm_mean = torch.where(local_items > 0, model_loss, model_loss.new_zeros(()))

        if use_sara:
            sara, per_layer = sara_loss(
                anchor_logits, target_logits, anchor_mask, target_mask,
                anchor_probs=anchor_probs, layer_weights=args.sara_layer_weights,
                temperature=args.sara_temperature, score=cap.score, detach_anchor=args.sara_detach_anchor,
                return_per_layer=True, backend=args.sara_backend,
            )
            sara = sara.to(lm_mean.dtype)
        else:
            sara, per_layer = lm_mean.new_zeros(()), None

        if training:
            k = getattr(self, "current_gradient_accumulation_steps", None) or args.gradient_accumulation_steps
            if num_items_in_batch is not None:
                # 0 tokens (e.g. one-token targets): lm_sum is 0 then, and 0 / 0 would be NaN.
                items = num_items_in_batch.clamp(min=1) if torch.is_tensor(num_items_in_batch) else max(num_items_in_batch, 1)
                lm = lm_sum / items
                if args.average_tokens_across_devices:
                    lm = lm * (self.accelerator.num_processes // self.get_tp_size())
            else:
                lm = lm_mean / k
            loss = lm + (args.sara_weight / k) * sara
            if aux_term is not None:
                loss = loss + aux_term / k
        else:
            loss = lm_mean + args.sara_weight * sara + (aux_term if aux_term is not None else 0.0)

        self._record(training, lm_mean, sara if use_sara else None, per_layer, cap.layers if use_sara else ())
        return (loss, outputs) if return_outputs else loss

    # ---- logging --------------------------------------------------------------------------

    def _record(self, training, lm_mean, sara, per_layer, layers):
        mode = "train" if training else "eval"
        names = ["lm_loss"]
        values = [lm_mean.detach().float().reshape(1)]
        if sara is not None:
            names.append("sara_loss")
            values.append(sara.detach().float().reshape(1))
            names += [f"sara_js/layer_{i}" for i in layers]
            values.append(per_layer.detach().float().reshape(-1))
        row = torch.cat([v.to(values[0].device) for v in values])
        current = self._sara_metrics.get(mode)
        if current is None or current[0] != names:
            self._sara_metrics[mode] = [names, row, 1]
        else:
            current[1] = current[1] + row
            current[2] += 1

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        """Add the SARA metrics accumulated since the last log (averaged over micro-batches and ranks)."""
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        entry = self._sara_metrics.pop(mode, None)
        if entry is not None:
            names, total, count = entry
            values = total / count
            if self.accelerator.num_processes > 1:
                values = self.accelerator.reduce(values, reduction="mean")
            prefix = "eval_" if mode == "eval" else ""
            # In place: evaluate() returns the same dict it logs, so eval_sara_* reach its caller too.
            logs.update({prefix + n: float(v) for n, v in zip(names, values.tolist())})
        super().log(logs, start_time)
