"""Data parallel SARA on torch.distributed (gloo, 2 processes, CPU): a plain training step under
DDP and under FSDP2 (``fully_shard``) gives the same parameter gradients as one process on the
whole batch. (The SARA trainer under a 2-process launch is tested in test_hf_trainer.py.)

Only the SARA term is compared: with every pair valid, the mean over each rank's pairs
averaged over the ranks (what DDP and FSDP2 do to gradients) is the mean over the whole batch.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from helpers import run_ranks  # noqa: E402
from hf_train_helpers import TOKENIZER, pairs, tiny_moe  # noqa: E402

WORLD = 2
PAIRS = 8


def sara_step_loss(model, data, capture_from=None):
    """SARA loss (both sides trained) of one batch of pairs through the model's routers."""
    import sara_kernels
    from sara_kernels.hf import SARACollator, capture_router_logits

    batch = SARACollator(TOKENIZER)(data)
    rows, length = len(data), batch["input_ids"].shape[1]
    with capture_router_logits(capture_from or model) as cap:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    anchor = [z[: rows * length] for z in cap.logits]
    target = [z[rows * length :] for z in cap.logits]
    mask = batch["attention_mask"]
    sara = sara_kernels.sara_loss(anchor, target, mask[:rows], mask[rows:], detach_anchor=False, backend="reference",
                                  score=cap.score)
    # The output enters with weight 0, as an LM loss would: DDP reduces gradients from the
    # forward's outputs, and every parameter then takes part in every step.
    return sara + 0.0 * out.logits.float().sum()


def whole_batch_grads() -> dict:
    model = tiny_moe()
    sara_step_loss(model, pairs(PAIRS)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(got: dict, want: dict, where: str):
    assert set(got) == set(want), f"{where}: gradients for other parameters"
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=1e-4, atol=1e-7, msg=lambda m: f"{where}: {name}: {m}")
    assert any(g.abs().sum() > 0 for n, g in got.items() if "gate" in n), f"{where}: no router gradient"


def _rank_data(rank: int):
    return pairs(PAIRS)[rank::WORLD]


def _ddp(rank: int, want: dict):
    from torch.nn.parallel import DistributedDataParallel

    model = tiny_moe()
    ddp = DistributedDataParallel(model)
    sara_step_loss(ddp, _rank_data(rank), capture_from=model).backward()
    _compare({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, want, f"rank {rank} DDP")


def _fsdp2(rank: int, want: dict):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = tiny_moe()
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sara_step_loss(model, _rank_data(rank)).backward()
    got = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    _compare(got, want, f"rank {rank} FSDP2")


def _check_rank(rank: int):
    want = whole_batch_grads()
    _ddp(rank, want)
    _fsdp2(rank, want)


def test_ddp_and_fsdp2_steps_equal_one_process_on_the_whole_batch():
    run_ranks(_check_rank, WORLD)
