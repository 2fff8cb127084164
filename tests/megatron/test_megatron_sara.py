"""sara_kernels.megatron on the real megatron-core (CPU, one gloo process): a GPTModel with SARA in
its spec attaches sara_weight * sara_loss of the captured pre-top-k logits (value and gradients of
every parameter), for live anchors and cached priors, padded and packed micro-batches, under
Megatron's micro-batch schedule; priors extraction; the spec transform; bad input."""

from __future__ import annotations

import functools
import threading

import pytest
import torch
import torch.distributed as dist

from megatron_model import (
    EXPERTS,
    MAX_LEN,
    RecordingRouter,
    expected_sara_padded,
    grads_of,
    init_parallel,
    parallel_state,
    clean_forward,
    cpu_rng_for_recomputation,
    cpu_token_counter,
    random_batch,
    reset_megatron_state,
    routers,
    sara_layers,
    sara_only_backward,
    tiny_config,
    tiny_model,
    tracked_sara,
    VOCAB,
    answered_columns,
    greedy_continuation,
    reproduced_by_hand,
)
from megatron_cpu import with_sdpa_attention

from helpers import free_port
from hf_train_helpers import one_thread
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_gpt_mtp_block_spec
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec
from sara_kernels import sara_loss
from sara_kernels.hf import RoutingPriors, capture_router_logits, load_routing_priors
from sara_kernels.testing import LOSS_TOL, assert_grads_close
from sara_kernels.megatron import TRACKER_NAME, SARAOptions, SARARouter, extract_routing_priors, sara_batch, with_sara

_single_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module", autouse=True)
def gloo_world_of_one():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    init_parallel()
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.fixture(autouse=True)
def fresh_megatron_state():
    reset_megatron_state()
    yield
    reset_megatron_state()


def moe_router(layer_spec):
    """The router entry of a layer spec's MoE layer: its ``mlp`` is a ModuleSpec in megatron-core 0.16,
    ``functools.partial(MoELayer, submodules=...)`` in 0.19."""
    mlp = layer_spec.submodules.mlp
    return (mlp.keywords["submodules"] if isinstance(mlp, functools.partial) else mlp.submodules).router


def assert_grads_equal(model, output, expected_loss):
    """Backward of ``output`` with the LM loss weighted 0 gives every parameter the gradient of
    ``expected_loss`` (built on a clean_forward's logits)."""
    expected = torch.autograd.grad(expected_loss, list(model.parameters()), allow_unused=True)
    sara_only_backward(output)
    got = grads_of(model)
    for (name, _), want in zip(model.named_parameters(), expected):
        want = torch.zeros_like(got[name]) if want is None else want.float()
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
    return got


@pytest.mark.parametrize("score, divergence", [("softmax", "js"), ("sigmoid", "js"), ("softmax", "reverse_kl")])
def test_live_anchors_padded_loss_and_every_gradient_equal_sara_loss(score, divergence):
    """Also ``sara_divergence`` through with_sara's SARAOptions: the tracked per-layer values and
    every gradient are those of sara_loss with that divergence."""
    layer_weights = [0.3, 1.2] if score == "sigmoid" else None
    model = tiny_model(moe_router_score_function=score, layer_weights=layer_weights, divergence=divergence)
    assert [r.sara_layer for r in routers(model)] == [None, 1, 2, None]  # "middle" of 4 MoE layers
    tokens, positions, padding = random_batch(6, 9, seed=1)
    anchor, target = [0, 4, 2], [3, 1, 5]
    with sara_batch(anchor=anchor, target=target):
        output = model(tokens, positions, None, labels=tokens, padding_mask=padding)
    tracked = tracked_sara(model).clone()
    clean_forward(model, tokens, positions, None, padding_mask=padding)
    expected, per_layer = expected_sara_padded(model, padding, anchor=anchor, target=target)
    assert expected.item() > 1e-6  # random routers: the anchors' routing differs from the targets'
    got = assert_grads_equal(model, output, expected)
    # SARA's gradient reaches the routers of the aligned layers and everything below them.
    for router in sara_layers(model):
        assert got[f"decoder.layers.{router.layer_number - 1}.mlp.router.weight"].abs().sum() > 0
    assert got["decoder.layers.3.mlp.router.weight"].abs().sum() == 0  # above the last SARA layer
    torch.testing.assert_close(tracked, per_layer.float(), **LOSS_TOL)


def test_per_token_loss_scales_by_the_local_valid_tokens_as_megatrons_aux_losses():
    # With calculate_per_token_loss Megatron divides every gradient by the global token count, so its
    # routers multiply aux losses by the micro-batch's valid tokens; SARA follows the same rule.
    model = tiny_model(seed=12, calculate_per_token_loss=True)
    tokens, positions, padding = random_batch(4, 6, seed=13)
    with sara_batch(anchor=[0, 1], target=[2, 3]):
        output = model(tokens, positions, None, labels=tokens, padding_mask=padding)
    clean_forward(model, tokens, positions, None, padding_mask=padding)
    expected, _ = expected_sara_padded(model, padding, anchor=[0, 1], target=[2, 3])
    assert 0 < int((~padding).sum()) < padding.numel()
    assert_grads_equal(model, output, expected * int((~padding).sum()))


