"""The demo and analyze commands end to end (CPU, reference backend) and the pseudo-language
(loading pairs from files: tests/hf/test_data.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from hf_train_helpers import one_thread, TOKENIZER, tiny_moe  # noqa: E402

from sara_kernels.hf import data as D  # noqa: E402
from sara_kernels.programs import corpus as C  # noqa: E402
from sara_kernels.programs.cli import main  # noqa: E402
from sara_kernels.testing import FP32_JS_ATOL  # noqa: E402


_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """What ``datasets`` caches when the commands read ``--data`` stays in the test's tmp dir."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))

from helpers import REPO  # noqa: E402
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- pseudo-language and data loading --------------------------------------------------------


def test_pseudo_language_grammar_by_hand():
    lex = C.pseudo_lexicon()
    got = C.translate("the big dog finds the red ball near the river today")
    expected = [lex["river"], lex["near"], lex["dog"], lex["big"], lex["ball"], lex["red"], "ko", lex["today"], lex["finds"]]
    assert got.split() == expected
    assert C.translate("the cat sees the key").split() == [lex["cat"], lex["key"], "ko", lex["sees"]]
    for bad in ("a dog barks", "the big dog finds the", "the dog", "the zebra sees the cat"):
        with pytest.raises(ValueError, match="not a generated sentence"):
            C.translate(bad)


def test_pseudo_lexicon_is_a_fixed_bijection_disjoint_from_english():
    lex = C.pseudo_lexicon()
    assert set(lex) == set(C.ENGLISH_WORDS) - {"the"}
    assert len(set(lex.values())) == len(lex)
    assert not set(lex.values()) & (set(C.ENGLISH_WORDS) | {C.OBJECT_MARKER})
    assert lex == C.pseudo_lexicon()  # hash-based, not seeded by process state
    corpus = C.make_parallel_corpus(50, seed=1)
    assert corpus == C.make_parallel_corpus(50, seed=1) and corpus != C.make_parallel_corpus(50, seed=2)
    for pair in corpus:
        content = [w for w in pair["anchor"].split() if w != "the"]
        assert sorted(lex[w] for w in content) == sorted(w for w in pair["target"].split() if w != "ko")
        ids = TOKENIZER(pair["anchor"] + " " + pair["target"])["input_ids"]
        assert TOKENIZER.unk_token_id not in ids


# ---- analyze ------------------------------------------------------------------------------


def _pooled(model, text):
    ids = torch.tensor([TOKENIZER(text)["input_ids"]])
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True, use_cache=False)
    return torch.stack([torch.softmax(z.double(), -1).mean(0) for z in out.router_logits])  # [L, E]


def _js(p, q):
    m = 0.5 * (p + q)
    return 0.5 * (torch.xlogy(p, p / m).sum(-1) + torch.xlogy(q, q / m).sum(-1))


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_moe")
    model = tiny_moe(seed=1)
    model.save_pretrained(folder)
    TOKENIZER.save_pretrained(folder)
    return str(folder), model.eval()


