"""One SGD step of SARATrainer and of SARASFTTrainer with ``sara_anchor_filter="correct"`` on 2 gloo
ranks x 1 micro-batch of 3 pairs, in one ``torchrun --nproc_per_node 2`` session (launched by
test_anchor_filter_distributed.py). Each rank saves, per trainer, the pair indices of its
micro-batch and its first logged entry; rank 0 also the parameter updates.

    python -m torch.distributed.run --nproc_per_node 2 anchor_filter_steps.py PAIRS_JSON OUT_DIR
"""

from __future__ import annotations

import copy
import gc
import json
import os
import pathlib
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_train_helpers import TOKENIZER, close_process_group, sft_sgd_config, sgd_args, tiny_moe, updates  # noqa: E402

PER_RANK = dict(per_device_train_batch_size=3, sara_anchor_filter="correct", sara_layers="all")


def run(kind: str, data: list, out: pathlib.Path):
    base = tiny_moe()
    model = copy.deepcopy(base)
    if kind == "sft":
        import datasets

        from sara_kernels.hf import SARASFTTrainer

        trainer = SARASFTTrainer(model=model, args=sft_sgd_config(out / kind, **PER_RANK),
                                 train_dataset=datasets.Dataset.from_list(data), processing_class=TOKENIZER)
        index_key = "sara_example_index"
    else:
        from sara_kernels.hf import SARATrainer

        trainer = SARATrainer(model=model, args=sgd_args(out / kind, **PER_RANK), train_dataset=data,
                              processing_class=TOKENIZER)
        index_key = "index"
    collate, micro_batches = trainer.data_collator, []

    def recording(examples):  # which pairs this rank's micro-batch holds
        micro_batches.append([int(example[index_key]) for example in examples])
        return collate(examples)

    trainer.data_collator = recording
    trainer.train()
    rank = trainer.args.process_index
    assert trainer.args.world_size == 2, trainer.args.world_size
    logged = next(entry for entry in trainer.state.log_history if "sara_loss" in entry)
    (out / f"{kind}_rank{rank}.json").write_text(json.dumps({"micro_batches": micro_batches, "logged": logged}))
    if rank == 0:
        torch.save(updates(base, model), out / f"{kind}_delta.pt")
    # The DDP model holds the process group: freed before the group is (as in examples/sara_torchrun.py).
    del trainer, model
    gc.collect()


def main():
    data, out = json.loads(pathlib.Path(sys.argv[1]).read_text()), pathlib.Path(sys.argv[2])
    torch.set_num_threads(1)
    try:
        for kind in ("sara", "sft"):
            run(kind, data, out)
    finally:
        close_process_group()


if __name__ == "__main__":
    main()
