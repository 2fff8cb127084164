"""sara_kernels.torchtitan in one process, on torchtitan 0.3.0's own Qwen3-MoE (softmax) and
DeepSeek-V3 (sigmoid, node-limited) routers: the value and every gate gradient equal
``sara_loss`` on the same logits; packed documents, priors, activation checkpointing, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("torchtitan")

import torchtitan.components.metrics as titan_metrics  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC  # noqa: E402
from torchtitan.distributed.parallel_dims import ParallelDims  # noqa: E402
from torchtitan.models.common.moe import TokenChoiceTopKRouter  # noqa: E402

from helpers import reference_loss  # noqa: E402
from hf_train_helpers import one_thread  # noqa: E402
from sara_kernels.testing.tolerances import GREEDY_TOP1_MARGIN, JS_TOL, assert_grads_close  # noqa: E402
from sara_kernels.torchtitan import SARAConverter, SARAMicrobatch, SARAOptions, SARARouter, sara_metrics, sara_step  # noqa: E402
from titan_models import ROUTERS, CPUMemoryMonitorStandIn, gate_logits_recorder, init_full_model, model_config  # noqa: E402

_single_thread = pytest.fixture(scope="module", autouse=True)(one_thread)
pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")  # torchtitan's router asks for fp32 autocast

SEQ = 16
OPTIONS = dict(sara_weight=0.7, sara_temperature=1.5, sara_layer_weights="1,3", sara_backend="reference")


def _models(name, seed=0, **options):
    """(plain torchtitan model, the same weights with SARA, the SARA model's config)."""
    _, plain_cfg = model_config(name)
    _, sara_cfg = model_config(name, SARAOptions(**{**OPTIONS, **options}))
    plain, with_sara = init_full_model(plain_cfg, seed), init_full_model(sara_cfg, seed)
    with torch.no_grad():
        for (n, p), (m, q) in zip(plain.named_parameters(), with_sara.named_parameters(), strict=True):
            assert n == m
            q.copy_(p)
    return plain.train(), with_sara.train(), sara_cfg


def _routers(model):
    return {int(n.split(".")[1]): m for n, m in model.named_modules() if isinstance(m, TokenChoiceTopKRouter)}


def _rows(z, rows):
    return z[rows].reshape(-1, z.shape[-1])


def _gate_logits(plain, tokens):
    """(the plain model's gate logits of each MoE layer, with autograd history; their layers)."""
    seen = gate_logits_recorder(plain)
    plain(tokens)
    layers = sorted(seen)
    return [seen[layer][0] for layer in layers], layers


def _reference_grads(plain, layers, loss_of):
    """d loss_of(dtype) / d gate weights of the plain model, in float64 and (the baseline of what
    float32 arithmetic can reach on these logits, see assert_grads_close) in float32."""
    gates = [_routers(plain)[layer].gate.weight for layer in layers]
    return [torch.autograd.grad(loss_of(dtype), gates, retain_graph=True) for dtype in (torch.float64, torch.float32)]


def _assert_gate_grads(got, layers, want64, want32):
    assert all(w.abs().max() > 0 for w in want64)
    for layer, w64, w32 in zip(layers, want64, want32):
        assert_grads_close(got[layer], w64, torch.float32, fp32_baseline=w32)


def _sara_gate_grads(model, tokens, microbatch, global_valid_tokens, answer_mask=None):
    """The gate gradients of one step (with ``answer_mask``: sara_anchor_filter with live anchors)."""
    with sara_step([microbatch], global_valid_tokens=global_valid_tokens):
        output = model(tokens)
        if answer_mask is not None:
            microbatch.set_answers(output, tokens, answer_mask)
        (output * 0).sum().backward()  # the LM contributes nothing: the gates' gradients are SARA's
    return {layer: r.gate.weight.grad for layer, r in _routers(model).items()}


def _logged_by_torchtitan(extra_metrics, folder, monkeypatch) -> dict:
    """{tag: value} that torchtitan's own ``MetricsProcessor.log`` (TensorBoard on) writes for one
    training step with ``extra_metrics``, read back from its event file."""
    monkeypatch.setattr(titan_metrics, "build_device_memory_monitor", CPUMemoryMonitorStandIn)
    # One rank: the processor asks torch.distributed which rank logs (MetricsProcessor._build_metric_logger).
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        processor = titan_metrics.MetricsProcessor.Config(enable_tensorboard=True, log_freq=1).build(
            parallel_dims=ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, world_size=1),
            dump_folder=str(folder))
        # Torchtitan's Trainer sets these before its first log; only the throughput figures depend on them.
        processor.num_flops_per_token = 1
        processor.data_loading_times.append(0.0)
        processor.log(1, global_avg_loss=2.5, global_max_loss=3.0, grad_norm=1.0, extra_metrics=extra_metrics)
        processor.close()
    finally:
        dist.destroy_process_group()
    (events,) = folder.glob("tb/*/events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    logged = {}
    for tag in accumulator.Tags()["scalars"]:
        (scalar,) = accumulator.Scalars(tag)
        assert scalar.step == 1
        logged[tag] = scalar.value
    return logged


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_value_and_gate_gradients_equal_sara_loss_on_the_same_logits(name, tmp_path, monkeypatch):
    plain, model, _ = _models(name)
    tokens = torch.randint(0, 2048, (4, SEQ), generator=torch.Generator().manual_seed(1))
    anchor, target = [0, 1, 3], [2, 3, 0]
    logits, layers = _gate_logits(plain, tokens)
    score = _routers(plain)[layers[0]].score_func

    def loss_of(dtype, per_layer=False):
        out = reference_loss([_rows(z, anchor).to(dtype) for z in logits], [_rows(z, target).to(dtype) for z in logits],
                             torch.ones(3, SEQ, dtype=torch.bool), torch.ones(3, SEQ, dtype=torch.bool), score=score,
                             temperature=1.5, layer_weights=[1.0, 3.0], return_per_layer=per_layer)
        return out if per_layer else OPTIONS["sara_weight"] * (40 / 100) * out

    assert [type(r) for r in _routers(model).values()] == [SARARouter] * len(layers)
    grads = _sara_gate_grads(model, tokens, SARAMicrobatch(valid_tokens=40, anchor=anchor, target=target), 100)
    _assert_gate_grads(grads, layers, *_reference_grads(plain, layers, loss_of))
    _, per_layer = loss_of(torch.float64, per_layer=True)
    metrics = sara_metrics(model)
    assert list(metrics) == [f"sara_js/layer_{layer}" for layer in layers]
    torch.testing.assert_close(torch.tensor(list(metrics.values()), dtype=torch.float64), per_layer, **JS_TOL["short"])
    assert sara_metrics(model) == {}  # read once
    # Through torchtitan's own metrics: logged next to its loss, under the same names, each value a float32 as written.
    logged = _logged_by_torchtitan(metrics, tmp_path, monkeypatch)
    assert logged["loss_metrics/global_avg_loss"] == 2.5
    assert {tag: value for tag, value in logged.items() if tag.startswith("sara_js/")} == metrics


# Documents (row-major) of two rows: row 0 = [0, 5) [5, 16); row 1 = [0, 3) (the tail of a document cut at the
# row start) [3, 10) [10, 16); SPANS are their flat token ranges.
POSITIONS = torch.cat([torch.cat([torch.arange(5), torch.arange(11)]),
                       torch.cat([torch.arange(7, 10), torch.arange(7), torch.arange(6)])]).view(2, SEQ)
SPANS = [(0, 5), (5, 16), (16, 19), (19, 26), (26, 32)]


def _packed_loss_of(logits, anchor, target, weights):
    """loss_of(dtype) for _reference_grads: sara_weight * the reference on the documents of SPANS."""
    flat = [z.reshape(-1, z.shape[-1]) for z in logits]

    def side(docs, dtype):
        rows = torch.cat([torch.arange(*SPANS[d]) for d in docs])
        lengths = torch.tensor([SPANS[d][1] - SPANS[d][0] for d in docs])
        return [z[rows].to(dtype) for z in flat], torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).int()

    def loss_of(dtype):
        (a_logits, a_cu), (t_logits, t_cu) = side(anchor, dtype), side(target, dtype)
        return OPTIONS["sara_weight"] * reference_loss(a_logits, t_logits, anchor_cu_seqlens=a_cu, target_cu_seqlens=t_cu,
                                                       score="softmax", temperature=1.5, layer_weights=[1.0, 3.0],
                                                       pair_weights=weights.to(dtype))

    return loss_of


