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

from .data import validate_pair

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

    Output keys: ``input_ids``, ``attention_mask``, ``labels`` ([R, S], R = 2B or B) and
    ``sara_example_index`` [B] (each example's ``"index"``, -1 when absent — needed only for
    cached priors; :class:`~sara_kernels.hf.data.PairDataset` provides it). Packed:
    ``input_ids``, ``position_ids``, ``labels`` ([1, T]), ``sara_cu_seqlens`` [R+1] (the R
    sequences in the same order: B anchors, then B targets) and ``sara_example_index``.
    """

    tokenizer: Any
    max_length: Optional[int] = None
    include_anchor: bool = True
    lm_on_anchor: bool = False
    pad_to_multiple_of: Optional[int] = None
    packing: bool = False

    def __post_init__(self):
        if self.tokenizer is None:
            raise ValueError("tokenizer: SARACollator needs the model's tokenizer")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 1):
            raise ValueError(f"max_length must be a positive int or None, got {self.max_length!r}")
        if self.lm_on_anchor and not self.include_anchor:
            raise ValueError("lm_on_anchor=True needs include_anchor=True (the anchor rows carry its LM labels)")
        if self.packing and self.pad_to_multiple_of:
            raise ValueError("pad_to_multiple_of: packed batches have no padding; leave it None with packing=True")

    def encode(self, side, where: str = "text") -> list:
        """Token ids of one side: a text (with special tokens) or chat messages (chat template)."""
        tok = self.tokenizer
        truncate = dict(truncation=True, max_length=self.max_length) if self.max_length else {}
        if isinstance(side, str):
            ids = tok(side, add_special_tokens=True, **truncate)["input_ids"]
        else:
            if not getattr(tok, "chat_template", None):
                raise ValueError(f"{where}: chat messages given but the tokenizer has no chat_template")
            text = tok.apply_chat_template(list(side), tokenize=False)
            ids = tok(text, add_special_tokens=False, **truncate)["input_ids"]
        if len(ids) == 0:
            raise ValueError(f"{where}: tokenises to no tokens")
        # The tokenizer leaves a text untruncated when max_length is below its special tokens.
        return list(ids)[: self.max_length]

    def __call__(self, examples: Sequence[dict]) -> dict:
        if len(examples) == 0:
            raise ValueError("SARACollator: empty list of examples")
        anchors, targets, index = [], [], []
        for j, example in enumerate(examples):
            where = f"example {example.get('index', j) if isinstance(example, dict) else j}"
            validate_pair(example, where)
            targets.append(self.encode(example["target"], f"{where}: target"))
            if self.include_anchor:
                anchors.append(self.encode(example["anchor"], f"{where}: anchor"))
            index.append(int(example.get("index", -1)))
        index = torch.tensor(index, dtype=torch.long)
        anchor_has_lm = self.include_anchor and self.lm_on_anchor
        if self.packing:
            ids, position_ids, cu_seqlens = pack_sequences(anchors + targets)
            labels = ids.clone()
            if anchors and not anchor_has_lm:
                labels[0, : int(cu_seqlens[len(anchors)])] = IGNORE_INDEX
            labels[0, cu_seqlens[:-1].long()] = IGNORE_INDEX
            return {"input_ids": ids, "position_ids": position_ids, "labels": labels, "sara_cu_seqlens": cu_seqlens,
                    "sara_example_index": index}
        ids, mask = pad_right(anchors + targets, pad_token_id(self.tokenizer), self.pad_to_multiple_of)
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        if anchors and not anchor_has_lm:
            labels[: len(anchors)] = IGNORE_INDEX
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "sara_example_index": index}
