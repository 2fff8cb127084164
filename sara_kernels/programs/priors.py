"""The ``priors`` command: cache the anchors' routing of a saved model for ``train --sara_priors``.

``python -m sara_kernels priors --model ./my-moe --data pairs.jsonl --out priors.safetensors``
reads the pairs exactly as ``train`` does (same ``--data`` and column options: the file is tied
to the pairs' order) and writes :func:`sara_kernels.hf.extract_routing_priors`' file. Give
``--max_length`` equal to the training's ``--sara_max_length``; ``--layers all`` (the default)
serves any ``--sara_layers``. It runs as one process (``--device_map auto`` for a model larger
than one GPU); :func:`~sara_kernels.hf.extract_routing_priors` called under torchrun shares the
work between ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

from .arguments import DataArguments, ModelArguments, ProgressArguments, RoutingArguments, parse_command

PROG = "python -m sara_kernels priors"


@dataclass
class PriorsArguments(RoutingArguments):
    out: str = field(default="routing_priors.safetensors", metadata={"help": "The priors file to write (safetensors)."})
    anchor_answers: bool = field(
        default=False,
        metadata={"help": "Also record whether the model reproduces each anchor's answer, for training with "
                          "--sara_anchor_filter correct (each pair needs an 'answer' or a chat anchor's reply)."},
    )


def prepare(argv: list) -> Callable[[], int]:
    """Parse, load the data and the model, and check it has MoE routers; returns the extraction."""
    model_args, data_args, args, progress = parse_command(
        (ModelArguments, DataArguments, PriorsArguments, ProgressArguments), argv, PROG,
        "Extract the anchors' routing priors of a saved MoE model for `train --sara_priors` (flags, or one YAML/JSON file).",
    )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        # Every rank would extract all anchors and write the same file at once.
        raise ValueError(
            f"priors runs as one process (WORLD_SIZE={world_size}): start it with python, not torchrun "
            "(--device_map auto spreads a model too large for one GPU over several)"
        )
    from ..hf.priors import extract_routing_priors
    from ..hf.routing import probe_routing

    pairs = data_args.load()
    model, tokenizer = model_args.load()
    probe_routing(model, args.layers, args.score)  # a model without MoE routers fails here, before any work

    def run() -> int:
        priors = extract_routing_priors(
            model, pairs, tokenizer, args.out, layers=args.layers, score=args.score, temperature=args.temperature,
            batch_size=args.batch_size, max_length=args.max_length, backend=args.backend, progress=progress.enabled,
            anchor_answers=args.anchor_answers,
        )
        print(f"wrote the routing priors of {priors.num_examples} anchors (decoder layers {list(priors.layers)}, "
              f"{priors.num_experts} experts, {priors.score}, max_length {priors.max_length}) to {args.out}")
        return 0

    return run