def test_packed_documents_follow_torchtitan_positions():
    plain, model, _ = _models("qwen3_softmax")
    tokens = torch.randint(0, 2048, (2, SEQ), generator=torch.Generator().manual_seed(2))
    anchor, target, weights = [0, 4], [3, 1], torch.tensor([2.0, 0.5])
    logits, layers = _gate_logits(plain, tokens)
    batch = SARAMicrobatch(valid_tokens=32, anchor=anchor, target=target, positions=POSITIONS, pair_weights=weights)
    grads = _sara_gate_grads(model, tokens, batch, 32)
    _assert_gate_grads(grads, layers, *_reference_grads(plain, layers, _packed_loss_of(logits, anchor, target, weights)))


def test_cached_priors_are_the_anchors(tmp_path):
    from sara_kernels.hf.priors import RoutingPriors, save_routing_priors

    plain, _, _ = _models("qwen3_softmax")
    layers = sorted(_routers(plain))
    probs = torch.softmax(torch.randn(6, len(layers), 64, generator=torch.Generator().manual_seed(3)), -1)
    path = tmp_path / "priors.safetensors"
    save_routing_priors(RoutingPriors(probs=probs, layers=tuple(layers), score="softmax", temperature=1.5), path)
    _, cfg = model_config("qwen3_softmax", SARAOptions(**OPTIONS), priors=str(path))
    model = init_full_model(cfg, 0).train()
    tokens = torch.randint(0, 2048, (2, SEQ), generator=torch.Generator().manual_seed(4))
    example_index, target = [5, 2], [1, 0]

    logits, _ = _gate_logits(plain, tokens)

    def loss_of(dtype):
        return OPTIONS["sara_weight"] * reference_loss(
            None, [_rows(z, target).to(dtype) for z in logits], None, torch.ones(2, SEQ, dtype=torch.bool),
            anchor_probs=probs[example_index].permute(1, 0, 2).to(dtype), score="softmax", temperature=1.5,
            layer_weights=[1.0, 3.0])

    grads = _sara_gate_grads(model, tokens, SARAMicrobatch(valid_tokens=32, example_index=example_index, target=target), 32)
    _assert_gate_grads(grads, layers, *_reference_grads(plain, layers, loss_of))


