"""The SARA term shared by the integrations (sara_kernels.term, sara_kernels.hf.term): options
validated once, the loss call and its metric names, the metric accumulator, and the two
Hugging Face trainers giving the same SARA gradient under gradient accumulation."""

from __future__ import annotations

import copy

import pytest
import torch

from sara_kernels import reference, sara_loss
from sara_kernels.term import MetricsAccumulator, SARAOptions, SARATerm, SequenceLayout, check_layer_weights, sara_term


def test_options_stand_alone_and_validate_once():
    options = SARAOptions(sara_weight=0.5, sara_layers="2,4", sara_layer_weights="1,3")
    assert options.sara_layers == [2, 4] and options.sara_layer_weights == [1.0, 3.0]
    check_layer_weights(options, (2, 4))
    with pytest.raises(ValueError, match=r"sara_layer_weights has 2 weights but sara_layers=\[2, 4\] selects 3"):
        check_layer_weights(options, (2, 4, 6))
    for bad, match in [
        (dict(sara_weight=-1.0), "sara_weight must be a finite number >= 0"),
        (dict(sara_weight=True), "sara_weight"),
        (dict(sara_temperature=float("inf")), "sara_temperature must be a finite number > 0"),
        (dict(sara_score="relu"), "sara_score must be one of"),
        (dict(sara_backend="numpy"), "sara_backend: expected one of"),
        (dict(sara_divergence="jsd"), r"sara_divergence: expected one of \('js', 'kl', 'reverse_kl'\)"),
        (dict(sara_layers="first"), "sara_layers: expected 'all', 'middle'"),
        (dict(sara_layer_weights="1,x"), "sara_layer_weights: expected comma-separated numbers"),
    ]:
        with pytest.raises(ValueError, match=match):
            SARAOptions(**bad)


@pytest.mark.parametrize(
    "spec, expected",
    [("7-34", list(range(7, 35))), ("0,4,7-9", [0, 4, 7, 8, 9]), (" 3 , 5-5", [3, 5]), ("2", [2])],
)
def test_sara_layers_accepts_inclusive_ranges(spec, expected):
    assert SARAOptions(sara_layers=spec).sara_layers == expected


@pytest.mark.parametrize("spec", ["4-2", "1-", "-3", "a-b", "1-2-3", ","])
def test_sara_layers_rejects_a_malformed_range_naming_the_option(spec):
    with pytest.raises(ValueError, match=r"^sara_layers: "):
        SARAOptions(sara_layers=spec)


