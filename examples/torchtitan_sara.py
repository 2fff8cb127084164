"""SARA in torchtitan's own Qwen3-MoE, trained a few steps on a CPU: ``python examples/torchtitan_sara.py --steps 5``.

The model is torchtitan 0.3.0's ``debugmodel_moe`` (64 experts, softmax routers) cut to
``--layers`` decoder layers, built through its model registry with :class:`SARAConverter` in
``converters=``, as torchtitan's quantization and LoRA converters are. Each step is one
forward-backward of torchtitan's trainer (``Trainer.forward_backward_step``) written out:
torchtitan's cross-entropy (summed, divided by the step's valid tokens), inside ``sara_step``,
whose one ``SARAMicrobatch`` says that rows 0..P-1 are anchors and rows P..2P-1 their targets.
The SARA gradient enters through each router; the loss function is torchtitan's, unchanged.

The data are synthetic parallel sentences: a target row is its anchor's words through a fixed
word map (another "language"). On a CPU each layer's FlexAttention (which has no CPU backward)
is replaced by torchtitan's ``ScaledDotProductAttention`` (causal, no document masks); on a GPU
pass ``--attention flex``.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torchtitan.components.loss import CrossEntropyLoss
from torchtitan.models import qwen3
from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention

from sara_kernels.torchtitan import SARAConverter, SARAMicrobatch, SARAOptions, sara_metrics, sara_step

VOCAB = 2048


def build_model(num_layers: int, options: SARAOptions, attention: str, seed: int = 0):
    spec = qwen3.model_registry("debugmodel_moe", attn_backend="flex")
    config = copy.deepcopy(spec.model)
    config.layers = config.layers[:num_layers]  # before the converter: sara_layers counts these layers
    if attention == "sdpa":
        for _, _, parent, attr in list(config.traverse(FlexAttention.Config)):
            setattr(parent, attr, ScaledDotProductAttention.Config())
    config = SARAConverter.Config(options=options).build().convert(config)
    with torch.device("meta"):
        model = config.build()
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights(buffer_device=torch.device("cpu"))
    return model


def parallel_batch(pairs: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """[2 * pairs, seq_len + 1] token rows: anchors, then their translations through a fixed word map."""
    word_map = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(99))
    anchors = torch.randint(0, VOCAB, (pairs, seq_len + 1), generator=generator)
    return torch.cat([anchors, word_map[anchors]])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--sara-weight", type=float, default=1.0)
    parser.add_argument("--attention", choices=["sdpa", "flex"], default="sdpa")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    options = SARAOptions(sara_weight=args.sara_weight, sara_layers="all")
    model = build_model(args.layers, options, args.attention).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = CrossEntropyLoss.Config().build()
    generator = torch.Generator().manual_seed(0)
    layout = SARAMicrobatch(valid_tokens=2 * args.pairs * args.seq_len,
                            anchor=list(range(args.pairs)), target=list(range(args.pairs, 2 * args.pairs)))
    for step in range(args.steps):
        rows = parallel_batch(args.pairs, args.seq_len, generator)
        inputs, labels = rows[:, :-1], rows[:, 1:]
        global_valid_tokens = torch.tensor(labels.numel())  # one rank, no accumulation: this micro-batch's
        optimizer.zero_grad()
        with sara_step([layout], global_valid_tokens=global_valid_tokens):
            loss, _ = loss_fn(model(inputs), labels, global_valid_tokens)
            loss.backward()
        optimizer.step()
        js = sara_metrics(model)
        print(f"step {step:4d}  lm loss {loss.item():.4f}  " + "  ".join(f"{k} {v:.5f}" for k, v in js.items()))


if __name__ == "__main__":
    main()