def test_cached_priors_by_example_index_and_extraction(tmp_path):
    model = tiny_model(seed=2, layers="all")
    anchors = [torch.randint(0, 40, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 9, 3, 7, 6)]
    path = tmp_path / "priors.safetensors"
    priors = extract_routing_priors(model, anchors, path, batch_size=2)
    assert model.training  # restored
    assert priors.probs.shape == (5, 4, EXPERTS) and priors.layers == (0, 1, 2, 3)
    loaded = load_routing_priors(path)
    torch.testing.assert_close(loaded.probs, priors.probs)
    assert loaded.score == "softmax" and loaded.model_type == "megatron-core"
    # Anchor 1 alone, by a plain eval forward: its pooled routing is the file's row 1.
    model.eval()
    for r in routers(model):
        r.recorded.clear()
    with torch.no_grad():
        ids = torch.tensor([anchors[1]])
        model(ids, torch.arange(ids.shape[1])[None], None)
    pooled = torch.stack([torch.softmax(r.recorded[-1][:, 0].double(), -1).mean(0) for r in routers(model)])
    torch.testing.assert_close(priors.probs[1].double(), pooled, rtol=1e-5, atol=1e-7)

    model = tiny_model(seed=3, layers=[1, 3], priors=path)
    tokens, positions, padding = random_batch(3, 8, seed=4)
    example_index = torch.tensor([4, 0, 1])
    with sara_batch(example_index=example_index):
        output = model(tokens, positions, None, labels=tokens, padding_mask=padding)
    tracked = tracked_sara(model).clone()
    clean_forward(model, tokens, positions, None, padding_mask=padding)
    anchor_probs = loaded.gather(example_index, layers=[1, 3])
    expected, per_layer = expected_sara_padded(model, padding, anchor_probs=anchor_probs)
    assert_grads_equal(model, output, expected)
    torch.testing.assert_close(tracked, per_layer.float(), **LOSS_TOL)


def test_anchor_filter_correct_from_megatron_extraction_with_answer_masks(tmp_path):
    """extract_routing_priors(answer_masks=...) records anchor_correct by the greedy teacher-forced
    rule (against each anchor run alone, answers the model's own greedy continuation or that with one
    token changed); training with the file and sara_anchor_filter="correct" weights each pair by it."""
    model = tiny_model(seed=31, layers="all")
    g = torch.Generator().manual_seed(32)
    anchors, masks = [], []
    # (prompt length, answer length, answer token changed or None: the answer is the model's own)
    for prompt_len, answer_len, changed in [(4, 3, None), (7, 2, 1), (3, 4, None), (6, 3, 0), (5, 3, None), (2, 3, 2)]:
        ids = greedy_continuation(model, torch.randint(0, VOCAB, (prompt_len,), generator=g).tolist(), answer_len)
        if changed is not None:
            ids[prompt_len + changed] = (ids[prompt_len + changed] + 1) % VOCAB
        anchors.append(ids)
        masks.append([0] * prompt_len + [1] * answer_len)
    by_hand = [reproduced_by_hand(model, ids, mask) for ids, mask in zip(anchors, masks)]
    assert by_hand == [True, False, True, False, True, False]

    path = tmp_path / "priors.safetensors"
    priors = extract_routing_priors(model, anchors, path, batch_size=4, answer_masks=masks)  # two ragged batches
    assert priors.anchor_correct.tolist() == by_hand
    loaded = load_routing_priors(path)
    assert loaded.anchor_correct.tolist() == by_hand
    torch.testing.assert_close(loaded.probs, extract_routing_priors(model, anchors, tmp_path / "plain.safetensors").probs)

    model = tiny_model(seed=33, priors=path, anchor_filter="correct")
    tokens, positions, padding = random_batch(4, 8, seed=34)
    example_index = torch.tensor([5, 0, 3, 2])
    with sara_batch(example_index=example_index):
        output = model(tokens, positions, None, labels=tokens, padding_mask=padding)
    tracked = tracked_sara(model).clone()
    clean_forward(model, tokens, positions, None, padding_mask=padding)
    anchor_probs = loaded.gather(example_index, layers=[1, 2])
    kept = torch.tensor(by_hand, dtype=torch.float64)[example_index]  # [0, 1, 0, 1]
    expected, per_layer = expected_sara_padded(model, padding, anchor_probs=anchor_probs, pair_weights=kept)
    unfiltered, _ = expected_sara_padded(model, padding, anchor_probs=anchor_probs)
    assert abs(expected.item() - unfiltered.item()) > 0.05 * unfiltered.item()  # the filter changes what is checked
    assert_grads_equal(model, output, expected)
    torch.testing.assert_close(tracked, per_layer.float(), **LOSS_TOL)


def test_extraction_answer_masks_refusals(tmp_path):
    model = tiny_model(seed=35, layers="all")
    anchors = [[3, 4, 5], [6, 7]]
    path = tmp_path / "priors.safetensors"
    for masks, message in [([[0, 1, 1]], r"^answer_masks: expected one per anchor \(2\), got 1"),
                           ([[0, 1, 1], [0, 1, 0]], r"^answer_masks\[1\]: expected 2 entries of 0 or 1"),
                           ([[0, 2, 1], [0, 1]], r"^answer_masks\[0\]: expected 3 entries of 0 or 1"),
                           ([[1, 1, 1], [0, 1]], r"^answer_masks\[0\]: expected 1 on the answer tokens, at least one and not the first"),
                           ([[0, 1, 1], [0, 0]], r"^answer_masks\[1\]: expected 1 on the answer tokens")]:
        with pytest.raises(ValueError, match=message):
            extract_routing_priors(model, anchors, path, answer_masks=masks)
    masks = [[0, 1, 1], [0, 1]]
    model.vocab_size = 2 * VOCAB  # as a tensor-parallel rank's output layer without gather sees its shard
    with pytest.raises(ValueError, match=rf"^answer_masks: the model's logits cover {VOCAB} of its {2 * VOCAB} vocabulary"):
        extract_routing_priors(model, anchors, path, answer_masks=masks)
    model.vocab_size, model.post_process = VOCAB, False  # a pipeline stage before the last
    with pytest.raises(ValueError, match=r"^answer_masks: the model has no output layer"):
        extract_routing_priors(model, anchors, path, answer_masks=masks)
    assert not path.exists()


