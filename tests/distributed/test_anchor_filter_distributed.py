"""``sara_anchor_filter="correct"`` under data parallelism: SARATrainer and SARASFTTrainer on W = 2
gloo ranks x 1 micro-batch of 3 pairs (one torchrun session, anchor_filter_steps.py) against the
same global batch computed by hand in one process.

The filter's π-weighted mean is taken per micro-batch (over the pairs it keeps), and the step is
``λ ×`` the mean of those over the micro-batches and ranks, as for unfiltered SARA
(:mod:`sara_kernels.hf.term`); the data put 2 kept pairs on one rank and 1 on the other, so a
mean over the global batch's kept pairs would give another step. ``sara_anchor_kept`` (like
every SARA metric) is logged on every rank as the mean over ranks of each rank's mean over its
micro-batches: with equal micro-batches, the kept fraction of the global batch.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
pytest.importorskip("trl")

from helpers import REPO, torchrun  # noqa: E402
from hf_train_helpers import (  # noqa: E402
    LAMBDA, TOKENIZER, answered_pairs, assert_updates_close, filtered_sara, manual_loss, one_thread, sft_sgd_config,
    tiny_moe, trl_encode, updates,
)

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

WORLD = 2
# Whether the model reproduces each pair's anchor answer (targets: never, they play no part in "correct").
ANCHOR_RIGHT = (True, False, True, True, False, False)


@pytest.fixture(scope="module")
def data():
    return answered_pairs(tiny_moe().eval(), ANCHOR_RIGHT, (False,) * len(ANCHOR_RIGHT))


@pytest.fixture(scope="module")
def launched(tmp_path_factory, data):
    """kind -> (each rank's micro-batches as pair indices, each rank's first logged entry, rank 0's updates)."""
    out = tmp_path_factory.mktemp("anchor_filter")
    (out / "pairs.json").write_text(json.dumps(data))
    script = os.path.join(REPO, "tests", "distributed", "anchor_filter_steps.py")
    proc = torchrun([script, str(out / "pairs.json"), str(out)], cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = {}
    for kind in ("sara", "sft"):
        ranks = [json.loads((out / f"{kind}_rank{r}.json").read_text()) for r in range(WORLD)]
        found[kind] = ([r["micro_batches"] for r in ranks], [r["logged"] for r in ranks],
                       torch.load(out / f"{kind}_delta.pt"))
    return found


def _rank_pairs(micro_batches):
    """Each rank's one micro-batch; together, the global batch."""
    assert [len(rank) for rank in micro_batches] == [1] * WORLD
    batches = [rank[0] for rank in micro_batches]
    assert sorted(i for batch in batches for i in batch) == list(range(len(ANCHOR_RIGHT)))
    return batches


def _check_kept_and_sara(batches, logged, data, encode_target=None):
    """The logged kept fraction and SARA are the means over ranks, on every rank."""
    weights = [[float(ANCHOR_RIGHT[i]) for i in batch] for batch in batches]
    fractions = [sum(w) / len(w) for w in weights]
    assert fractions[0] != fractions[1]  # each rank normalises over its own kept pairs
    model = tiny_moe()
    with torch.no_grad():
        per_rank = [float(filtered_sara(model, [data[i] for i in batch], w, encode_target))
                    for batch, w in zip(batches, weights)]
        everything = float(filtered_sara(model, data, [float(r) for r in ANCHOR_RIGHT], encode_target))
    for entry in logged:
        assert entry["sara_anchor_kept"] == pytest.approx(sum(fractions) / WORLD)
        assert entry["sara_loss"] == pytest.approx(sum(per_rank) / WORLD, rel=1e-5)
        assert entry["sara_loss"] != pytest.approx(everything, rel=1e-3)  # not the global batch's kept mean
    return weights


def _sara_gradient_term(model, batches, weights, data, encode_target=None):
    """λ · the mean over ranks of each micro-batch's filtered SARA (what DDP's gradient average gives)."""
    return LAMBDA * sum(filtered_sara(model, [data[i] for i in batch], w, encode_target)
                        for batch, w in zip(batches, weights)) / WORLD


def test_anchor_filter_two_ranks_sara_trainer_step_is_the_mean_over_ranks_of_their_kept_pairs(launched, data):
    micro_batches, logged, delta = launched["sara"]
    batches = _rank_pairs(micro_batches)
    weights = _check_kept_and_sara(batches, logged, data)
    model = tiny_moe()
    model.train()
    lm_tokens = [len(TOKENIZER(e["target"])["input_ids"]) - 1 for e in data]
    loss = _sara_gradient_term(model, batches, weights, data)
    for batch in batches:  # the LM term: the token mean over the global batch
        lm_mean, _ = manual_loss(model, [data[i] for i in batch], sara_weight=0.0)
        loss = loss + lm_mean * sum(lm_tokens[i] for i in batch) / sum(lm_tokens)
    loss.backward()
    assert_updates_close(delta, {n: -(p.grad if p.grad is not None else torch.zeros_like(p))
                                 for n, p in model.named_parameters()})


def test_anchor_filter_two_ranks_sft_trainer_step_is_trls_step_plus_the_filtered_sara(launched, data, tmp_path):
    from sara_kernels.hf import SARASFTTrainer

    micro_batches, logged, delta = launched["sft"]
    batches = _rank_pairs(micro_batches)
    weights = _check_kept_and_sara(batches, logged, data, trl_encode)
    base = tiny_moe()
    lm_model = tiny_moe()  # TRL's own step on the global batch, in one process
    SARASFTTrainer(model=lm_model, args=sft_sgd_config(tmp_path, sara_weight=0.0, per_device_train_batch_size=6),
                   train_dataset=datasets.Dataset.from_list(data), processing_class=TOKENIZER).train()
    lm_delta = updates(base, lm_model)
    model = tiny_moe()
    model.train()
    _sara_gradient_term(model, batches, weights, data, trl_encode).backward()
    assert_updates_close(delta, {n: lm_delta[n] - (p.grad if p.grad is not None else torch.zeros_like(p))
                                 for n, p in model.named_parameters()})
