"""The SARA term of a training step, framework-neutral: its options, the loss call and its metrics.

What every integration shares — the Hugging Face trainers (:mod:`sara_kernels.hf.term` adds the
router capture and the Trainer's scaling) and the Megatron path (which computes SARA inside the
router and scales it with its own aux-loss machinery):

* :class:`SARAOptions`: the ``sara_*`` options, validated once here. A dataclass usable on its own
  (``SARAOptions(sara_weight=0.1, sara_layers="middle")``) or as a mixin placed before a
  ``TrainingArguments`` subclass, whose own ``__post_init__`` then runs first.
* :func:`sara_term`: ``sara_loss`` called with the options, returning a :class:`SARATerm` (the
  unweighted loss, its per-layer values, the decoder-layer indices) whose :meth:`SARATerm.metrics`
  are the logged names (``sara_loss``, ``sara_js/layer_{i}``, or ``sara_kl/…``, ``sara_reverse_kl/…``
  after ``sara_divergence``).
* :class:`MetricsAccumulator`: the per-micro-batch metrics summed until the next log.

Layer selection ("all" / "middle" / indices) is :mod:`sara_kernels.layer_selection`. How the
weighted term ``sara_weight × loss`` is scaled for gradient accumulation and data parallelism is
the integration's job, because it depends on what its framework does to the loss it is handed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from . import backends
from ._inputs import WHOLE, SequenceLayout, check_divergence, check_score, check_temperature
from .api import sara_loss_of_layouts
from .layer_selection import resolve_layers_spec

__all__ = ["ANCHOR_FILTERS", "kept_pairs", "SARAOptions", "SARATerm", "MetricsAccumulator", "SequenceLayout", "check_layer_weights",
           "sara_term"]


# sara_anchor_filter's values: which sides' answers decide whether a pair is kept.
ANCHOR_FILTERS = ("none", "correct", "correct_anchor_wrong_target")


def kept_pairs(anchor_filter: str, anchor_correct: torch.Tensor, target_correct: Optional[torch.Tensor]) -> torch.Tensor:
    """The pairs ``sara_anchor_filter`` keeps (bool [P]): those whose anchor answer the model
    reproduces and, with ``"correct_anchor_wrong_target"`` (RA-MoE's filter), whose target answer
    it does not."""
    if anchor_filter == "correct_anchor_wrong_target":
        return anchor_correct & ~target_correct
    return anchor_correct


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


@dataclass
class SARAOptions:
    """The SARA options (all prefixed ``sara_``, parseable by HfArgumentParser), shared by
    :class:`~sara_kernels.hf.SARATrainingArguments`, :class:`~sara_kernels.hf.SARASFTConfig` and
    the Megatron integration."""

    sara_weight: float = field(default=1.0, metadata={"help": "λ: weight of the SARA loss added to the LM loss (0 = LM only)."})
    # str for HfArgumentParser; a list of ints is accepted too (normalised in __post_init__).
    sara_layers: str = field(
        default="all",
        metadata={"help": "MoE layers to align: 'all', 'middle', or comma-separated decoder-layer indices and inclusive ranges ('0,4,7-34')."},
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
    sara_divergence: str = field(
        default="js",
        metadata={"help": "Divergence between the pooled routing distributions: 'js' (symmetric Jensen-Shannon), "
                          "'kl' = KL(anchor || target), 'reverse_kl' = KL(target || anchor)."},
    )
    sara_anchor_filter: str = field(
        default="none",
        metadata={"help": "Which pairs SARA keeps: 'none' (all), 'correct' (those whose anchor answer the model "
                          "reproduces, greedy and teacher-forced), 'correct_anchor_wrong_target' (and whose target "
                          "answer it does not)."},
    )
    sara_lm_on_anchor: bool = field(default=False, metadata={"help": "Also train the LM on the anchor side."})
    sara_backend: str = field(default="auto", metadata={"help": backends.HELP})

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:  # as a mixin: the TrainingArguments checks run first
            parent()
        if not (_is_number(self.sara_weight) and self.sara_weight >= 0):
            raise ValueError(f"sara_weight must be a finite number >= 0, got {self.sara_weight!r}")
        self.sara_layers = resolve_layers_spec(self.sara_layers, "sara_layers")
        check_score(self.sara_score, "sara_score", option=True)
        check_temperature(self.sara_temperature, "sara_temperature", option=True)
        if isinstance(self.sara_layer_weights, str):
            try:
                self.sara_layer_weights = [float(x) for x in self.sara_layer_weights.split(",") if x.strip()]
            except ValueError:
                raise ValueError(
                    f"sara_layer_weights: expected comma-separated numbers, got {self.sara_layer_weights!r}"
                ) from None
        check_divergence(self.sara_divergence, "sara_divergence")
        if self.sara_anchor_filter not in ANCHOR_FILTERS:
            raise ValueError(f"sara_anchor_filter must be one of {list(ANCHOR_FILTERS)}, got {self.sara_anchor_filter!r}")
        backends.check_backend(self.sara_backend, "sara_backend")


def check_layer_weights(options: SARAOptions, layers: Sequence[int]) -> None:
    """One ``sara_layer_weights`` entry per selected MoE layer (``layers``: their decoder indices)."""
    weights = options.sara_layer_weights
    if weights is not None and len(weights) != len(layers):
        raise ValueError(
            f"sara_layer_weights has {len(weights)} weights but sara_layers={options.sara_layers!r} selects "
            f"{len(layers)} MoE layers (decoder layers {list(layers)}): give one weight per layer"
        )


@dataclass(frozen=True)
class SARATerm:
    """One micro-batch's SARA: ``loss`` (unweighted, a scalar with autograd history; [L, B] with
    ``sara_term(..., reduction="none")``), ``per_layer``
    ([L] divergence per layer, the weighted mean over pairs), ``layers`` (their decoder-layer
    indices), ``divergence`` (which one, for the metric names) and ``kept`` (the fraction of pairs
    ``sara_anchor_filter`` kept, None without the filter or with ``reduction="none"``)."""

    loss: torch.Tensor
    per_layer: torch.Tensor
    layers: tuple
    divergence: str = "js"
    kept: Optional[torch.Tensor] = None

    def metrics(self) -> dict:
        """The logged values (detached): ``sara_loss``, ``sara_{divergence}/layer_{i}`` and, with
        ``sara_anchor_filter``, ``sara_anchor_kept``."""
        per_layer = self.per_layer.detach().float().reshape(-1)
        kept = {} if self.kept is None else {"sara_anchor_kept": self.kept.detach().float()}
        return {"sara_loss": self.loss.detach().float(), **kept,
                **{f"sara_{self.divergence}/layer_{layer}": per_layer[j] for j, layer in enumerate(self.layers)}}


def sara_term(options: SARAOptions, anchor_logits, target_logits, *, layers: Sequence[int], score: str,
              anchor_layout: SequenceLayout = WHOLE, target_layout: SequenceLayout = WHOLE, anchor_probs=None,
              pair_weights=None, group=None, reduction: str = "mean") -> SARATerm:
    """:func:`~sara_kernels.sara_loss` with the options' temperature, layer weights, anchor
    detaching, divergence and backend, on the routing of the selected ``layers`` (decoder indices,
    one per logits tensor or prior row) scored with ``score``. Each side is its logits and its
    :class:`SequenceLayout` (``anchor_probs``, cached priors, replace the anchor's logits and leave
    its layout whole); ``pair_weights`` (one per pair) and ``group`` are ``sara_loss``'s. With
    ``sara_anchor_filter``, ``pair_weights`` are the kept pairs (1) and the dropped ones (0), and
    their mean is logged as ``sara_anchor_kept``. ``reduction="none"``: ``loss`` is ``sara_loss``'s [L, B]
    of each pair's divergence, π-weighted (0 for a pair with an empty side), for a caller that
    weights the pairs itself."""
    loss, per_layer = sara_loss_of_layouts(
        anchor_logits, target_logits, anchor_layout, target_layout, anchor_probs=anchor_probs,
        layer_weights=options.sara_layer_weights, pair_weights=pair_weights, temperature=options.sara_temperature,
        score=score, detach_anchor=options.sara_detach_anchor, divergence=options.sara_divergence,
        backend=options.sara_backend, group=group, reduction=reduction,
    )
    kept = None
    if options.sara_anchor_filter != "none" and reduction != "none":
        if pair_weights is None:
            raise ValueError(f"sara_anchor_filter={options.sara_anchor_filter!r}: the kept pairs (pair_weights) are missing")
        kept = torch.as_tensor(pair_weights).float().mean()
    return SARATerm(loss=loss, per_layer=per_layer, layers=tuple(layers), divergence=options.sara_divergence,
                    kept=kept)


class MetricsAccumulator:
    """Named scalar metrics summed per mode (``"train"`` / ``"eval"``) over the micro-batches
    since the last :meth:`pop`; kept on the device so that recording never syncs with the host."""

    def __init__(self):
        self._entries: dict = {}

    def add(self, mode: str, metrics: dict) -> None:
        """Add one micro-batch's values; a new set of names restarts the mode's sums."""
        names = list(metrics)
        values = [torch.as_tensor(v).detach().float().reshape(1) for v in metrics.values()]
        row = torch.cat([v.to(values[0].device) for v in values])
        current = self._entries.get(mode)
        if current is None or current[0] != names:
            self._entries[mode] = [names, row, 1]
        else:
            current[1] = current[1] + row
            current[2] += 1

    def pop(self, mode: str):
        """(names, [len(names)] tensor of means over the recorded micro-batches), or None."""
        entry = self._entries.pop(mode, None)
        if entry is None:
            return None
        names, total, count = entry
        return names, total / count