@pytest.mark.parametrize("anchors", ["live", "priors"])
@pytest.mark.parametrize("padded", [False, True])
def test_packed_sequences(padded, anchors):
    lengths = [4, 1, 6, 3]
    if anchors == "live":
        model = tiny_model(seed=5, layers=[2])
        anchor, target = [2, 0], [1, 3]
        layout = dict(anchor=anchor, target=target, pair_weights=torch.tensor([0.6, 1.8]))
    else:
        # Cached priors of 5 examples; the pack's 4 sequences are the targets (the default), each
        # paired with the prior of its example index.
        probs = torch.softmax(torch.randn(5, 1, EXPERTS, generator=torch.Generator().manual_seed(7)), -1)
        priors = RoutingPriors(probs=probs, layers=(2,), score="softmax", temperature=1.0)
        model = tiny_model(seed=5, layers=[2], priors=priors)
        example_index, target = torch.tensor([3, 0, 4, 3]), [0, 1, 2, 3]
        layout = dict(example_index=example_index, pair_weights=torch.tensor([1.0, 0.0, 2.5, 0.5]))
    starts = [0, 4, 5, 11] if not padded else [0, 6, 8, 16]  # padded: each sequence starts at its padded offset
    total = starts[-1] + lengths[-1] + (2 if padded else 0)
    cu = torch.tensor([0, 4, 5, 11, 14], dtype=torch.int32)
    cu_padded = torch.tensor(starts + [total], dtype=torch.int32) if padded else None
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_padded,
                             cu_seqlens_kv_padded=cu_padded, max_seqlen_q=6, max_seqlen_kv=6)
    tokens = torch.randint(0, 40, (1, total), generator=torch.Generator().manual_seed(6))
    positions = torch.cat([torch.arange(n) for n in [s1 - s0 for s0, s1 in zip(starts, starts[1:] + [total])]])[None]
    with sara_batch(**layout, packed_seq_params=params):
        output = model(tokens, positions, None, labels=tokens, packed_seq_params=params)
    tracked = tracked_sara(model).clone()
    clean_forward(model, tokens, positions, None, packed_seq_params=params)
    (router,) = sara_layers(model)
    flat = router.recorded[-1].double()[:, 0]  # [t, E]
    side = lambda seqs: torch.cat([flat[starts[i] : starts[i] + lengths[i]] for i in seqs])  # noqa: E731
    side_cu = lambda seqs: torch.tensor([0] + [lengths[i] for i in seqs]).cumsum(0)  # noqa: E731
    if anchors == "live":
        anchor_side = dict(anchor_logits=[side(anchor)], anchor_cu_seqlens=side_cu(anchor))
    else:
        anchor_side = dict(anchor_logits=None, anchor_probs=priors.gather(example_index).double())
    loss, per_layer = sara_loss(**anchor_side, target_logits=[side(target)], target_cu_seqlens=side_cu(target),
                                pair_weights=layout["pair_weights"].double(), backend="reference", return_per_layer=True)
    expected = router.sara.sara_weight * loss
    assert expected.item() > 1e-6
    assert_grads_equal(model, output, expected)
    torch.testing.assert_close(tracked, per_layer.float(), **LOSS_TOL)


@pytest.mark.parametrize("routers_arg", [None, TopKRouter, r"decoder\.layers\.\d+\.mlp\.router"])
def test_capture_refuses_megatrons_router_and_points_to_with_sara(routers_arg):
    # A plain GPTModel (Megatron's own TopKRouter): the forward-hook capture of the Hugging Face
    # path would see (probs, routing_map) after top-k, not logits, so it must refuse before any hook.
    spec = with_sdpa_attention(get_gpt_layer_local_spec(num_experts=EXPERTS))
    model = GPTModel(config=tiny_config(), transformer_layer_spec=spec, vocab_size=40, max_sequence_length=16)
    assert type(model.decoder.layers[0].mlp.router) is TopKRouter
    with pytest.raises(ValueError) as err:
        capture_router_logits(model, routers=routers_arg)
    message = str(err.value)
    assert "router 'decoder.layers.0.mlp.router' is a Megatron-core TopKRouter" in message
    assert "sara_kernels.megatron: with_sara(layer_spec, SARAOptions(sara_weight=...))" in message
    assert "sara_batch(" in message and "coeff" not in message and "\n" not in message
    # The message's with_sara call is the real signature: it accepts the model's spec.
    assert moe_router(with_sara(spec, SARAOptions(sara_weight=0.1))).func is SARARouter
    assert not any(module._forward_hooks for module in model.modules())


def test_megatrons_track_moe_metrics_logs_sara_next_to_load_balancing_loss():
    # What Megatron's training log does once per step: reduce the names in track_names across
    # ranks and put each tracked loss, summed over layers / number of MoE layers, in total_loss_dict.
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker, track_moe_metrics

    model = tiny_model(seed=14, moe_aux_loss_coeff=0.01)
    tokens, positions, padding = random_batch(4, 6, seed=15)
    with sara_batch(anchor=[0, 1], target=[2, 3]):
        output = model(tokens, positions, None, labels=tokens, padding_mask=padding)
    sara_only_backward(output)
    clean_forward(model, tokens, positions, None, padding_mask=padding)
    _, per_layer = expected_sara_padded(model, padding, anchor=[0, 1], target=[2, 3])
    config, total_loss_dict = model.config, {}
    track_moe_metrics(loss_scale=1.0, iteration=1, total_loss_dict=total_loss_dict,
                      track_names=["load_balancing_loss", TRACKER_NAME], num_layers=config.num_layers,
                      moe_layer_freq=config.moe_layer_freq, mtp_num_layers=config.mtp_num_layers)
    assert TRACKER_NAME == "sara_loss" and set(total_loss_dict) == {"load_balancing_loss", TRACKER_NAME}
    assert total_loss_dict["load_balancing_loss"] > 0
    # Megatron's mean over MoE layers counts every MoE layer (4), SARA's or not.
    torch.testing.assert_close(total_loss_dict[TRACKER_NAME], per_layer.sum().float() / len(routers(model)),
                               **LOSS_TOL)
    assert per_layer.sum() > 1e-6
    assert not get_moe_layer_wise_logging_tracker()[TRACKER_NAME]["values"].any()  # cleared for the next step