@pytest.mark.parametrize("policy, anchor_filter", [(FullAC, "none"), (SelectiveAC, "none"), (FullAC, "correct")])
def test_activation_checkpointing_adds_the_term_once_with_the_same_gradient(policy, anchor_filter):
    """Also sara_anchor_filter with live anchors, whose term waits for set_answers: the same
    gradient and logged values as without checkpointing."""
    plain, model, _ = _models("qwen3_softmax", sara_anchor_filter=anchor_filter)
    _, checkpointed, _ = _models("qwen3_softmax", sara_anchor_filter=anchor_filter)
    policy.Config().build().apply(checkpointed)
    tokens = torch.randint(0, 2048, (4, SEQ), generator=torch.Generator().manual_seed(5))
    answer_mask = None
    if anchor_filter != "none":
        tokens, answer_mask = _answered_rows(plain, 4, seed=5)  # pairs (0, 2) kept, (1, 3) not
    batch = SARAMicrobatch(valid_tokens=64, anchor=[0, 1], target=[2, 3])
    want = _sara_gate_grads(model, tokens, batch, 64, answer_mask)
    got = _sara_gate_grads(checkpointed, tokens, SARAMicrobatch(valid_tokens=64, anchor=[0, 1], target=[2, 3]), 64,
                           answer_mask)
    for layer in want:
        assert want[layer].abs().max() > 0
        torch.testing.assert_close(got[layer], want[layer], rtol=0, atol=0)
    assert sara_metrics(checkpointed) == sara_metrics(model)


