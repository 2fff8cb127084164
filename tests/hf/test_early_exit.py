"""Early exit of routing-only forwards (``capture_router_logits(early_exit=True)``): the forward
stops after the last selected router on every family the capture supports, the captured logits
and a whole training step (loss, logged metrics, every parameter's update) equal those of the
full forward, the later layers and the LM head do not run, and it is switched off, with a logged
reason, on compiled, FSDP2 and ZeRO-3 models."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from hf_train_helpers import TOKENIZER, one_thread, pairs, sft_sgd_config, sgd_args, tiny_moe, updates  # noqa: E402
from test_capture import COMMON, FAMILIES, batch, hook_count, make_model  # noqa: E402

from sara_kernels.hf import capture as capture_module  # noqa: E402
from sara_kernels.hf import capture_router_logits, default_score, install_router_hooks  # noqa: E402
from sara_kernels.hf.routing import pooled_routing, probe_routing  # noqa: E402

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


def count_starts(model, modules: dict) -> dict:
    """name -> number of forward calls started on that module (pre-hooks: a stopped call counts)."""
    counts = dict.fromkeys(modules, 0)
    for name, module in modules.items():
        module.register_forward_pre_hook(lambda *_, name=name: counts.__setitem__(name, counts[name] + 1))
    return counts


def after_last(model, last: int) -> dict:
    """The modules a forward stopped after decoder layer ``last``'s router must not start."""
    later = {f"layer {i}": layer for i, layer in enumerate(model.model.layers) if i > last}
    return {**later, "norm": model.model.norm, "lm_head": model.lm_head}


@pytest.fixture
def no_early_exit(monkeypatch):
    """What the package did before early exit: every routing-only forward runs to the end."""
    monkeypatch.setattr(capture_module, "early_exit_possible", lambda *models: False)


@pytest.fixture
def fresh_off_log(monkeypatch):
    """Each reason for switching early exit off is logged once per process: forget earlier tests' lines."""
    monkeypatch.setattr(capture_module, "_EARLY_EXIT_OFF_LOGGED", set())


# --------------------------------------------------------------------------------------------
# The capture, family by family
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_early_exit_stops_after_the_last_selected_router_on_every_family(family):
    model = make_model(family).eval()
    moe_layers = FAMILIES[family][1]
    selected = moe_layers[:2]  # the last MoE layer (and every layer after the selection) must not run
    ids, mask = batch()
    with torch.no_grad():
        with capture_router_logits(model, layers=selected) as full:
            expected_out = model(input_ids=ids, attention_mask=mask).logits
    starts = count_starts(model, after_last(model, selected[-1]))
    before = hook_count(model)
    with torch.no_grad(), capture_router_logits(model, layers=selected, early_exit=True) as early:
        model(input_ids=ids, attention_mask=mask)
        raise AssertionError("unreachable: the block ends at the stopped forward")
    assert early.stopped_early and not full.stopped_early
    assert early.layers == full.layers == tuple(selected)
    assert all(torch.equal(a, b) for a, b in zip(early.logits, full.logits))
    assert starts == dict.fromkeys(starts, 0), starts
    # Nothing left behind: hooks, grad mode, training mode, and the next full forward.
    assert hook_count(model) == before
    assert torch.is_grad_enabled() and not model.training
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, expected_out)
    assert starts["lm_head"] == 1


def test_early_exit_with_a_grad_enabled_forward_and_installed_hooks():
    """Installed (permanent) hooks on an eager model stop too; the logits keep their history."""
    model = make_model("qwen3_moe").train()
    hooks = install_router_hooks(model)
    ids, mask = batch()
    with capture_router_logits(model, layers=[2]) as full:
        model(input_ids=ids, attention_mask=mask)
    starts = count_starts(model, after_last(model, 2))
    with capture_router_logits(model, layers=[2], early_exit=True) as early:
        model(input_ids=ids, attention_mask=mask)
    assert early.stopped_early and starts == dict.fromkeys(starts, 0)
    assert early.layers == (2,) and torch.equal(early.logits[0], full.logits[0])
    early.logits[0].sum().backward()
    assert model.model.layers[2].mlp.gate.weight.grad.abs().sum() > 0
    hooks.remove()


