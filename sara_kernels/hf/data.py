"""Parallel-pair data for SARA: validation, loading with 🤗 datasets, and the indexed dataset.

A *pair* is a dict ``{"anchor": ..., "target": ..., "lang": optional str}`` where anchor and
target are either plain text or chat messages (a list of ``{"role": str, "content": str}``).
The anchor is the high-resource side (e.g. English) whose routing the target side is pulled
towards. A side's *answer* (what ``sara_anchor_filter`` checks the model reproduces) is its last
text's ending given in ``"answer"`` (the anchor's) or ``"target_answer"``, else the reply of a
chat side whose last message is the assistant's (:func:`side_answer`). Every entry point validates pairs with :func:`validate_pair`, so a malformed example
fails with the same message, naming the example, wherever it comes from.

Files are read by ``datasets`` (json/jsonl, csv/tsv, parquet, arrow, a ``save_to_disk``
folder): data stays memory-mapped, and people's corpora come in whatever columns they have, so
:func:`pairs_from_dataset` maps the user's columns onto ``anchor``/``target``/``lang``,
including the ``{"translation": {"en": ..., "sw": ...}}`` layout of translation corpora.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

import torch

if TYPE_CHECKING:
    import datasets

PAIR_KEYS = ("anchor", "target")
# The optional field holding each side's answer.
ANSWER_KEYS = {"anchor": "answer", "target": "target_answer"}
# ``data_format`` names and the ``datasets`` builder (and its options) that reads each.
DATA_FORMATS = {
    "json": ("json", {}),
    "csv": ("csv", {}),
    "tsv": ("csv", {"sep": "\t"}),
    "parquet": ("parquet", {}),
    "arrow": ("arrow", {}),
}
_EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".arrow": "arrow"}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".zip")


# --------------------------------------------------------------------------------------------
# Validation
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
    for key, answer_key in ANSWER_KEYS.items():
        answer = example.get(answer_key)
        if answer is None:
            continue
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError(f"{where}: {answer_key!r} must be a non-empty text, got {answer!r}")
        side = example[key]
        last = side if isinstance(side, str) else side[-1]["content"]
        if not last.endswith(answer):
            raise ValueError(f"{where}: {answer_key!r} must be the ending of the {key}'s last text, "
                             f"which ends with {last[-40:]!r}")
    lang = example.get("lang")
    if lang is not None and not isinstance(lang, str):
        raise TypeError(f"{where}: 'lang' must be a string tag, got {type(lang).__name__}")


def side_answer(example: dict, key: str) -> Optional[str]:
    """The answer of side ``key`` ("anchor" or "target") of a valid pair: its ``answer`` /
    ``target_answer`` field, else the reply of a chat whose last message is the assistant's, else None."""
    answer = example.get(ANSWER_KEYS[key])
    side = example[key]
    if answer is None and not isinstance(side, str) and side[-1]["role"] == "assistant":
        answer = side[-1]["content"]
    return answer


def required_answer(example: dict, key: str, anchor_filter: str, where: str) -> str:
    """:func:`side_answer`, or the one-line error of ``sara_anchor_filter`` naming the pair ``where``."""
    answer = side_answer(example, key)
    if answer is None:
        raise ValueError(
            f"sara_anchor_filter={anchor_filter!r}: {where} has no {key} answer; give each pair an {ANSWER_KEYS[key]!r} "
            f"field or a chat {key} ending with the assistant's reply"
        )
    return answer


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _format_of(path: str) -> Optional[str]:
    name = path.lower()
    for suffix in _COMPRESSIONS:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return _EXTENSIONS.get(os.path.splitext(name)[1])