def test_eval_and_no_grad_route_without_sara():
    plain, model, _ = _models("qwen3_softmax")
    tokens = torch.randint(0, 2048, (2, SEQ), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), plain(tokens), rtol=0, atol=0)
    model.eval()
    model(tokens)  # no sara_step needed
    model.train()
    with pytest.raises(RuntimeError, match="without a sara_step"):
        model(tokens)
    with pytest.raises(RuntimeError, match="2 times .* of 1 micro-batches"):
        with sara_step(SARAMicrobatch(valid_tokens=2, anchor=[0], target=[1]), global_valid_tokens=2):
            model(tokens)
            model(tokens)


def test_sequence_sharded_logits_are_refused():
    """With tensor and expert parallelism torchtitan shards the gate's output over the sequence
    (models/common/moe_sharding.py, ``_router_sharding_config``); no rank holds a whole sequence to pool."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    _, model, _ = _models("qwen3_softmax")
    router = _routers(model)[0]
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        logits = DTensor.from_local(torch.randn(2, SEQ, router.gate.out_features), init_device_mesh("cpu", (1,)), [Shard(1)])
        with sara_step(SARAMicrobatch(valid_tokens=2 * SEQ, anchor=[0], target=[1]), global_valid_tokens=2 * SEQ):
            with pytest.raises(NotImplementedError, match=r"sharded as \(Shard\(dim=1\),\)"):
                router._attach_sara(router.gate, (), logits)  # the router's hook, given such a gate output
    finally:
        dist.destroy_process_group()


def test_converter_selects_layers_and_checks_its_options():
    _, cfg = model_config("deepseek_sigmoid", SARAOptions(sara_layers=[2], sara_backend="reference"))
    model = init_full_model(cfg, 0)
    kinds = {layer: type(r) for layer, r in _routers(model).items()}
    assert kinds == {1: TokenChoiceTopKRouter, 2: SARARouter}  # layer 0 is dense
    with pytest.raises(ValueError, match="already use SARARouter"):
        SARAConverter.Config().build().convert(cfg)
    with pytest.raises(ValueError, match=r"\[0\] are not MoE layers"):
        model_config("deepseek_sigmoid", SARAOptions(sara_layers=[0]))
    with pytest.raises(ValueError, match="sara_score='softmax' but the router of layer 1 scores with score_func='sigmoid'"):
        model_config("deepseek_sigmoid", SARAOptions(sara_score="softmax"))
    with pytest.raises(ValueError, match="sara_layer_weights has 1 weights"):
        model_config("deepseek_sigmoid", SARAOptions(sara_layer_weights="1"))
    with pytest.raises(ValueError, match="sara_lm_on_anchor"):
        SARAConverter.Config(options=SARAOptions(sara_lm_on_anchor=True)).build()


@pytest.mark.parametrize("kwargs, message", [
    (dict(valid_tokens=4, anchor=[0]), "anchor= needs target="),
    (dict(valid_tokens=4, anchor=[0, 1], target=[2, 3], pair_weights=[1.0]), r"^SARAMicrobatch pair_weights: expected shape \[B\] = \[2\]"),
    (dict(valid_tokens=4, example_index=[0, 1], pair_weights=[1.0, -0.5]), r"^SARAMicrobatch pair_weights: .* pair_weights\[1\] = -0.5"),
    (dict(valid_tokens=4, anchor=[0], target=[1], pair_weights=torch.tensor([float("inf")])), r"^SARAMicrobatch pair_weights: .* = inf"),
    (dict(valid_tokens=4, anchor=[0], target=[1], example_index=[0]), "exactly one of anchor="),
    (dict(valid_tokens=4, anchor=[0, 1], target=[1]), "anchor has 2 entries but target has 1"),
    (dict(valid_tokens=4, anchor=[0.5], target=[1]), "anchor: expected a non-empty 1-D sequence of integer indices"),
    (dict(valid_tokens=1.5, anchor=[0], target=[1]), "valid_tokens: expected an integer count"),
    (dict(valid_tokens=4, anchor=[0], target=[1], positions=torch.zeros(4)), r"positions: expected .* \[B, L\]"),
])
def test_bad_microbatch_layouts_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SARAMicrobatch(**kwargs)


def test_rows_outside_the_microbatch_are_refused():
    _, model, _ = _models("qwen3_softmax")
    tokens = torch.randint(0, 2048, (2, SEQ), generator=torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match=r"target: indices must lie in \[0, 2\), the micro-batch's rows"):
        with sara_step(SARAMicrobatch(valid_tokens=2, anchor=[0], target=[2]), global_valid_tokens=2):
            model(tokens)


@pytest.mark.parametrize("positions", [False, True], ids=["rows", "documents"])
def test_an_empty_microbatch_side_is_a_clear_error(positions):
    """A micro-batch with no row leaves the targets of cached priors empty: refused naming the
    example indices it cannot pair (not a failing min() of an empty tensor)."""
    logits = torch.randn(0, SEQ, 8)
    batch = SARAMicrobatch(valid_tokens=0, example_index=[3], positions=torch.zeros(0, SEQ) if positions else None)
    unit = "documents" if positions else "rows"
    with pytest.raises(ValueError, match=f"^SARAMicrobatch: example_index has 1 entries but the micro-batch has 0 target {unit}"):
        batch.side("target", logits)


def _priors_file(tmp_path, layers, anchor_correct=None, seed=8):
    from sara_kernels.hf.priors import RoutingPriors, save_routing_priors

    probs = torch.softmax(torch.randn(6, len(layers), 64, generator=torch.Generator().manual_seed(seed)), -1)
    path = tmp_path / "priors.safetensors"
    flags = None if anchor_correct is None else torch.tensor(anchor_correct, dtype=torch.bool)
    save_routing_priors(RoutingPriors(probs=probs, layers=tuple(layers), score="softmax", temperature=1.5,
                                      anchor_correct=flags), path)
    return probs, str(path)


def test_pair_weights_are_sara_loss_pi_and_a_zero_weight_microbatch_adds_nothing():
    plain, model, _ = _models("qwen3_softmax")
    tokens = torch.randint(0, 2048, (4, SEQ), generator=torch.Generator().manual_seed(9))
    anchor, target, weights = [0, 1, 3], [2, 3, 0], torch.tensor([1.25, 0.0, 0.5])
    logits, layers = _gate_logits(plain, tokens)

    def loss_of(dtype, pair_weights=weights, per_layer=False):
        out = reference_loss([_rows(z, anchor).to(dtype) for z in logits], [_rows(z, target).to(dtype) for z in logits],
                             torch.ones(3, SEQ, dtype=torch.bool), torch.ones(3, SEQ, dtype=torch.bool), score="softmax",
                             temperature=1.5, layer_weights=[1.0, 3.0], pair_weights=pair_weights.to(dtype),
                             return_per_layer=per_layer)
        return out if per_layer else OPTIONS["sara_weight"] * out

    assert abs(loss_of(torch.float64).item() - loss_of(torch.float64, torch.ones(3)).item()) > 1e-4
    batch = SARAMicrobatch(valid_tokens=48, anchor=anchor, target=target, pair_weights=weights)
    grads = _sara_gate_grads(model, tokens, batch, 48)
    _assert_gate_grads(grads, layers, *_reference_grads(plain, layers, loss_of))
    _, per_layer = loss_of(torch.float64, per_layer=True)
    metrics = sara_metrics(model)
    assert list(metrics) == [f"sara_js/layer_{layer}" for layer in layers]  # no sara_anchor_kept without the filter
    torch.testing.assert_close(torch.tensor(list(metrics.values()), dtype=torch.float64), per_layer, **JS_TOL["short"])

    model.zero_grad(set_to_none=True)
    batch = SARAMicrobatch(valid_tokens=48, anchor=anchor, target=target, pair_weights=[0.0, 0.0, 0.0])
    grads = _sara_gate_grads(model, tokens, batch, 48)
    assert all(not g.any() for g in grads.values())
    assert set(sara_metrics(model).values()) == {0.0}


def test_anchor_filter_correct_reads_the_priors_anchor_correct(tmp_path):
    """π_b = the priors' anchor_correct[example_index] times pair_weights; sara_anchor_kept in sara_metrics."""
    plain, _, _ = _models("qwen3_softmax")
    layers = sorted(_routers(plain))
    correct = [True, False, True, False, True, True]
    probs, path = _priors_file(tmp_path, layers, correct)
    _, cfg = model_config("qwen3_softmax", SARAOptions(**OPTIONS, sara_anchor_filter="correct"), priors=path)
    model = init_full_model(cfg, 0).train()
    tokens = torch.randint(0, 2048, (3, SEQ), generator=torch.Generator().manual_seed(10))
    example_index, user_weights = [5, 1, 2], torch.tensor([0.5, 3.0, 2.0])
    pi = torch.tensor(correct, dtype=torch.float64)[example_index] * user_weights  # [0.5, 0, 2]
    logits, _ = _gate_logits(plain, tokens)

    def loss_of(dtype, per_layer=False):
        out = reference_loss(None, [z.reshape(-1, z.shape[-1]).to(dtype) for z in logits], None,
                             torch.ones(3, SEQ, dtype=torch.bool), anchor_probs=probs[example_index].permute(1, 0, 2).to(dtype),
                             score="softmax", temperature=1.5, layer_weights=[1.0, 3.0], pair_weights=pi.to(dtype),
                             return_per_layer=per_layer)
        return out if per_layer else OPTIONS["sara_weight"] * out

    batch = SARAMicrobatch(valid_tokens=48, example_index=example_index, pair_weights=user_weights)
    grads = _sara_gate_grads(model, tokens, batch, 48)
    _assert_gate_grads(grads, layers, *_reference_grads(plain, layers, loss_of))
    _, per_layer = loss_of(torch.float64, per_layer=True)
    metrics = sara_metrics(model)
    assert list(metrics) == ["sara_anchor_kept"] + [f"sara_js/layer_{layer}" for layer in layers]
    assert metrics["sara_anchor_kept"] == pytest.approx(2 / 3)
    torch.testing.assert_close(torch.tensor(list(metrics.values())[1:], dtype=torch.float64), per_layer, **JS_TOL["short"])

    model.zero_grad(set_to_none=True)
    grads = _sara_gate_grads(model, tokens, SARAMicrobatch(valid_tokens=48, example_index=[1, 3, 1]), 48)  # none kept
    assert all(not g.any() for g in grads.values())
    assert sara_metrics(model)["sara_anchor_kept"] == 0.0
    # A live micro-batch beside the priors takes its π from the LM logits (set_answers), not from the file.
    with pytest.raises(RuntimeError, match=r"SARAMicrobatch.set_answers\(logits, tokens, answer_mask\) was not called"):
        _sara_gate_grads(model, tokens, SARAMicrobatch(valid_tokens=48, anchor=[0], target=[1]), 48)


