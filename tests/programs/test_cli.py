"""``python -m sara_kernels train | priors | analyze`` run in-process on CPU: a tiny MoE saved to a
tmp dir, a few pairs, 2 training steps; config files; and the one-line errors of user mistakes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from helpers import REPO  # noqa: E402
from hf_train_helpers import TOKENIZER, one_thread, pairs, tiny_moe  # noqa: E402

from sara_kernels.hf import load_routing_priors, save_pairs, save_routing_priors  # noqa: E402
from sara_kernels.programs.arguments import ModelArguments  # noqa: E402
from sara_kernels.programs.cli import main  # noqa: E402

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

QUIET = ["--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no", "--dataloader_pin_memory", "false"]


@pytest.fixture(autouse=True)
def _quiet_and_cached_in_tmp(tmp_path, monkeypatch):
    """No progress bars (stderr must hold only the command's own lines); the datasets cache in tmp."""
    from transformers.utils import logging as hf_logging

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    yield
    datasets.enable_progress_bars()
    hf_logging.enable_progress_bar()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_moe")
    tiny_moe(seed=1).save_pretrained(folder)
    TOKENIZER.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "pairs.jsonl"
    save_pairs(pairs(8, seed=2), path)
    return str(path)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(f"{folder}/model.safetensors")


def _train(model_dir, data, out, *extra):
    argv = ["train", "--model", model_dir, "--data", data, "--output_dir", str(out), "--max_steps", "2",
            "--per_device_train_batch_size", "4", "--learning_rate", "0.01", *QUIET, *extra]
    return main(argv)


def test_train_two_steps_writes_the_fine_tuned_model(model_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(model_dir, data, out, "--sara_weight", "0.5", "--logging_steps", "1") == 0
    assert "trained: 2 optimiser steps" in capsys.readouterr().out
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert any("sara_loss" in entry for entry in state["log_history"])
    for name in ("config.json", "tokenizer.json"):
        assert (out / name).exists()
    before, after = _weights(model_dir), _weights(out)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the model was trained and saved


def test_train_reads_the_translation_layout_by_language_codes(model_dir, tmp_path, monkeypatch):
    from sara_kernels.hf import SARATrainer

    path = tmp_path / "opus.jsonl"
    path.write_text("".join(json.dumps({"translation": {"en": p["anchor"], "xx": p["target"]}}) + "\n" for p in pairs(8)))
    trained_on = []
    train = SARATrainer.train

    def recording_train(self, *args, **kwargs):
        trained_on.extend(self.train_dataset)
        return train(self, *args, **kwargs)

    monkeypatch.setattr(SARATrainer, "train", recording_train)
    assert _train(model_dir, str(path), tmp_path / "run", "--anchor-lang", "en", "--target-lang", "xx") == 0
    # The "en" text is the anchor and the "xx" text the target, pair by pair (a swap would also train),
    # and the target's code is the pair's language.
    assert [(row["anchor"], row["target"], row["lang"]) for row in trained_on] == [
        (p["anchor"], p["target"], "xx") for p in pairs(8)]


def test_priors_file_is_consumed_by_train(model_dir, data, tmp_path, capsys):
    priors = tmp_path / "priors.safetensors"
    assert main(["priors", "--model", model_dir, "--data", data, "--out", str(priors), "--no-progress"]) == 0
    assert "routing priors of 8 anchors" in capsys.readouterr().out
    loaded = load_routing_priors(priors)
    assert loaded.num_examples == 8 and loaded.layers == (1, 2) and loaded.max_length is None

    # One plain SGD step: cached priors equal the live anchors (no dropout), so the updates agree.
    sgd = ["--max_steps", "1", "--optim", "sgd", "--lr_scheduler_type", "constant", "--max_grad_norm", "0",
           "--weight_decay", "0", "--per_device_train_batch_size", "8", "--sara_weight", "5"]
    assert _train(model_dir, data, tmp_path / "live", *sgd) == 0
    assert _train(model_dir, data, tmp_path / "cached", *sgd, "--sara_priors", str(priors)) == 0
    base, live, cached = _weights(model_dir), _weights(tmp_path / "live"), _weights(tmp_path / "cached")
    for name in base:
        torch.testing.assert_close(cached[name] - base[name], live[name] - base[name], rtol=1e-4, atol=1e-7)
    # What train read is the file: the same priors rolled over the examples (each pair gets another
    # anchor's routing; the anchors' fingerprint still fits) move the SARA layers' routers elsewhere.
    loaded.probs = torch.roll(loaded.probs, shifts=1, dims=0)
    save_routing_priors(loaded, tmp_path / "rolled.safetensors")
    assert _train(model_dir, data, tmp_path / "rolled", *sgd, "--sara_priors", str(tmp_path / "rolled.safetensors")) == 0
    rolled, gate = _weights(tmp_path / "rolled"), "model.layers.2.mlp.gate.weight"
    assert (rolled[gate] - live[gate]).abs().max() > 1e-2 * (live[gate] - base[gate]).abs().max()
    capsys.readouterr()

    # The file is read and checked: extracted without truncation, it does not fit sara_max_length = 4.
    assert _train(model_dir, data, tmp_path / "bad", "--sara_priors", str(priors), "--sara_max_length", "4") == 1
    err = capsys.readouterr().err
    assert "routing_priors were extracted with max_length=None, but sara_max_length = 4" in err


def test_yaml_and_json_config_files(model_dir, data, tmp_path, capsys):
    config = {"model": model_dir, "data": data, "output_dir": str(tmp_path / "from_yaml"), "max_steps": 2,
              "per_device_train_batch_size": 4, "learning_rate": 0.01, "sara_weight": 0.5, "sara_layers": "middle",
              "report_to": "none", "disable_tqdm": True, "save_strategy": "no", "dataloader_pin_memory": False}
    yaml_path = tmp_path / "train.yaml"
    yaml_path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in config.items()))
    assert main(["train", str(yaml_path)]) == 0
    assert json.loads((tmp_path / "from_yaml" / "trainer_state.json").read_text())["global_step"] == 2
    json_path = tmp_path / "train.json"
    json_path.write_text(json.dumps({**config, "output_dir": str(tmp_path / "from_json"), "max_steps": 1}))
    assert main(["train", str(json_path)]) == 0
    assert json.loads((tmp_path / "from_json" / "trainer_state.json").read_text())["global_step"] == 1
    capsys.readouterr()
    json_path.write_text(json.dumps({**config, "sara_wieght": 1.0}))
    assert main(["train", str(json_path)]) == 1
    assert "sara_wieght" in capsys.readouterr().err


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    folder = tmp_path_factory.mktemp("dense")
    Qwen3ForCausalLM(Qwen3Config(vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=16)).save_pretrained(folder)
    TOKENIZER.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("command", ["train", "priors", "analyze", "demo"])
