"""TRL integration: :class:`SARASFTTrainer` and :class:`SARASFTConfig` (``pip install sara-kernels[trl]``).

``SARASFTTrainer`` is TRL's ``SFTTrainer`` with ``sara_weight`` × SARA added to its loss. The
user's parallel pairs stay a ``datasets.Dataset`` (columns ``anchor``, ``target``, optional
``lang``): each row is given its index (``sara_example_index``) and its target in TRL's own
format, which TRL then tokenises, truncates and labels as usual:

* a text target becomes the ``text`` column (language modelling on the whole target);
* chat messages ending with an assistant turn become ``prompt`` (the turns before it) and
  ``completion`` (that turn), so TRL's completion-only loss applies (``completion_only_loss``,
  on by default): no LM loss on the prompt;
* other chat messages become ``messages`` (TRL's ``assistant_only_loss`` applies if set).

The LM term is TRL's own: its fused LM head (no ``[B, S, V]`` logits), its loss types, its
router aux loss handling, its metrics (``entropy``, ``mean_token_accuracy``, ``num_tokens``,
``aux_loss``), with and without PEFT. The anchors run as a separate ``no_grad`` forward whose
router logits are captured; they are tokenised as :class:`~sara_kernels.hf.collate.SARACollator`
tokenises a side, truncated to ``max_length``. Logged besides TRL's metrics: ``sara_loss`` and
``sara_js/layer_{i}``.

Packing and padding-free batches are refused: SARA pools each target sequence's routing and
compares it with its own anchor, which needs one pair per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from trl import SFTConfig, SFTTrainer

from ..term import SARAOptions
from .collate import SARACollator, pad_right, pad_token_id
from .data import validate_pair
from .term import SARATermMixin, prepare_sara_model

INDEX_COLUMN = "sara_example_index"
_ANCHOR_IDS, _ANCHOR_MASK = "sara_anchor_input_ids", "sara_anchor_attention_mask"


@dataclass
class SARASFTConfig(SARAOptions, SFTConfig):
    """TRL's ``SFTConfig`` plus the SARA options (:class:`~sara_kernels.term.SARAOptions`).

    The anchor is truncated to ``max_length``, like the target. ``sara_lm_on_anchor`` and
    ``sara_detach_anchor=False`` are not supported here (use :class:`SARATrainer`).
    """

    def __post_init__(self):
        super().__post_init__()
        if self.sara_lm_on_anchor:
            raise ValueError("sara_lm_on_anchor=True is not supported by SARASFTTrainer (use SARATrainer)")
        if not self.sara_detach_anchor:
            raise ValueError("sara_detach_anchor=False is not supported by SARASFTTrainer (use SARATrainer)")
        for name in ("packing", "eval_packing", "padding_free"):
            if getattr(self, name):
                raise ValueError(
                    f"{name}=True is not supported with SARA: SARA compares each target sequence's pooled routing "
                    "with its own anchor's, which needs one pair per row (no packed or padding-free batches)"
                )


def sft_pairs(dataset, text_field: str = "text", name: str = "train_dataset"):
    """A pairs ``datasets.Dataset`` (or a list of pair dicts) in TRL's format, see the module docstring.

    Adds ``sara_example_index`` (the row's position) and the target in TRL's columns; keeps
    ``anchor`` (tokenised per batch) and drops ``target``.
    """
    import datasets

    if isinstance(dataset, list):
        dataset = datasets.Dataset.from_list(dataset)
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"{name}: expected a datasets.Dataset (or a list) of pairs with 'anchor' and 'target' columns, "
            f"got {type(dataset).__name__}"
        )
    missing = [c for c in ("anchor", "target") if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{name}: missing column(s) {missing}; got columns {dataset.column_names}")
    taken = [c for c in (text_field, "prompt", "completion", "messages", INDEX_COLUMN) if c in dataset.column_names]
    if taken:
        raise ValueError(f"{name}: column(s) {taken} would be overwritten by the target in TRL's format; rename them")

    def to_sft(example, index):
        validate_pair(dict(example), f"{name}[{index}]")
        target = example["target"]
        if isinstance(target, str):
            out = {text_field: target}
        elif len(target) > 1 and target[-1]["role"] == "assistant":
            out = {"prompt": target[:-1], "completion": target[-1:]}
        else:
            out = {"messages": target}
        return {**out, INDEX_COLUMN: index}

    return dataset.map(to_sft, with_indices=True, remove_columns=["target"], desc=f"SARA pairs ({name})")


@dataclass
class SARASFTCollator:
    """TRL's collator for the targets, plus the anchors (right-padded) and each pair's index.

    Args:
        lm_collator: the collator of the target rows (TRL's ``DataCollatorForLanguageModeling``).
        tokenizer: tokenises the anchors as :class:`SARACollator` does.
        max_length: anchor truncation (TRL's ``max_length``).
    """

    lm_collator: Callable
    tokenizer: Any
    max_length: Optional[int] = None

    def __call__(self, examples):
        encoder = SARACollator(self.tokenizer, max_length=self.max_length)
        anchors = [encoder.encode(e["anchor"], f"example {e[INDEX_COLUMN]}: anchor") for e in examples]
        batch = dict(self.lm_collator([{k: v for k, v in e.items() if k not in ("anchor", INDEX_COLUMN)}
                                       for e in examples]))
        batch[_ANCHOR_IDS], batch[_ANCHOR_MASK] = pad_right(anchors, pad_token_id(self.tokenizer))
        batch[INDEX_COLUMN] = torch.tensor([int(e[INDEX_COLUMN]) for e in examples], dtype=torch.long)
        return batch


class SARASFTTrainer(SARATermMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` that adds ``sara_weight`` × SARA to its loss (see the module docstring).

    Args: those of ``SFTTrainer``, with ``args`` a :class:`SARASFTConfig` and ``train_dataset`` /
    ``eval_dataset`` pairs (a ``datasets.Dataset`` or a list of dicts with ``anchor`` and
    ``target``). ``peft_config`` works as in TRL.

    Scaling and metrics are those of :class:`~sara_kernels.hf.trainer.SARATrainer`
    (:mod:`sara_kernels.hf.term`): the step's gradient is ``λ ×`` the mean per-micro-batch SARA
    loss, independent of the accumulation steps and the number of processes.
    """

    def __init__(self, model=None, args: Optional[SARASFTConfig] = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, **kwargs):
        if not isinstance(args, SARASFTConfig):
            raise TypeError(
                f"args: SARASFTTrainer needs a SARASFTConfig (SFTConfig plus the sara_* options), "
                f"got {type(args).__name__}"
            )
        if train_dataset is None:
            raise ValueError("train_dataset: SARASFTTrainer needs the parallel pairs")
        train_dataset = sft_pairs(train_dataset, args.dataset_text_field, "train_dataset")
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: sft_pairs(v, args.dataset_text_field, f"eval_dataset[{k!r}]")
                            for k, v in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = sft_pairs(eval_dataset, args.dataset_text_field, "eval_dataset")
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)  # a processor's tokenizer
        self.data_collator = SARASFTCollator(self.data_collator, tokenizer, args.max_length)
        if args.sara_weight > 0:
            prepare_sara_model(self.accelerator.unwrap_model(self.model), args)

    def _set_signature_columns_if_needed(self):
        """Keep the anchor and the index through ``remove_unused_columns``."""
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, "anchor", INDEX_COLUMN]

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """A pairs dataset passed here is converted like those given to ``__init__``."""
        if eval_dataset is not None and not isinstance(eval_dataset, (str, dict)):
            eval_dataset = sft_pairs(eval_dataset, self.args.dataset_text_field, "eval_dataset")
        return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's loss on the target rows + λ·SARA(anchor routing, target routing)."""
        args = self.args
        inputs = dict(inputs)
        if INDEX_COLUMN not in inputs or _ANCHOR_IDS not in inputs:
            raise ValueError(
                f"batch has no anchors: SARASFTTrainer needs batches from SARASFTCollator (got keys {sorted(inputs)})"
            )
        inputs.pop(INDEX_COLUMN)
        anchor_ids, anchor_mask = inputs.pop(_ANCHOR_IDS), inputs.pop(_ANCHOR_MASK)
        if args.sara_weight == 0:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        anchor = self._sara_anchor_routing(model, input_ids=anchor_ids, attention_mask=anchor_mask)
        with self._sara_capture(model) as target:
            # TRL's return_outputs=True runs a second forward for the logits: taken outside the capture.
            loss = super().compute_loss(model, inputs, False, num_items_in_batch)
        term = self._sara_term(target, anchor.logits, target.logits, anchor_mask=anchor_mask,
                               target_mask=inputs["attention_mask"])
        scale = self._sara_step_scale(model.training, num_items_in_batch)
        loss = loss + (args.sara_weight * scale) * term.loss.to(loss.dtype)
        self._sara_record(model.training, term.metrics())

        if return_outputs:
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            return loss, outputs
        return loss
