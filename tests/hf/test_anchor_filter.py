"""``sara_anchor_filter``: SARA keeps a pair only where the model reproduces its anchor's answer
(greedy, teacher-forced, from the anchor forward), and with ``"correct_anchor_wrong_target"`` only
where it does not reproduce the target's. The data is built from the tiny model's own greedy
continuations, so which answers it reproduces is known: a kept pair's answer is the model's
continuation, a dropped one's has its last word replaced by another word."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from hf_train_helpers import TOKENIZER, answered_pairs, filtered_sara, one_thread, sft_sgd_config, sgd_args  # noqa: E402
from hf_train_helpers import chat_pairs, chat_tokenizer, step_logs, tiny_moe, trl_encode  # noqa: E402

from sara_kernels.hf.collate import SARACollator  # noqa: E402
from sara_kernels.hf.trainer import SARATrainer, _PairBatch  # noqa: E402
from sara_kernels.testing.tolerances import LOSS_TOL  # noqa: E402

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

ANSWER_WORDS = 2
# Which pairs' anchors (and, for RA-MoE, targets) carry the model's own continuation.
ANCHOR_RIGHT = (True, False, True, True, False, False)
TARGET_RIGHT = (False, False, True, False, True, False)


@pytest.fixture(scope="module")
def model():
    return tiny_moe(seed=0).eval()


@pytest.fixture(scope="module")
def data(model):
    return answered_pairs(model, ANCHOR_RIGHT, TARGET_RIGHT, ANSWER_WORDS)


def _trainer(model, tmp_path, data, **overrides):
    args = sgd_args(tmp_path, sara_anchor_filter="correct", sara_layers="all", **overrides)
    return SARATrainer(model=model, args=args, train_dataset=data, processing_class=TOKENIZER)


def _step(trainer, model, data):
    """(π, SARA term) of one micro-batch of ``data`` through the trainer's own forward."""
    batch = _PairBatch.from_inputs(trainer.data_collator([dict(e, index=i) for i, e in enumerate(data)]))
    with torch.no_grad():
        _, _, routing = trainer._forward(model, batch, use_sara=True)
        term = trainer._sara_from(routing, batch.index, training=False)
    return routing.pair_weights, term


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_anchor_filter_keeps_the_pairs_whose_anchor_answer_the_model_reproduces(model, data, tmp_path, packing):
    trainer = _trainer(model, tmp_path, data, sara_packing=packing)
    head_positions = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: head_positions.append(args[0].shape[-2]))
    try:
        weights, term = _step(trainer, model, data)
    finally:
        hook.remove()
    assert weights.tolist() == [float(r) for r in ANCHOR_RIGHT]
    # The anchor forward (the first) projects only the positions predicting an answer token: every
    # anchor has a 3-word prompt, so padded rows share their answer columns.
    assert head_positions[0] == ANSWER_WORDS * (len(data) if packing else 1) < head_positions[1]
    expected = filtered_sara(model, data, ANCHOR_RIGHT)
    torch.testing.assert_close(term.loss.double(), expected, **LOSS_TOL)
    # Not the unfiltered loss: a filter that kept every pair would fail above.
    assert not torch.isclose(expected, filtered_sara(model, data, [1.0] * len(data)), **LOSS_TOL)
    assert float(term.metrics()["sara_anchor_kept"]) == pytest.approx(sum(ANCHOR_RIGHT) / len(data))


def test_anchor_filter_correct_anchor_wrong_target_also_drops_reproduced_targets(model, data, tmp_path):
    trainer = SARATrainer(model=model, train_dataset=data, processing_class=TOKENIZER,
                          args=sgd_args(tmp_path, sara_anchor_filter="correct_anchor_wrong_target", sara_layers="all"))
    weights, term = _step(trainer, model, data)
    expected = [float(a and not t) for a, t in zip(ANCHOR_RIGHT, TARGET_RIGHT)]
    assert weights.tolist() == expected
    torch.testing.assert_close(term.loss.double(), filtered_sara(model, data, expected), **LOSS_TOL)


def test_anchor_filter_one_forward_path_agrees(model, data, tmp_path):
    """With the anchor in the graph (sara_detach_anchor=False) both sides run in one forward, whose logits decide."""
    trainer = _trainer(model, tmp_path, data, sara_detach_anchor=False)
    weights, _ = _step(trainer, model, data)
    assert weights.tolist() == [float(r) for r in ANCHOR_RIGHT]


