"""``sara_anchor_filter``: SARA keeps a pair only where the model reproduces its anchor's answer
(greedy, teacher-forced, from the anchor forward), and with ``"correct_anchor_wrong_target"`` only
where it does not reproduce the target's. The data is built from the tiny model's own greedy
continuations, so which answers it reproduces is known: a kept pair's answer is the model's
continuation, a dropped one's has its last word replaced by another word."""

from __future__ import annotations

import copy
import random

import pytest
import torch

pytest.importorskip("transformers")

from hf_train_helpers import TOKENIZER, one_thread, sgd_args, step_logs, tiny_moe  # noqa: E402

from sara_kernels import reference  # noqa: E402
from sara_kernels.hf.collate import SARACollator  # noqa: E402
from sara_kernels.hf.trainer import SARATrainer, _PairBatch  # noqa: E402
from sara_kernels.programs.corpus import ENGLISH_WORDS  # noqa: E402
from sara_kernels.testing.tolerances import LOSS_TOL  # noqa: E402

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

ANSWER_WORDS = 2
# Which pairs' anchors (and, for RA-MoE, targets) carry the model's own continuation.
ANCHOR_RIGHT = (True, False, True, True, False, False)
TARGET_RIGHT = (False, False, True, False, True, False)


@pytest.fixture(scope="module")
def model():
    return tiny_moe(seed=0).eval()


def _greedy_words(model, words: list, count: int):
    """The model's greedy continuation of ``words`` (after BOS), or None if it is not all plain words."""
    ids = [TOKENIZER.bos_token_id] + TOKENIZER.convert_tokens_to_ids(words)
    out = []
    with torch.no_grad():
        for _ in range(count):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            token = TOKENIZER.convert_ids_to_tokens(nxt)
            if token not in ENGLISH_WORDS:
                return None
            ids.append(nxt)
            out.append(token)
    return out


def _side(model, rng, right: bool) -> tuple:
    """(text, answer): a prompt of plain words and an answer the model reproduces when ``right``;
    otherwise the same continuation with its last word changed."""
    while True:
        prompt = rng.sample(ENGLISH_WORDS, 3)
        answer = _greedy_words(model, prompt, ANSWER_WORDS)
        if answer is not None:
            break
    if not right:
        answer[-1] = next(w for w in rng.sample(ENGLISH_WORDS, 5) if w != answer[-1])
    answer = " ".join(answer)
    return " ".join(prompt) + " " + answer, answer


@pytest.fixture(scope="module")
def data(model):
    rng = random.Random(7)
    pairs = []
    for anchor_right, target_right in zip(ANCHOR_RIGHT, TARGET_RIGHT):
        anchor, answer = _side(model, rng, anchor_right)
        target, target_answer = _side(model, rng, target_right)
        pairs.append({"anchor": anchor, "answer": answer, "target": target, "target_answer": target_answer})
    return pairs


def _encode(text):
    return TOKENIZER(text)["input_ids"]


def oracle_sara(model, data, weights) -> torch.Tensor:
    """SARA from transformers' own router logits, one example at a time, in float64: per MoE layer the
    π-weighted mean over pairs of JS(pooled anchor, pooled target), then the mean over layers."""
    pooled = {"anchor": [], "target": []}
    with torch.no_grad():
        for example in data:
            for side in pooled:
                out = model(input_ids=torch.tensor([_encode(example[side])]), output_router_logits=True)
                pooled[side].append(torch.stack([torch.softmax(z.double(), -1).mean(0) for z in out.router_logits]))
    js = reference.js_divergence(torch.stack(pooled["anchor"], 1), torch.stack(pooled["target"], 1))  # [L, B]
    w = torch.tensor(weights, dtype=torch.float64)
    return ((js * w).sum(1) / w.sum()).mean()


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
    expected = oracle_sara(model, data, ANCHOR_RIGHT)
    torch.testing.assert_close(term.loss.double(), expected, **LOSS_TOL)
    # Not the unfiltered loss: a filter that kept every pair would fail above.
    assert not torch.isclose(expected, oracle_sara(model, data, [1.0] * len(data)), **LOSS_TOL)
    assert float(term.metrics()["sara_anchor_kept"]) == pytest.approx(sum(ANCHOR_RIGHT) / len(data))


def test_anchor_filter_correct_anchor_wrong_target_also_drops_reproduced_targets(model, data, tmp_path):
    trainer = SARATrainer(model=model, train_dataset=data, processing_class=TOKENIZER,
                          args=sgd_args(tmp_path, sara_anchor_filter="correct_anchor_wrong_target", sara_layers="all"))
    weights, term = _step(trainer, model, data)
    expected = [float(a and not t) for a, t in zip(ANCHOR_RIGHT, TARGET_RIGHT)]
    assert weights.tolist() == expected
    torch.testing.assert_close(term.loss.double(), oracle_sara(model, data, expected), **LOSS_TOL)


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
    torch.testing.assert_close(term.loss.double(), oracle_sara(model, data, ANCHOR_RIGHT), **LOSS_TOL)
    assert float(term.metrics()["sara_anchor_kept"]) == pytest.approx(sum(ANCHOR_RIGHT) / len(data))


def test_anchor_filter_refuses_what_it_cannot_do(model, data, tmp_path):
    from sara_kernels.hf import SARASFTConfig, extract_routing_priors

    path = tmp_path / "priors.safetensors"
    extract_routing_priors(model, data, TOKENIZER, str(path), layers="all", progress=False)
    with pytest.raises(ValueError, match=r"^sara_anchor_filter='correct' with routing_priors: .*anchor_answers=True"):
        SARATrainer(model=model, args=sgd_args(tmp_path, sara_anchor_filter="correct"), train_dataset=data,
                    processing_class=TOKENIZER, routing_priors=str(path))
    with pytest.raises(ValueError, match="sara_anchor_filter='correct' is not supported by SARASFTTrainer"):
        SARASFTConfig(output_dir=str(tmp_path / "sft"), sara_anchor_filter="correct", use_cpu=True, bf16=False)
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