def _forward_step(batches, data_iterator, model, layouts=None, unpadded=False):
    index = next(data_iterator)
    tokens, positions, padding = batches[index]
    layout = layouts[index] if layouts else dict(anchor=[0, 1], target=[2, 3])
    with sara_batch(**layout, unpadded=unpadded):
        output = model(tokens, positions, None, labels=tokens, padding_mask=padding)
    # The LM loss weighted 0: the gradients are SARA's, scaled by the schedule.
    return output, lambda out: (out.float().sum() * 0.0, {"lm": out.detach().float().mean()})


def test_micro_batch_scale_is_megatrons_aux_loss_rule():
    # forward_backward_no_pipelining is a loop of these two over the micro-batches; it cannot run
    # on a CPU only because it allocates its token counter with device="cuda".
    from megatron.core.pipeline_parallel.schedules import backward_step, forward_step
    from megatron_sara import BACKWARD_STEP_MODEL_TYPE

    num_micro_batches = 3
    batches = [random_batch(4, 7, seed=10 + i) for i in range(num_micro_batches)]
    model = tiny_model(seed=7)
    data = iter(range(num_micro_batches))
    for i in range(num_micro_batches):
        output, _ = forward_step(
            functools.partial(_forward_step, batches), data, model, num_micro_batches, None, [], model.config,
            cp_group_size=1, is_first_microbatch=i == 0, current_microbatch=i,
        )
        # the schedule's rule: aux losses are scaled by loss_scale * cp / num_micro_batches
        assert float(MoEAuxLossAutoScaler.main_loss_backward_scale) == pytest.approx(1.0 / num_micro_batches)
        backward_step(None, output, None, *BACKWARD_STEP_MODEL_TYPE, model.config)
    scheduled = grads_of(model)
    # The tracker sums the micro-batches (Megatron's logging then multiplies by 1 / num_micro_batches).
    tracked = tracked_sara(model).clone()
    expected_loss, expected_tracked = 0.0, 0.0
    for tokens, positions, padding in batches:
        clean_forward(model, tokens, positions, None, padding_mask=padding)
        loss, per_layer = expected_sara_padded(model, padding, anchor=[0, 1], target=[2, 3])
        expected_loss, expected_tracked = expected_loss + loss, expected_tracked + per_layer
    params = list(model.parameters())
    expected = torch.autograd.grad(expected_loss / num_micro_batches, params, allow_unused=True)
    for (name, p), want in zip(model.named_parameters(), expected):
        want = torch.zeros_like(p) if want is None else want.float()
        torch.testing.assert_close(scheduled[name], want, rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert any(g.abs().sum() > 0 for g in scheduled.values())
    torch.testing.assert_close(tracked, expected_tracked.float(), **LOSS_TOL)


# Activation recomputation of the MoE layers, the three ways Megatron runs it. With the "block"
# method and 2 layers, decoder layers 0-1 are recomputed and 2-3 are not: SARA's layers 1 and 2
# ("middle") are one of each. megatron-core 0.16.1 calls the layers it does not recompute without
# padding_mask, so "block" runs on unpadded micro-batches (a padded one is refused, tested below).
RECOMPUTE = {
    "full-uniform": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full-block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
    "selective-moe": dict(recompute_granularity="selective", recompute_modules=["moe"]),
}


def _scheduled_step(schedule: str, num_micro_batches: int, padded: bool = True, **config_overrides):
    """(every gradient, the tracked per-layer values, the logged LM losses) of one step of the LM
    loss weighted 0 (SARA's gradient alone) through Megatron's schedule code: ``"no_pipelining"``
    is megatron-core's forward_backward_no_pipelining (forward and backward of each micro-batch in
    turn); ``"all_in_flight"`` runs every micro-batch's forward_step, then their backward_steps in
    the same order, as the pipelined schedules do with micro-batches in flight."""
    from megatron.core.pipeline_parallel.schedules import backward_step, forward_backward_no_pipelining, forward_step
    from megatron_sara import BACKWARD_STEP_MODEL_TYPE

    reset_megatron_state()
    batches = [random_batch(4, 7, seed=10 + i, lengths=None if padded else [7] * 4) for i in range(num_micro_batches)]
    model = tiny_model(seed=7, **config_overrides)
    # A layout per micro-batch: a recomputation given another micro-batch's changes the gradient;
    # the queued sara_batch carries its pair_weights to the recomputation.
    layouts = [dict(anchor=[0, 1], target=[2, 3], pair_weights=[0.3, 1.6]), dict(anchor=[3, 0], target=[1, 2]),
               dict(anchor=[2], target=[1])]
    step_func = functools.partial(_forward_step, batches, layouts=layouts[:num_micro_batches], unpadded=not padded)
    data = iter(range(num_micro_batches))
    store = []
    if schedule == "no_pipelining":
        with cpu_token_counter():
            store = forward_backward_no_pipelining(forward_step_func=step_func, data_iterator=data, model=model,
                                                   num_microbatches=num_micro_batches, seq_length=7, micro_batch_size=4)
    else:
        outputs = [forward_step(step_func, data, model, num_micro_batches, None, store, model.config, cp_group_size=1,
                                is_first_microbatch=i == 0, current_microbatch=i)[0] for i in range(num_micro_batches)]
        for output in outputs:
            backward_step(None, output, None, *BACKWARD_STEP_MODEL_TYPE, model.config)
    return grads_of(model), tracked_sara(model).clone(), torch.stack([entry["lm"] for entry in store])


@pytest.mark.parametrize("schedule", ["no_pipelining", "all_in_flight"])
@pytest.mark.parametrize("recompute", list(RECOMPUTE))
def test_recompute_of_moe_layers_equals_the_run_without(recompute, schedule):
    padded = recompute != "full-block"
    plain_grads, plain_tracked, plain_lm = _scheduled_step(schedule, 3, padded)
    with cpu_rng_for_recomputation():
        grads, tracked, lm = _scheduled_step(schedule, 3, padded, **RECOMPUTE[recompute])
    # The term is attached exactly once per micro-batch, in the recomputation: zero or twice would
    # change the gradient, and the tracker would hold no value or a doubled one.
    for name, want in plain_grads.items():  # float32 both: the order of gradient accumulation may differ
        assert_grads_close(grads[name], want, torch.float32)
    assert plain_grads["decoder.layers.1.mlp.router.weight"].abs().sum() > 0
    assert plain_grads["decoder.layers.2.mlp.router.weight"].abs().sum() > 0
    assert plain_tracked.min() > 1e-6
    torch.testing.assert_close(tracked, plain_tracked, **LOSS_TOL)
    torch.testing.assert_close(lm, plain_lm)


def test_recompute_without_sara_batch_and_out_of_order_backward_are_refused():
    with cpu_rng_for_recomputation():
        with pytest.raises(ValueError, match="layer 2 got no padding_mask"):  # megatron-core 0.16.1 drops it there
            _scheduled_step("all_in_flight", 1, **RECOMPUTE["full-block"])
        model = tiny_model(seed=7, **RECOMPUTE["selective-moe"])
        tokens, positions, padding = random_batch(4, 7, seed=3)
        output = model(tokens, positions, None, labels=tokens, padding_mask=padding)  # no sara_batch
        with pytest.raises(RuntimeError, match="layer 2 was recomputed in backward, but no checkpointed forward"):
            sara_only_backward(output)
        # Two micro-batches of different shapes, backward in the reverse order of their forwards.
        outputs = []
        for num_seqs in (4, 6):
            tokens, positions, padding = random_batch(num_seqs, 7, seed=num_seqs)
            with sara_batch(anchor=[0, 1], target=[2, 3]):
                outputs.append(model(tokens, positions, None, labels=tokens, padding_mask=padding))
        with pytest.raises(RuntimeError, match=r"recomputed logits \(7, 6, 6\) are not those of the oldest"):
            sara_only_backward(outputs[1])


def test_forgotten_padding_mask_is_refused_unless_the_micro_batch_is_unpadded():
    model = tiny_model(seed=16)
    tokens, positions, padding = random_batch(4, 6, seed=17)
    with pytest.raises(ValueError, match="layer 1 got no padding_mask, so SARA would pool over padding: pass "
                                         r"padding_mask=.* or sara_batch\(..., unpadded=True\)"):
        with sara_batch(anchor=[0, 1], target=[2, 3]):
            model(tokens, positions, None, labels=tokens)
    # Said unpadded: pooled over every position, as with an all-False padding_mask.
    full = torch.zeros_like(padding)
    with sara_batch(anchor=[0, 1], target=[2, 3], unpadded=True):
        output = model(tokens, positions, None, labels=tokens)
    clean_forward(model, tokens, positions, None, padding_mask=full)
    expected, _ = expected_sara_padded(model, full, anchor=[0, 1], target=[2, 3])
    assert expected.item() > 1e-6
    assert_grads_equal(model, output, expected)
    with pytest.raises(TypeError, match="sara_batch unpadded: expected True or False"):
        sara_batch(anchor=[0], target=[1], unpadded="yes")


def test_multi_token_prediction_layers_get_no_sara():
    """SARA's layers are decoder layers: the routers of a multi-token-prediction block built from the
    same spec add nothing, whether megatron-core numbers them after the decoder's (0.16) or from 1
    with is_mtp_layer set (0.19)."""
    options = SARAOptions(sara_weight=0.5, sara_layers="all")
    spec = with_sara(with_sdpa_attention(get_gpt_layer_local_spec(num_experts=EXPERTS)), options,
                     router_class=RecordingRouter)
    config = tiny_config(mtp_num_layers=1)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=MAX_LEN,
                     position_embedding_type="learned_absolute",
                     mtp_block_spec=get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False))
    mtp_routers = [m for name, m in model.named_modules() if name.startswith("mtp.") and isinstance(m, SARARouter)]
    assert len(mtp_routers) == 1 and mtp_routers[0].sara_layer is None
    assert [r.sara_layer for r in routers(model)] == list(range(config.num_layers))