def test_user_mistakes_are_one_line_without_traceback(command, model_dir, dense_dir, data, tmp_path, capsys):
    out = ["--output_dir", str(tmp_path / "o"), *QUIET] if command == "train" else ["--out", str(tmp_path / "o")]
    opus = tmp_path / "opus.jsonl"
    opus.write_text("".join(json.dumps({"translation": {"en": p["anchor"], "sw": p["target"]}}) + "\n" for p in pairs(4)))
    cases = [
        (["--model", model_dir, "--data", str(tmp_path / "missing.jsonl")], 1, "data: no such file or folder: .*missing.jsonl"),
        (["--model", model_dir, "--data", data, "--anchor_column", "english"], 1,
         r"anchor_column: no column 'english' in .*pairs.jsonl; available columns: \['anchor', 'target', 'lang'\]"),
        (["--model", dense_dir, "--data", data], 1, "Qwen3ForCausalLM without MoE routers that record router_logits"),
        (["--model", model_dir, "--data", str(opus)], 1,
         r"anchor_column: no column 'anchor' in .*opus.jsonl; available columns: \['translation.en', 'translation.sw'\] "
         r"\(the translation layout, with language codes \['en', 'sw'\]: give anchor_lang and target_lang\)"),
        (["--model", str(tmp_path / "nope"), "--data", data], 1, "nope is not a directory with a saved model"),
        (["--model", model_dir, "--data", data, "--bogus", "3"], 2, r"unrecognized arguments: --bogus 3"),
        (["--model", model_dir, "--data", data, "--dtype", "float8"], 2, r"argument --dtype: invalid choice: 'float8'"),
        ([str(tmp_path / "missing.yaml")], 1, r"config file not found"),
    ]
    if command != "demo":  # the demo has a model of its own
        cases.append((["--data", data], 1, r"model: give the checkpoint folder"))
    if command != "train":  # train's is --sara_max_length
        cases.append((["--model", model_dir, "--data", data, "--max_length", "0"], 1,
                      "max_length must be a positive integer, got 0"))
    import re

    for argv, status, match in cases:
        extra = out if len(argv) > 1 else []
        assert main([command, *argv, *extra]) == status, argv
        captured = capsys.readouterr()
        lines = [line for line in captured.err.splitlines() if line.strip()]
        assert len(lines) == 1, captured.err
        assert lines[0].startswith(f"python -m sara_kernels {command}: error: ") and re.search(match, lines[0]), lines[0]
        assert "Traceback" not in captured.err and captured.out == ""
        assert "routers=" not in lines[0]  # the Python API's argument: the command line has no such option
    assert not (tmp_path / "o").exists()  # nothing was written, not even an empty output folder


