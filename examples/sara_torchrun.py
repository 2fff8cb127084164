"""SARA fine-tuning under torchrun (DDP): ``torchrun --nproc_per_node 2 examples/sara_torchrun.py --out DIR``.

A tiny random Qwen3-MoE and the demo's synthetic parallel corpus, so it runs anywhere (CPU ranks
use gloo, GPU ranks NCCL; the Trainer picks). Swap in your model, tokenizer and pairs: nothing
else changes under torchrun, Accelerate or FSDP. The SARA term is scaled per micro-batch and
rank so that the step's gradient is λ × the mean SARA loss whatever the number of processes
(see sara_kernels.hf.trainer). Rank 0 writes ``DIR/final_loss.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os

import torch

from sara_kernels.hf import SARATrainer, SARATrainingArguments
from sara_kernels.programs.corpus import build_word_tokenizer, make_parallel_corpus
from sara_kernels.programs.demo import build_tiny_model


def train(args) -> None:
    torch.set_num_threads(1)
    tokenizer = build_word_tokenizer()
    model = build_tiny_model(tokenizer, seed=0)
    training = SARATrainingArguments(
        output_dir=args.out, per_device_train_batch_size=4, max_steps=args.steps, learning_rate=1e-3,
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), ddp_find_unused_parameters=False,
        sara_weight=1.0, sara_layers="all",
    )
    trainer = SARATrainer(model=model, args=training, train_dataset=make_parallel_corpus(32, seed=1),
                          processing_class=tokenizer)
    trainer.train()
    if trainer.args.process_index == 0:
        last = [h for h in trainer.state.log_history if "sara_loss" in h][-1]
        with open(os.path.join(args.out, "final_loss.json"), "w") as f:
            json.dump({"world_size": trainer.args.world_size, **last}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=2)
    train(parser.parse_args())
    # An orderly exit: the DDP model (which holds the process group) is freed first, on return from
    # train(), then the group itself. Freed the other way round, at interpreter exit, gloo's
    # threads can hang or abort the process.
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