def test_analyze_cli_matches_independent_computation(saved_model, tmp_path, capsys):
    folder, model = saved_model
    pairs = C.make_parallel_corpus(6, seed=4)
    pairs[0]["lang"] = "other"
    data = tmp_path / "pairs.jsonl"
    D.save_pairs(pairs, data)
    out = tmp_path / "analysis"
    assert main(["analyze", "--model", folder, "--data", str(data), "--out", str(out), "--batch-size", "4", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "JS/ln2" in printed and "top-2 overlap" in printed and "mean" in printed

    result = json.loads((out / "routing_analysis.json").read_text())
    assert (out / "routing_heatmap.png").read_bytes()[:8] == PNG_MAGIC
    pa = torch.stack([_pooled(model, p["anchor"]) for p in pairs])  # [N, L, E]
    pt = torch.stack([_pooled(model, p["target"]) for p in pairs])
    js = _js(pa, pt)  # [N, L]
    assert result["layers"] == [1, 2] and result["top_k"] == 2 and result["num_pairs"] == 6
    torch.testing.assert_close(torch.tensor(result["js"], dtype=torch.float64), js.mean(0), rtol=1e-4, atol=FP32_JS_ATOL)
    torch.testing.assert_close(torch.tensor(result["js_normalized"], dtype=torch.float64), js.mean(0) / math.log(2), rtol=1e-4,
                               atol=FP32_JS_ATOL / math.log(2))
    overlap = [[len(set(pa[n, l].topk(2).indices.tolist()) & set(pt[n, l].topk(2).indices.tolist())) / 2
                for l in range(2)] for n in range(6)]
    assert result["topk_overlap"] == pytest.approx(torch.tensor(overlap).mean(0).tolist())
    assert result["by_lang"]["other"] == pytest.approx((js[0] / math.log(2)).tolist(), rel=1e-4)
    assert all(0.0 <= v <= 1.0 for v in result["js_normalized"])


# ---- demo -----------------------------------------------------------------------------------


def test_demo_cli_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-m", "sara_kernels", "demo", "--quick", "--out", str(out)],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "routing JS/ln2" in proc.stdout and "LM loss" in proc.stdout and "--quick is a smoke test" in proc.stdout
    # stderr is a pipe, not a terminal: no progress bar (each redraw would be a carriage-return line)
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "summary.png").read_bytes()[:8] == PNG_MAGIC
    results = summary["results"]
    assert set(results) == {"init", "baseline", "sara"}
    for stage in results.values():
        assert stage["routing"]["layers"] == [0, 1, 2, 3]
        assert math.isfinite(stage["target_lm_loss"])
    # Both runs start from one initialisation and see the same batches: their first logged LM losses agree.
    first = [next(h["lm_loss"] for h in summary["log_history"][run] if "lm_loss" in h) for run in ("baseline", "sara")]
    assert first[0] == pytest.approx(first[1], rel=1e-5)
    assert any("sara_loss" in h for h in summary["log_history"]["sara"])
    assert not any("sara_loss" in h for h in summary["log_history"]["baseline"])
    assert results["baseline"]["target_lm_loss"] < results["init"]["target_lm_loss"]


def _synthetic_summary():
    """The fields plot_summary reads, as run_demo writes them: 2 layers, 3 logged steps per run."""
    routing = {"layers": [1, 2], "top_k": 2, "js_normalized": [0.3, 0.2], "topk_overlap": [0.4, 0.6]}
    history = {
        "baseline": [{"step": s, "lm_loss": 4.0 - s} for s in (1, 2, 3)] + [{"step": 3, "train_runtime": 1.0}],
        "sara": [{"step": s, "lm_loss": 4.0 - s, "sara_loss": 0.1 / s} for s in (1, 2, 3)],
    }
    return {"model": "synthetic", "sizes": {"train_pairs": 8, "steps": 3}, "config": {"quick": False},
            "results": {s: {"routing": routing} for s in ("init", "baseline", "sara")}, "log_history": history}


def test_demo_plot_has_a_legend_entry_for_every_curve(tmp_path):
    """Every bar series and line, on every axes (the SARA-loss curve is on a twin y axis of the training
    panel, whose legend is drawn by the primary axes), has a real label shown in some legend."""
    from sara_kernels.programs.demo import plot_summary

    fig = plot_summary(_synthetic_summary(), str(tmp_path / "summary.png"))
    assert (tmp_path / "summary.png").read_bytes()[:8] == PNG_MAGIC
    shown = {t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()}
    drawn = [artist.get_label() for ax in fig.axes for artist in (*ax.get_lines(), *ax.containers)]
    assert len(fig.axes) == 4 and len(drawn) == 3 + 3 + 3  # bars per stage on 2 panels; 2 LM + 1 SARA curve
    # An unlabelled artist gets a "_child<n>" label, which a legend built from explicit labels would show
    # as is: so require real labels, and name the three training curves the figure exists to compare.
    assert not [label for label in drawn if label.startswith("_")], drawn
    assert set(drawn) <= shown, set(drawn) - shown
    assert {"baseline LM loss", "sara LM loss", "sara SARA loss (JS, right axis)"} <= shown


def test_demo_with_model_and_data_paths(saved_model, tmp_path):
    from sara_kernels.programs.demo import DemoConfig, run_demo, summary_table

    folder, _ = saved_model
    data = tmp_path / "pairs.jsonl"
    D.save_pairs(C.make_parallel_corpus(24, seed=5), data)
    summary = run_demo(DemoConfig(out_dir=str(tmp_path / "o"), model_path=folder, data_path=str(data), steps=2,
                                  batch_size=4, progress=False))
    assert summary["sizes"] == {"train_pairs": 22, "eval_pairs": 2, "steps": 2, "batch_size": 4}
    assert summary["results"]["init"]["routing"]["layers"] == [1, 2]
    table = summary_table(summary)
    assert table.splitlines()[1].split()[:4] == ["layer", "init", "baseline", "sara"]
    with pytest.raises(ValueError, match="sara_weight"):
        run_demo(DemoConfig(out_dir=str(tmp_path / "o"), sara_weight=0.0))


def test_demo_cli_reads_data_and_model_as_train_does(saved_model, tmp_path, capsys):
    folder, _ = saved_model
    opus = tmp_path / "opus.jsonl"
    opus.write_text("".join(json.dumps({"translation": {"en": p["anchor"], "sw": p["target"]}}) + "\n"
                            for p in C.make_parallel_corpus(12, seed=6)))
    out = tmp_path / "demo"
    argv = ["demo", "--model", folder, "--data", str(opus), "--anchor_lang", "en", "--target-lang", "sw", "--steps", "1",
            "--batch_size", "4", "--out", str(out), "--no_progress", "--dtype", "float32"]
    assert main(argv) == 0
    assert "routing JS/ln2" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == folder and summary["data"] == str(opus)
    assert summary["sizes"] == {"train_pairs": 11, "eval_pairs": 1, "steps": 1, "batch_size": 4}
    assert summary["results"]["init"]["routing"]["layers"] == [1, 2]


def test_demo_uses_one_device_when_several_gpus_are_visible(monkeypatch, tmp_path):
    """A plain (non-distributed) demo process on a machine with several GPUs trains on one device.

    transformers sets ``n_gpu = torch.cuda.device_count()`` outside a distributed launch, and
    SARATrainer rejects the resulting DataParallel. No GPU is used here: CUDA is reported absent
    and only the device count is faked, which is all ``TrainingArguments`` reads for ``n_gpu``.
    """
    from sara_kernels.programs.demo import DemoConfig, run_demo, training_args
    from sara_kernels.hf import SARATrainer, SARATrainingArguments

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    plain = SARATrainingArguments(output_dir=str(tmp_path / "plain"), report_to="none")
    assert plain.n_gpu == 4  # the simulated machine: what the demo got before pinning n_gpu
    with pytest.raises(ValueError, match=r"DataParallel \(4 GPUs in one process\)"):
        SARATrainer(model=tiny_moe(), args=plain, train_dataset=C.make_parallel_corpus(8), processing_class=TOKENIZER)

    cfg = DemoConfig(out_dir=str(tmp_path / "demo"), quick=True, steps=1, batch_size=4, progress=False).resolved()
    args = training_args("sara", cfg, 1.0)
    assert args.n_gpu == 1 and args.device == torch.device("cpu") and args.train_batch_size == 4
    summary = run_demo(cfg, train_pairs=16, eval_pairs=4)
    assert summary["device"] == "cpu" and summary["sizes"]["steps"] == 1
    assert any("sara_loss" in h for h in summary["log_history"]["sara"])
