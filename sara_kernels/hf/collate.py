"""Collation of parallel pairs into SARA batches: right padding, or packing without padding.

Used by the trainer, prior extraction and the programs alike, so every path tokenises and pads a
side exactly the same way (which is what makes cached priors equal to live anchors).

**Packed (padding-free) batches** put every sequence of the batch in one row ``[1, T]``, as
transformers' ``DataCollatorWithFlattening`` does: ``position_ids`` restart at 0 for each
sequence and there is no ``attention_mask``, which is how transformers' attention (eager, SDPA,
flex and FlashAttention alike) finds the sequence boundaries and keeps sequences from attending
to each other; ``labels`` hold -100 at each sequence's first token, so the label shift never
makes one sequence predict the next one's first token. The LM loss and its token count are then
those of the padded batch. ``sara_cu_seqlens`` gives the boundaries for SARA.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..term import ANCHOR_FILTERS
from .data import required_answer, validate_pair

IGNORE_INDEX = -100


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int, multiple_of: Optional[int] = None):
    """(input_ids [B, S] long, attention_mask [B, S] long), padded on the right.

    Always right padding, whatever ``tokenizer.padding_side`` says: valid tokens then keep the
    positions they would have unpadded, so a sequence's routing (and hence its pooled
    distribution) does not depend on what it was batched with — which is what makes cached
    priors equal to live anchors.
    """
    length = max(len(s) for s in sequences)
    if multiple_of:
        length = int(math.ceil(length / multiple_of) * multiple_of)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def pack_sequences(sequences: Sequence[Sequence[int]]):
    """(input_ids [1, T] long, position_ids [1, T] long, cu_seqlens [B+1] int32) of the sequences
    concatenated, positions restarting at 0 for each (see the module docstring)."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    if not len(sequences) or int(lengths.min()) < 1:
        raise ValueError("pack_sequences: expected at least one sequence, each of at least one token")
    ids = torch.tensor(list(itertools.chain.from_iterable(sequences)), dtype=torch.long)
    cu_seqlens = torch.zeros(len(sequences) + 1, dtype=torch.int32)
    cu_seqlens[1:] = lengths.cumsum(0)
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)
    position_ids = torch.arange(ids.numel(), dtype=torch.long) - starts
    return ids[None], position_ids[None], cu_seqlens


