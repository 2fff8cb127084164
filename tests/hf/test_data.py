"""Loading parallel pairs with 🤗 datasets: every file format, the column mapping, the translation
layout, chat pairs, and the errors a user sees. Files are written to tmp dirs; nothing is downloaded."""

from __future__ import annotations

import json

import pytest

datasets = pytest.importorskip("datasets")

from sara_kernels.hf import PairDataset, SARACollator, load_pairs, pairs_from_dataset  # noqa: E402
from sara_kernels.hf.data import anchors_fingerprint  # noqa: E402

ROWS = [
    {"en": "the dog sees the cat", "sw": "mbwa anaona paka", "tag": "sw"},
    {"en": "the cat runs", "sw": "paka anakimbia", "tag": "sw"},
    {"en": "a big house", "sw": "nyumba kubwa", "tag": "sw"},
]
PAIRS = [{"anchor": r["en"], "target": r["sw"], "lang": r["tag"]} for r in ROWS]
MAPPING = dict(anchor_column="en", target_column="sw", lang_column="tag")


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Keep what ``datasets`` caches inside the test's tmp dir."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_with_the_default_columns(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"anchor": "the dog", "target": "x", "lang": "ps", "id": 7}\n\n{"anchor": "a", "target": "b"}\n')
    pairs = load_pairs(path)
    assert isinstance(pairs, datasets.Dataset)
    assert pairs.column_names == ["anchor", "target", "lang"]  # other columns dropped
    assert list(pairs) == [{"anchor": "the dog", "target": "x", "lang": "ps"}, {"anchor": "a", "target": "b", "lang": None}]


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "tsv", "parquet", "arrow", "saved", "saved_dict", "jsonl.gz"])
def test_every_source_format_with_column_mapping(tmp_path, fmt):
    table = datasets.Dataset.from_list(ROWS)
    path = tmp_path / f"pairs.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(ROWS))  # one JSON array
    elif fmt == "jsonl":
        _jsonl(path, ROWS)
    elif fmt == "jsonl.gz":
        import gzip

        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in ROWS).encode()))
    elif fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        path.write_text("en{0}sw{0}tag\n".format(sep) + "".join(sep.join(r.values()) + "\n" for r in ROWS))
    elif fmt == "parquet":
        table.to_parquet(str(path))
    elif fmt == "arrow":
        table.save_to_disk(str(tmp_path / "saved_for_arrow"))
        path = next((tmp_path / "saved_for_arrow").glob("*.arrow"))
    elif fmt == "saved":
        table.save_to_disk(str(path))
    else:
        datasets.DatasetDict(train=table, test=table.select([0])).save_to_disk(str(path))
        assert list(load_pairs(path, split="test", **MAPPING)) == PAIRS[:1]
        with pytest.raises(ValueError, match=r"split: .* has no split 'dev'; its splits: \['test', 'train'\]"):
            load_pairs(path, split="dev", **MAPPING)
    assert list(load_pairs(path, **MAPPING)) == PAIRS


def test_several_files_and_an_explicit_format(tmp_path):
    a, b = _jsonl(tmp_path / "a.jsonl", ROWS[:2]), _jsonl(tmp_path / "b.jsonl", ROWS[2:])
    assert list(load_pairs([a, b], **MAPPING)) == PAIRS
    odd = _jsonl(tmp_path / "pairs.txt", ROWS)
    with pytest.raises(ValueError, match=r"cannot tell the format of .*pairs.txt from its extension; give data_format"):
        load_pairs(odd, **MAPPING)
    assert list(load_pairs(odd, data_format="json", **MAPPING)) == PAIRS
    with pytest.raises(ValueError, match=r"data_format must be one of .*'parquet'.*got 'xml'"):
        load_pairs(odd, data_format="xml")
    (tmp_path / "pairs.csv").write_text("en\nx\n")
    with pytest.raises(ValueError, match=r"different formats \(\['csv', 'json'\]\)"):
        load_pairs([a, tmp_path / "pairs.csv"])