def test_anchor_filter_refusals_name_the_option(tmp_path):
    _, path = _priors_file(tmp_path, [0, 1])
    with pytest.raises(ValueError, match=r"^SARAConverter: sara_anchor_filter='correct' needs a priors file .*--anchor_answers"):
        SARAConverter.Config(options=SARAOptions(sara_anchor_filter="correct", sara_temperature=1.5), priors=path).build()
    _, path = _priors_file(tmp_path, [0, 1], [True] * 6)
    with pytest.raises(ValueError, match=r"^SARAConverter: sara_anchor_filter='correct_anchor_wrong_target' with cached priors"):
        SARAConverter.Config(options=SARAOptions(sara_anchor_filter="correct_anchor_wrong_target", sara_temperature=1.5),
                             priors=path).build()


def _answers_by_hand(plain, tokens, answer_from: int):
    """[B] whether the plain model's greedy prediction reproduces each row's tokens from column
    ``answer_from`` on, teacher-forced (every such prediction clear of a top-1 tie)."""
    with torch.no_grad():
        predicting = plain(tokens).double()[:, answer_from - 1 : -1]
    top2 = predicting.topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > GREEDY_TOP1_MARGIN, "a top-1 tie: choose another seed"
    return (predicting.argmax(dim=-1) == tokens[:, answer_from:]).all(dim=1)


