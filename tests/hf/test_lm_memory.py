"""SARATrainer's LM term runs through the model's own loss path: a training step allocates no
``[B, S, V]`` tensor beyond what a plain ``Trainer`` step on the same model and batch does.

Measured on CPU with the PyTorch profiler's allocation events (``profile_memory=True``): every
CPU allocation and free made during ``trainer.train()`` (one SGD step) is recorded with its
size; the running sum over time, taken at its maximum, is the step's peak of memory allocated
since the step began. This counts exactly the tensors torch allocates (not the allocator's
caching, the Python heap or the process's resident size), so it is deterministic and a
``[B, S, V]`` float32 tensor — B·S·V·4 bytes, about 100 MB here — stands far above the rest.

Two models: a stock Qwen3-MoE, whose own loss computes the full logits (SARA must add nothing
to it), and :class:`ChunkedLossQwen3MoeForCausalLM`, which stands in for a fused
linear-cross-entropy loss path (Liger's ``use_liger_kernel``, TRL's): given labels it never
builds the logits, so a trainer that computed the loss from ``outputs.logits`` itself would show
up here as a peak larger by at least B·S·V·4 bytes (measured: 510 MB larger, before the trainer
passed the labels to the model).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from hf_train_helpers import TOKENIZER, one_thread, pairs, sgd_args, tiny_moe  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from transformers import Qwen3MoeForCausalLM, Trainer  # noqa: E402
from transformers.modeling_outputs import MoeCausalLMOutputWithPast  # noqa: E402

from sara_kernels.hf import SARACollator, SARATrainer  # noqa: E402

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

VOCAB = 65536  # the model's vocabulary; the word tokenizer uses its first few hundred ids
NUM_PAIRS = 4
SENTENCES_PER_SIDE = 24  # about 200 tokens per side


class ChunkedLossQwen3MoeForCausalLM(Qwen3MoeForCausalLM):
    """Qwen3-MoE whose loss, given labels in training, is a chunked linear cross-entropy: the LM
    head and the cross-entropy run on ``CHUNK`` positions at a time under activation
    checkpointing, so neither the logits nor their gradient ever exist for the whole batch — the
    memory behaviour of Liger's fused linear cross-entropy, in plain PyTorch."""

    CHUNK = 32

    def forward(self, input_ids=None, attention_mask=None, labels=None, logits_to_keep=0, num_items_in_batch=None,
                **kwargs):
        if labels is None or not self.training:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                   logits_to_keep=logits_to_keep, num_items_in_batch=num_items_in_batch, **kwargs)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        targets = labels[:, 1:].reshape(-1)

        def chunk_loss(h, t):
            return F.cross_entropy(self.lm_head(h).float(), t, ignore_index=-100, reduction="sum")

        total = sum(
            torch.utils.checkpoint.checkpoint(chunk_loss, hidden[i : i + self.CHUNK], targets[i : i + self.CHUNK],
                                              use_reentrant=False)
            for i in range(0, targets.numel(), self.CHUNK)
        )
        count = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
        return MoeCausalLMOutputWithPast(loss=total / count)


def long_pairs():
    """NUM_PAIRS pairs of about 200 tokens a side (sentences of the synthetic corpus, joined)."""
    sentences = pairs(NUM_PAIRS * SENTENCES_PER_SIDE, seed=11)
    return [
        {side: " ".join(p[side] for p in sentences[i::NUM_PAIRS]) for side in ("anchor", "target")}
        for i in range(NUM_PAIRS)
    ]


def peak_allocated_bytes(step) -> int:
    """Peak, over ``step()``, of the CPU memory allocated since it began (see the module docstring)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # One "[memory]" event per allocation (+bytes) or free (-bytes); frees of blocks allocated
    # before profiling began are not reported, so the sum only counts the step's own tensors.
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def plain_collator(examples):
    """The target rows of a SARA batch, as a plain LM batch."""
    batch = SARACollator(TOKENIZER, include_anchor=False)(examples)
    return {k: v for k, v in batch.items() if k != "sara_example_index"}


@pytest.mark.parametrize(
    "model_class", [Qwen3MoeForCausalLM, ChunkedLossQwen3MoeForCausalLM], ids=["stock-loss", "chunked-loss"]
)
def test_sara_step_adds_no_full_logits_to_the_models_own_loss(tmp_path, model_class):
    data = long_pairs()
    tokens = int(plain_collator(data)["attention_mask"].sum())
    logits_bytes = tokens * VOCAB * 4
    base = tiny_moe(vocab_size=VOCAB, max_position_embeddings=512)

    def step(trainer_class, **kwargs):
        model = model_class(base.config)
        model.load_state_dict(base.state_dict())
        args = sgd_args(tmp_path, per_device_train_batch_size=NUM_PAIRS, **kwargs)
        trainer = trainer_class(model=model, args=args, train_dataset=data, processing_class=TOKENIZER,
                                **({"data_collator": plain_collator} if trainer_class is Trainer else {}))
        peak = peak_allocated_bytes(trainer.train)
        return peak, trainer.state.log_history[0]["loss"]

    plain_peak, plain_loss = step(Trainer, sara_weight=0.0)
    sara_peak, _ = step(SARATrainer, sara_weight=1.0)
    lm_only_peak, lm_only_loss = step(SARATrainer, sara_weight=0.0)

    # The measurement sees the logits: the stock loss path holds at least the logits and their
    # float32 log-softmax at once, the chunked one never holds them.
    if model_class is Qwen3MoeForCausalLM:
        assert plain_peak > 2 * logits_bytes
    else:
        assert plain_peak < logits_bytes / 2
    # The same LM loss either way (the chunked path included).
    assert lm_only_loss == pytest.approx(plain_loss, rel=1e-5)
    # SARA's extra peak (the anchor forward's captured router logits, its small SARA tensors)
    # is far below one [B, S, V] float32 tensor.
    assert sara_peak - plain_peak < logits_bytes / 4, (sara_peak, plain_peak, logits_bytes)
    assert lm_only_peak - plain_peak < logits_bytes / 4, (lm_only_peak, plain_peak, logits_bytes)
