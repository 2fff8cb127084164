"""Router-logit capture (sara_kernels.hf.capture) on tiny random transformers MoE models.

Where transformers' own ``output_router_logits=True`` works, the captured logits must equal it
exactly; the other tests cover what it cannot do (FSDP2, checkpointing, compile, loss paths
that drop the field, decoder-layer indices with dense layers, non-transformers modules).
"""

from __future__ import annotations

import functools
import logging
import re

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from sara_kernels import sara_loss  # noqa: E402
from sara_kernels.hf import (  # noqa: E402
    capture_router_logits,
    default_score,
    find_routers,
    install_router_hooks,
    select_layers,
)

COMMON = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
E = 4  # experts in every tiny config

# family -> (config overrides, decoder indices of its MoE layers, router attribute path in a layer)
FAMILIES = {
    "qwen3_moe": (
        dict(num_experts=E, num_experts_per_tok=2, moe_intermediate_size=8, head_dim=8, mlp_only_layers=[0]),
        [1, 2, 3],
        "mlp.gate",
    ),
    "qwen2_moe": (
        dict(
            num_experts=E,
            num_experts_per_tok=2,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=8,
            decoder_sparse_step=2,
        ),
        [1, 3],
        "mlp.gate",
    ),
    "mixtral": (dict(num_local_experts=E, num_experts_per_tok=2, head_dim=8), [0, 1, 2, 3], "mlp.gate"),
    "olmoe": (dict(num_experts=E, num_experts_per_tok=2), [0, 1, 2, 3], "mlp.gate"),
    "phimoe": (dict(num_local_experts=E, num_experts_per_tok=2), [0, 1, 2, 3], "mlp.router"),
    "deepseek_v3": (
        dict(
            n_routed_experts=E,
            num_experts_per_tok=2,
            moe_intermediate_size=8,
            n_shared_experts=1,
            first_k_dense_replace=1,
            num_key_value_heads=2,  # multi-head latent attention: one KV head per query head
            n_group=1,
            topk_group=1,
            q_lora_rank=None,
            kv_lora_rank=8,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
        ),
        [1, 2, 3],
        "mlp.gate",
    ),
    "gpt_oss": (
        dict(
            num_local_experts=E,
            num_experts_per_tok=2,
            head_dim=8,
            sliding_window=8,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        [0, 1, 2, 3],
        "mlp.router",
    ),
}


def make_model(family: str, **overrides) -> nn.Module:
    """A fresh tiny random model (seeded, so two calls give the same weights)."""
    kwargs, _, _ = FAMILIES[family]
    config = AutoConfig.for_model(family, **{**COMMON, **kwargs, **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@functools.lru_cache(maxsize=None)
def cached_model(family: str) -> nn.Module:
    """Shared eval-mode model for the tests that neither train nor wrap it."""
    return make_model(family).eval()


def batch(seed: int = 1, batch_size: int = 2, seq: int = 6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, COMMON["vocab_size"], (batch_size, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, seq - 2 :] = 0  # right padding on the second sequence
    return ids, mask


def router(model, layer: int, family: str) -> nn.Module:
    module = model.model.layers[layer]
    for part in FAMILIES[family][2].split("."):
        module = getattr(module, part)
    return module


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# --------------------------------------------------------------------------------------------
# Families: same logits as transformers' own capture, true layer indices, [N, E]
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_matches_builtin_capture_with_true_layer_indices(family):
    model = cached_model(family)
    ids, mask = batch()
    with torch.no_grad():
        builtin = model(input_ids=ids, attention_mask=mask, output_router_logits=True).router_logits
        with capture_router_logits(model) as captured:
            model(input_ids=ids, attention_mask=mask)

    assert captured.layers == tuple(FAMILIES[family][1])  # dense layers skipped, decoder indices kept
    assert len(captured.logits) == len(builtin) == len(captured.layers)
    for ours, theirs in zip(captured.logits, builtin):
        assert ours.shape == (ids.numel(), E)  # raw logits over all experts (gpt_oss: not the top-k scores)
        assert torch.equal(ours, theirs)
    assert captured.names == tuple(f"model.layers.{i}.{FAMILIES[family][2]}" for i in captured.layers)
    assert captured.score == ("sigmoid" if family == "deepseek_v3" else "softmax")


def test_logits_keep_autograd_history_only_when_grad_is_on():
    model = cached_model("qwen3_moe")
    ids, mask = batch()
    with capture_router_logits(model) as with_grad:
        model(input_ids=ids, attention_mask=mask)
    with torch.no_grad(), capture_router_logits(model) as without:
        model(input_ids=ids, attention_mask=mask)
    assert all(t.requires_grad and t.grad_fn is not None for t in with_grad.logits)
    assert not any(t.requires_grad for t in without.logits)


def test_hooks_removed_on_exit_and_on_exception():
    model = cached_model("mixtral")
    ids, _ = batch()
    before = hook_count(model)
    with capture_router_logits(model) as captured:
        assert hook_count(model) > before
        model(input_ids=ids)
    assert hook_count(model) == before
    with pytest.raises(KeyError):
        with capture_router_logits(model):
            raise KeyError("boom")
    assert hook_count(model) == before
    # Outside the block nothing more is recorded.
    model(input_ids=ids)
    assert len(captured) == 4


def test_one_block_captures_one_forward():
    model = cached_model("olmoe")
    ids, _ = batch()
    with torch.no_grad(), capture_router_logits(model) as captured:
        assert len(captured) == 0
        with pytest.raises(RuntimeError, match="no router logits were captured"):
            captured.logits
        model(input_ids=ids)
        with pytest.raises(RuntimeError, match="ran twice"):
            model(input_ids=ids)


def test_loss_paths_without_router_logits_in_the_output():
    """Trainers that drop outputs.router_logits, tuple outputs, calling the inner model directly."""
    model = cached_model("qwen3_moe")
    ids, mask = batch()
    with torch.no_grad():
        builtin = model(input_ids=ids, attention_mask=mask, output_router_logits=True).router_logits
        with capture_router_logits(model) as from_loss:
            out = model(input_ids=ids, attention_mask=mask, labels=ids, output_router_logits=False)
        assert getattr(out, "router_logits", None) is None
        with capture_router_logits(model) as from_tuple:
            model(input_ids=ids, attention_mask=mask, return_dict=False)
        with capture_router_logits(model) as from_inner:
            model.model(input_ids=ids, attention_mask=mask)
    for captured in (from_loss, from_tuple, from_inner):
        assert captured.layers == (1, 2, 3)
        assert all(torch.equal(a, b) for a, b in zip(captured.logits, builtin))


# --------------------------------------------------------------------------------------------
# Unsupported models and bad arguments
# --------------------------------------------------------------------------------------------


def test_dense_model_is_rejected_with_a_reason():
    config = AutoConfig.for_model("llama", **{**COMMON, "head_dim": 8})
    llama = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM declares no 'router_logits' OutputRecorder.*routers="):
        capture_router_logits(llama)
    with pytest.raises(ValueError, match="router_logits"):
        capture_router_logits(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        capture_router_logits("Qwen/Qwen3-30B-A3B")


def test_bad_arguments_name_the_argument():
    model = cached_model("qwen3_moe")
    with pytest.raises(ValueError, match=r"score must be one of"):
        capture_router_logits(model, score="sparsemixer")
    with pytest.raises(ValueError, match=r"layers=\[0\]: \[0\] are not MoE layers.*\[1, 2, 3\]"):
        capture_router_logits(model, layers=[0])  # layer 0 is dense (mlp_only_layers)
    with pytest.raises(ValueError, match="layers must be"):
        capture_router_logits(model, layers="first")
    with pytest.raises(TypeError, match="output_index must be an int or None"):
        capture_router_logits(model, output_index="0")
    with pytest.raises(TypeError, match="routers= takes"):
        capture_router_logits(model, routers=42)


# --------------------------------------------------------------------------------------------
# Layer selection and score
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "moe_layers, expected",
    [
        ([5], [5]),
        ([0, 1], [0, 1]),
        ([0, 1, 2], [0, 1, 2]),
        ([0, 1, 2, 3], [1, 2]),
        ([1, 3, 5, 7, 9], [3, 5, 7]),
        (list(range(8)), [2, 3, 4, 5]),
        (list(range(3, 48)), list(range(14, 37))),  # K = 45: drop 11 on each side
    ],
)
def test_middle_rule_keeps_the_middle_half(moe_layers, expected):
    assert select_layers(moe_layers, "middle") == tuple(expected)
    assert select_layers(moe_layers, "all") == tuple(moe_layers)


def test_layer_selection_on_a_model():
    model = cached_model("mixtral")
    ids, _ = batch()
    with torch.no_grad():
        builtin = model(input_ids=ids, output_router_logits=True).router_logits
        with capture_router_logits(model, layers="middle") as middle:
            model(input_ids=ids)
        with capture_router_logits(model, layers=[3, 0]) as chosen:
            model(input_ids=ids)
    assert middle.layers == (1, 2) and torch.equal(middle.logits[0], builtin[1])
    assert chosen.layers == (0, 3) and torch.equal(chosen.logits[1], builtin[3])


def test_default_score_and_override():
    assert default_score(cached_model("deepseek_v3")) == "sigmoid"
    assert default_score(cached_model("qwen3_moe")) == "softmax"
    assert default_score(cached_model("deepseek_v3").config) == "sigmoid"

    class Cfg:
        scoring_func = "sigmoid"
        model_type = "my_moe"

    module = nn.Linear(2, 2)
    assert default_score(module) == "softmax"
    module.config = Cfg()
    assert default_score(module) == "sigmoid"

    with capture_router_logits(cached_model("deepseek_v3"), score="softmax") as captured:
        pass
    assert captured.score == "softmax"


# --------------------------------------------------------------------------------------------
# Gradient flows from sara_loss to the routers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, layers, selected",
    [("mixtral", "middle", (1, 2)), ("deepseek_v3", [2], (2,))],  # mixtral: middle half of MoE layers 0-3
)
def test_sara_loss_gradient_reaches_router_weights(family, layers, selected):
    model = make_model(family).train()
    anchor_ids, anchor_mask = batch(seed=1)
    target_ids, target_mask = batch(seed=2, seq=5)
    with torch.no_grad(), capture_router_logits(model, layers=layers) as anchor:
        model(input_ids=anchor_ids, attention_mask=anchor_mask)
    with capture_router_logits(model, layers=layers) as target:
        model(input_ids=target_ids, attention_mask=target_mask)
    loss = sara_loss(
        anchor_logits=anchor.logits,
        target_logits=target.logits,
        anchor_mask=anchor_mask,
        target_mask=target_mask,
        score=target.score,
        backend="reference",
    )
    loss.backward()
    assert loss.item() > 0
    assert target.layers == anchor.layers == selected
    for layer in selected:
        grad = router(model, layer, family).weight.grad
        assert grad is not None and grad.abs().sum() > 0
    assert router(model, 3, family).weight.grad is None  # after the last selected layer: untouched


# --------------------------------------------------------------------------------------------
# Training set-ups where the built-in capture fails
# --------------------------------------------------------------------------------------------


def test_gradient_checkpointing_non_reentrant_records_each_layer_once():
    reference = make_model("qwen3_moe").train()
    ids, mask = batch()
    with capture_router_logits(reference) as expected:
        reference(input_ids=ids, attention_mask=mask)

    model = make_model("qwen3_moe").train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    raw_calls = []
    model.model.layers[2].mlp.gate.register_forward_hook(lambda *args: raw_calls.append(1))
    with capture_router_logits(model) as captured:
        out = model(input_ids=ids, attention_mask=mask)
        (out.logits.sum() + sum(t.sum() for t in captured.logits)).backward()  # recomputes inside the block
    assert len(raw_calls) == 2  # the forward and the backward recomputation both ran the router
    assert captured.layers == (1, 2, 3)
    assert all(t.requires_grad for t in captured.logits)
    assert all(torch.equal(a, b) for a, b in zip(captured.logits, expected.logits))
    assert model.model.layers[2].mlp.gate.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_reentrant_is_refused_unless_no_grad():
    model = make_model("qwen3_moe").train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    ids, mask = batch()
    before = hook_count(model)
    with pytest.raises(RuntimeError, match="use_reentrant=True"):
        with capture_router_logits(model):
            model(input_ids=ids, attention_mask=mask)
    assert hook_count(model) == before
    with torch.no_grad(), capture_router_logits(model) as anchor:  # an anchor pass needs no gradient
        model(input_ids=ids, attention_mask=mask)
    assert anchor.layers == (1, 2, 3)


def test_fsdp2_sharded_inner_model():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from torch.distributed.fsdp import fully_shard

    model = make_model("qwen3_moe").train()
    ids, mask = batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, output_router_logits=True).router_logits
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        fully_shard(model.model)
        assert type(model.model).__name__ == "FSDPQwen3MoeModel"
        # transformers' name-keyed capture loses the routers under FSDP2 ...
        assert model(input_ids=ids, attention_mask=mask, output_router_logits=True).router_logits is None
        # ... the hooks on the router modules do not.
        with capture_router_logits(model) as captured:
            model(input_ids=ids, attention_mask=mask)
        assert captured.layers == (1, 2, 3)
        assert all(torch.equal(a, b) for a, b in zip(captured.logits, expected))
        sum(t.sum() for t in captured.logits).backward()
        assert model.model.layers[3].mlp.gate.weight.grad is not None
    finally:
        dist.destroy_process_group()


def test_torch_compile_with_hooks_installed_before_compiling():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    ids, mask = batch()
    eager = make_model("qwen3_moe", num_hidden_layers=3)
    with torch.no_grad():
        expected = eager(input_ids=ids, attention_mask=mask, output_router_logits=True).router_logits

    # Without install_router_hooks the capture would silently see nothing: refused.
    with pytest.raises(RuntimeError, match="install_router_hooks"):
        capture_router_logits(torch.compile(eager, backend="eager"))

    model = make_model("qwen3_moe", num_hidden_layers=3)
    hooks = install_router_hooks(model)
    # Dynamo traces the hooks, whatever the backend: "eager" keeps the test fast (aot_eager and
    # inductor give the same records and gradients, but take 5-60 s more on CPU).
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter)
    compiled(input_ids=ids, attention_mask=mask)  # compiled while inactive
    for _ in range(2):
        with capture_router_logits(compiled) as captured:
            compiled(input_ids=ids, attention_mask=mask)
        compiled(input_ids=ids, attention_mask=mask)  # inactive again: nothing recorded
        assert captured.layers == (1, 2)
        assert all(torch.equal(a, b) for a, b in zip(captured.logits, expected))
        assert all(t.requires_grad for t in captured.logits)
    assert counter.frame_count == 2  # one graph per flag value, no recompile per block
    with capture_router_logits(compiled) as twice:  # the hook skips its checks in compiled code ...
        compiled(input_ids=ids, attention_mask=mask)
        compiled(input_ids=ids, attention_mask=mask)
    with pytest.raises(RuntimeError, match="ran twice"):  # ... reading the result catches it
        twice.logits
    sum(t.sum() for t in captured.logits).backward()
    assert model.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0

    with pytest.raises(RuntimeError, match="before torch.compile"):
        install_router_hooks(torch.compile(make_model("qwen3_moe", num_hidden_layers=3), backend="eager"))
    hooks.remove()
    assert hook_count(model) == 0
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# MoE modules outside transformers: routers named explicitly
# --------------------------------------------------------------------------------------------


class ToyRouter(nn.Linear):
    """Returns (logits, top-1 index), like most routers; ``bare`` returns the logits alone, ``3-D`` keeps [B, S, E]."""

    def __init__(self, bare: bool = False, flatten: bool = True):
        super().__init__(8, E)
        self.bare, self.flatten = bare, flatten

    def forward(self, x):
        logits = super().forward(x.reshape(-1, 8) if self.flatten else x)
        return logits if self.bare else (logits, logits.argmax(-1))


class ToyBlock(nn.Module):
    def __init__(self, moe: bool, **router_kwargs):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.router = ToyRouter(**router_kwargs) if moe else None

    def forward(self, x):
        if self.router is not None:
            out = self.router(x)
            logits = out if self.router.bare else out[0]
            x = x + logits.reshape(*x.shape[:-1], E).softmax(-1).sum(-1, keepdim=True)
        return self.proj(x)


class ToyMoE(nn.Module):
    def __init__(self, **router_kwargs):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(ToyBlock(moe=i % 2 == 1, **router_kwargs) for i in range(4))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class ToyUnnumbered(nn.Module):
    def __init__(self):
        super().__init__()
        self.early = ToyBlock(moe=True, bare=True)
        self.late = ToyBlock(moe=True, bare=True)

    def forward(self, x):
        return self.late(self.early(x))


def toy_input():
    return torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))