def _answered_rows(plain, answer_len: int, seed: int):
    """(tokens [4, SEQ]: rows 0 and 3 end with the plain model's own greedy continuation, row 1 with
    it with one token changed, row 2 with random tokens; the answer mask of those last columns)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 2048, (4, SEQ - answer_len), generator=g)
    with torch.no_grad():
        for _ in range(answer_len):
            tokens = torch.cat([tokens, plain(tokens)[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    tokens[1, -2] = (tokens[1, -2] + 1) % 2048
    tokens[2, -answer_len:] = torch.randint(0, 2048, (answer_len,), generator=g)
    answer_mask = torch.zeros(4, SEQ, dtype=torch.bool)
    answer_mask[:, -answer_len:] = True
    return tokens, answer_mask


@pytest.mark.parametrize("anchor_filter, kept", [("correct", [1.0, 0.0, 1.0]), ("correct_anchor_wrong_target", [1.0, 0.0, 0.0])])
def test_anchor_filter_with_live_anchors_weights_the_pairs_by_the_lm_logits(anchor_filter, kept):
    """SARAMicrobatch.set_answers after the forward: π from the LM logits by the greedy rule, the gate
    gradients those of sara_loss with that π (float64 reference), the logged values the filtered ones."""
    plain, model, _ = _models("qwen3_softmax", sara_anchor_filter=anchor_filter)
    tokens, answer_mask = _answered_rows(plain, 4, seed=11)
    answered = _answers_by_hand(plain, tokens, SEQ - 4)
    assert answered.tolist() == [True, False, False, True]
    anchor, target, user_weights = [0, 1, 3], [2, 3, 0], torch.tensor([1.5, 2.0, 0.5])
    pi = answered[anchor] & (~answered[target] if anchor_filter == "correct_anchor_wrong_target" else True)
    assert pi.double().tolist() == kept
    pi = pi.double() * user_weights.double()
    logits, layers = _gate_logits(plain, tokens)

    def loss_of(dtype, per_layer=False):
        out = reference_loss([_rows(z, anchor).to(dtype) for z in logits], [_rows(z, target).to(dtype) for z in logits],
                             torch.ones(3, SEQ, dtype=torch.bool), torch.ones(3, SEQ, dtype=torch.bool), score="softmax",
                             temperature=1.5, layer_weights=[1.0, 3.0], pair_weights=pi.to(dtype), return_per_layer=per_layer)
        return out if per_layer else OPTIONS["sara_weight"] * (40 / 64) * out

    batch = SARAMicrobatch(valid_tokens=40, anchor=anchor, target=target, pair_weights=user_weights)
    grads = _sara_gate_grads(model, tokens, batch, 64, answer_mask)
    _assert_gate_grads(grads, layers, *_reference_grads(plain, layers, loss_of))
    _, per_layer = loss_of(torch.float64, per_layer=True)
    metrics = sara_metrics(model)
    assert list(metrics) == ["sara_anchor_kept"] + [f"sara_js/layer_{layer}" for layer in layers]
    assert metrics["sara_anchor_kept"] == pytest.approx(sum(kept) / 3)
    torch.testing.assert_close(torch.tensor(list(metrics.values())[1:], dtype=torch.float64), per_layer, **JS_TOL["short"])


def test_anchor_filter_with_live_anchors_in_packed_documents():
    """The answers of torchtitan's packed documents: a document's answer is its own tokens, its first
    token predicted by no logit of it; π by hand from the plain model's logits of the flat rows."""
    plain, model, _ = _models("qwen3_softmax", sara_anchor_filter="correct")
    tokens = _answered_rows(plain, 4, seed=11)[0][:2]  # row 0 ends with the greedy continuation, row 1 with one changed
    answer_mask = torch.zeros(2, SEQ, dtype=torch.bool)
    answer_mask[0, 3:5] = answer_mask[0, 12:] = answer_mask[1, 8:10] = answer_mask[1, 12:] = True  # docs 0, 1, 3, 4
    with torch.no_grad():
        predicting = plain(tokens).double().reshape(-1, 2048)
    flat_mask, flat_tokens = answer_mask.reshape(-1), tokens.reshape(-1)
    answered = []
    for start, end in SPANS:
        marked = [t for t in range(start, end) if flat_mask[t]]
        top2 = torch.stack([predicting[t - 1].topk(2).values for t in marked]) if marked else torch.ones(1, 2)
        assert (top2[:, 0] - top2[:, 1]).min() > GREEDY_TOP1_MARGIN or not marked
        answered.append(bool(marked) and all(int(predicting[t - 1].argmax()) == int(flat_tokens[t]) for t in marked))
    assert answered == [False, True, False, False, False]
    anchor, target = [1, 4, 3], [0, 2, 1]
    pi = torch.tensor([answered[a] for a in anchor], dtype=torch.float64)
    logits, layers = _gate_logits(plain, tokens)
    batch = SARAMicrobatch(valid_tokens=32, anchor=anchor, target=target, positions=POSITIONS)
    grads = _sara_gate_grads(model, tokens, batch, 32, answer_mask)
    _assert_gate_grads(grads, layers, *_reference_grads(plain, layers, _packed_loss_of(logits, anchor, target, pi)))
    assert sara_metrics(model)["sara_anchor_kept"] == pytest.approx(1 / 3)