def _load_dataset(paths: list, data_format: Optional[str], split: str) -> "datasets.Dataset":
    """One split of the files (or folder) ``paths`` as a ``datasets.Dataset``; ValueError for what cannot be read."""
    import datasets

    for path in paths:
        if not (glob.has_magic(path) and glob.glob(path)) and not os.path.exists(path):
            raise FileNotFoundError(f"data: no such file or folder: {path}")
    if data_format is not None and data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {sorted(DATA_FORMATS)} (or None: from the extension), got {data_format!r}")
    if len(paths) == 1 and os.path.isdir(paths[0]):
        folder = paths[0]
        if os.path.exists(os.path.join(folder, "state.json")) or os.path.exists(os.path.join(folder, "dataset_dict.json")):
            loaded = datasets.load_from_disk(folder)  # a save_to_disk folder
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"split: {folder} has no split {split!r}; its splits: {sorted(loaded)}")
                loaded = loaded[split]
            return loaded
        # A folder of data files: datasets infers their format unless data_format names it.
        builder, options = DATA_FORMATS[data_format] if data_format else (folder, {})
        source = {"data_dir": folder} if data_format else {}
    else:
        if data_format is None:
            found = {path: _format_of(path) for path in paths}
            unknown = [path for path, fmt in found.items() if fmt is None]
            if unknown:
                raise ValueError(
                    f"data_format: cannot tell the format of {unknown[0]} from its extension; "
                    f"give data_format (one of {sorted(DATA_FORMATS)})"
                )
            if len(set(found.values())) > 1:
                raise ValueError(f"data: the files have different formats ({sorted(set(found.values()))}); load them apart")
            data_format = next(iter(found.values()))
        builder, options = DATA_FORMATS[data_format]
        source = {"data_files": paths}
    try:
        try:
            return datasets.load_dataset(builder, split=split, **source, **options)
        except ValueError:
            if builder != "json" or "on_mixed_types" in options:
                raise
            # datasets < 4.8 scans the first block for mixed-type columns by parsing each line alone,
            # which fails on a blank line of a JSONL file; read without the scan (text pairs have
            # no mixed types; chat messages whose fields differ get the missing ones as None).
            return datasets.load_dataset(builder, split=split, **source, **options, on_mixed_types=None)
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__ or e
        raise ValueError(f"data: {', '.join(paths)} could not be read as {data_format or 'data files'}: {cause}") from None
    except ValueError as e:  # an unknown split, or no rows at all
        reason = "no pairs found" if "corresponds to no data" in str(e) else str(e)
        raise ValueError(f"data: {', '.join(paths)}: {reason}") from None


def load_pairs(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    data_format: Optional[str] = None,
    split: str = "train",
    anchor_column: str = "anchor",
    target_column: str = "target",
    lang_column: Optional[str] = None,
    anchor_lang: Optional[str] = None,
    target_lang: Optional[str] = None,
    translation_column: str = "translation",
) -> "datasets.Dataset":
    """Read parallel pairs with ``datasets.load_dataset`` and map their columns (see :func:`pairs_from_dataset`).

    ``source``: one path or a list (or glob) of json/jsonl, csv, tsv, parquet or arrow files
    (compressed too; format from the extension unless ``data_format`` says), a folder of such
    files, or a folder written by ``save_to_disk`` (``split`` picks from a ``DatasetDict``).
    Returns a ``datasets.Dataset`` with columns ``anchor``, ``target`` (and ``lang`` when known),
    every row validated; pass it to :class:`~sara_kernels.hf.SARATrainer` as it is. ``datasets``
    caches what it reads (``HF_DATASETS_CACHE``) and notices when a file changes.
    """
    paths = [os.fspath(p) for p in ([source] if isinstance(source, (str, os.PathLike)) else source)]
    if not paths:
        raise ValueError("data: no files given")
    dataset = _load_dataset(paths, data_format, split)
    return pairs_from_dataset(
        dataset, anchor_column=anchor_column, target_column=target_column, lang_column=lang_column,
        anchor_lang=anchor_lang, target_lang=target_lang, translation_column=translation_column,
        source=paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} more)",
    )


def _check_column_type(dataset, column: str, key: str, source: str) -> None:
    """Catch a column of numbers or booleans once, by its type, rather than at every row."""
    import datasets

    feature = dataset.features[column]
    if isinstance(feature, datasets.Value) and feature.dtype not in ("string", "large_string"):
        expected = "language tags (strings)" if key == "lang" else "texts or lists of chat messages"
        raise ValueError(f"{key}_column: column {column!r} of {source} holds {feature.dtype} values, expected {expected}")