def test_a_folder_of_data_files(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    _jsonl(folder / "part0.jsonl", ROWS[:1])
    _jsonl(folder / "part1.jsonl", ROWS[1:])
    assert sorted(p["anchor"] for p in load_pairs(folder, **MAPPING)) == sorted(p["anchor"] for p in PAIRS)
    assert len(load_pairs(folder, data_format="json", **MAPPING)) == 3


def test_translation_layout(tmp_path):
    rows = [{"translation": {"en": r["en"], "sw": r["sw"], "fr": "x"}, "id": i} for i, r in enumerate(ROWS)]
    path = _jsonl(tmp_path / "opus.jsonl", rows)
    pairs = load_pairs(path, anchor_lang="en", target_lang="sw")
    assert list(pairs) == PAIRS  # lang is the target's code
    # The same with the nested field named directly.
    direct = load_pairs(path, anchor_column="translation.en", target_column="translation.sw")
    assert list(direct) == [{"anchor": p["anchor"], "target": p["target"]} for p in PAIRS]
    with pytest.raises(ValueError, match=r"target_lang: no language 'yo' in column 'translation' of .*opus.jsonl; "
                                         r"it has \['en', 'fr', 'sw'\]"):
        load_pairs(path, anchor_lang="en", target_lang="yo")
    with pytest.raises(ValueError, match="give both language codes"):
        load_pairs(path, anchor_lang="en")
    with pytest.raises(ValueError, match=r"translation_column: no column 'trans' .*available columns: \['translation', 'id'\]"):
        load_pairs(path, anchor_lang="en", target_lang="sw", translation_column="trans")
    with pytest.raises(ValueError, match="not both"):
        load_pairs(path, anchor_lang="en", target_lang="sw", anchor_column="id")


def test_chat_message_pairs_reach_the_collator_as_messages(tmp_path):
    from hf_train_helpers import TOKENIZER

    anchor = [{"role": "user", "content": "the dog"}, {"role": "assistant", "content": "sees the cat"}]
    target = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "runs", "name": "bot"}]
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages_en": anchor, "messages_xx": target}, {"messages_en": anchor, "messages_xx": anchor}])
    pairs = load_pairs(path, anchor_column="messages_en", target_column="messages_xx")
    assert pairs[0] == {"anchor": anchor, "target": target} and pairs[1]["target"] == anchor
    batch = SARACollator(TOKENIZER)([PairDataset(pairs)[0]])
    expected = TOKENIZER(TOKENIZER.apply_chat_template(target, tokenize=False), add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][1, : len(expected)].tolist() == expected
    bad = _jsonl(tmp_path / "bad_chat.jsonl", [{"anchor": anchor, "target": [{"role": "user", "content": " "}]}])
    with pytest.raises(ValueError, match=r"bad_chat.jsonl\[0\]: target\[0\]\['content'\] is empty"):
        load_pairs(bad)


def test_wrong_column_names_the_column_and_lists_the_available_ones(tmp_path):
    path = _jsonl(tmp_path / "pairs.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"anchor_column: no column 'anchor' in .*pairs.jsonl; "
                                         r"available columns: \['en', 'sw', 'tag'\]"):
        load_pairs(path)
    with pytest.raises(ValueError, match=r"target_column: no column 'swahili' .*available columns: \['en', 'sw', 'tag'\]"):
        load_pairs(path, anchor_column="en", target_column="swahili")
    with pytest.raises(ValueError, match=r"lang_column: no column 'language'"):
        load_pairs(path, anchor_column="en", target_column="sw", lang_column="language")
    with pytest.raises(ValueError, match="both 'en'"):
        load_pairs(path, anchor_column="en", target_column="en")


def test_bad_rows_and_files_name_the_row_or_file(tmp_path):
    csv = tmp_path / "holes.csv"
    csv.write_text("en,sw,n\nthe dog,mbwa,1\n,paka,2\n")
    with pytest.raises(ValueError, match=r"holes.csv\[1\]: no 'anchor' \(column 'en' is empty in this row\)"):
        load_pairs(csv, anchor_column="en", target_column="sw")
    with pytest.raises(ValueError, match=r"target_column: column 'n' of .*holes.csv holds int64 values, expected texts"):
        load_pairs(csv, anchor_column="sw", target_column="n")
    cases = {
        '{"anchor": "a", "target": "b"}\n{"anchor": "", "target": "c"}\n': r"\[1\]: 'anchor' is an empty text",
        '{"anchor": "a", "target": {"x": 1}}\n': r"\[0\]: 'target' must be a text or a list of chat messages",
        '{"anchor": "a", "target": b}\n': r"bad2.jsonl could not be read as json: JSON parse error",
        "\n\n": r"bad3.jsonl: no pairs found",
    }
    for i, (text, match) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text(text)
        with pytest.raises(ValueError, match=match):
            load_pairs(path)
    with pytest.raises(FileNotFoundError, match=r"data: no such file or folder: .*nope.jsonl"):
        load_pairs(tmp_path / "nope.jsonl")


def test_loaded_pairs_feed_the_indexed_dataset_and_the_priors_fingerprint(tmp_path):
    pairs = load_pairs(_jsonl(tmp_path / "pairs.jsonl", ROWS), **MAPPING)
    wrapped = PairDataset(pairs)
    assert len(wrapped) == 3 and wrapped[2] == {**PAIRS[2], "index": 2}
    assert anchors_fingerprint(pairs) == anchors_fingerprint(PAIRS)
    assert list(pairs_from_dataset(datasets.Dataset.from_list(ROWS), **MAPPING)) == PAIRS