def test_anchor_filter_logs_the_kept_fraction(model, data, tmp_path):
    trainer = _trainer(copy.deepcopy(model), tmp_path, data, per_device_train_batch_size=len(data))
    trainer.train()
    logged = [e for e in trainer.state.log_history if "sara_anchor_kept" in e]
    assert logged and logged[0]["sara_anchor_kept"] == pytest.approx(sum(ANCHOR_RIGHT) / len(data))
    assert step_logs(trainer.state.log_history)  # the step ran and logged


def test_anchor_filter_without_answers_is_one_line_naming_the_option(model, data, tmp_path):
    unanswered = [{"anchor": e["anchor"], "target": e["target"]} for e in data]
    trainer = _trainer(copy.deepcopy(model), tmp_path, unanswered)
    with pytest.raises(ValueError, match=r"^sara_anchor_filter='correct': example \d+ has no anchor answer[^\n]*$"):
        trainer.train()


def test_anchor_filter_finds_a_chat_anchors_reply_and_rejects_a_wrong_answer_field():
    collator = SARACollator(TOKENIZER, anchor_filter="correct")
    chat = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "the dog"}]
    batch = collator([{"anchor": chat, "target": "the"}])
    ids, mask = batch["input_ids"][0], batch["sara_answer_mask"][0]
    assert TOKENIZER.convert_ids_to_tokens(ids[mask.bool()].tolist()) == ["the", "dog"]
    assert mask[-3:].tolist() == [1, 1, 0]  # the reply, not the end of turn after it
    with pytest.raises(ValueError, match="'answer' must be the ending of the anchor's last text"):
        collator([{"anchor": "the cat", "target": "the", "answer": "dog"}])


def test_anchor_filter_with_priors_reads_the_correctness_recorded_at_extraction(model, data, tmp_path):
    from sara_kernels.hf import extract_routing_priors

    path = tmp_path / "priors.safetensors"
    priors = extract_routing_priors(model, data, TOKENIZER, str(path), layers="all", progress=False,
                                    anchor_answers=True)
    assert priors.anchor_correct.tolist() == list(ANCHOR_RIGHT)
    trainer = SARATrainer(model=model, args=sgd_args(tmp_path, sara_anchor_filter="correct", sara_layers="all"),
                          train_dataset=data, processing_class=TOKENIZER, routing_priors=str(path))
    assert trainer.routing_priors.anchor_correct.tolist() == list(ANCHOR_RIGHT)  # through the file
    batch = _PairBatch.from_inputs(trainer.data_collator([dict(e, index=i) for i, e in enumerate(data)]))
    assert not batch.has_anchor  # priors replace the anchor forward
    with torch.no_grad():
        _, _, routing = trainer._forward(model, batch, use_sara=True)
        term = trainer._sara_from(routing, batch.index, training=True)
    torch.testing.assert_close(term.loss.double(), filtered_sara(model, data, ANCHOR_RIGHT), **LOSS_TOL)
    assert float(term.metrics()["sara_anchor_kept"]) == pytest.approx(sum(ANCHOR_RIGHT) / len(data))


def test_anchor_filter_refuses_what_it_cannot_do(model, data, tmp_path):
    from sara_kernels.hf import extract_routing_priors

    path = tmp_path / "priors.safetensors"
    extract_routing_priors(model, data, TOKENIZER, str(path), layers="all", progress=False)
    with pytest.raises(ValueError, match=r"^sara_anchor_filter='correct' with routing_priors: .*anchor_answers=True"):
        SARATrainer(model=model, args=sgd_args(tmp_path, sara_anchor_filter="correct"), train_dataset=data,
                    processing_class=TOKENIZER, routing_priors=str(path))
    with pytest.raises(ValueError, match="sara_anchor_filter must be one of"):
        sgd_args(tmp_path, sara_anchor_filter="right")
    with pytest.raises(ValueError, match=r"^anchor_answers: pairs\[0\] have no anchor answer"):
        extract_routing_priors(model, [{"anchor": "the cat", "target": "the"}], TOKENIZER, str(path),
                               progress=False, anchor_answers=True)


def test_anchor_filter_kept_fraction_per_language_in_analyze(model, data):
    from sara_kernels.programs.analyze import routing_report

    tagged = [dict(e, lang="xx" if i < 3 else "yy") for i, e in enumerate(data)]
    report = routing_report(model, TOKENIZER, tagged, progress=False, anchor_answers=True)
    assert report.anchor_kept_by_lang == pytest.approx({"xx": sum(ANCHOR_RIGHT[:3]) / 3, "yy": sum(ANCHOR_RIGHT[3:]) / 3})
    assert report.to_dict()["anchor_kept_by_lang"] == report.anchor_kept_by_lang
    assert "anchors answered correctly" in report.table()
    assert "anchor_kept_by_lang" not in routing_report(model, TOKENIZER, tagged, progress=False).to_dict()


