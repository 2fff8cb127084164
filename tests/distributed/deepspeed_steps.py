"""One optimiser step of SARATrainer / SARASFTTrainer under DeepSpeed ZeRO for each case of a
JSON list, in one ``torchrun --nproc_per_node 2`` session (see test_deepspeed.py, which launches
it): DeepSpeed compiles its shared-memory comm op at the first distributed init, so every case
shares that one compile. Rank 0 saves each case's parameter updates to ``<out>/<name>.pt``.

    python -m torch.distributed.run --nproc_per_node 2 deepspeed_steps.py CASES_JSON OUT_DIR
"""

from __future__ import annotations

import copy
import gc
import json
import os
import pathlib
import sys

import torch

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TESTS)
ZERO3_EXAMPLE = pathlib.Path(TESTS).parent / "examples" / "deepspeed_zero3.json"

from hf_train_helpers import TOKENIZER, close_process_group, pairs, sft_sgd_config, sgd_args, tiny_moe  # noqa: E402

PAIRS = 8
# Per rank: 2 micro-batches of 2 pairs, so 2 ranks x 2 x 2 = the one-process batch of 8.
PER_RANK = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2)


def zero_config(stage: int) -> dict:
    """The README's ZeRO-3 config (examples/deepspeed_zero3.json: the Trainer's own optimiser, here
    plain SGD, and the routers partitioned), or the same at ZeRO-2."""
    config = json.loads(ZERO3_EXAMPLE.read_text())
    if stage == 2:
        config["zero_optimization"] = {"stage": 2}
    return config


def full_parameters(trainer) -> dict:
    """Every parameter whole (gathered from its ZeRO-3 partitions; a no-op under ZeRO-2)."""
    import deepspeed

    module = trainer.model_wrapped.module
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {n: p.detach().clone() for n, p in module.named_parameters()}


def run_case(case: dict, base, out: pathlib.Path):
    model = copy.deepcopy(base)
    config = zero_config(case["stage"])
    config["zero_optimization"].update(case.get("zero", {}))
    options = dict(PER_RANK, deepspeed=config, output_dir=str(out / case["name"]))
    if case.get("checkpointing"):
        options.update(activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False})
    options.update(case.get("options", {}))
    if case["trainer"] == "sft":
        import datasets

        from sara_kernels.hf import SARASFTTrainer

        trainer = SARASFTTrainer(model=model, args=sft_sgd_config(out, **options),
                                 train_dataset=datasets.Dataset.from_list(pairs(PAIRS)), processing_class=TOKENIZER)
    else:
        from sara_kernels.hf import SARATrainer

        trainer = SARATrainer(model=model, args=sgd_args(out, **options),
                              train_dataset=case.get("pairs") or pairs(PAIRS), processing_class=TOKENIZER,
                              routing_priors=case.get("priors"))
    trainer.train()
    if case["stage"] == 3:  # the router really is partitioned: each rank holds a part of it
        gate = trainer.model_wrapped.module.model.layers[1].mlp.gate.weight
        assert 0 < gate.ds_tensor.numel() < gate.ds_numel, (gate.ds_tensor.numel(), gate.ds_numel)
    after = full_parameters(trainer)
    if trainer.args.process_index == 0:
        assert trainer.args.world_size == 2, trainer.args.world_size
        assert trainer.is_deepspeed_enabled
        before = dict(base.named_parameters())
        torch.save({n: p - before[n].detach() for n, p in after.items()}, out / f"{case['name']}.pt")
        logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
        (out / f"{case['name']}.log.json").write_text(json.dumps(logged))
    # Free the engine (it holds hooks and buffers on the group) before the next case builds its own.
    del trainer, model
    gc.collect()


def main():
    cases, out = json.loads(pathlib.Path(sys.argv[1]).read_text()), pathlib.Path(sys.argv[2])
    torch.set_num_threads(1)
    # Built before any ZeRO-3 arguments exist: while one is alive, transformers builds models under
    # deepspeed.zero.Init, partitioned on creation.
    bases = [tiny_moe() for _ in cases]
    assert not any(hasattr(p, "ds_id") for p in bases[-1].parameters())
    try:
        for case, base in zip(cases, bases):
            run_case(case, base, out)
    finally:
        close_process_group()


if __name__ == "__main__":
    main()