def pairs_from_dataset(
    dataset: "datasets.Dataset",
    *,
    anchor_column: str = "anchor",
    target_column: str = "target",
    lang_column: Optional[str] = None,
    anchor_lang: Optional[str] = None,
    target_lang: Optional[str] = None,
    translation_column: str = "translation",
    source: str = "dataset",
) -> "datasets.Dataset":
    """Map the columns of a ``datasets.Dataset`` onto pairs: columns ``anchor``, ``target`` (and ``lang``).

    * ``anchor_column`` / ``target_column``: the columns holding the two sides (texts, or lists
      of ``{"role", "content"}`` chat messages). A field of a nested column is named with a dot
      (``"translation.en"``).
    * ``anchor_lang`` / ``target_lang``: language codes of the ``{"translation": {code: text}}``
      layout (in ``translation_column``), instead of the two columns; ``lang`` is then
      ``target_lang``.
    * ``lang_column``: the language tag of each pair (default: ``"lang"`` when there is one).

    ``answer`` / ``target_answer`` columns are kept; other columns are dropped. Every row is validated (:func:`validate_pair`); errors name the
    row as ``source[i]``. A wrong column name is a ValueError that lists the columns there are.
    """
    if (anchor_lang is None) != (target_lang is None):
        raise ValueError("anchor_lang and target_lang: give both language codes of the translation layout, or neither")
    if anchor_lang is not None:
        if (anchor_column, target_column) != ("anchor", "target"):
            raise ValueError("give either anchor_column/target_column or anchor_lang/target_lang, not both")
        feature = dataset.features.get(translation_column)
        if feature is None:
            raise ValueError(
                f"translation_column: no column {translation_column!r} in {source} (anchor_lang/target_lang read "
                f"{{{translation_column!r}: {{code: text}}}}); available columns: {dataset.column_names}"
            )
        if not isinstance(feature, dict):
            raise ValueError(
                f"translation_column: column {translation_column!r} of {source} holds {feature}, "
                "expected records {language code: text}"
            )
        for key, code in (("anchor_lang", anchor_lang), ("target_lang", target_lang)):
            if code not in feature:
                raise ValueError(
                    f"{key}: no language {code!r} in column {translation_column!r} of {source}; it has {sorted(feature)}"
                )
        anchor_column, target_column = f"{translation_column}.{anchor_lang}", f"{translation_column}.{target_lang}"
    if anchor_column == target_column:
        raise ValueError(f"anchor_column and target_column are both {anchor_column!r}: the two sides need two columns")
    if lang_column is None and "lang" in dataset.column_names:
        lang_column = "lang"
    wanted = {"anchor": anchor_column, "target": target_column}
    if lang_column is not None:
        wanted["lang"] = lang_column
    # The answers sara_anchor_filter reads travel under their own names.
    wanted.update({k: k for k in ANSWER_KEYS.values() if k in dataset.column_names})
    if any(column not in dataset.column_names for column in wanted.values()):
        dataset = dataset.flatten()  # nested fields become "column.field" columns
    for key, column in wanted.items():
        if column not in dataset.column_names:
            codes = [c[len(translation_column) + 1 :] for c in dataset.column_names if c.startswith(f"{translation_column}.")]
            hint = (f" (the translation layout, with language codes {codes}: give anchor_lang and target_lang)"
                    if codes and anchor_lang is None else "")
            raise ValueError(f"{key}_column: no column {column!r} in {source}; available columns: {dataset.column_names}{hint}")
        _check_column_type(dataset, column, key, source)
    dataset = dataset.select_columns(list(wanted.values())).rename_columns({c: k for k, c in wanted.items() if c != k})
    if "lang" not in wanted and target_lang is not None:
        dataset = dataset.add_column("lang", [target_lang] * len(dataset))
    if len(dataset) == 0:
        raise ValueError(f"{source}: no pairs found")
    for i, example in enumerate(dataset):
        where = f"{source}[{i}]"
        for key in PAIR_KEYS:
            if example[key] is None:
                raise ValueError(f"{where}: no {key!r} (column {wanted[key]!r} is empty in this row)")
        try:
            validate_pair(example, where)
        except TypeError as e:  # a bad value in a file, not a caller's type mistake
            raise ValueError(str(e)) from None
    return dataset


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
        # Iterated rather than indexed: a datasets.Dataset reads rows in batches that way.
        for i, example in zip(range(len(pairs)), pairs):
            validate_pair(example, f"pairs[{i}]")
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        return {**self.pairs[i], "index": int(i)}