# ---- SARASFTTrainer: the anchors' correctness from the anchor forward, the targets' from TRL's --------------


def _sft(model, tmp_path, data, **overrides):
    """A SARASFTTrainer taking one SGD step on ``data`` in its order."""
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("trl")
    from sara_kernels.hf import SARASFTTrainer

    options = dict(sara_anchor_filter="correct", sara_layers="all", per_device_train_batch_size=len(data),
                   train_sampling_strategy="sequential")
    tokenizer = overrides.pop("processing_class", TOKENIZER)
    peft_config = overrides.pop("peft_config", None)
    args = sft_sgd_config(tmp_path, **dict(options, **overrides))
    return SARASFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(data),
                          processing_class=tokenizer, peft_config=peft_config)


def _sft_logged(model, tmp_path, data, **overrides) -> dict:
    """The SARA metrics TRL's training step logged (the micro-batch before the update)."""
    trainer = _sft(copy.deepcopy(model), tmp_path, data, **overrides)
    trainer.train()
    return next(e for e in trainer.state.log_history if "sara_loss" in e)


@pytest.mark.parametrize("layout", ["padded", "padding_free", "packed"])
def test_anchor_filter_sft_keeps_the_pairs_whose_anchor_answer_the_model_reproduces(model, data, tmp_path, layout):
    options = {"padded": {}, "padding_free": dict(padding_free=True, max_length=None),
               "packed": dict(packing=True, max_length=128, per_device_train_batch_size=1)}[layout]
    logged = _sft_logged(model, tmp_path, data, **options)
    expected = filtered_sara(model, data, ANCHOR_RIGHT, trl_encode)
    torch.testing.assert_close(torch.tensor(logged["sara_loss"], dtype=torch.float64), expected, **LOSS_TOL)
    # Not the unfiltered loss: a filter that kept every pair would fail above.
    assert not torch.isclose(expected, filtered_sara(model, data, [1.0] * len(data), trl_encode), **LOSS_TOL)
    assert logged["sara_anchor_kept"] == pytest.approx(sum(ANCHOR_RIGHT) / len(data))


def _target_sequences(batch):
    """(example index, token ids, answer marks) of each target sequence of an SFT batch."""
    ids, marks = batch["input_ids"], batch["sara_target_answer_mask"]
    if "sara_target_cu_seqlens" in batch:  # one flattened row
        cu = batch["sara_target_cu_seqlens"].tolist()
        ids, marks = ([t[0, a:b] for a, b in zip(cu, cu[1:])] for t in (ids, marks))
    return zip(batch["sara_example_index"].tolist(), ids, marks)


@pytest.mark.parametrize("layout", ["padded", "padding_free", "packed"])
def test_anchor_filter_sft_correct_anchor_wrong_target_reads_trls_training_forward(model, data, tmp_path, layout):
    """The targets' answers are checked on TRL's tokens, from the is_top1 of its fused LM head: no other forward."""
    options = {"padded": {}, "padding_free": dict(padding_free=True, max_length=None),
               "packed": dict(packing=True, max_length=128, per_device_train_batch_size=1)}[layout]
    trainer = _sft(copy.deepcopy(model), tmp_path, data, sara_anchor_filter="correct_anchor_wrong_target", **options)
    batch = next(iter(trainer.get_train_dataloader()))
    found = {i: TOKENIZER.convert_ids_to_tokens(ids[marks.bool()].tolist()) for i, ids, marks in _target_sequences(batch)}
    assert found == {i: e["target_answer"].split() for i, e in enumerate(data)}  # each target's answer, in TRL's tokens
    calls = []
    handle = trainer.model.register_forward_pre_hook(lambda m, a: calls.append(1))
    trainer.train()
    handle.remove()
    assert len(calls) == 2  # the anchors' forward and TRL's
    logged = next(e for e in trainer.state.log_history if "sara_loss" in e)
    kept = [float(a and not t) for a, t in zip(ANCHOR_RIGHT, TARGET_RIGHT)]
    torch.testing.assert_close(torch.tensor(logged["sara_loss"], dtype=torch.float64),
                               filtered_sara(model, data, kept, trl_encode), **LOSS_TOL)
    assert logged["sara_anchor_kept"] == pytest.approx(sum(kept) / len(data))