def test_early_exit_lets_other_errors_through():
    model = make_model("mixtral").eval()
    ids, _ = batch()
    before = hook_count(model)

    def fail(*_):
        raise KeyError("boom")

    handle = model.model.layers[1].register_forward_pre_hook(fail)
    with pytest.raises(KeyError, match="boom"):
        with torch.no_grad(), capture_router_logits(model, layers=[2], early_exit=True):
            model(input_ids=ids)
    handle.remove()
    assert hook_count(model) == before and torch.is_grad_enabled()


# --------------------------------------------------------------------------------------------
# Switched off where a stopped forward would leave state behind
# --------------------------------------------------------------------------------------------


def router_logits_of(model):
    """transformers' own router logits of a full forward of ``batch()`` (taken before wrapping the model)."""
    ids, mask = batch()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, output_router_logits=True).router_logits


def assert_full_forward_with_reason(model, expected, caplog, reason: str):
    ids, mask = batch()
    inner = getattr(model, "_orig_mod", model)
    starts = count_starts(inner, {"lm_head": inner.lm_head})
    with caplog.at_level(logging.INFO, logger="sara_kernels"):
        with torch.no_grad(), capture_router_logits(model, layers=[1], early_exit=True) as captured:
            model(input_ids=ids, attention_mask=mask)
    assert not captured.stopped_early and starts["lm_head"] == 1
    assert torch.equal(captured.logits[0], expected[0])
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("sara_kernels")]
    assert len(messages) == 1 and "no early exit" in messages[0] and reason in messages[0], messages


def test_early_exit_off_on_a_compiled_model(caplog, fresh_off_log):
    torch._dynamo.reset()
    model = make_model("qwen3_moe", num_hidden_layers=3).eval()
    expected = router_logits_of(model)
    hooks = install_router_hooks(model)
    assert_full_forward_with_reason(torch.compile(model, backend="eager"), expected, caplog, "torch.compile")
    hooks.remove()
    torch._dynamo.reset()


def test_early_exit_off_under_fsdp2(caplog, fresh_off_log):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from torch.distributed.fsdp import fully_shard

    model = make_model("qwen3_moe", num_hidden_layers=3).eval()
    expected = router_logits_of(model)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert_full_forward_with_reason(model, expected, caplog, "FSDP")
    finally:
        dist.destroy_process_group()


def test_early_exit_off_under_deepspeed_zero3(caplog, fresh_off_log):
    """ZeRO-3 as transformers' Trainer declares it (HfDeepSpeedConfig, read by is_deepspeed_zero3_enabled);
    no ZeRO-3 engine is started here (its CPU comm op takes minutes to build)."""
    pytest.importorskip("deepspeed")
    from transformers.integrations import HfDeepSpeedConfig

    model = make_model("qwen3_moe", num_hidden_layers=3).eval()
    expected = router_logits_of(model)
    zero3 = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert_full_forward_with_reason(model, expected, caplog, "ZeRO-3")
    finally:
        del zero3  # transformers holds it by a weak reference: ZeRO-3 is off again


# --------------------------------------------------------------------------------------------
# Training steps and priors: equal with and without early exit
# --------------------------------------------------------------------------------------------


