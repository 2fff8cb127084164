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
``sara_js/layer_{i}`` (and ``sara_anchor_kept``).

**``sara_anchor_filter``** (see :class:`~sara_kernels.hf.SARATrainer`): the pairs' answers become
columns, the collator marks the anchors' answer tokens and, for ``"correct_anchor_wrong_target"``,
the targets' in TRL's tokens (:meth:`SARASFTCollator.target_answer_mask`); the anchors'
correctness comes from their forward, the targets' from TRL's training forward (its fused LM
head's ``is_top1``). Not under DeepSpeed ZeRO-3, whose anchor forward has no LM head.

**Padding-free and packed batches** (TRL's ``padding_free=True``, and ``packing=True`` with the
``"bfd"`` strategy, which TRL runs padding-free): the anchors of the batch are packed as well
(:func:`~sara_kernels.hf.collate.pack_sequences`), and SARA pairs target sequence b with anchor
sequence b through per-side ``cu_seqlens``. With packing, a packed row holds several pairs'
targets; each token carries the row of its pair in a table of (anchor, index) the trainer keeps,
so the collator finds each sequence's anchor. ``"wrapped"`` and ``"bfd_split"`` packing cut
sequences apart (a target would then be pooled in pieces) and are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_utils import unwrap_peft_model
from trl import SFTConfig, SFTTrainer

from ..term import SARAOptions, SequenceLayout
from .checkpoint import SARACheckpointing
from .collate import IGNORE_INDEX, SARACollator, pack_sequences, pad_right, pad_token_id
from .data import required_answer, validate_pair
from .routing import answers_hit
from .term import SARATermMixin, check_trainer_scaling, prepare_sara_model

INDEX_COLUMN = "sara_example_index"
_ANCHOR_IDS, _ANCHOR_MASK = "sara_anchor_input_ids", "sara_anchor_attention_mask"
# Padding-free batches: the packed anchors' positions and both sides' sequence boundaries.
_ANCHOR_POSITIONS, _ANCHOR_CU, _TARGET_CU = "sara_anchor_position_ids", "sara_anchor_cu_seqlens", "sara_target_cu_seqlens"
# Packed datasets: per token, the row of its pair in SARASFTTrainer's table of packed pairs.
PAIR_ROW_COLUMN = "sara_pair_row"
# sara_anchor_filter: each pair's answers (and the target as given, whose answer is found in TRL's tokens),
# and the batch's answer masks (the anchors' in their layout, the targets' in TRL's).
ANCHOR_ANSWER_COLUMN, TARGET_ANSWER_COLUMN, TARGET_COLUMN = "sara_anchor_answer", "sara_target_answer", "sara_target"
_ANCHOR_ANSWERS, _TARGET_ANSWERS = "sara_anchor_answer_mask", "sara_target_answer_mask"
# The columns of a pair the collator reads besides TRL's.
PAIR_COLUMNS = ("anchor", INDEX_COLUMN, ANCHOR_ANSWER_COLUMN, TARGET_ANSWER_COLUMN, TARGET_COLUMN)


@dataclass
class SARASFTConfig(SARAOptions, SFTConfig):
    """TRL's ``SFTConfig`` plus the SARA options (:class:`~sara_kernels.term.SARAOptions`).

    The anchor is truncated to ``max_length``, like the target. ``sara_lm_on_anchor`` and
    ``sara_detach_anchor=False`` are not supported here (use :class:`SARATrainer`), nor
    ``sara_anchor_filter`` under DeepSpeed ZeRO-3 (see :class:`SARASFTTrainer`).
    """

    def __post_init__(self):
        super().__post_init__()
        if self.sara_lm_on_anchor:
            raise ValueError("sara_lm_on_anchor=True is not supported by SARASFTTrainer (use SARATrainer)")
        if not self.sara_detach_anchor:
            raise ValueError("sara_detach_anchor=False is not supported by SARASFTTrainer (use SARATrainer)")
        if (self.packing or self.eval_packing) and self.packing_strategy != "bfd":
            raise ValueError(
                f"packing_strategy={self.packing_strategy!r} is not supported with SARA: it cuts sequences apart, and "
                "SARA pools each whole target sequence to compare it with its anchor; use packing_strategy='bfd'"
            )
        if (self.padding_free or self.packing or self.eval_packing) and self.pad_to_multiple_of:
            raise ValueError(
                f"pad_to_multiple_of={self.pad_to_multiple_of} is not supported with SARA in padding-free batches: "
                "the padding would be read as extra sequences; leave it None"
            )


def sft_pairs(dataset, text_field: str = "text", name: str = "train_dataset", anchor_filter: str = "none"):
    """A pairs ``datasets.Dataset`` (or a list of pair dicts) in TRL's format, see the module docstring.

    Adds ``sara_example_index`` (the row's position) and the target in TRL's columns; keeps
    ``anchor`` (tokenised per batch) and drops ``target``. With ``anchor_filter``
    (``sara_anchor_filter``) each row also gets its anchor's answer (``sara_anchor_answer``) and, for
    ``"correct_anchor_wrong_target"``, its target's (``sara_target_answer``) and the target as given
    (``sara_target``); a pair without one is the option's one-line error.
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
    taken = [c for c in (text_field, "prompt", "completion", "messages", *PAIR_COLUMNS[1:]) if c in dataset.column_names]
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
        if anchor_filter != "none":
            out[ANCHOR_ANSWER_COLUMN] = required_answer(example, "anchor", anchor_filter, f"{name}[{index}]")
        if anchor_filter == "correct_anchor_wrong_target":
            out[TARGET_ANSWER_COLUMN] = required_answer(example, "target", anchor_filter, f"{name}[{index}]")
            out[TARGET_COLUMN] = target
        return {**out, INDEX_COLUMN: index}

    return dataset.map(to_sft, with_indices=True, remove_columns=["target"], desc=f"SARA pairs ({name})")


@dataclass
class SARASFTCollator:
    """TRL's collator for the targets, plus the anchors and each pair's index.

    Args:
        lm_collator: the collator of the target rows (TRL's ``DataCollatorForLanguageModeling``).
        tokenizer: tokenises the anchors as :class:`SARACollator` does.
        max_length: anchor truncation (TRL's ``max_length``).
        padding_free: the targets come flattened into one row (TRL's padding-free collator): the
            anchors are packed too, and both sides get ``cu_seqlens``; else anchors are right-padded.
        packed_pairs: the pair columns (:data:`PAIR_COLUMNS`) of each row of the table that packed
            datasets' ``sara_pair_row`` points into.
        anchor_filter: ``sara_anchor_filter``; unless "none", the batch also marks the anchors' answer
            tokens (``sara_anchor_answer_mask``, laid out as the anchors) and, for
            ``"correct_anchor_wrong_target"``, the targets' in TRL's tokens (``sara_target_answer_mask``,
            laid out as ``input_ids``, see :meth:`target_answer_mask`).
    """

    lm_collator: Callable
    tokenizer: Any
    max_length: Optional[int] = None
    padding_free: bool = False
    packed_pairs: Optional[list] = None
    anchor_filter: str = "none"

    def __call__(self, examples):
        if PAIR_ROW_COLUMN in examples[0]:  # packed rows: one pair per sequence, seq_lengths long each
            pairs, targets = [], []
            for e in examples:
                start = 0
                for length in e["seq_lengths"]:
                    pairs.append(self.packed_pairs[e[PAIR_ROW_COLUMN][start]])
                    targets.append((e["input_ids"][start : start + length], e["labels"][start : start + length]))
                    start += length
        else:
            pairs = [{k: e[k] for k in PAIR_COLUMNS if k in e} for e in examples]
            targets = [(e["input_ids"], e.get("labels")) for e in examples]
        encoder = SARACollator(self.tokenizer, max_length=self.max_length)
        where = [f"example {pair[INDEX_COLUMN]}: anchor" for pair in pairs]
        if self.anchor_filter == "none":
            anchors = [encoder.encode(pair["anchor"], w) for pair, w in zip(pairs, where)]
        else:
            anchors, anchor_answers = zip(*(encoder.answer_mask(pair["anchor"], pair[ANCHOR_ANSWER_COLUMN], w)
                                            for pair, w in zip(pairs, where)))
        ours = (*PAIR_COLUMNS, PAIR_ROW_COLUMN)
        batch = dict(self.lm_collator([{k: v for k, v in e.items() if k not in ours} for e in examples]))
        if self.padding_free:
            batch[_ANCHOR_IDS], batch[_ANCHOR_POSITIONS], batch[_ANCHOR_CU] = pack_sequences(anchors)
            target_cu = torch.zeros(len(targets) + 1, dtype=torch.int32)
            target_cu[1:] = torch.tensor([len(ids) for ids, _ in targets]).cumsum(0)
            batch[_TARGET_CU] = target_cu
        else:
            batch[_ANCHOR_IDS], batch[_ANCHOR_MASK] = pad_right(anchors, pad_token_id(self.tokenizer))
        if self.anchor_filter != "none":
            batch[_ANCHOR_ANSWERS] = (pack_sequences(anchor_answers)[0] if self.padding_free
                                      else pad_right(anchor_answers, 0)[0])
        if self.anchor_filter == "correct_anchor_wrong_target":
            marks = torch.zeros_like(batch["input_ids"])
            start = 0
            for row, (pair, (ids, labels)) in enumerate(zip(pairs, targets)):
                mask = torch.tensor(self.target_answer_mask(pair, ids, labels), dtype=marks.dtype)
                if self.padding_free:
                    marks[0, start : start + len(ids)] = mask
                    start += len(ids)
                else:
                    marks[row, : len(ids)] = mask
            batch[_TARGET_ANSWERS] = marks
        batch[INDEX_COLUMN] = torch.tensor([int(pair[INDEX_COLUMN]) for pair in pairs], dtype=torch.long)
        return batch

    def target_answer_mask(self, pair: dict, ids, labels) -> list:
        """0/1 per token of a target as TRL tokenised it (``ids``, ``labels``): 1 on its answer's tokens.

        Found on the target as given, encoded untruncated by :meth:`SARACollator.answer_mask` (the
        anchors' rule), whose tokens TRL's must equal up to the answer's end; all zeros when TRL's
        truncation cut the answer, as for a truncated anchor. TRL's forward scores only labelled
        tokens, so every answer token must carry an LM label.
        """
        where = f"example {pair[INDEX_COLUMN]}: target"
        full, mask = SARACollator(self.tokenizer).answer_mask(pair[TARGET_COLUMN], pair[TARGET_ANSWER_COLUMN], where)
        marked = [j for j, m in enumerate(mask) if m]
        if not marked or marked[-1] >= len(ids):
            return [0] * len(ids)
        if list(ids[: marked[-1] + 1]) != list(full[: marked[-1] + 1]):
            raise ValueError(
                f"sara_anchor_filter='correct_anchor_wrong_target': {where}: TRL's tokens differ from the tokenizer's "
                "encoding of the target before its answer ends, so the answer cannot be found in them "
                "(truncation_mode='keep_end' cuts the start: use 'keep_start')"
            )
        if labels is None or any(labels[j] == IGNORE_INDEX for j in marked):
            raise ValueError(
                f"sara_anchor_filter='correct_anchor_wrong_target': {where}: its answer has tokens without an LM label, "
                "and TRL's forward scores labelled tokens only; make the answer the target's assistant reply, or turn "
                "assistant_only_loss off"
            )
        return mask[: len(ids)] + [0] * (len(ids) - len(mask))


class SARASFTTrainer(SARACheckpointing, SARATermMixin, SFTTrainer):
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
        if args.sara_weight > 0 and args.sara_anchor_filter != "none" and is_deepspeed_zero3_enabled():
            raise ValueError(
                f"sara_anchor_filter={args.sara_anchor_filter!r} is not supported by SARASFTTrainer under DeepSpeed "
                "ZeRO-3: its anchor forward skips the LM head there (compute_loss says why), and the filter reads the "
                "anchor's predictions from it; use SARATrainer"
            )
        anchor_filter = args.sara_anchor_filter if args.sara_weight > 0 else "none"
        # Filled by _prepare_dataset for packed datasets (called from SFTTrainer.__init__ and evaluate).
        self._sara_packed_pairs: list = []
        train_dataset = sft_pairs(train_dataset, args.dataset_text_field, "train_dataset", anchor_filter)
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: sft_pairs(v, args.dataset_text_field, f"eval_dataset[{k!r}]", anchor_filter)
                            for k, v in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = sft_pairs(eval_dataset, args.dataset_text_field, "eval_dataset", anchor_filter)
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)  # a processor's tokenizer
        self.data_collator = SARASFTCollator(self.data_collator, tokenizer, args.max_length,
                                             padding_free=self.padding_free, packed_pairs=self._sara_packed_pairs,
                                             anchor_filter=anchor_filter)
        if args.sara_weight > 0:
            check_trainer_scaling(self)
            prepare_sara_model(self.accelerator.unwrap_model(self.model), args)

    def _set_signature_columns_if_needed(self):
        """Keep the pair's columns through ``remove_unused_columns``."""
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, *PAIR_COLUMNS, PAIR_ROW_COLUMN]

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        """TRL's preparation; packing is done here instead, so that each token keeps the row of its
        pair (TRL's packing keeps only ``input_ids`` and ``labels``)."""
        dataset = super()._prepare_dataset(dataset, processing_class, args, False, formatting_func, dataset_name)
        if not packing:
            return dataset
        from trl.data_utils import pack_dataset

        if args.max_length is None:
            raise ValueError("max_length: packing needs it (the length of a packed row); set max_length")
        offset = len(self._sara_packed_pairs)
        columns = [c for c in PAIR_COLUMNS if c in dataset.column_names]
        self._sara_packed_pairs.extend(dict(zip(columns, row)) for row in zip(*(dataset[c] for c in columns)))
        dataset = dataset.map(lambda e, i: {PAIR_ROW_COLUMN: [offset + i] * len(e["input_ids"])}, with_indices=True,
                              desc=f"SARA pair rows ({dataset_name})")
        dataset = dataset.select_columns(["input_ids", "labels", PAIR_ROW_COLUMN])
        return pack_dataset(dataset, args.max_length, args.packing_strategy, {"desc": f"Packing {dataset_name} dataset"})

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """A pairs dataset passed here is converted like those given to ``__init__``."""
        if eval_dataset is not None and not isinstance(eval_dataset, (str, dict)):
            anchor_filter = self.args.sara_anchor_filter if self.args.sara_weight > 0 else "none"
            eval_dataset = sft_pairs(eval_dataset, self.args.dataset_text_field, "eval_dataset", anchor_filter)
        return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's loss on the target rows + λ·SARA(anchor routing, target routing).

        With ``sara_anchor_filter`` the anchor's correctness comes from its forward (run to the LM
        head, projecting the answer positions only) and the target's from TRL's own training forward:
        its fused LM head returns, per labelled token, whether it is the model's top prediction."""
        args = self.args
        inputs = dict(inputs)
        if INDEX_COLUMN not in inputs or _ANCHOR_IDS not in inputs:
            raise ValueError(
                f"batch has no anchors: SARASFTTrainer needs batches from SARASFTCollator (got keys {sorted(inputs)})"
            )
        inputs.pop(INDEX_COLUMN)
        anchor_answers, target_answers = inputs.pop(_ANCHOR_ANSWERS, None), inputs.pop(_TARGET_ANSWERS, None)
        anchor_inputs = {"input_ids": inputs.pop(_ANCHOR_IDS)}
        if _ANCHOR_CU in inputs:  # padding-free
            anchor_inputs["position_ids"] = inputs.pop(_ANCHOR_POSITIONS)
            anchor_layout = SequenceLayout(cu_seqlens=inputs.pop(_ANCHOR_CU))
            target_layout = SequenceLayout(cu_seqlens=inputs.pop(_TARGET_CU))
        else:
            anchor_inputs["attention_mask"] = inputs.pop(_ANCHOR_MASK)
            anchor_layout = SequenceLayout(mask=anchor_inputs["attention_mask"])
            target_layout = SequenceLayout(mask=inputs["attention_mask"])
        if args.sara_weight == 0:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        filtered = args.sara_anchor_filter != "none"
        needed = {_ANCHOR_ANSWERS: anchor_answers} if filtered else {}
        if args.sara_anchor_filter == "correct_anchor_wrong_target":
            needed[_TARGET_ANSWERS] = target_answers
        missing = [key for key, mask in needed.items() if mask is None]
        if missing:
            raise ValueError(
                f"sara_anchor_filter={args.sara_anchor_filter!r}: the batch has no {missing}; build the collator with "
                f"SARASFTCollator(anchor_filter={args.sara_anchor_filter!r}) (SARASFTTrainer's own does)"
            )

        anchor_model = model
        if is_deepspeed_zero3_enabled():
            # TRL's fused LM head reads lm_head.weight outside the module and gathers it only when ZeRO-3 has not
            # fetched it already; an anchor forward through lm_head puts it in ZeRO-3's prefetch trace, which then
            # fetches it early and frees it before TRL's backward reads it (an empty weight). The anchor's routing
            # needs no head: it runs through the decoder alone (which is why the anchor filter is refused there).
            anchor_model = unwrap_peft_model(self.accelerator.unwrap_model(model)).get_decoder()
        anchor, anchor_correct = self._sara_anchor_routing(
            anchor_model, answer_mask=anchor_answers, cu_seqlens=anchor_layout.cu_seqlens, **anchor_inputs)
        scored = []
        # The output of the model TRL calls (through any PEFT wrapper): its fused LM head's per-token results.
        hook = (self.accelerator.unwrap_model(model).register_forward_hook(lambda m, a, out: scored.append(out))
                if target_answers is not None else None)
        try:
            with self._sara_capture(model) as target:
                # TRL's return_outputs=True runs a second forward for the logits: taken outside the capture.
                loss = super().compute_loss(model, inputs, False, num_items_in_batch)
        finally:
            if hook is not None:
                hook.remove()
        weights = None
        if filtered:
            target_correct = None
            if target_answers is not None:
                is_top1 = getattr(scored[-1], "is_top1", None) if scored else None
                if is_top1 is None:
                    raise ValueError(
                        "sara_anchor_filter='correct_anchor_wrong_target' reads is_top1 from TRL's fused LM head, "
                        "which this training forward did not return"
                    )
                target_correct = answers_hit(is_top1, target_answers, target_layout.cu_seqlens)
            weights = self._sara_kept_pairs(anchor_correct, target_correct)
        term = self._sara_term(target, anchor.logits, target.logits, anchor_layout=anchor_layout,
                               target_layout=target_layout, pair_weights=weights)
        scale = self._sara_step_scale(model.training, num_items_in_batch)
        loss = loss + (args.sara_weight * scale) * term.loss.to(loss.dtype)
        self._sara_record(model.training, term.metrics())

        if return_outputs:
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            return loss, outputs
        return loss
