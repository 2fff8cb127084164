"""The ``train`` command: fine-tune a saved MoE model with SARA from the shell.

``python -m sara_kernels train --model ./my-moe --data pairs.jsonl --output_dir runs/sara --sara_weight 0.5``
or ``python -m sara_kernels train config.yaml`` (the same names as keys). Options: the model
(:class:`~.arguments.ModelArguments`), the data (:class:`~.arguments.DataArguments`),
:class:`TrainCommandArguments`, and every ``TrainingArguments`` / ``sara_*`` option of
:class:`~sara_kernels.hf.SARATrainingArguments`. The fine-tuned model, its tokenizer and the
trainer state are written to ``--output_dir``.

Devices: a plain process trains on one device (``cuda:0`` when there is a GPU; several visible
GPUs are not wrapped in ``nn.DataParallel``, see :func:`.demo.single_device`); ``torchrun`` /
``accelerate launch`` give data parallelism; ``--device_map auto`` spreads one large model
over the GPUs of one process.

Progress: ``--no_progress`` (or a stderr that is not a terminal) turns the trainer's bar into its
plain log lines (``disable_tqdm``). A run that fails removes the ``--output_dir`` folders it
created while they are still empty.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..hf.trainer import SARATrainingArguments
from .arguments import DataArguments, ModelArguments, ProgressArguments, parse_command

PROG = "python -m sara_kernels train"


@dataclass
class TrainCommandArguments:
    """What the command adds to the trainer's own arguments."""

    sara_priors: Optional[str] = field(
        default=None,
        metadata={"help": "Routing priors written by `python -m sara_kernels priors` for the same data, with "
                          "--max_length equal to --sara_max_length: training then skips the anchor forward."},
    )
    eval_data: list[str] = field(
        default_factory=list,
        metadata={"help": "Held-out pair files, read like --data (same format and columns); evaluated as "
                          "--eval_strategy says."},
    )

    def __post_init__(self):
        if isinstance(self.eval_data, (str, os.PathLike)):
            self.eval_data = [os.fspath(self.eval_data)]


def prepare(argv: list) -> Callable[[], int]:
    """Parse, load the data and the model, and build the trainer (where user errors surface); returns the run."""
    model_args, data_args, command_args, progress, training_args = parse_command(
        (ModelArguments, DataArguments, TrainCommandArguments, ProgressArguments, SARATrainingArguments), argv, PROG,
        "Fine-tune a saved MoE model with LM + sara_weight × SARA on parallel pairs (flags, or one YAML/JSON file).",
    )
    import torch

    from ..hf.trainer import SARATrainer
    from .demo import single_device

    if not progress.enabled:
        training_args.disable_tqdm = True
    single_device(training_args)
    created = _missing_folders(training_args.output_dir)
    with _removed_if_empty_on_error(created):
        train_pairs = data_args.load()
        eval_pairs = data_args.load(command_args.eval_data) if command_args.eval_data else None
        model, tokenizer = model_args.load(device=str(training_args.device))
        trainer = SARATrainer(
            model=model, args=training_args, train_dataset=train_pairs, eval_dataset=eval_pairs,
            processing_class=tokenizer, routing_priors=command_args.sara_priors,
        )

    def run() -> int:
        with _removed_if_empty_on_error(created):
            result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
            trainer.save_model()
            trainer.save_state()
        if trainer.is_world_process_zero():
            print(f"trained: {result.global_step} optimiser steps, mean loss {result.training_loss:.4f}; "
                  f"model and tokenizer saved to {training_args.output_dir}")
        if torch.distributed.is_initialized():  # an orderly exit: gloo threads alive at exit can abort the process
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        return 0

    return run


def _missing_folders(path: str) -> list:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


@contextlib.contextmanager
def _removed_if_empty_on_error(folders: list):
    """On an exception, remove those of ``folders`` (deepest first) that are empty: a failed run leaves no
    empty output folder behind, but keeps any checkpoint it wrote."""
    try:
        yield
    except BaseException:
        for folder in folders:
            try:
                os.rmdir(folder)
            except OSError:  # not empty, or already gone (another rank)
                break
        raise