def toy_router_outputs(model: ToyMoE, x):
    """What each router of ``model`` returns in ``model(x)``, recomputed block by block."""
    outputs = {}
    for i, block in enumerate(model.blocks):
        if block.router is not None:
            outputs[i] = block.router(x)
        x = block(x)
    return outputs


@pytest.mark.parametrize(
    "routers",
    [ToyRouter, r"blocks\.\d+\.router", "list"],
    ids=["class", "regex", "modules"],
)
def test_explicit_routers(routers):
    model = ToyMoE()
    if routers == "list":
        routers = [model.blocks[3].router, model.blocks[1].router]
    x = toy_input()
    with capture_router_logits(model, routers=routers, output_index=0) as captured:
        model(x)
    assert captured.layers == (1, 3)  # parsed from blocks.<i>.router
    assert captured.score == "softmax"
    expected = [out[0] for out in toy_router_outputs(model, x).values()]
    assert all(torch.equal(a, b) for a, b in zip(captured.logits, expected))
    assert hook_count(model) == 0


def test_explicit_routers_output_forms():
    x = toy_input()
    bare = ToyMoE(bare=True)
    with capture_router_logits(bare, routers=ToyRouter, output_index=None) as captured:
        bare(x)
    assert [t.shape for t in captured.logits] == [(6, E), (6, E)]
    with pytest.raises(TypeError, match="output_index=None"):
        with capture_router_logits(bare, routers=ToyRouter, output_index=0):
            bare(x)

    three_d = ToyMoE(bare=True, flatten=False)
    with capture_router_logits(three_d, routers=ToyRouter) as captured:
        three_d(x)
    assert [t.shape for t in captured.logits] == [(6, E), (6, E)]  # [B, S, E] -> [N, E], rows b*S + s
    assert torch.equal(captured.logits[1], toy_router_outputs(three_d, x)[3].reshape(6, E))