def test_eval_and_no_grad_route_without_sara_batch_and_training_needs_one():
    model = tiny_model(seed=8)
    tokens, positions, padding = random_batch(2, 5, seed=9)
    with torch.no_grad():
        model(tokens, positions, None)
    model.eval()
    model(tokens, positions, None)
    model.train()
    with pytest.raises(RuntimeError, match=r"layer 1 ran in training without a sara_batch"):
        model(tokens, positions, None)


def test_sara_batch_rejects_bad_layouts():
    with pytest.raises(ValueError, match="exactly one of anchor= .* and example_index="):
        sara_batch(target=[0])
    with pytest.raises(ValueError, match="anchor= needs target="):
        sara_batch(anchor=[0])
    with pytest.raises(ValueError, match="anchor has 2 entries but target has 1"):
        sara_batch(anchor=[0, 1], target=[2])
    with pytest.raises(ValueError, match="example_index: expected a non-empty 1-D sequence of integer"):
        sara_batch(example_index=[0.5])
    # Open blocks belong to their thread: another thread's model call sees none of them.
    outer, inner = sara_batch(anchor=[0], target=[1]), sara_batch(anchor=[1], target=[0])
    with outer:
        with inner:
            assert sara_batch.current() is inner
            seen = []
            thread = threading.Thread(target=lambda: seen.append(sara_batch.opened()))
            thread.start()
            thread.join()
            assert seen == [None]
            with pytest.raises(RuntimeError, match="this block is already open"):
                with outer:
                    pass
        assert sara_batch.current() is outer
    assert sara_batch.opened() is None
    model = tiny_model(seed=8)
    tokens, positions, padding = random_batch(2, 5, seed=9)
    with pytest.raises(ValueError, match=r"target: indices must lie in \[0, 2\)"):
        with sara_batch(anchor=[0], target=[2]):
            model(tokens, positions, None, padding_mask=padding)
    with pytest.raises(ValueError, match="needs cached priors"):
        with sara_batch(example_index=[0, 1]):
            model(tokens, positions, None, padding_mask=padding)


