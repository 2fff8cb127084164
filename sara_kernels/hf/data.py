"""Parallel-pair data for SARA: validation, jsonl loading, and a synthetic pseudo-language.

A *pair* is a dict ``{"anchor": ..., "target": ..., "lang": optional str}`` where anchor and
target are either plain text or chat messages (a list of ``{"role": str, "content": str}``).
The anchor is the high-resource side (e.g. English) whose routing the target side is pulled
towards. Every entry point validates pairs with :func:`validate_pair`, so a malformed example
fails with the same message, naming the example, wherever it comes from.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable, Sequence

import torch

PAIR_KEYS = ("anchor", "target")


# --------------------------------------------------------------------------------------------
# Validation and loading
# --------------------------------------------------------------------------------------------


def _check_side(value: Any, key: str, where: str) -> None:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where}: {key!r} is an empty text")
        return
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise ValueError(f"{where}: {key!r} is an empty list of chat messages")
        for j, msg in enumerate(value):
            if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
                raise ValueError(
                    f"{where}: {key}[{j}] must be a chat message {{'role': ..., 'content': ...}}, got {msg!r}"
                )
            if not isinstance(msg["content"], str) or not msg["content"].strip():
                raise ValueError(f"{where}: {key}[{j}]['content'] is empty")
        return
    raise TypeError(f"{where}: {key!r} must be a text or a list of chat messages, got {type(value).__name__}")


def validate_pair(example: Any, where: str = "pair") -> None:
    """Raise a ValueError/TypeError naming ``where`` and the key if ``example`` is not a valid pair.

    Checked up front (not left to the tokenizer) because a missing or empty side would otherwise
    surface much later as a shape error inside the loss, far from the offending example.
    """
    if not isinstance(example, dict):
        raise TypeError(f"{where}: expected a dict with keys 'anchor' and 'target', got {type(example).__name__}")
    missing = [k for k in PAIR_KEYS if k not in example]
    if missing:
        raise ValueError(
            f"{where}: missing key(s) {missing}; a pair needs 'anchor' (high-resource text) and 'target' "
            f"(its translation), got keys {sorted(example)}"
        )
    for key in PAIR_KEYS:
        _check_side(example[key], key, where)
    lang = example.get("lang")
    if lang is not None and not isinstance(lang, str):
        raise TypeError(f"{where}: 'lang' must be a string tag, got {type(lang).__name__}")


def load_pairs(path: str | os.PathLike) -> list[dict]:
    """Read parallel pairs from a jsonl file: one ``{"anchor", "target", optional "lang"}`` per line.

    Blank lines are skipped; any other bad line raises a ValueError with its line number.
    """
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{os.fspath(path)}:{lineno}"
            try:
                example = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            validate_pair(example, where)
            pairs.append(example)
    if not pairs:
        raise ValueError(f"{os.fspath(path)}: no pairs found (expected one JSON object per line)")
    return pairs


def save_pairs(pairs: Iterable[dict], path: str | os.PathLike) -> None:
    """Write pairs as jsonl (the format :func:`load_pairs` and ``--data`` read)."""
    with open(path, "w", encoding="utf-8") as f:
        for example in pairs:
            f.write(json.dumps(example, ensure_ascii=False) + "\n")


def anchors_fingerprint(pairs: Sequence[dict]) -> str:
    """SHA-256 of the anchors in order.

    Cached priors are looked up by example index, so a priors file is only valid for the same
    anchors in the same order; storing this fingerprint lets the trainer refuse a shuffled or
    different dataset instead of silently pairing targets with the wrong priors.
    """
    h = hashlib.sha256()
    for example in pairs:
        h.update(json.dumps(example["anchor"], ensure_ascii=False, sort_keys=True).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


class PairDataset(torch.utils.data.Dataset):
    """Map-style dataset of validated pairs that adds each example's position as ``"index"``.

    The index travels through :class:`~sara_kernels.hf.trainer.SARACollator` to the trainer,
    which uses it to gather the cached routing priors of the batch's examples (the sampler
    shuffles, so the position in the batch says nothing about the example).
    """

    def __init__(self, pairs: Sequence[dict]):
        if isinstance(pairs, PairDataset):
            pairs = pairs.pairs
        if not hasattr(pairs, "__len__") or not hasattr(pairs, "__getitem__"):
            raise TypeError(f"pairs: expected a sequence of dicts, got {type(pairs).__name__}")
        if len(pairs) == 0:
            raise ValueError("pairs: the dataset is empty")
        for i in range(len(pairs)):
            validate_pair(pairs[i], f"pairs[{i}]")
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        return {**self.pairs[i], "index": int(i)}