def test_anchor_filter_with_live_anchors_refusals():
    plain, model, _ = _models("qwen3_softmax", sara_anchor_filter="correct")
    tokens, answer_mask = _answered_rows(plain, 3, seed=12)

    def step(call_set_answers):
        batch = SARAMicrobatch(valid_tokens=64, anchor=[0, 1], target=[2, 3])
        with sara_step([batch], global_valid_tokens=64):
            output = model(tokens)
            call_set_answers(batch, output)
            (output * 0).sum().backward()

    with pytest.raises(RuntimeError, match=r"^SARA router of layer \d: sara_anchor_filter='correct' with live anchors .*"
                                           r"SARAMicrobatch.set_answers\(logits, tokens, answer_mask\) was not called"):
        step(lambda batch, output: None)
    no_answer = answer_mask.clone()
    no_answer[1] = False
    with pytest.raises(ValueError, match=r"^SARAMicrobatch.set_answers answer_mask: anchor sequences \[1\] have no answer"):
        step(lambda batch, output: batch.set_answers(output, tokens, no_answer))
    first = answer_mask.clone()
    first[2, 0] = True
    with pytest.raises(ValueError, match=r"^SARAMicrobatch.set_answers answer_mask: marks a row's or document's first"):
        step(lambda batch, output: batch.set_answers(output, tokens, first))
    with pytest.raises(ValueError, match=r"^SARAMicrobatch.set_answers tokens: expected a tensor of shape \[4, 16\]"):
        step(lambda batch, output: batch.set_answers(output, tokens[:, 1:], answer_mask))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        def vocab_sharded(batch, output):
            batch.set_answers(DTensor.from_local(output, init_device_mesh("cpu", (1,)), [Shard(2)]), tokens, answer_mask)

        with pytest.raises(ValueError, match=r"^SARAMicrobatch.set_answers logits: a DTensor placed as \(Shard\(dim=2\),\)"):
            step(vocab_sharded)
    finally:
        dist.destroy_process_group()
    with pytest.raises(RuntimeError, match=r"^SARAMicrobatch.set_answers: no SARA router has run"):
        SARAMicrobatch(valid_tokens=64, anchor=[0], target=[1]).set_answers(torch.zeros(2, SEQ, 8), tokens[:2], answer_mask[:2])