def pad_token_id(tokenizer) -> int:
    """Token used for padding (its value never matters: padded positions are masked out)."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


@dataclass
class SARACollator:
    """Tokenise parallel pairs into one SARA batch (see the module docstring for the layout).

    Args:
        tokenizer: the model's tokenizer. Plain texts get its special tokens (BOS/EOS);
            chat messages go through its chat template.
        max_length: truncate each side to this many tokens (None: no truncation).
        include_anchor: put anchor rows in the batch (False when priors replace them).
        lm_on_anchor: train the LM on anchor tokens too (their ``labels`` are kept).
        pad_to_multiple_of: round the padded length up (tensor-core friendly shapes).
        packing: one packed row without padding (module docstring) instead of padded rows.
        anchor_filter: ``sara_anchor_filter``; unless "none", the batch also marks the tokens of
            the anchors' answers (and, for "correct_anchor_wrong_target", of the targets').

    Output keys: ``input_ids``, ``attention_mask``, ``labels`` ([R, S], R = 2B or B) and
    ``sara_example_index`` [B] (each example's ``"index"``, -1 when absent — needed only for
    cached priors; :class:`~sara_kernels.hf.data.PairDataset` provides it); with ``anchor_filter``,
    ``sara_answer_mask`` (``input_ids``' shape, 1 on the answer tokens, see :meth:`answer_mask`). Packed:
    ``input_ids``, ``position_ids``, ``labels`` ([1, T]), ``sara_cu_seqlens`` [R+1] (the R
    sequences in the same order: B anchors, then B targets) and ``sara_example_index``.
    """

    tokenizer: Any
    max_length: Optional[int] = None
    include_anchor: bool = True
    lm_on_anchor: bool = False
    pad_to_multiple_of: Optional[int] = None
    packing: bool = False
    anchor_filter: str = "none"

    def __post_init__(self):
        if self.tokenizer is None:
            raise ValueError("tokenizer: SARACollator needs the model's tokenizer")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 1):
            raise ValueError(f"max_length must be a positive int or None, got {self.max_length!r}")
        if self.lm_on_anchor and not self.include_anchor:
            raise ValueError("lm_on_anchor=True needs include_anchor=True (the anchor rows carry its LM labels)")
        if self.packing and self.pad_to_multiple_of:
            raise ValueError("pad_to_multiple_of: packed batches have no padding; leave it None with packing=True")
        if self.anchor_filter not in ANCHOR_FILTERS:
            raise ValueError(f"anchor_filter must be one of {list(ANCHOR_FILTERS)}, got {self.anchor_filter!r}")
        if self.anchor_filter != "none" and not self.include_anchor:
            raise ValueError(f"anchor_filter={self.anchor_filter!r} needs include_anchor=True (the anchors' answers)")

    def encode(self, side, where: str = "text") -> list:
        """Token ids of one side: a text (with special tokens) or chat messages (chat template)."""
        return self._encode(side, where)[0]

    def answer_mask(self, side, answer: Optional[str], where: str) -> tuple:
        """(token ids of ``side`` as :meth:`encode` gives them, 0/1 per token: 1 on the tokens of
        ``answer``, the ending of the side's last text).

        All zeros when there is nothing the model can be checked on: no ``answer``, or one that
        truncation cut, or one starting at the first token (which nothing predicts). A token that
        straddles the answer's first character counts as the answer's.
        """
        ids, text, offsets = self._encode(side, where, offsets=True)
        mask = [0] * len(ids)
        if answer is None:
            return ids, mask
        end = text.rfind(side if isinstance(side, str) else side[-1]["content"])
        if end < 0:
            raise ValueError(f"{where}: the chat template's text does not hold the last message as written, so "
                             "sara_anchor_filter cannot find the answer's tokens")
        end += len(side if isinstance(side, str) else side[-1]["content"])
        start = end - len(answer)
        inside = [j for j, (a, b) in enumerate(offsets) if a < b and b > start and a < end]
        if inside and inside[0] > 0 and offsets[inside[-1]][1] >= end:
            for j in inside:
                mask[j] = 1
        return ids, mask

    def _encode(self, side, where: str, offsets: bool = False):
        """(ids[, the text tokenised, each token's character span in it]) of one side."""
        tok = self.tokenizer
        options = dict(truncation=True, max_length=self.max_length) if self.max_length else {}
        if offsets:
            if not getattr(tok, "is_fast", False):
                raise ValueError(f"{where}: sara_anchor_filter finds answers by character offsets, which needs a fast "
                                 f"tokenizer (got {type(tok).__name__})")
            options["return_offsets_mapping"] = True
        if isinstance(side, str):
            text = side
            encoded = tok(side, add_special_tokens=True, **options)
        else:
            if not getattr(tok, "chat_template", None):
                raise ValueError(f"{where}: chat messages given but the tokenizer has no chat_template")
            text = tok.apply_chat_template(list(side), tokenize=False)
            encoded = tok(text, add_special_tokens=False, **options)
        ids = encoded["input_ids"]
        if len(ids) == 0:
            raise ValueError(f"{where}: tokenises to no tokens")
        # The tokenizer leaves a text untruncated when max_length is below its special tokens.
        ids = list(ids)[: self.max_length]
        if not offsets:
            return ids, None, None
        return ids, text, [tuple(o) for o in encoded["offset_mapping"]][: len(ids)]

    def _side(self, example: dict, key: str, where: str, answers: list):
        """The ids of side ``key``; with the filter, its answer mask appended to ``answers``."""
        if self.anchor_filter == "none" or (key == "target" and self.anchor_filter == "correct"):
            ids = self.encode(example[key], f"{where}: {key}")
            answers.append([0] * len(ids))
            return ids
        answer = required_answer(example, key, self.anchor_filter, where)
        ids, mask = self.answer_mask(example[key], answer, f"{where}: {key}")
        answers.append(mask)
        return ids

    def __call__(self, examples: Sequence[dict]) -> dict:
        if len(examples) == 0:
            raise ValueError("SARACollator: empty list of examples")
        anchors, targets, index = [], [], []
        anchor_answers, target_answers = [], []
        for j, example in enumerate(examples):
            where = f"example {example.get('index', j) if isinstance(example, dict) else j}"
            validate_pair(example, where)
            targets.append(self._side(example, "target", where, target_answers))
            if self.include_anchor:
                anchors.append(self._side(example, "anchor", where, anchor_answers))
            index.append(int(example.get("index", -1)))
        index = torch.tensor(index, dtype=torch.long)
        anchor_has_lm = self.include_anchor and self.lm_on_anchor
        answers = {}
        if self.packing:
            ids, position_ids, cu_seqlens = pack_sequences(anchors + targets)
            labels = ids.clone()
            if anchors and not anchor_has_lm:
                labels[0, : int(cu_seqlens[len(anchors)])] = IGNORE_INDEX
            labels[0, cu_seqlens[:-1].long()] = IGNORE_INDEX
            if self.anchor_filter != "none":
                answers["sara_answer_mask"] = pack_sequences(anchor_answers + target_answers)[0]
            return {"input_ids": ids, "position_ids": position_ids, "labels": labels, "sara_cu_seqlens": cu_seqlens,
                    "sara_example_index": index, **answers}
        ids, mask = pad_right(anchors + targets, pad_token_id(self.tokenizer), self.pad_to_multiple_of)
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        if anchors and not anchor_has_lm:
            labels[: len(anchors)] = IGNORE_INDEX
        if self.anchor_filter != "none":
            answers["sara_answer_mask"] = pad_right(anchor_answers + target_answers, 0, self.pad_to_multiple_of)[0]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "sara_example_index": index, **answers}
