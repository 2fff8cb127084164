"""sara_kernels.megatron on 2 gloo processes (CPU): data parallel equals one process on the whole
batch (gradients, and the SARA value Megatron's track_moe_metrics logs), and context parallel (a
router whose ranks hold Megatron's sequence chunks, with pair_weights) equals the whole sequences;
sara_anchor_filter with priors, and on live anchors (each rank's set_answers on its own
columns' logits), on 2 data-parallel ranks equals one process. One spawn runs all, bounded in time."""

from __future__ import annotations

import torch
import torch.distributed as dist

import megatron_model as mm
from helpers import run_ranks
from megatron.core.transformer.moe.moe_utils import track_moe_metrics
from sara_kernels.testing import LOSS_TOL, assert_grads_close


# The averaged gradients of 2 ranks and those of one process sum the same float32 products in
# another order, so they agree to float32 rounding of those sums, relative to the gradient's size.
DP_GRAD_TOL = dict(rtol=1e-4, atol=1e-7)


def _whole_batch():
    """4 pairs (anchor i, target 4 + i) of ragged sequences."""
    return mm.random_batch(8, 7, seed=21)


def _check_data_parallel(rank: int):
    tokens, positions, padding = _whole_batch()
    mine = [2 * rank, 2 * rank + 1, 4 + 2 * rank, 4 + 2 * rank + 1]  # this rank's 2 pairs
    model = mm.tiny_model(seed=11)
    with mm.sara_batch(anchor=[0, 1], target=[2, 3]):
        output = model(tokens[mine], positions[mine], None, labels=tokens[mine], padding_mask=padding[mine])
    mm.sara_only_backward(output)
    for p in model.parameters():  # what Megatron's DDP does with the gradients: the mean over DP
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
    tracked = mm.tracked_sara(model).clone()
    dist.all_reduce(tracked)
    tracked /= dist.get_world_size()
    # Megatron's own step logging averages SARA over the data-parallel ranks once its name is in track_names.
    logged = {}
    track_moe_metrics(loss_scale=1.0, iteration=1, total_loss_dict=logged, track_names=[mm.TRACKER_NAME],
                      num_layers=model.config.num_layers, moe_layer_freq=model.config.moe_layer_freq)
    mm.reset_megatron_state()

    whole = mm.tiny_model(seed=11)
    with mm.sara_batch(anchor=[0, 1, 2, 3], target=[4, 5, 6, 7]):
        output = whole(tokens, positions, None, labels=tokens, padding_mask=padding)
    mm.sara_only_backward(output)
    expected = mm.grads_of(whole)
    for name, grad in mm.grads_of(model).items():
        torch.testing.assert_close(grad, expected[name], **DP_GRAD_TOL, msg=lambda m: f"{name}: {m}")
    assert any(g.abs().sum() > 0 for g in expected.values())
    torch.testing.assert_close(tracked, mm.tracked_sara(whole), **LOSS_TOL)
    num_moe_layers = len(mm.routers(whole))
    torch.testing.assert_close(logged[mm.TRACKER_NAME], mm.tracked_sara(whole).sum() / num_moe_layers, **LOSS_TOL)
    mm.reset_megatron_state()


def _check_data_parallel_anchor_filter(rank: int):
    """sara_anchor_filter="correct" with priors on 2 data-parallel ranks, each keeping one of its two
    pairs: the gradients averaged over the ranks, and the logged kept fraction, are those of one
    process on the whole batch (the mean over its 2 kept pairs)."""
    from sara_kernels.hf import RoutingPriors
    from sara_kernels.megatron import KEPT_TRACKER_NAME

    tokens, positions, padding = _whole_batch()
    probs = torch.softmax(torch.randn(PAIRS_OF_PRIORS, 2, mm.EXPERTS, generator=torch.Generator().manual_seed(22)), -1)
    priors = RoutingPriors(probs=probs, layers=(1, 2), score="softmax", temperature=1.0,
                           anchor_correct=torch.tensor([True, False, False, True]))
    mine = [4 + 2 * rank, 5 + 2 * rank]  # this rank's target rows, examples 2 * rank and 2 * rank + 1
    model = mm.tiny_model(seed=11, priors=priors, anchor_filter="correct")
    with mm.sara_batch(example_index=[2 * rank, 2 * rank + 1]):
        output = model(tokens[mine], positions[mine], None, labels=tokens[mine], padding_mask=padding[mine])
    mm.sara_only_backward(output)
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
    logged = {}
    track_moe_metrics(loss_scale=1.0, iteration=1, total_loss_dict=logged, track_names=[KEPT_TRACKER_NAME],
                      num_layers=model.config.num_layers, moe_layer_freq=model.config.moe_layer_freq)
    mm.reset_megatron_state()

    whole = mm.tiny_model(seed=11, priors=priors, anchor_filter="correct")
    with mm.sara_batch(example_index=list(range(PAIRS_OF_PRIORS))):
        output = whole(tokens[4:], positions[4:], None, labels=tokens[4:], padding_mask=padding[4:])
    mm.sara_only_backward(output)
    expected = mm.grads_of(whole)
    for name, grad in mm.grads_of(model).items():
        torch.testing.assert_close(grad, expected[name], **DP_GRAD_TOL, msg=lambda m: f"{name}: {m}")
    assert any(g.abs().sum() > 0 for g in expected.values())
    torch.testing.assert_close(logged[KEPT_TRACKER_NAME], torch.tensor(0.5), **LOSS_TOL)
    mm.reset_megatron_state()


PAIRS_OF_PRIORS = 4  # examples 0..3, the targets of rows 4..7


