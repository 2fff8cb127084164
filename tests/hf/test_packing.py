"""Packed, padding-free batches: SARACollator(packing=True), SARATrainer(sara_packing=True) and
SARASFTTrainer with TRL's padding_free=True and packing=True. Each packed step must equal the
padded step on the same pairs (loss, SARA metrics and every parameter's update, fp32), with live
anchors (one and two forwards) and with cached priors."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from hf_train_helpers import TOKENIZER, assert_updates_close, one_thread, pairs, tiny_moe, train_delta  # noqa: E402

from sara_kernels.hf import SARACollator, extract_routing_priors  # noqa: E402
from sara_kernels.hf.collate import pack_sequences  # noqa: E402

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

LAMBDA = 5.0


def test_pack_sequences_restarts_positions():
    ids, positions, cu = pack_sequences([[5, 6, 7], [8], [9, 10]])
    assert ids.tolist() == [[5, 6, 7, 8, 9, 10]]
    assert positions.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert cu.tolist() == [0, 3, 4, 6] and cu.dtype == torch.int32
    with pytest.raises(ValueError, match="at least one token"):
        pack_sequences([[1], []])


@pytest.mark.parametrize("lm_on_anchor", [False, True])
def test_packed_batch_holds_the_padded_batchs_sequences(lm_on_anchor):
    data = pairs(3)
    padded = SARACollator(TOKENIZER, lm_on_anchor=lm_on_anchor)(data)
    packed = SARACollator(TOKENIZER, lm_on_anchor=lm_on_anchor, packing=True)(data)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    rows = [padded["input_ids"][r][padded["attention_mask"][r].bool()].tolist() for r in range(6)]
    cu = packed["sara_cu_seqlens"].tolist()
    assert len(cu) == 7
    for r, row in enumerate(rows):  # anchors then targets, in order
        assert packed["input_ids"][0, cu[r] : cu[r + 1]].tolist() == row
        assert packed["position_ids"][0, cu[r] : cu[r + 1]].tolist() == list(range(len(row)))
        labels = packed["labels"][0, cu[r] : cu[r + 1]].tolist()
        trained = r >= 3 or lm_on_anchor
        # The first token never has a label (no sequence predicts the next one's start).
        assert labels == [-100] + (row[1:] if trained else [-100] * (len(row) - 1))
    # The same tokens carry LM loss as in the padded batch (its labels[:, 1:]).
    assert int((packed["labels"] != -100).sum()) == int((padded["labels"][:, 1:] != -100).sum())
    assert packed["sara_example_index"].tolist() == padded["sara_example_index"].tolist()
    with pytest.raises(ValueError, match="pad_to_multiple_of: packed batches have no padding"):
        SARACollator(TOKENIZER, packing=True, pad_to_multiple_of=8)


def _assert_same_step(packed, padded):
    (packed_delta, packed_trainer), (padded_delta, padded_trainer) = packed, padded
    assert_updates_close(packed_delta, padded_delta)
    got, want = packed_trainer.state.log_history[0], padded_trainer.state.log_history[0]
    for key in ("loss", "lm_loss", "sara_loss", "sara_js/layer_1", "sara_js/layer_2"):
        assert key in want and key in got, (key, sorted(want), sorted(got))
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    assert want["sara_loss"] > 0


@pytest.mark.parametrize(
    "options",
    [dict(), dict(sara_lm_on_anchor=True), dict(sara_detach_anchor=False), dict(priors=True)],
    ids=["two-forwards", "lm-on-anchor", "anchor-gradient", "priors"],
)
def test_sara_trainer_packed_step_equals_padded_step(tmp_path, options):
    """k = 2 micro-batches of 4 pairs, sequential: the packed step is the padded step."""
    base, data = tiny_moe(), pairs(8)
    options = dict(options)
    if options.pop("priors", False):
        path = tmp_path / "priors.safetensors"
        extract_routing_priors(base, data, TOKENIZER, path, batch_size=3, progress=False)
        options["routing_priors"] = str(path)
    common = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, train_sampling_strategy="sequential",
                  **options)
    padded = train_delta(base, tmp_path, data, **common)
    packed = train_delta(base, tmp_path, data, sara_packing=True, **common)
    assert packed[1].data_collator.packing
    _assert_same_step(packed, padded)
    # Evaluation (live anchors, also with priors) packs as well and measures the same SARA.
    padded_eval = padded[1].evaluate(eval_dataset=data[:4])
    packed_eval = packed[1].evaluate(eval_dataset=data[:4])
    assert packed_eval["eval_sara_loss"] == pytest.approx(padded_eval["eval_sara_loss"], rel=1e-5)
    assert packed_eval["eval_lm_loss"] == pytest.approx(padded_eval["eval_lm_loss"], rel=1e-5)


def test_sara_trainer_rejects_malformed_packed_batches(tmp_path):
    from sara_kernels.hf import SARATrainer
    from hf_train_helpers import sgd_args

    trainer = SARATrainer(model=tiny_moe(), args=sgd_args(tmp_path, sara_packing=True), train_dataset=pairs(2),
                          processing_class=TOKENIZER)
    batch = trainer.data_collator(pairs(2))
    with pytest.raises(ValueError, match="packed batch .* no 'attention_mask'"):
        trainer.compute_loss(trainer.model, dict(batch, attention_mask=torch.ones_like(batch["input_ids"])))
    with pytest.raises(ValueError, match="batch has 3 packed sequences for 2 pairs"):
        trainer.compute_loss(trainer.model, dict(batch, sara_cu_seqlens=batch["sara_cu_seqlens"][:4]))


# ---- TRL ------------------------------------------------------------------------------------


def _sft_step(base, tmp_path, data, **overrides):
    from sara_kernels.hf import SARASFTConfig, SARASFTTrainer

    datasets = pytest.importorskip("datasets")
    kwargs = dict(
        output_dir=str(tmp_path / "sft"), max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant",
        max_grad_norm=0.0, weight_decay=0.0, warmup_steps=0, report_to="none", save_strategy="no", disable_tqdm=True,
        use_cpu=True, dataloader_pin_memory=False, seed=0, router_aux_loss_coef=0.0, bf16=False, logging_steps=1,
        sara_weight=LAMBDA, train_sampling_strategy="sequential",
    )
    kwargs.update(overrides)
    model = copy.deepcopy(base)
    trainer = SARASFTTrainer(model=model, args=SARASFTConfig(**kwargs), train_dataset=datasets.Dataset.from_list(data),
                             processing_class=TOKENIZER)
    trainer.train()
    before = dict(base.named_parameters())
    return {n: p.detach() - before[n].detach() for n, p in model.named_parameters()}, trainer


def _assert_same_sft_step(packed, padded):
    (packed_delta, packed_trainer), (padded_delta, padded_trainer) = packed, padded
    assert_updates_close(packed_delta, padded_delta)
    got, want = packed_trainer.state.log_history[0], padded_trainer.state.log_history[0]
    for key in ("loss", "sara_loss", "sara_js/layer_1", "sara_js/layer_2", "num_tokens"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    assert want["sara_loss"] > 0


def test_sft_padding_free_step_equals_padded_step(tmp_path):
    pytest.importorskip("trl")
    base, data = tiny_moe(), pairs(8)
    # TRL's padding-free batches do not truncate: max_length=None on both sides.
    common = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_length=None)
    padded = _sft_step(base, tmp_path, data, **common)
    packed = _sft_step(base, tmp_path, data, padding_free=True, **common)
    batch = next(iter(packed[1].get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    assert batch["sara_target_cu_seqlens"].shape == (5,) and batch["sara_anchor_cu_seqlens"].shape == (5,)
    _assert_same_sft_step(packed, padded)


def test_sft_packing_step_equals_padded_step(tmp_path):
    """packing=True (bfd): the 8 pairs' targets, reordered by length, fill one packed row; each
    sequence keeps its own anchor, so the step equals the padded batch of the 8 pairs."""
    pytest.importorskip("trl")
    base, data = tiny_moe(), pairs(8)
    padded = _sft_step(base, tmp_path, data, per_device_train_batch_size=8, max_length=128)
    packed = _sft_step(base, tmp_path, data, per_device_train_batch_size=1, packing=True, max_length=128)
    assert len(packed[1].train_dataset) == 1  # one packed row holds every pair
    batch = next(iter(packed[1].get_train_dataloader()))
    order = batch["sara_example_index"].tolist()
    assert sorted(order) == list(range(8)) and order != list(range(8))  # bfd reordered the pairs
    encoder = SARACollator(TOKENIZER, max_length=128)
    cu = batch["sara_anchor_cu_seqlens"].tolist()
    for b, index in enumerate(order):  # anchor b is the anchor of target b's pair
        assert batch["sara_anchor_input_ids"][0, cu[b] : cu[b + 1]].tolist() == encoder.encode(data[index]["anchor"])
    _assert_same_sft_step(packed, padded)


def test_sft_refuses_packing_that_cuts_sequences(tmp_path):
    pytest.importorskip("trl")
    from sara_kernels.hf import SARASFTConfig

    common = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_length=32)
    for strategy in ("wrapped", "bfd_split"):
        with pytest.raises(ValueError, match=f"packing_strategy='{strategy}' is not supported with SARA"):
            SARASFTConfig(packing=True, packing_strategy=strategy, **common)
    with pytest.raises(ValueError, match="pad_to_multiple_of=8 is not supported with SARA in padding-free"):
        SARASFTConfig(padding_free=True, pad_to_multiple_of=8, **common)
