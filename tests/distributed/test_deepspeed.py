"""SARATrainer and SARASFTTrainer under DeepSpeed ZeRO-2 and ZeRO-3 (2 gloo processes on CPU,
DeepSpeed's CPU accelerator, fp32): one optimiser step of 2 ranks x 2 accumulated micro-batches
of 2 pairs gives the parameter updates of a one-process step on the batch of 8, with and without
non-reentrant activation checkpointing (the router hooks fire again in the recompute), with live
anchors and with cached priors, and (ZeRO-3, SARATrainer) with ``sara_anchor_filter``; and those updates are not the LM-only step's (the SARA term is in
them). ZeRO-3 runs the README's config, examples/deepspeed_zero3.json, whose
``stage3_param_persistence_threshold=0`` partitions even the small routers. ``SARATrainer``'s
logged values agree: ``loss = lm_loss + λ · sara_loss``.

Every case runs in one torchrun session (deepspeed_steps.py): DeepSpeed compiles its shared-memory
comm op on the first distributed init (torch's extension cache, ``TORCH_EXTENSIONS_DIR`` or
``~/.cache/torch_extensions``), so the session pays for that compile once at most.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("deepspeed")
datasets = pytest.importorskip("datasets")
pytest.importorskip("trl")

from helpers import REPO, torchrun  # noqa: E402
from hf_train_helpers import (  # noqa: E402
    LAMBDA, TOKENIZER, answered_pairs, assert_updates_close, one_thread, pairs, sft_sgd_config, tiny_moe, train_delta,
    updates,
)

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

PAIRS = 8
GATE = "model.layers.1.mlp.gate.weight"
# name: (trainer, ZeRO stage, activation checkpointing, cached priors)
CASES = {
    "zero2": ("sara", 2, False, False),
    "zero2_checkpointing": ("sara", 2, True, False),
    "zero2_priors": ("sara", 2, False, True),
    "zero2_checkpointing_priors": ("sara", 2, True, True),
    "zero3": ("sara", 3, False, False),
    "zero3_checkpointing": ("sara", 3, True, False),
    "zero3_priors": ("sara", 3, False, True),
    "zero3_checkpointing_priors": ("sara", 3, True, True),
    "sft_zero3": ("sft", 3, False, False),
    "sft_zero3_checkpointing": ("sft", 3, True, False),
    "zero3_anchor_filter": ("sara", 3, False, False),
}
# sara_anchor_filter="correct" on pairs whose anchors the model answers in every other pair, taken in
# order: each micro-batch of 2 keeps one pair, so the mean over micro-batches and ranks of their
# kept means is the one-process batch's mean over its 4 kept pairs.
ANCHOR_FILTER_CASES = {"zero3_anchor_filter"}
ANCHOR_FILTER = dict(sara_anchor_filter="correct", sara_layers="all", train_sampling_strategy="sequential")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("deepspeed")


@pytest.fixture(scope="module")
def priors_path(workdir):
    from sara_kernels.hf import extract_routing_priors

    path = workdir / "priors.safetensors"
    extract_routing_priors(tiny_moe(), pairs(PAIRS), TOKENIZER, path, progress=False)
    return str(path)


@pytest.fixture(scope="module")
def answered():
    return answered_pairs(tiny_moe().eval(), (True, False) * (PAIRS // 2), (False,) * PAIRS)


@pytest.fixture(scope="module")
def zero_updates(workdir, priors_path, answered):
    """Every case's parameter updates from one 2-process torchrun session."""
    cases = [dict(name=name, trainer=trainer, stage=stage, checkpointing=checkpointing,
                  priors=priors_path if priors else None)
             for name, (trainer, stage, checkpointing, priors) in CASES.items()]
    for case in cases:
        if case["name"] in ANCHOR_FILTER_CASES:
            case.update(options=ANCHOR_FILTER, pairs=answered)
    (workdir / "cases.json").write_text(json.dumps(cases))
    script = os.path.join(REPO, "tests", "distributed", "deepspeed_steps.py")
    # The extension compile (about 45-155 s on 2 cores, once per machine) plus 10 steps of ~5 s.
    proc = torchrun([script, str(workdir / "cases.json"), str(workdir)], cwd=REPO, timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {name: (torch.load(workdir / f"{name}.pt"), json.loads((workdir / f"{name}.log.json").read_text()))
            for name in CASES}


def one_process_sara(workdir, priors_path, kind: str, data=None):
    """The same step in one process without DeepSpeed: the batch of 8, no accumulation."""
    options = dict(output_dir=str(workdir / f"single_{kind}"), per_device_train_batch_size=PAIRS)
    if kind == "priors":
        options["routing_priors"] = priors_path
    if kind == "lm_only":
        options["sara_weight"] = 0.0
    if kind == "anchor_filter":
        options.update(ANCHOR_FILTER)
    return train_delta(tiny_moe(), workdir, data or pairs(PAIRS), **options)[0]


def one_process_sft(workdir, sara_weight: float):
    from sara_kernels.hf import SARASFTTrainer

    base = tiny_moe()
    model = tiny_moe()
    config = sft_sgd_config(workdir, output_dir=str(workdir / f"single_sft_{sara_weight}"), sara_weight=sara_weight,
                        per_device_train_batch_size=PAIRS)
    SARASFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(pairs(PAIRS)),
                   processing_class=TOKENIZER).train()
    return updates(base, model)


@pytest.fixture(scope="module")
def one_process(workdir, priors_path, answered):
    """(with SARA, LM only) one-process updates for each kind of case, computed once each."""
    found = {}

    def get(trainer: str, priors: bool, anchor_filter: bool = False):
        key = (trainer, priors, anchor_filter)
        if key not in found:
            if anchor_filter:
                found[key] = (one_process_sara(workdir, priors_path, "anchor_filter", answered),
                              one_process_sara(workdir, priors_path, "lm_only", answered))
            elif trainer == "sft":
                found[key] = one_process_sft(workdir, LAMBDA), one_process_sft(workdir, 0.0)
            else:
                found[key] = (one_process_sara(workdir, priors_path, "priors" if priors else "live"),
                              one_process_sara(workdir, priors_path, "lm_only"))
        return found[key]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_zero_step_equals_the_one_process_step(case, zero_updates, one_process):
    trainer, _, _, priors = CASES[case]
    with_sara, lm_only = one_process(trainer, priors, case in ANCHOR_FILTER_CASES)
    got, logged = zero_updates[case]
    assert_updates_close(got, with_sara)
    if case in ANCHOR_FILTER_CASES:  # the filter ran: half the pairs kept (the mean over ranks, logged on rank 0)
        assert logged["sara_anchor_kept"] == pytest.approx(0.5)
    if trainer == "sara":  # 2 ranks x 2 micro-batches with unequal token counts
        assert logged["loss"] == pytest.approx(logged["lm_loss"] + LAMBDA * logged["sara_loss"], rel=1e-5)
    # The SARA term moves the router far beyond the tolerance: the LM-only step is not what ran.
    assert (got[GATE] - lm_only[GATE]).abs().max() > 100 * 2e-4 * with_sara[GATE].abs().max()