def _check_data_parallel_live_anchor_filter(rank: int):
    """sara_anchor_filter="correct" on live anchors on 2 data-parallel ranks, each keeping one of its two
    pairs by its own set_answers: the averaged gradients and the logged values (the kept fraction
    included) are those of one process on the whole batch."""
    from sara_kernels.megatron import KEPT_TRACKER_NAME

    def step(model, cols, anchor, target):
        batch = mm.sara_batch(anchor=anchor, target=target)
        with batch:
            output = model(tokens[cols], positions[cols], None, padding_mask=padding[cols])
        batch.set_answers(output, tokens[cols], answer_mask[cols])
        mm.sara_only_backward(output)
        logged = {}
        track_moe_metrics(loss_scale=1.0, iteration=1, total_loss_dict=logged, track_names=[mm.TRACKER_NAME, KEPT_TRACKER_NAME],
                          num_layers=model.config.num_layers, moe_layer_freq=model.config.moe_layer_freq)
        mm.reset_megatron_state()
        return logged

    whole = mm.tiny_model(seed=11, anchor_filter="correct")
    # Anchors 0..3 (0 and 2 answered), targets 4..7: rank r holds pairs 2r and 2r + 1.
    tokens, padding, answer_mask, answered = mm.answered_columns(whole, 3, [7, 6, 7, 5, 6, 7, 4, 7], seed=23,
                                                                 changed=(1, 3), random=())
    assert answered[:4] == [True, False, True, False]
    positions = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
    want_logged = step(whole, list(range(8)), [0, 1, 2, 3], [4, 5, 6, 7])
    model = mm.tiny_model(seed=11, anchor_filter="correct")
    logged = step(model, [2 * rank, 2 * rank + 1, 4 + 2 * rank, 5 + 2 * rank], [0, 1], [2, 3])
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
    expected = mm.grads_of(whole)
    for name, grad in mm.grads_of(model).items():
        torch.testing.assert_close(grad, expected[name], **DP_GRAD_TOL, msg=lambda m: f"{name}: {m}")
    assert any(g.abs().sum() > 0 for g in expected.values())
    assert logged.keys() == want_logged.keys()
    for name, value in logged.items():
        torch.testing.assert_close(value, want_logged[name], **LOSS_TOL)
    torch.testing.assert_close(want_logged[KEPT_TRACKER_NAME], torch.tensor(0.5), **LOSS_TOL)


def _cp_chunks(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    """Megatron's load-balanced context-parallel split: 2 * cp chunks, rank r holds r and 2cp-1-r."""
    chunk = seq_len // (2 * cp)
    return torch.cat([torch.arange(i * chunk, (i + 1) * chunk) for i in (rank, 2 * cp - 1 - rank)])


def _check_context_parallel(rank: int):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from sara_kernels import sara_loss

    mm.parallel_state.destroy_model_parallel()
    mm.parallel_state.initialize_model_parallel(1, 1, context_parallel_size=2)
    mm.reset_megatron_state()
    torch.manual_seed(13)
    config = mm.tiny_config(context_parallel_size=2)
    router = mm.RecordingRouter(config, pg_collection=get_default_pg_collection(), sara=mm.SARAOptions(sara_weight=0.6, sara_layers="middle"))
    router.set_layer_number(2)  # decoder layer 1: in the middle of 4 MoE layers
    router.train()
    assert router._sara_group() is not None and router._sara_group().size() == 2
    seq_len, num_cols = 8, 4
    g = torch.Generator().manual_seed(14)
    hidden = torch.randn(seq_len, num_cols, mm.HIDDEN, generator=g)  # the same whole sequences on both ranks
    padding = torch.arange(seq_len)[:, None] >= torch.tensor([8, 3, 6, 1])[None, :]  # [s, b], True = padding
    local = _cp_chunks(seq_len, 2, rank)
    pair_weights = torch.tensor([0.4, 1.3])  # replicated on the CP ranks
    with mm.sara_batch(anchor=[0, 1], target=[2, 3], pair_weights=pair_weights):
        probs, _ = router(hidden[local], padding[local])
    (probs.sum() * 0.0).backward()
    grad = router.weight.grad.clone()
    # Megatron scales aux losses by cp and averages gradients over dp x cp: the sum over CP ranks.
    dist.all_reduce(grad)
    weight = router.weight.detach().double().requires_grad_(True)
    logits = torch.nn.functional.linear(hidden.double(), weight).transpose(0, 1)  # [b, s, E]
    valid = ~padding.T
    expected, per_layer = sara_loss([logits[[0, 1]].reshape(-1, mm.EXPERTS)], [logits[[2, 3]].reshape(-1, mm.EXPERTS)],
                                    valid[[0, 1]], valid[[2, 3]], pair_weights=pair_weights.double(), backend="reference",
                                    return_per_layer=True)
    (expected * 0.6 / 2).backward()  # this layer's share: weight / 2 selected layers
    assert_grads_close(grad, weight.grad, torch.float32)
    assert weight.grad.abs().sum() > 0
    tracked = mm.get_moe_layer_wise_logging_tracker()[mm.TRACKER_NAME]["values"][1]
    torch.testing.assert_close(tracked, per_layer[0].float(), **LOSS_TOL)  # every rank: whole sequences


def _check(rank: int):
    torch.set_num_threads(1)
    mm.init_parallel()
    try:
        _check_data_parallel(rank)
        _check_data_parallel_anchor_filter(rank)
        _check_data_parallel_live_anchor_filter(rank)
        _check_context_parallel(rank)
    finally:
        mm.parallel_state.destroy_model_parallel()


def test_two_data_parallel_ranks_equal_one_process_and_context_parallel_equals_whole_sequences():
    run_ranks(_check, 2, timeout=240)