def test_explicit_routers_without_layer_numbers_use_order_of_appearance():
    model = ToyUnnumbered()
    with capture_router_logits(model, routers=ToyRouter) as by_class:
        model(toy_input())
    assert by_class.layers == (0, 1) and by_class.names == ("early.router", "late.router")
    with capture_router_logits(model, routers=[model.late.router, model.early.router]) as by_list:
        model(toy_input())
    assert by_list.layers == (0, 1) and by_list.names == ("late.router", "early.router")


def test_explicit_router_errors():
    model = ToyMoE()
    with pytest.raises(ValueError, match=re.escape("has no module path matching (re.fullmatch) 'router'")):
        capture_router_logits(model, routers="router")  # full match: 'blocks.1.router' is not 'router'
    with pytest.raises(ValueError, match="not submodules"):
        capture_router_logits(model, routers=[ToyRouter()])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        capture_router_logits(model, routers="blocks[")
    with pytest.raises(ValueError, match="has no module of class Embedding"):
        capture_router_logits(model, routers=nn.Embedding)


def test_composite_model_uses_its_text_model_recorder():
    from transformers import AutoModelForImageTextToText

    text = {**COMMON, **FAMILIES["qwen3_moe"][0], "num_hidden_layers": 2, "mlp_only_layers": []}
    config = AutoConfig.for_model(
        "qwen3_vl_moe",
        text_config=text,
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
    )
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).eval()
    ids, mask = batch()
    with torch.no_grad(), capture_router_logits(model) as captured:
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    assert captured.names == ("model.language_model.layers.0.mlp.gate", "model.language_model.layers.1.mlp.gate")
    assert captured.layers == (0, 1)
    assert all(torch.equal(a, b) for a, b in zip(captured.logits, out.router_logits))