def test_anchor_filter_sft_evaluate_filters_the_pairs_given_to_it(model, data, tmp_path):
    trainer = _sft(copy.deepcopy(model), tmp_path, data[:2], sara_anchor_filter="correct_anchor_wrong_target",
                   per_device_eval_batch_size=len(data))
    metrics = trainer.evaluate(data)  # converted like the training pairs, answers included
    kept = [float(a and not t) for a, t in zip(ANCHOR_RIGHT, TARGET_RIGHT)]
    assert metrics["eval_sara_anchor_kept"] == pytest.approx(sum(kept) / len(data))
    torch.testing.assert_close(torch.tensor(metrics["eval_sara_loss"], dtype=torch.float64),
                               filtered_sara(model, data, kept, trl_encode), **LOSS_TOL)


def test_anchor_filter_sft_with_lora_reads_trls_forward_through_the_peft_wrapper(model, data, tmp_path):
    peft = pytest.importorskip("peft")
    trainer = _sft(copy.deepcopy(model), tmp_path, data, sara_anchor_filter="correct_anchor_wrong_target",
                   peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    kept = [float(a and not t) for a, t in zip(ANCHOR_RIGHT, TARGET_RIGHT)]  # LoRA starts as the identity
    assert trainer.evaluate(data)["eval_sara_anchor_kept"] == pytest.approx(sum(kept) / len(data))


def test_anchor_filter_sft_finds_chat_replies_in_trls_tokens(tmp_path):
    """Chat pairs: each side's answer is its assistant reply; the target's is found in TRL's
    prompt + completion tokens, where it carries LM labels."""
    tokenizer, data = chat_tokenizer(), chat_pairs(4)
    trainer = _sft(tiny_moe(), tmp_path, data, sara_anchor_filter="correct_anchor_wrong_target",
                   processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    for row, i in enumerate(batch["sara_example_index"].tolist()):
        for side, ids, marks in (("target", batch["input_ids"], batch["sara_target_answer_mask"]),
                                 ("anchor", batch["sara_anchor_input_ids"], batch["sara_anchor_answer_mask"])):
            assert tokenizer.decode(ids[row][marks[row].bool()]) == data[i][side][-1]["content"], side
        assert (batch["labels"][row][batch["sara_target_answer_mask"][row].bool()] != -100).all()


def test_anchor_filter_sft_refuses_what_it_cannot_do(model, data, tmp_path, monkeypatch):
    unanswered = [{"anchor": e["anchor"], "target": e["target"]} for e in data]
    with pytest.raises(ValueError, match=r"^sara_anchor_filter='correct': train_dataset\[0\] has no anchor answer[^\n]*$"):
        _sft(model, tmp_path, unanswered)
    no_target_answer = [{k: v for k, v in e.items() if k != "target_answer"} for e in data]
    with pytest.raises(ValueError, match=r"^sara_anchor_filter='correct_anchor_wrong_target': train_dataset\[0\] has "
                                         r"no target answer[^\n]*$"):
        _sft(model, tmp_path, no_target_answer, sara_anchor_filter="correct_anchor_wrong_target")
    _sft(model, tmp_path, no_target_answer)  # "correct" reads the anchors' answers only
    collator = _sft(model, tmp_path, data, sara_anchor_filter="correct_anchor_wrong_target").data_collator
    pair = {"sara_example_index": 0, "sara_target": data[0]["target"], "sara_target_answer": data[0]["target_answer"]}
    ids = trl_encode(data[0]["target"])
    with pytest.raises(ValueError, match=r"^sara_anchor_filter='correct_anchor_wrong_target': example 0: target: its "
                                         r"answer has tokens without an LM label[^\n]*$"):
        collator.target_answer_mask(pair, ids, [-100] * len(ids))
    with pytest.raises(ValueError, match=r"^sara_anchor_filter='correct_anchor_wrong_target': example 0: target: TRL's "
                                         r"tokens differ[^\n]*keep_end[^\n]*$"):
        collator.target_answer_mask(pair, ids[1:], ids[1:])  # what truncation_mode="keep_end" does
    assert collator.target_answer_mask(pair, ids[:-3], ids[:-3]) == [0] * (len(ids) - 3)  # the answer cut: not reproduced
    trainer = _sft(model, tmp_path, data, sara_anchor_filter="correct_anchor_wrong_target")
    trainer.data_collator.anchor_filter = "correct"  # a collator built for the other filter
    with pytest.raises(ValueError, match=r"^sara_anchor_filter='correct_anchor_wrong_target': the batch has no "
                                         r"\['sara_target_answer_mask'\][^\n]*$"):
        trainer.train()
    monkeypatch.setattr("sara_kernels.hf.trl.is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(ValueError, match=r"^sara_anchor_filter='correct' is not supported by SARASFTTrainer under "
                                         r"DeepSpeed ZeRO-3[^\n]*$"):
        _sft(model, tmp_path, data)