def sigmoid_moe():
    """A tiny DeepSeek-V3 (sigmoid routers) over the test tokenizer, dense layer 0, MoE layers 1-3."""
    overrides = dict(vocab_size=len(TOKENIZER), num_hidden_layers=4, pad_token_id=TOKENIZER.pad_token_id,
                     bos_token_id=TOKENIZER.bos_token_id, eos_token_id=TOKENIZER.eos_token_id)
    config = AutoConfig.for_model("deepseek_v3", **{**COMMON, **FAMILIES["deepseek_v3"][0], **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


MODELS = {
    "softmax": lambda: tiny_moe(num_layers=4),  # Qwen3-MoE, dense layer 0, MoE layers 1-3
    "sigmoid": sigmoid_moe,
}
SELECTED = [1, 2]  # MoE layer 3, the final norm and the LM head come after the last selected router


def one_step(trainer_name, base, tmp_path):
    """(parameter updates, logged values, starts of the modules after the selection) of one training step."""
    model = copy.deepcopy(base)
    starts = count_starts(model, after_last(model, SELECTED[-1]))
    if trainer_name == "SARATrainer":
        from sara_kernels.hf import SARATrainer

        trainer = SARATrainer(model=model, args=sgd_args(tmp_path, sara_layers=SELECTED), train_dataset=pairs(8),
                              processing_class=TOKENIZER)
    else:
        datasets = pytest.importorskip("datasets")
        pytest.importorskip("trl")
        from sara_kernels.hf import SARASFTTrainer

        trainer = SARASFTTrainer(model=model, args=sft_sgd_config(tmp_path, sara_layers=SELECTED),
                                 train_dataset=datasets.Dataset.from_list(pairs(8)), processing_class=TOKENIZER)
    trainer.train()
    logged = {k: v for k, v in trainer.state.log_history[0].items() if k == "loss" or k.startswith("sara_")}
    return updates(base, model), logged, starts


@pytest.mark.parametrize("score", list(MODELS))
@pytest.mark.parametrize("trainer_name", ["SARATrainer", "SARASFTTrainer"])
def test_early_exit_training_step_equals_the_full_forward_step(trainer_name, score, tmp_path, monkeypatch):
    base = MODELS[score]()
    assert default_score(base) == score
    early_delta, early_logs, early_starts = one_step(trainer_name, base, tmp_path)
    monkeypatch.setattr(capture_module, "early_exit_possible", lambda *models: False)
    full_delta, full_logs, full_starts = one_step(trainer_name, base, tmp_path)

    # One micro-batch: the anchor forward stops before these modules, the target forward runs them
    # (TRL's fused LM head reads lm_head.weight without calling the module).
    assert {k: full_starts[k] - early_starts[k] for k in full_starts} == dict.fromkeys(full_starts, 1), full_starts
    assert early_starts["layer 3"] == early_starts["norm"] == 1
    assert early_logs.keys() == full_logs.keys() >= {"loss", "sara_loss", "sara_js/layer_1", "sara_js/layer_2"}
    assert early_logs == full_logs and early_logs["sara_loss"] > 0
    assert early_delta.keys() == full_delta.keys()
    assert all(torch.equal(early_delta[n], full_delta[n]) for n in full_delta)
    assert full_delta["model.layers.2.mlp.gate.weight"].abs().sum() > 0


def test_early_exit_priors_and_probe_equal_the_full_forward(monkeypatch):
    model = tiny_moe(num_layers=4).eval()
    anchors = [p["anchor"] for p in pairs(6)]
    starts = count_starts(model, after_last(model, SELECTED[-1]))
    early = pooled_routing(model, TOKENIZER, anchors, layers=SELECTED, batch_size=4, backend="reference",
                           progress=False)
    early_probe = probe_routing(model, SELECTED)
    assert starts == dict.fromkeys(starts, 0), starts
    monkeypatch.setattr(capture_module, "early_exit_possible", lambda *models: False)
    full = pooled_routing(model, TOKENIZER, anchors, layers=SELECTED, batch_size=4, backend="reference",
                          progress=False)
    assert starts["lm_head"] == 2  # two batches, now run to the end
    assert probe_routing(model, SELECTED) == early_probe == ((1, 2), 4, "softmax")
    assert early[1:] == full[1:] == ((1, 2), "softmax")
    assert torch.equal(early[0], full[0]) and early[0].shape == (6, 2, 4)