def test_find_routers_reports_what_will_be_hooked():
    infos = find_routers(cached_model("gpt_oss"))
    expected = [(f"model.layers.{i}.mlp.router", i, 0) for i in range(4)]
    assert [(r.name, r.layer, r.output_index) for r in infos] == expected


def test_normal_path_is_quiet(caplog, recwarn):
    model = cached_model("qwen2_moe")
    ids, _ = batch()
    with caplog.at_level(logging.INFO, logger="sara_kernels"):
        with capture_router_logits(model) as captured:
            model(input_ids=ids)
    assert captured.layers == (1, 3)
    assert not [r for r in caplog.records if r.name.startswith("sara_kernels")]
    assert not [w for w in recwarn if "sara_kernels" in str(w.filename)]


def test_layer_index_ignores_numbers_in_a_wrapper_path():
    """A wrapper holding the transformers model in a list puts a number before ``model.layers.<i>``."""

    class Ensemble(nn.Module):
        def __init__(self, member):
            super().__init__()
            self.members = nn.ModuleList([member])

        def forward(self, **kwargs):
            return self.members[0](**kwargs)

    model = cached_model("qwen3_moe")
    wrapped = Ensemble(model)
    ids, mask = batch()
    with torch.no_grad():
        builtin = model(input_ids=ids, attention_mask=mask, output_router_logits=True).router_logits
        with capture_router_logits(wrapped) as captured:
            wrapped(input_ids=ids, attention_mask=mask)
    assert captured.names == tuple(f"members.0.model.layers.{i}.mlp.gate" for i in (1, 2, 3))
    assert captured.layers == (1, 2, 3)
    assert all(torch.equal(a, b) for a, b in zip(captured.logits, builtin))
    assert [r.layer for r in find_routers(wrapped)] == [1, 2, 3]


def test_install_router_hooks_does_not_keep_the_model_alive():
    import gc
    import weakref

    model = ToyMoE()
    hooks = install_router_hooks(model, routers=ToyRouter)
    assert hooks.model is model
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
    assert hooks.model is None
    hooks.remove()  # still safe once the model is gone