def test_spec_transform_shapes_and_refusals():
    spec = get_gpt_layer_local_spec(num_experts=EXPERTS)
    options = SARAOptions(sara_weight=0.1, sara_layers="middle")
    sara_spec = with_sara(spec, options)
    builder = moe_router(sara_spec)
    assert builder.func is SARARouter and builder.keywords["sara"] is options and builder.keywords["priors"] is None
    assert moe_router(spec) is TopKRouter  # the input spec is not modified
    # megatron-core 0.19 builds the MoE layer as functools.partial(MoELayer, submodules=...).
    partial_spec = functools.partial(MoELayer, submodules=MoESubmodules(experts=None, router=TopKRouter))
    blocks = with_sara([partial_spec, get_gpt_layer_local_spec()], options, router_class=RecordingRouter)
    assert blocks[0].func is MoELayer and blocks[0].keywords["submodules"].router.func is RecordingRouter
    # experts= given: 0.19's MoESubmodules requires it (0.16 defaults it to None).
    moe_submodules = MoESubmodules(experts=None, router=ModuleSpec(module=TopKRouter))
    as_spec = with_sara(ModuleSpec(module=MoELayer, submodules=moe_submodules), options)
    assert as_spec.submodules.router.func is SARARouter
    with pytest.raises(ValueError, match="has no MoELayer"):
        with_sara(get_gpt_layer_local_spec(), options)
    with pytest.raises(ValueError, match="applied twice"):
        with_sara(sara_spec, options)
    with pytest.raises(TypeError, match="options: expected sara_kernels.term.SARAOptions"):
        with_sara(spec, {"sara_weight": 0.1})
    with pytest.raises(TypeError, match="router_class: expected a subclass of SARARouter"):
        with_sara(spec, options, router_class=TopKRouter)
    with pytest.raises(ValueError, match=r"\[7\] are not MoE layers"):
        tiny_model(layers=[1, 7])
    with pytest.raises(ValueError, match="sara_layer_weights has 1 weights but"):
        tiny_model(layers="middle", layer_weights=[1.0])
    priors = RoutingPriors(probs=torch.full((2, 1, EXPERTS + 1), 1.0 / (EXPERTS + 1)), layers=(1,), score="softmax",
                           temperature=1.0)
    with pytest.raises(ValueError, match="E = 7 experts"):
        tiny_model(layers=[1], priors=priors)
    sigmoid_spec = with_sara(with_sdpa_attention(spec), SARAOptions(sara_score="sigmoid"), router_class=RecordingRouter)
    with pytest.raises(ValueError, match="SARA follows the router"):  # checked when the routers are built
        GPTModel(config=tiny_config(), transformer_layer_spec=sigmoid_spec, vocab_size=40, max_sequence_length=16)


def test_an_empty_micro_batch_side_is_a_clear_error():
    """No sequence in the micro-batch (no column, or a pack of none) leaves the targets of cached
    priors empty: refused naming the example indices it cannot pair."""
    message = "^sara_batch: example_index has 2 entries but the micro-batch has 0 target sequences"
    with pytest.raises(ValueError, match=message):
        sara_batch(example_index=[3, 4]).columns("target", 0, "cpu")
    empty_pack = PackedSeqParams(qkv_format="thd", cu_seqlens_q=torch.zeros(1, dtype=torch.int32),
                                 cu_seqlens_kv=torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match=message):
        sara_batch(example_index=[3, 4], packed_seq_params=empty_pack).packed_side("target", 0, "cpu")


def test_pair_weights_live_anchors_loss_gradients_and_a_zero_weight_micro_batch():
    """sara_batch(pair_weights=...) is sara_loss's π: value (tracked) and every gradient against
    the float64 reference with the same weights; a micro-batch whose weights are all 0 adds 0 and
    no gradient."""
    model = tiny_model(seed=21)
    tokens, positions, padding = random_batch(6, 9, seed=22)
    anchor, target, weights = [0, 4, 2], [3, 1, 5], torch.tensor([0.25, 0.0, 1.75])
    with sara_batch(anchor=anchor, target=target, pair_weights=weights):
        output = model(tokens, positions, None, labels=tokens, padding_mask=padding)
    tracked = tracked_sara(model).clone()
    clean_forward(model, tokens, positions, None, padding_mask=padding)
    expected, per_layer = expected_sara_padded(model, padding, anchor=anchor, target=target, pair_weights=weights)
    unweighted, _ = expected_sara_padded(model, padding, anchor=anchor, target=target)
    assert abs(expected.item() - unweighted.item()) > 1e-4  # the weights change the value this test checks
    assert_grads_equal(model, output, expected)
    torch.testing.assert_close(tracked, per_layer.float(), **LOSS_TOL)

    model.zero_grad(set_to_none=True)
    reset_megatron_state()
    with sara_batch(anchor=anchor, target=target, pair_weights=[0.0, 0.0, 0.0]):
        output = model(tokens, positions, None, labels=tokens, padding_mask=padding)
    assert not tracked_sara(model).any()
    sara_only_backward(output)
    assert all(not g.any() for g in grads_of(model).values())


