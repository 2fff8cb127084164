"""sara_kernels.torchtitan on 2 gloo processes (CPU), through torchtitan 0.3.0's own
``parallelize_qwen3`` and ``pipeline_llm``: FSDP2, expert parallelism (EP = 2), pipeline
parallelism (PP = 2, 1F1B, and GPipe with full activation checkpointing, 4 micro-batches) and tensor
parallelism (TP = 2, sequence parallel) each give every gate the gradient, and
``sara_metrics`` the per-layer values, of one process on the whole batch (PP 1F1B and TP with
``pair_weights``; FSDP2 also with ``sara_anchor_filter`` on live anchors, each rank's
``set_answers`` reading its own rows' logits). One spawn runs all.

Stand-ins for what torchtitan 0.3.0 assumes of a GPU (tests only), besides ``SDPA_STAND_IN``:

* ``_use_cpu_meshes``: with no accelerator ``torchtitan/tools/utils.py`` (``get_device_info``:
  ``_get_available_device_type() or "cuda"``) makes ``device_type`` "cuda", which
  ``ParallelDims`` builds its device meshes on; the tests set it to "cpu".
* ``_sum_reductions``: FSDP2 reduces gradients with ``ReduceOp.PREMUL_SUM`` for torchtitan's
  divide factor, which gloo lacks; ``set_force_sum_reduction_for_comms(True)`` sums instead
  (the same result: torchtitan's factor is 1, its losses are already divided by the step's tokens).
* FSDP, EP and TP run with ``spmd_backend="partial_dtensor"``: under the default ``"spmd_types"``
  the parameters stay plain tensors and FSDP2 refuses them when ``dp_shard > 1`` (and, under TP,
  at ``dp_shard = 1`` too: "all parameters must be DTensors on the full SPMD mesh").
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchtitan")

from helpers import run_ranks  # noqa: E402
from sara_kernels.testing.tolerances import FP32_JS_ATOL  # noqa: E402

SEQ = 16
PAIRS = 4  # the whole batch: anchors 0..3, targets 4..7 (pair i = rows i and 4 + i)
OPTIONS = dict(sara_weight=0.5, sara_backend="reference")


def _use_cpu_meshes():
    import torchtitan.distributed.parallel_dims as parallel_dims
    import torchtitan.tools.utils as utils

    utils.device_type = parallel_dims.device_type = "cpu"


def _sum_reductions(model_parts):
    from torch.distributed.fsdp import FSDPModule

    for part in model_parts:
        for module in part.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)


def _whole_batch():
    return torch.randint(0, 2048, (2 * PAIRS, SEQ), generator=torch.Generator().manual_seed(31))


def _sara_only_loss(pred, labels, global_valid_tokens=None):
    """The schedule's loss: zero, so that every gate gradient is SARA's."""
    return (pred * 0).sum(), {}


def _gate_grads(model_parts) -> dict:
    from torch.distributed.tensor import DTensor
    from torchtitan.models.common.moe import TokenChoiceTopKRouter

    grads = {}
    for part in model_parts:
        for name, module in part.named_modules():
            if isinstance(module, TokenChoiceTopKRouter):
                grad = module.gate.weight.grad
                grads[int(name.split(".")[1])] = grad.full_tensor() if isinstance(grad, DTensor) else grad
    return grads


def _one_process(name, tokens, anchor, target, pair_weights=None, answer_mask=None):
    """Gate gradients and logged values of one process on the whole batch."""
    from sara_kernels.torchtitan import SARAMicrobatch

    n = tokens.numel()
    return _one_process_microbatches(
        name, [(tokens, SARAMicrobatch(valid_tokens=n, anchor=anchor, target=target, pair_weights=pair_weights))], n,
        answer_mask)


def _options(answer_mask):
    from sara_kernels.torchtitan import SARAOptions

    return SARAOptions(**OPTIONS, sara_anchor_filter="none" if answer_mask is None else "correct")


def _step(model, tokens, microbatch, answer_mask):
    """The schedule-free step's forward and backward (with ``answer_mask``: set_answers between)."""
    output = model(tokens)
    if answer_mask is not None:
        microbatch.set_answers(output, tokens, answer_mask)
    _sara_only_loss(output, None)[0].backward()


def _one_process_microbatches(name, microbatches, global_valid_tokens, answer_mask=None):
    """Gate gradients and logged values of one process running ``microbatches`` ((tokens,
    SARAMicrobatch) each) in turn, the gradients accumulated."""
    from sara_kernels.torchtitan import sara_metrics, sara_step
    from titan_models import init_full_model, model_config

    _, cfg = model_config(name, _options(answer_mask))
    model = init_full_model(cfg, 7).train()
    for tokens, microbatch in microbatches:
        with sara_step(microbatch, global_valid_tokens=global_valid_tokens):
            _step(model, tokens, microbatch, answer_mask)
    return _gate_grads([model]), sara_metrics(model)