def test_sara_term_is_sara_loss_with_the_options_and_names_its_metrics():
    torch.manual_seed(0)
    anchor = [torch.randn(10, 5, dtype=torch.float64) for _ in range(2)]
    target = [torch.randn(10, 5, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    cu = torch.tensor([0, 3, 10])
    options = SARAOptions(sara_temperature=0.7, sara_layer_weights=[1.0, 3.0], sara_backend="reference")
    term = sara_term(options, anchor, target, layers=(3, 5), score="sigmoid", anchor_layout=SequenceLayout(cu_seqlens=cu),
                     target_layout=SequenceLayout(cu_seqlens=torch.tensor([0, 6, 10])))
    loss, per_layer = sara_loss(anchor, target, anchor_cu_seqlens=cu, target_cu_seqlens=torch.tensor([0, 6, 10]),
                                layer_weights=[1.0, 3.0], temperature=0.7, score="sigmoid", return_per_layer=True,
                                backend="reference")
    assert isinstance(term, SARATerm) and term.layers == (3, 5)
    torch.testing.assert_close(term.loss, loss)
    torch.testing.assert_close(term.per_layer, per_layer)
    assert term.loss.requires_grad  # the term keeps its autograd history; the metrics do not
    metrics = term.metrics()
    assert list(metrics) == ["sara_loss", "sara_js/layer_3", "sara_js/layer_5"]
    assert not any(v.requires_grad for v in metrics.values())
    assert float(metrics["sara_js/layer_5"]) == pytest.approx(float(per_layer[1]))


def test_sara_term_takes_each_side_layout_as_a_sequence_layout():
    anchor = [torch.randn(6, 5)]
    mask = torch.ones(2, 3)
    with pytest.raises(TypeError, match=r"^anchor_layout: expected a sara_kernels.term.SequenceLayout, got dict"):
        sara_term(SARAOptions(), anchor, anchor, layers=(0,), score="softmax", anchor_layout={"mask": mask, "cu_seqlens": None},
                  target_layout=SequenceLayout(mask=mask))


def test_sara_divergence_reaches_the_trainer_its_loss_and_metric_names(tmp_path):
    """``sara_divergence="reverse_kl"`` through SARATrainer (the option every integration reads through
    sara_term): the evaluated SARA is KL(P_target ‖ P_anchor) of each pair's pooled routing, mean
    over layers and pairs, and the per-layer metrics are named after it."""
    from hf_train_helpers import TOKENIZER, pairs, sgd_args, tiny_moe

    from sara_kernels.hf import SARATrainer

    model, data = tiny_moe(), pairs(4)
    args = sgd_args(tmp_path, sara_divergence="reverse_kl", per_device_eval_batch_size=4)
    metrics = SARATrainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                          processing_class=TOKENIZER).evaluate()
    pooled = {"anchor": [], "target": []}
    with torch.no_grad():
        for example in data:
            for side, rows in pooled.items():
                out = model(input_ids=torch.tensor([TOKENIZER(example[side])["input_ids"]]), output_router_logits=True,
                            use_cache=False)
                rows.append(torch.stack([torch.softmax(z.double(), dim=-1).mean(0) for z in out.router_logits]))
    p_a, p_t = (torch.stack(pooled[side], dim=1) for side in ("anchor", "target"))
    expected = reference.divergence_of(p_a, p_t, "reverse_kl").mean()
    assert metrics["eval_sara_loss"] == pytest.approx(float(expected), rel=1e-4)
    assert float(expected) != pytest.approx(float(reference.divergence_of(p_a, p_t, "kl").mean()), rel=1e-2)
    assert {"eval_sara_reverse_kl/layer_1", "eval_sara_reverse_kl/layer_2"} <= metrics.keys()
    assert not any(key.startswith("eval_sara_js/") for key in metrics)


def test_metrics_accumulator_means_per_mode_and_restarts_on_new_names():
    acc = MetricsAccumulator()
    acc.add("train", {"lm_loss": torch.tensor(1.0), "sara_loss": torch.tensor(4.0)})
    acc.add("train", {"lm_loss": torch.tensor(3.0), "sara_loss": torch.tensor(2.0)})
    acc.add("eval", {"lm_loss": torch.tensor(7.0)})
    names, values = acc.pop("train")
    assert names == ["lm_loss", "sara_loss"] and values.tolist() == [2.0, 3.0]
    assert acc.pop("train") is None
    acc.add("eval", {"sara_loss": torch.tensor(5.0)})  # other names: the eval sums restart
    assert acc.pop("eval")[1].tolist() == [5.0]


def test_both_trainers_give_the_same_sara_gradient_under_accumulation(tmp_path):
    """k = 2 micro-batches of 4: the SARA part of the update (run with λ minus run with λ = 0) is
    the same for SARATrainer and SARASFTTrainer, and is λ × ∇ mean(SARA(mb1), SARA(mb2)) — not
    half or twice that, which a trainer scaling SARA by 1/k on top of the Trainer's own division
    (or not at all) would give."""
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from hf_train_helpers import TOKENIZER, assert_updates_close, pairs, sgd_args, tiny_moe

    from sara_kernels.hf import SARASFTConfig, SARASFTTrainer, SARATrainer

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # Targets ending in EOS are tokenised alike by TRL (which appends one otherwise) and SARACollator.
        base, data = tiny_moe(), [dict(p, target=p["target"] + TOKENIZER.eos_token) for p in pairs(8)]
        common = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, train_sampling_strategy="sequential")

        def update(make_trainer, weight):
            model = copy.deepcopy(base)
            make_trainer(model, weight).train()
            before = dict(base.named_parameters())
            return {n: p.detach() - before[n].detach() for n, p in model.named_parameters()}

        def hf(model, weight):
            return SARATrainer(model=model, args=sgd_args(tmp_path, sara_weight=weight, **common), train_dataset=data,
                               processing_class=TOKENIZER)

        def sft(model, weight):
            args = SARASFTConfig(
                output_dir=str(tmp_path / "sft"), max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant",
                max_grad_norm=0.0, weight_decay=0.0, warmup_steps=0, report_to="none", save_strategy="no",
                disable_tqdm=True, use_cpu=True, dataloader_pin_memory=False, seed=0, router_aux_loss_coef=0.0,
                max_length=64, bf16=False, sara_weight=weight, **common,
            )
            return SARASFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(data),
                                  processing_class=TOKENIZER)

        sara_part = {}
        for name, make in (("SARATrainer", hf), ("SARASFTTrainer", sft)):
            with_sara, lm_only = update(make, 5.0), update(make, 0.0)
            sara_part[name] = {n: with_sara[n] - lm_only[n] for n in with_sara}
    finally:
        torch.set_num_threads(previous)

    oracle = copy.deepcopy(base)
    per_batch = []
    for micro_batch in (data[:4], data[4:]):
        pooled = {}
        for side in ("anchor", "target"):
            rows = []
            for example in micro_batch:
                ids = torch.tensor([TOKENIZER(example[side])["input_ids"]])
                with torch.set_grad_enabled(side == "target"):
                    out = oracle(input_ids=ids, output_router_logits=True, use_cache=False)
                rows.append(torch.stack([torch.softmax(z.double(), -1).mean(0) for z in out.router_logits]))
            pooled[side] = torch.stack(rows, 1)
        per_batch.append(reference.js_divergence(pooled["anchor"], pooled["target"]).mean())
    (5.0 * (per_batch[0] + per_batch[1]) / 2).backward()
    expected = {n: -(p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in oracle.named_parameters()}

    # The LM parts cancel to rounding only, so the tolerance is relative to the SARA update's size.
    assert_updates_close(sara_part["SARATrainer"], sara_part["SARASFTTrainer"], rtol=1e-3)
    assert_updates_close(sara_part["SARATrainer"], expected, rtol=1e-3)
    gate = "model.layers.1.mlp.gate.weight"
    assert expected[gate].abs().max() > 1e-3  # the SARA update is far from zero


def test_resume_checks_sara_divergence_and_older_checkpoints_were_js(tmp_path):
    """The checkpoint state holds sara_divergence; a checkpoint written before the option existed
    was trained with JS, so it resumes under "js" and is refused under "kl"."""
    from sara_kernels.hf.checkpoint import check_sara_state, save_sara_state, sara_state

    def state(divergence):
        options = SARAOptions(sara_divergence=divergence)
        return sara_state(options, layers=[1, 2], score="softmax", anchor_max_length=None, priors=None)

    older = {k: v for k, v in state("js").items() if k != "sara_divergence"}
    save_sara_state(str(tmp_path), older)
    check_sara_state(str(tmp_path), state("js"))
    with pytest.raises(ValueError, match="sara_divergence 'js' -> 'kl'"):
        check_sara_state(str(tmp_path), state("kl"))
    save_sara_state(str(tmp_path), state("reverse_kl"))
    with pytest.raises(ValueError, match="sara_divergence 'reverse_kl' -> 'js'"):
        check_sara_state(str(tmp_path), state("js"))