def _priors_with_answers(num_examples: int, layers, anchor_correct, seed: int) -> RoutingPriors:
    probs = torch.softmax(torch.randn(num_examples, len(layers), EXPERTS, generator=torch.Generator().manual_seed(seed)), -1)
    return RoutingPriors(probs=probs, layers=tuple(layers), score="softmax", temperature=1.0,
                         anchor_correct=torch.tensor(anchor_correct, dtype=torch.bool))


def test_anchor_filter_correct_with_cached_priors_weights_logging_and_nothing_kept():
    """sara_anchor_filter="correct": π_b = the priors' anchor_correct[example_index] (times the
    user's pair_weights); value and every gradient against the reference with those weights;
    sara_anchor_kept logged by Megatron's track_moe_metrics as the kept fraction."""
    from megatron.core.transformer.moe.moe_utils import track_moe_metrics

    from sara_kernels.megatron import KEPT_TRACKER_NAME

    correct = [True, False, True, True, False, True]
    priors = _priors_with_answers(6, [1, 2], correct, seed=23)
    model = tiny_model(seed=24, priors=priors, anchor_filter="correct")
    tokens, positions, padding = random_batch(4, 8, seed=25)
    example_index, user_weights = torch.tensor([5, 1, 2, 3]), torch.tensor([1.5, 2.0, 0.5, 1.0])
    with sara_batch(example_index=example_index, pair_weights=user_weights):
        output = model(tokens, positions, None, labels=tokens, padding_mask=padding)
    tracked = tracked_sara(model).clone()
    config, logged = model.config, {}
    track_moe_metrics(loss_scale=1.0, iteration=1, total_loss_dict=logged, track_names=[TRACKER_NAME, KEPT_TRACKER_NAME],
                      num_layers=config.num_layers, moe_layer_freq=config.moe_layer_freq)
    clean_forward(model, tokens, positions, None, padding_mask=padding)
    kept = torch.tensor(correct, dtype=torch.float64)[example_index]  # [1, 0, 1, 1]
    expected, per_layer = expected_sara_padded(model, padding, anchor_probs=priors.gather(example_index),
                                               pair_weights=kept * user_weights)
    assert_grads_equal(model, output, expected)
    torch.testing.assert_close(tracked, per_layer.float(), **LOSS_TOL)
    torch.testing.assert_close(logged[KEPT_TRACKER_NAME], torch.tensor(0.75), **LOSS_TOL)

    model.zero_grad(set_to_none=True)
    reset_megatron_state()
    with sara_batch(example_index=[1, 4]):  # no anchor answered: nothing left to align
        output = model(tokens[:2], positions[:2], None, labels=tokens[:2], padding_mask=padding[:2])
    assert not tracked_sara(model).any()
    sara_only_backward(output)
    assert all(not g.any() for g in grads_of(model).values())


def test_anchor_filter_and_pair_weights_refusals():
    priors = _priors_with_answers(3, [1, 2], [True, False, True], seed=26)
    no_answers = RoutingPriors(probs=priors.probs, layers=priors.layers, score="softmax", temperature=1.0)
    with pytest.raises(ValueError, match="priors --anchor_answers"):
        tiny_model(priors=no_answers, anchor_filter="correct")
    with pytest.raises(ValueError, match="correct_anchor_wrong_target' with cached priors is not supported"):
        tiny_model(priors=priors, anchor_filter="correct_anchor_wrong_target")
    for bad, message in [([1.0, 2.0], r"expected shape \[B\] = \[3\]"), ([1.0, -1.0, 0.0], r"pair_weights\[1\] = -1"),
                         ([1.0, float("nan"), 0.0], r"pair_weights\[1\] = nan"), (torch.ones(3, dtype=torch.long), "floating")]:
        with pytest.raises((ValueError, TypeError), match=rf"^sara_batch pair_weights.*{message}"):
            sara_batch(anchor=[0, 1, 2], target=[3, 4, 5], pair_weights=bad)


@pytest.mark.parametrize("anchor_filter, kept", [("correct", [1.0, 0.0, 1.0]), ("correct_anchor_wrong_target", [0.0, 0.0, 1.0])])
def test_anchor_filter_with_live_anchors_weights_the_pairs_by_the_lm_logits(anchor_filter, kept):
    """sara_batch.set_answers in the loss function: π by the greedy rule from the model's LM logits;
    every gradient that of sara_loss with that π (float64 reference), the tracked values the filtered ones."""
    from megatron.core.transformer.moe.moe_utils import track_moe_metrics

    from sara_kernels.megatron import KEPT_TRACKER_NAME

    model = tiny_model(seed=41, anchor_filter=anchor_filter)
    tokens, padding, answer_mask, answered = answered_columns(model, 3, [7, 9, 6, 8, 9, 5, 0], seed=42)
    assert answered == [True, False, True, True, False, False, False]
    positions = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
    anchor, target, user_weights = [0, 4, 2], [3, 1, 5], torch.tensor([1.5, 2.0, 0.5])
    if anchor_filter == "correct":  # a kept anchor paired with an empty target: no weight in the mean (π_b = 0)
        anchor, target, kept, user_weights = anchor + [3], target + [6], kept + [1.0], torch.tensor([1.5, 2.0, 0.5, 3.0])
    pi = torch.tensor([answered[a] and not (anchor_filter == "correct_anchor_wrong_target" and answered[t])
                       for a, t in zip(anchor, target)], dtype=torch.float64)
    assert pi.tolist() == kept
    batch = sara_batch(anchor=anchor, target=target, pair_weights=user_weights)
    with batch:
        output = model(tokens, positions, None, padding_mask=padding)  # [b, s, V]: no labels, the loss is the user's
    batch.set_answers(output, tokens, answer_mask)
    tracked = tracked_sara(model).clone()
    config, logged = model.config, {}
    track_moe_metrics(loss_scale=1.0, iteration=1, total_loss_dict=logged, track_names=[TRACKER_NAME, KEPT_TRACKER_NAME],
                      num_layers=config.num_layers, moe_layer_freq=config.moe_layer_freq)
    clean_forward(model, tokens, positions, None, padding_mask=padding)
    expected, per_layer = expected_sara_padded(model, padding, anchor=anchor, target=target, pair_weights=pi * user_weights)
    assert_grads_equal(model, output, expected)
    torch.testing.assert_close(tracked, per_layer.float(), **LOSS_TOL)
    torch.testing.assert_close(logged[KEPT_TRACKER_NAME], torch.tensor(sum(kept) / len(kept)), **LOSS_TOL)