def _answered_batch(name, answer_len: int = 3):
    """(the whole batch with each row ending in the model's own greedy continuation, except the
    anchors of pairs 1 and 3, one answer token changed; the answer mask of those columns): with
    sara_anchor_filter="correct" each data-parallel rank keeps one of its two pairs."""
    from titan_models import init_full_model, model_config

    model = init_full_model(model_config(name)[1], 7).train()
    tokens = _whole_batch()[:, : SEQ - answer_len]
    with torch.no_grad():
        for _ in range(answer_len):
            tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    tokens[[1, 3], -1] = (tokens[[1, 3], -1] + 1) % 2048
    answer_mask = torch.zeros_like(tokens, dtype=torch.bool)
    answer_mask[:, -answer_len:] = True
    return tokens, answer_mask


def _parallel(name, world_mesh_shape: dict, schedule: str = "1F1B", ac_config=None, options=None):
    """(model parts, schedule or None, parallel_dims) of torchtitan's own parallelization."""
    import copy

    from torch.distributed.tensor import distribute_tensor
    from torchtitan.config import ParallelismConfig, TrainingConfig
    from torchtitan.config.configs import CompileConfig
    from torchtitan.distributed.parallel_dims import ParallelDims
    from torchtitan.distributed.utils import set_spmd_backend
    from torchtitan.models.common.decoder import Decoder

    from sara_kernels.torchtitan import SARAOptions
    from titan_models import init_full_model, model_config

    options = options or SARAOptions(**OPTIONS)
    spmd = "spmd_types" if world_mesh_shape.get("pp", 1) > 1 else "partial_dtensor"
    parallelism = ParallelismConfig(
        data_parallel_shard_degree=world_mesh_shape.get("dp_shard", 1),
        tensor_parallel_degree=world_mesh_shape.get("tp", 1),
        expert_parallel_degree=world_mesh_shape.get("ep", 1),
        pipeline_parallel_degree=world_mesh_shape.get("pp", 1),
        pipeline_parallel_schedule=schedule, pipeline_parallel_microbatch_size=2, spmd_backend=spmd)
    set_spmd_backend(spmd)  # as torchtitan's Trainer does
    training = TrainingConfig(local_batch_size=2 * PAIRS, seq_len=SEQ, dtype="float32", mixed_precision_param="float32")

    class _Job:  # what update_from_config reads of torchtitan's Trainer.Config
        pass

    job = _Job()
    job.parallelism = parallelism
    spec, cfg = model_config(name, options)
    cfg.update_from_config(config=job)
    dims = ParallelDims.from_config(parallelism, world_size=2)
    dims.build_mesh()
    full = init_full_model(copy.deepcopy(cfg), 7)
    with torch.device("meta"):
        model = cfg.build()
    kwargs = dict(parallel_dims=dims, training=training, parallelism=parallelism, compile_config=CompileConfig(),
                  ac_config=ac_config, dump_folder="")
    if dims.pp_enabled:
        schedule_obj, parts, _, _ = spec.pipelining_fn(model, device=torch.device("cpu"), model_config=cfg,
                                                       parallelize_fn=spec.parallelize_fn, loss_fn=_sara_only_loss, **kwargs)
    else:
        schedule_obj, parts = None, [spec.parallelize_fn(model, **kwargs)]
    _sum_reductions(parts)
    wanted = dict(full.named_parameters()) | dict(full.named_buffers())
    for part in parts:
        part.to_empty(device="cpu")
        with torch.no_grad():
            for fqn, tensor in list(part.named_parameters()) + list(part.named_buffers()):
                value = wanted[fqn.replace(CHECKPOINT_PREFIX, "")]
                if hasattr(tensor, "device_mesh"):
                    value = distribute_tensor(value, tensor.device_mesh, tensor.placements)
                tensor.copy_(value)
        part.train()
    assert isinstance(cfg, Decoder.Config)
    return parts, schedule_obj, dims


# What activation checkpointing's wrapper inserts into parameter names.
CHECKPOINT_PREFIX = "_checkpoint_wrapped_module."


def _check_data_parallel(rank, name, degrees, pair_weights=None, anchor_filter=False):
    """``pair_weights`` (one per pair of the whole batch): only where no rank splits the pairs.
    ``anchor_filter``: sara_anchor_filter="correct" on live anchors (``_answered_batch``)."""
    from sara_kernels.torchtitan import SARAMicrobatch, sara_step

    tokens, answer_mask = _answered_batch(name) if anchor_filter else (_whole_batch(), None)
    want, want_logged = _one_process(name, tokens, list(range(PAIRS)), list(range(PAIRS, 2 * PAIRS)), pair_weights,
                                     answer_mask)
    if anchor_filter:
        assert want_logged["sara_anchor_kept"] == 0.5
    parts, _, _ = _parallel(name, degrees, options=_options(answer_mask))
    if degrees.get("ep", 1) > 1:  # each rank holds half of the experts, the tokens sent to them all-to-all
        for moe in (m for m in parts[0].modules() if hasattr(m, "routed_experts")):
            experts = moe.routed_experts
            assert type(experts.token_dispatcher).__name__ == "AllToAllTokenDispatcher"
            assert experts.inner_experts.w1_EFD.to_local().shape[0] == experts.inner_experts.num_experts // 2
    # The data-parallel ranks split the pairs; the tensor-parallel ranks of one of them see the same rows.
    shards, dp_rank = degrees.get("dp_shard", 1), rank // degrees.get("tp", 1)
    per = PAIRS // shards
    mine = [*range(dp_rank * per, (dp_rank + 1) * per), *range(PAIRS + dp_rank * per, PAIRS + (dp_rank + 1) * per)]
    local = tokens[mine]
    microbatch = SARAMicrobatch(valid_tokens=local.numel(), anchor=list(range(per)), target=list(range(per, 2 * per)),
                                pair_weights=pair_weights)
    with sara_step(microbatch, global_valid_tokens=tokens.numel()):
        _step(parts[0], local, microbatch, None if answer_mask is None else answer_mask[mine])
    _assert_equals_one_process(parts, want, want_logged, f"{name} {degrees}", stage=False)