def test_yaml_float_without_a_dot_is_one_line(model_dir, data, tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(f"model: {model_dir}\ndata: {data}\noutput_dir: {tmp_path / 'o'}\nlearning_rate: 1e-5\n")
    assert main(["train", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "learning_rate: YAML reads 1e-5 as a string, not a number" in err and "'learning_rate: 1.0e-05'" in err


def test_a_failed_train_leaves_no_empty_output_folder(model_dir, data, tmp_path, monkeypatch):
    from sara_kernels.hf import SARATrainer

    def broken(self, *args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(SARATrainer, "train", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        _train(model_dir, data, tmp_path / "runs" / "sara")
    assert not (tmp_path / "runs").exists()  # both folders were created by the run, and both were empty
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(RuntimeError, match="interrupted"):
        _train(model_dir, data, kept)
    assert kept.is_dir()  # the user's own folder stays


def test_priors_refuses_a_distributed_launch(model_dir, data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["priors", "--model", model_dir, "--data", data, "--out", str(tmp_path / "p.safetensors")]) == 1
    assert "priors runs as one process (WORLD_SIZE=2)" in capsys.readouterr().err
    assert not (tmp_path / "p.safetensors").exists()


def test_a_bug_while_running_keeps_its_traceback(model_dir, data, tmp_path, monkeypatch):
    from sara_kernels.hf import SARATrainer

    def broken(self, *args, **kwargs):
        raise ValueError("a bug inside training")

    monkeypatch.setattr(SARATrainer, "train", broken)
    with pytest.raises(ValueError, match="a bug inside training"):
        _train(model_dir, data, tmp_path / "run")


def test_model_options_reach_from_pretrained(model_dir, data, tmp_path, monkeypatch, capsys):
    model, _ = ModelArguments(model=model_dir, dtype="bfloat16", device_map="cpu").load()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}

    from transformers import AutoModelForCausalLM

    seen = {}
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    argv = ["analyze", "--model", model_dir, "--data", data, "--out", str(tmp_path / "a"), "--no-progress",
            "--dtype", "float32", "--device-map", '{"": "cpu"}', "--trust-remote-code"]
    assert main(argv) == 0
    assert seen["dtype"] == "float32" and seen["device_map"] == {"": "cpu"} and seen["trust_remote_code"] is True
    assert "JS/ln2" in capsys.readouterr().out
    assert (tmp_path / "a" / "routing_analysis.json").exists()


# Runs ``python -m sara_kernels CMD -h`` for each command in turn in one fresh interpreter (one start-up
# for all three: the modules imported only grow, so a clean set at the end of each holds for each alone),
# and prints, after each, which of the heavy modules are loaded.
_HELP_IMPORTS = """
import runpy, sys
for command in sys.argv[1:]:
    sys.argv = ["sara_kernels", command, "-h"]
    try:
        runpy.run_module("sara_kernels", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        assert e.code in (0, None), (command, e.code)
    print("HEAVY", command, sorted(m for m in ("torch", "transformers.trainer") if m in sys.modules))
"""


def test_help_of_priors_analyze_demo_imports_neither_torch_nor_the_trainer(tmp_path):
    """-h of these commands answers without importing torch or transformers' Trainer (seconds of start-up
    each); train's -h needs SARATrainingArguments, a TrainingArguments subclass, so it is not checked."""
    commands = ["priors", "analyze", "demo"]
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", _HELP_IMPORTS, *commands], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("usage: python -m sara_kernels") == len(commands), proc.stdout[-3000:]  # help was printed
    heavy = [line.split(" ", 2)[1:] for line in proc.stdout.splitlines() if line.startswith("HEAVY ")]
    assert heavy == [[command, "[]"] for command in commands], heavy