def test_anchor_filter_with_live_anchors_refusals():
    model = tiny_model(seed=43, anchor_filter="correct")
    tokens, padding, answer_mask, _ = answered_columns(model, 2, [5, 6, 4, 6], seed=44)
    positions = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)

    def step(set_answers):
        batch = sara_batch(anchor=[0, 1], target=[2, 3])
        with batch:
            output = model(tokens, positions, None, padding_mask=padding)
        set_answers(batch, output)
        sara_only_backward(output)

    with pytest.raises(RuntimeError, match=r"^SARA router of layer \d: sara_anchor_filter='correct' with live anchors .*"
                                           r"sara_batch.set_answers\(logits, tokens, answer_mask\) was not called"):
        step(lambda batch, output: None)
    no_answer = answer_mask.clone()
    no_answer[1] = False
    with pytest.raises(ValueError, match=r"^sara_batch.set_answers answer_mask: anchor sequences \[1\] have no answer"):
        step(lambda batch, output: batch.set_answers(output, tokens, no_answer))
    first = answer_mask.clone()
    first[2, 0] = True
    with pytest.raises(ValueError, match=r"^sara_batch.set_answers answer_mask: marks a sequence's first token"):
        step(lambda batch, output: batch.set_answers(output, tokens, first))
    with pytest.raises(ValueError, match=r"^sara_batch.set_answers tokens: expected a tensor of shape \[4, 6\]"):
        step(lambda batch, output: batch.set_answers(output, tokens[:, 1:], answer_mask))
    with pytest.raises(RuntimeError, match=r"^sara_batch.set_answers: no SARA router has run"):
        sara_batch(anchor=[0], target=[1]).set_answers(torch.zeros(2, 6, VOCAB), tokens[:2], answer_mask[:2])
    for name, why in [("pipeline_model_parallel_size", "on the last stage only"),
                      ("tensor_model_parallel_size", "sharded over the vocabulary"),
                      ("context_parallel_size", "part of every sequence")]:
        with pytest.raises(ValueError, match=rf"^sara_anchor_filter='correct' with live anchors is not supported with "
                                             rf"{name} > 1 \(.*{why}"):
            config = tiny_config()
            setattr(config, name, 2)  # as a parallel run's config says (its own checks need that many ranks)
            SARARouter(config, sara=SARAOptions(sara_anchor_filter="correct"))


def test_anchor_filter_with_live_anchors_set_answers_where_no_term_is_attached():
    """Megatron's evaluation runs the training forward_step (model.eval() under no_grad), whose loss
    function calls set_answers: there, under no_grad alone and with sara_weight 0 it does nothing
    (no error, nothing tracked, no gradient)."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    tokens, padding, answer_mask = None, None, None
    for weight, mode in [(0.7, "eval"), (0.7, "no_grad"), (0.0, "train")]:
        reset_megatron_state()
        model = tiny_model(seed=47, weight=weight, anchor_filter="correct")
        if tokens is None:
            tokens, padding, answer_mask, answered = answered_columns(model, 3, [7, 9, 6, 8], seed=48)
            assert answered[:2] == [True, False]
        positions = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
        model.train(mode != "eval")
        batch = sara_batch(anchor=[0, 1], target=[2, 3])
        with batch, torch.set_grad_enabled(mode == "train"):
            output = model(tokens, positions, None, padding_mask=padding)
        batch.set_answers(output, tokens, answer_mask)
        if mode == "train":
            sara_only_backward(output)
            assert all(not g.any() for g in grads_of(model).values())
        assert TRACKER_NAME not in get_moe_layer_wise_logging_tracker()


@pytest.mark.parametrize("recompute", ["full-uniform", "selective-moe"])
def test_anchor_filter_with_live_anchors_under_recomputation(recompute):
    """The recomputation in backward attaches the term after set_answers: the gradients and tracked
    values of the run without recomputation."""
    runs = []
    for overrides in ({}, RECOMPUTE[recompute]):
        reset_megatron_state()
        model = tiny_model(seed=45, anchor_filter="correct", **overrides)
        with cpu_rng_for_recomputation():
            tokens, padding, answer_mask, answered = answered_columns(model, 3, [7, 9, 6, 8], seed=46)
            assert answered[:2] == [True, False]  # one of the two pairs kept
            positions = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
            batch = sara_batch(anchor=[0, 1], target=[2, 3])
            with batch:
                output = model(tokens, positions, None, padding_mask=padding)
            batch.set_answers(output, tokens, answer_mask)
            sara_only_backward(output)
        runs.append((grads_of(model), tracked_sara(model).clone()))
    (want, want_tracked), (got, tracked) = runs
    assert want["decoder.layers.1.mlp.router.weight"].abs().sum() > 0
    for name, grad in want.items():
        assert_grads_close(got[name], grad, torch.float32)
    assert want_tracked.min() > 1e-6
    torch.testing.assert_close(tracked, want_tracked, **LOSS_TOL)