def _check_pipeline(rank, name, schedule, ac_config=None, pair_weights=None):
    """``pair_weights``: one per micro-batch (each holds one pair), a 0 dropping its micro-batch;
    the reference is then one process running the same micro-batches in turn."""
    from sara_kernels.torchtitan import SARAMicrobatch, sara_step

    tokens = _whole_batch()
    # Micro-batch m holds pair m: rows (m, 4 + m) of the whole batch, the target first in odd micro-batches,
    # so that each micro-batch needs its own layout.
    order = [row for m in range(PAIRS) for row in ((m, PAIRS + m) if m % 2 == 0 else (PAIRS + m, m))]
    weights = [None if pair_weights is None else [pair_weights[m]] for m in range(PAIRS)]
    layouts = [SARAMicrobatch(valid_tokens=2 * SEQ, anchor=[m % 2], target=[1 - m % 2], pair_weights=weights[m])
               for m in range(PAIRS)]
    n = tokens.numel()
    if pair_weights is None:
        want, want_logged = _one_process(name, tokens, list(range(PAIRS)), list(range(PAIRS, 2 * PAIRS)))
    else:
        rows = tokens[order].view(PAIRS, 2, SEQ)
        want, want_logged = _one_process_microbatches(name, list(zip(rows, layouts)), n)
    parts, pipeline, dims = _parallel(name, {"pp": 2}, schedule, ac_config)
    with sara_step(layouts, global_valid_tokens=n, pipeline_metadata_inference=True):  # the schedule's first step
        if rank == 0:
            pipeline.step(tokens[order])
        else:
            pipeline.step(target=tokens[order], losses=[], loss_kwargs={"global_valid_tokens": torch.tensor(n)})
    _assert_equals_one_process(parts, want, want_logged, f"{name} PP {schedule} {ac_config}", stage=True)


def _assert_equals_one_process(parts, want: dict, want_logged: dict, where: str, *, stage: bool):
    """The gate gradients of ``parts`` (every MoE layer; with ``stage``, a pipeline stage's one)
    and the values ``sara_metrics`` logs over the ranks are those of one process."""
    import torch.distributed as dist

    from sara_kernels.torchtitan import sara_metrics

    got = _gate_grads(parts)
    if stage:
        assert len(got) == 1 and got.keys() <= want.keys()  # one MoE layer per stage
    else:
        assert got.keys() == want.keys()
    for layer, grad in got.items():
        torch.testing.assert_close(grad, want[layer], **GATE_GRAD_TOL, msg=lambda m: f"{where} layer {layer}: {m}")
    logged = sara_metrics(parts, dist.group.WORLD)
    assert logged.keys() == want_logged.keys()
    for key, value in logged.items():
        assert value == pytest.approx(want_logged[key], rel=1e-5, abs=FP32_JS_ATOL)  # float32 JS, other summation order


# The gate gradients of 2 ranks and of one process sum the same float32 products in another
# order (and the experts' bf16 outputs feed the earlier layers'), so they agree to float32
# rounding of those sums, relative to the gradient's size.
GATE_GRAD_TOL = dict(rtol=1e-4, atol=1e-7)


def _check_all(rank):
    from torchtitan.distributed.activation_checkpoint import FullAC

    torch.set_num_threads(1)
    torch.autograd.set_multithreading_enabled(False)
    _use_cpu_meshes()
    _check_pipeline(rank, "qwen3_softmax", "1F1B", pair_weights=[1.5, 0.0, 0.5, 1.0])
    _check_data_parallel(rank, "qwen3_softmax", {"dp_shard": 2})
    _check_data_parallel(rank, "qwen3_softmax", {"dp_shard": 2}, anchor_filter=True)
    _check_data_parallel(rank, "qwen3_softmax", {"dp_shard": 2, "ep": 2})
    _check_data_parallel(rank, "qwen3_softmax", {"tp": 2}, pair_weights=[0.5, 2.0, 0.0, 1.0])
    _check_data_parallel(rank, "deepseek_sigmoid", {"dp_shard": 2, "ep": 2})
    _check_pipeline(rank, "deepseek_sigmoid", "GPipe", FullAC.Config())  # recomputed in backward, metadata inference's too


def test_fsdp_expert_and_pipeline_parallel_equal_one_process():
    run_ranks(_check_all, 2, timeout=420)
