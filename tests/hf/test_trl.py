"""SARASFTTrainer (TRL's SFTTrainer + SARA) on CPU with a tiny random Qwen3-MoE: the step is TRL's
own step plus λ·SARA (checked against a plain SFTTrainer step and a hand-computed SARA gradient),
TRL's metrics survive, chat targets get TRL's completion-only labels, LoRA works, and what SARA
cannot do is refused (packed batches: tests/hf/test_packing.py)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from hf_train_helpers import LAMBDA, TOKENIZER, assert_updates_close, chat_pairs, chat_tokenizer, one_thread, pairs  # noqa: E402
from hf_train_helpers import tiny_moe  # noqa: E402
from hf_train_helpers import sft_sgd_config as sgd_config, updates  # noqa: E402
from helpers import REPO  # noqa: E402

from sara_kernels import reference  # noqa: E402
from sara_kernels.hf import SARACollator, SARASFTConfig, SARASFTTrainer  # noqa: E402

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

def pooled_routing(model, ids):
    out = model(input_ids=torch.tensor([ids]), output_router_logits=True, use_cache=False)
    return torch.stack([torch.softmax(z.double(), dim=-1).mean(0) for z in out.router_logits])  # [L, E]


def test_step_is_trls_step_plus_sara_and_keeps_trls_metrics(tmp_path):
    """k = 2 micro-batches of 4: Δθ = (plain SFTTrainer's Δθ) - λ · ∇ mean(SARA(mb1), SARA(mb2)),
    the SARA gradient computed by hand from transformers' own router logits and the float64
    reference JS, on the anchors tokenised as SARACollator does and the targets as TRL did."""
    from trl import SFTConfig, SFTTrainer

    base, data = tiny_moe(), pairs(8)
    common = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, train_sampling_strategy="sequential")

    model = copy.deepcopy(base)
    trainer = SARASFTTrainer(model=model, args=sgd_config(tmp_path, **common),
                             train_dataset=datasets.Dataset.from_list(data), processing_class=TOKENIZER)
    trainer.train()
    sara_delta = updates(base, model)

    plain_model = copy.deepcopy(base)
    plain = SFTTrainer(model=plain_model, args=sgd_config(tmp_path, SFTConfig, **common),
                       train_dataset=datasets.Dataset.from_list([{"text": p["target"]} for p in data]),
                       processing_class=TOKENIZER)
    plain.train()
    lm_delta = updates(base, plain_model)

    oracle = copy.deepcopy(base)
    encoder = SARACollator(TOKENIZER, max_length=64)
    rows = {row["sara_example_index"]: row["input_ids"] for row in trainer.train_dataset}
    assert rows[0] == plain.train_dataset[0]["input_ids"]  # the targets are tokenised as TRL does
    per_batch = []
    for micro_batch in (range(0, 4), range(4, 8)):
        anchors = torch.stack([pooled_routing(oracle, encoder.encode(data[i]["anchor"])) for i in micro_batch], 1)
        targets = torch.stack([pooled_routing(oracle, rows[i]) for i in micro_batch], 1)
        per_batch.append(reference.js_divergence(anchors.detach(), targets).mean())
    (LAMBDA * (per_batch[0] + per_batch[1]) / 2).backward()
    expected = {n: lm_delta[n] - (p.grad if p.grad is not None else torch.zeros_like(p))
                for n, p in oracle.named_parameters()}
    assert_updates_close(sara_delta, expected)
    gate = "model.layers.1.mlp.gate.weight"  # SARA moves the router far beyond the tolerance
    assert (expected[gate] - lm_delta[gate]).abs().max() > 100 * 2e-4 * expected[gate].abs().max()

    entry = trainer.state.log_history[0]
    assert {"entropy", "mean_token_accuracy", "num_tokens", "sara_js/layer_1", "sara_js/layer_2"} <= entry.keys()
    assert entry["sara_loss"] == pytest.approx(float(sum(per_batch).detach()) / 2, rel=1e-4)
    assert entry["num_tokens"] == plain.state.log_history[0]["num_tokens"]


def test_evaluate_reports_trl_and_sara_metrics(tmp_path):
    data = datasets.Dataset.from_list(pairs(8))
    # compute_metrics makes the Trainer ask compute_loss for the outputs (the logits) too.
    trainer = SARASFTTrainer(model=tiny_moe(), args=sgd_config(tmp_path, per_device_eval_batch_size=8),
                             train_dataset=data, eval_dataset=data, processing_class=TOKENIZER,
                             compute_metrics=lambda p: {"logits_rows": float(p.predictions.shape[0])})
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_entropy", "eval_mean_token_accuracy", "eval_sara_loss", "eval_sara_js/layer_2"} <= (
        metrics.keys()
    )
    assert metrics["eval_logits_rows"] == 8
    assert metrics["eval_sara_loss"] > 0
    # A pairs dataset given to evaluate() is converted like the one given to the trainer.
    assert trainer.evaluate(pairs(4, seed=5))["eval_sara_loss"] > 0


def test_chat_targets_get_trls_completion_only_labels(tmp_path):
    tokenizer, data = chat_tokenizer(), chat_pairs(4)
    trainer = SARASFTTrainer(model=tiny_moe(), args=sgd_config(tmp_path, per_device_train_batch_size=4),
                             train_dataset=datasets.Dataset.from_list(data), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    encoder = SARACollator(tokenizer)
    for row, i in enumerate(batch["sara_example_index"].tolist()):
        target = data[i]["target"]
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        assert ids == encoder.encode(target)  # the whole chat is the input
        trained = [t for t in batch["labels"][row].tolist() if t != -100]
        # Only the assistant's reply (and the end of the turn) carries LM loss, not the user's prompt.
        assert tokenizer.decode(trained) == target[1]["content"] + " </s>"
        anchor = batch["sara_anchor_input_ids"][row][batch["sara_anchor_attention_mask"][row].bool()].tolist()
        assert anchor == encoder.encode(data[i]["anchor"])
    trainer.train()
    entry = trainer.state.log_history[0]
    assert entry["sara_loss"] > 0 and torch.isfinite(torch.tensor(entry["loss"]))


def test_lora_trains_adapters_with_sara(tmp_path):
    from peft import LoraConfig

    base, data = tiny_moe(), datasets.Dataset.from_list(pairs(8))
    deltas = {}
    for weight in (0.0, LAMBDA):
        model = copy.deepcopy(base)
        trainer = SARASFTTrainer(model=model, args=sgd_config(tmp_path, sara_weight=weight, learning_rate=0.1),
                                 train_dataset=data, processing_class=TOKENIZER,
                                 peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                        init_lora_weights="gaussian"))
        lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
        params = dict(trainer.model.named_parameters())
        deltas[weight] = {n: params[n].detach() - before for n, before in lora.items()}
        assert all(n.count("lora_") for n in lora)  # only the adapters train
        if weight:
            entry = trainer.state.log_history[0]
            assert entry["sara_loss"] > 0 and "mean_token_accuracy" in entry
    # SARA's gradient reaches the adapters: the updates differ from LM-only training.
    assert any((deltas[LAMBDA][n] - deltas[0.0][n]).abs().max() > 1e-6 for n in deltas[0.0])


def test_refused_configurations_and_bad_datasets(tmp_path):
    from trl import SFTConfig

    # Packing and padding-free batches are supported (tests/hf/test_packing.py, also what stays refused).
    for bad in (dict(sara_lm_on_anchor=True), dict(sara_detach_anchor=False), dict(sara_weight=-1.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            sgd_config(tmp_path, **bad)
    model, data = tiny_moe(), pairs(4)
    with pytest.raises(TypeError, match="SARASFTConfig"):
        SARASFTTrainer(model=model, args=sgd_config(tmp_path, SFTConfig), train_dataset=data, processing_class=TOKENIZER)
    args = sgd_config(tmp_path)
    with pytest.raises(ValueError, match=r"train_dataset: missing column\(s\) \['target'\]"):
        SARASFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list([{"anchor": "the dog"}]),
                       processing_class=TOKENIZER)
    with pytest.raises(ValueError, match=r"column\(s\) \['text'\] would be overwritten"):
        SARASFTTrainer(model=model, args=args, train_dataset=[dict(p, text="x") for p in data],
                       processing_class=TOKENIZER)
    with pytest.raises(ValueError, match=r"train_dataset\[1\]: 'target' is an empty text"):
        SARASFTTrainer(model=model, args=args, train_dataset=[data[0], {"anchor": "the dog", "target": " "}],
                       processing_class=TOKENIZER)
    with pytest.raises(ValueError, match="sara_layer_weights has 3 weights"):
        SARASFTTrainer(model=model, args=sgd_config(tmp_path, sara_layer_weights="1,2,3"), train_dataset=data,
                       processing_class=TOKENIZER)


def test_readme_trl_snippet_runs(tmp_path, monkeypatch):
    """The README's TRL section, as printed, with and without LoRA."""
    readme = open(os.path.join(REPO, "README.md")).read()
    snippet = readme.split("### TRL: `SARASFTTrainer`")[1].split("```python\n")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)  # output_dir="out"
    namespace = {"model": tiny_moe(), "tokenizer": TOKENIZER, "pairs": pairs(8)}
    exec(compile(snippet, "README.md (TRL)", "exec"), namespace)
    assert namespace["train"].num_rows == 8 and (tmp_path / "out").is_dir()
