"""The SARA term of a ``transformers.Trainer`` step, shared by :class:`~sara_kernels.hf.SARATrainer`
and :class:`~sara_kernels.hf.SARASFTTrainer`: router capture, the anchor's routing forward, the
scaling under gradient accumulation and data parallelism, and the logged metrics. The options,
the loss call and the metric names are the framework-neutral :mod:`sara_kernels.term`.

**Scaling.** Each micro-batch adds ``λ · SARA / k`` (k = gradient-accumulation steps of this
optimiser step) on every rank, so after DDP's gradient averaging the step's gradient is ``λ ×``
the mean per-micro-batch SARA loss, independent of k and of the world size W. The Trainer's
``training_step`` divides the loss ``compute_loss`` returns by k unless that loss is "already
scaled" (``loss_is_scaled_for_ga``, or its own rule when that is None), so the factor given to
SARA here is ``1 / k`` when the Trainer will not divide and ``1`` when it will. The term is added
after the Trainer's ``compute_loss`` multiplies its token-averaged LM loss by W, so it is never
multiplied by W. That rule is transformers' (``Trainer.training_step`` and ``compute_loss``), mirrored
here: :func:`check_trainer_scaling` makes a trainer's construction fail, naming the attribute, when
the installed transformers no longer reads what the mirror reads (tests/hf/test_trainer.py checks the
resulting gradient over accumulation × world size against an explicit sum).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import transformers
from transformers import Trainer
from transformers.trainer_utils import unwrap_peft_model

from ..term import MetricsAccumulator, SARATerm, SequenceLayout, check_layer_weights, kept_pairs, sara_term
from .capture import (
    CapturedRouterLogits,
    capture_router_logits,
    early_exit_possible,
    install_router_hooks,
    router_hooks_installed,
)
from .routing import answer_positions, answers_reproduced, forward_kwargs


def prepare_sara_model(model, args) -> None:
    """What a trainer with SARA does to its (unwrapped) model when it is built, so that mistakes
    fail there, with the capture's message, instead of at the first training step: router hooks
    installed before the Trainer compiles the model (compiled code ignores hooks registered after
    its first call), the selected layers found, one layer weight per selected layer."""
    if args.torch_compile and not router_hooks_installed(model):
        install_router_hooks(model)
    probe = capture_router_logits(model, layers=args.sara_layers, score=args.sara_score)
    check_layer_weights(args, probe.layers)


# What the scaling here and SARATrainer's LM term mirror of transformers.Trainer: the attributes each
# method reads to decide the division by the accumulation steps k and the multiplication by W.
TRAINER_SCALING_READS = {
    "training_step": ("loss_is_scaled_for_ga", "model_accepts_loss_kwargs", "compute_loss_func",
                      "current_gradient_accumulation_steps"),
    "compute_loss": ("average_tokens_across_devices", "model_accepts_loss_kwargs", "compute_loss_func",
                     "num_processes", "get_tp_size"),
}


def check_trainer_scaling(trainer) -> None:
    """Fail, naming the transformers attribute, unless the Trainer's loss-scaling rule is the one
    :meth:`SARATermMixin._sara_step_scale` mirrors: a release that changed it would otherwise change
    the gradient silently. Called when a trainer with SARA is built."""
    for method, names in TRAINER_SCALING_READS.items():
        read = getattr(Trainer, method).__code__.co_names
        gone = [name for name in names if name not in read]
        if gone:
            raise RuntimeError(
                f"transformers {transformers.__version__}: Trainer.{method} no longer reads {', '.join(gone)}, "
                "which SARA's loss scaling mirrors (sara_kernels.hf.term): its gradient would be silently wrong; "
                "use a transformers release this sara_kernels supports"
            )
    scaled = trainer.loss_is_scaled_for_ga
    if not (scaled is None or scaled is True or scaled is False):
        raise RuntimeError(f"Trainer.loss_is_scaled_for_ga: expected True, False or None, got {scaled!r}")
    if not isinstance(getattr(trainer, "model_accepts_loss_kwargs", None), bool):
        raise RuntimeError("Trainer.model_accepts_loss_kwargs: expected a bool set by Trainer.__init__, got "
                           f"{getattr(trainer, 'model_accepts_loss_kwargs', None)!r}")


class SARATermMixin:
    """The SARA pieces of a Trainer subclass's ``compute_loss``; placed before the Trainer class.

    ``self.args`` holds the :class:`~sara_kernels.term.SARAOptions`. The subclass runs the
    forwards inside :meth:`_sara_capture` blocks (or :meth:`_sara_anchor_routing`), then calls
    :meth:`_sara_term`, adds ``args.sara_weight * _sara_step_scale(...) * term.loss`` to its loss
    and records the term's metrics with :meth:`_sara_record`; :meth:`log` adds them to the logs.
    """

    def _sara_capture(self, model, enabled: bool = True, early_exit: bool = False):
        """A capture block on the unwrapped ``model`` (a null context yielding None when not ``enabled``)."""
        if not enabled:
            return contextlib.nullcontext(None)
        return capture_router_logits(self.accelerator.unwrap_model(model), layers=self.args.sara_layers,
                                     score=self.args.sara_score, early_exit=early_exit)

    def _sara_anchor_routing(self, model, answer_mask=None, cu_seqlens=None, **inputs):
        """(router logits, None) of a graph-free forward of the anchor rows, stopped after the last
        selected router (no later layer, no LM head) unless :func:`early_exit_possible` says no;
        then without the vocabulary projection.

        With ``answer_mask`` (``sara_anchor_filter``) the forward runs to the end and the second
        value is :func:`answers_reproduced` of each anchor (``cu_seqlens``: packed anchors). The
        vocabulary projection is then that of the answer positions only, through the model's own
        ``logits_to_keep`` given those positions (transformers' causal LMs take a tensor of indices
        there): the head, its final norm and any logit transform stay the model's. A model without
        ``logits_to_keep`` projects every position.
        """
        # A PEFT wrapper's forward hides the model's options (logits_to_keep) behind **kwargs; it passes them on.
        inputs.update(forward_kwargs(unwrap_peft_model(self.accelerator.unwrap_model(model)), lm_head=False))
        positions = None
        if answer_mask is not None:
            positions = answer_positions(answer_mask)
            if "logits_to_keep" in inputs:
                inputs["logits_to_keep"] = positions
        # The wrapper the call goes through counts too: the unwrapped model no longer shows an FSDP1 or ZeRO-3 root.
        early_exit = answer_mask is None and early_exit_possible(model)
        with torch.no_grad(), self._sara_capture(model, early_exit=early_exit) as captured:
            outputs = model(**inputs)
        if answer_mask is None:
            return captured, None
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        if "logits_to_keep" not in inputs:
            logits = logits[:, positions]
        return captured, answers_reproduced(logits, inputs["input_ids"], answer_mask, positions, cu_seqlens)

    def _sara_kept_pairs(self, anchor_correct: torch.Tensor, target_correct: Optional[torch.Tensor]) -> torch.Tensor:
        """π_b of ``sara_anchor_filter``: 1 for the pairs :func:`~sara_kernels.term.kept_pairs` keeps, else 0."""
        return kept_pairs(self.args.sara_anchor_filter, anchor_correct, target_correct).float()

    def _sara_term(self, target: CapturedRouterLogits, anchor_logits, target_logits, *, anchor_layout: SequenceLayout,
                   target_layout: SequenceLayout, anchor_probs=None, pair_weights=None) -> SARATerm:
        """:func:`~sara_kernels.term.sara_term` on the layers and score of the ``target`` capture
        (``target_logits``: its logits or the target rows of them)."""
        return sara_term(self.args, anchor_logits, target_logits, layers=target.layers, score=target.score,
                         anchor_layout=anchor_layout, target_layout=target_layout, anchor_probs=anchor_probs,
                         pair_weights=pair_weights)

    def _sara_step_scale(self, training: bool, num_items_in_batch=None) -> float:
        """The factor of a per-micro-batch mean term in the loss ``compute_loss`` returns (module docstring)."""
        if not training:
            return 1.0
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:  # the Trainer's own rule in training_step
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        if not scaled:
            return 1.0
        steps = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        return 1.0 / steps

    def _sara_record(self, training: bool, metrics: dict) -> None:
        """Keep one micro-batch's metrics (device tensors) until the next :meth:`log`."""
        if not hasattr(self, "_sara_metrics"):
            self._sara_metrics = MetricsAccumulator()
        self._sara_metrics.add("train" if training else "eval", metrics)

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        """Add the SARA metrics recorded since the last log (averaged over micro-batches and ranks)."""
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        recorded = self._sara_metrics.pop(mode) if hasattr(self, "_sara_metrics") else None
        if recorded is not None:
            names, values = recorded
            if self.accelerator.num_processes > 1:
                values = self.accelerator.reduce(values, reduction="mean")
            prefix = "eval_" if mode == "eval" else ""
            # In place: evaluate() returns the same dict it logs, so eval_sara_* reach its caller too.
            logs.update({prefix + n: float(v) for n, v in zip(names, values.tolist())})
        super().log(logs, start_time)
