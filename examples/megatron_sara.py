"""SARA on a tiny Megatron-core MoE GPT: the spec gets SARA with with_sara, each micro-batch's model
call is wrapped in sara_batch, and the loss function stays the plain LM loss.

    python examples/megatron_sara.py --steps 10
    python examples/megatron_sara.py --steps 3 --priors priors.safetensors   # cached anchors

Synthetic parallel data: each target sequence is its anchor "translated" by a fixed token
permutation, so a model that routes by meaning can route both alike. Runs on one process (a gloo
group of one on a CPU, with the stand-ins of examples/megatron_cpu.py for megatron-core's CUDA-only
pieces) or on a GPU with Megatron's own modules.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.pipeline_parallel.schedules import backward_step, forward_step
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker
from megatron.core.transformer.transformer_config import TransformerConfig

from sara_kernels.megatron import TRACKER_NAME, SARAOptions, SARARouter, extract_routing_priors, sara_batch, with_sara

VOCAB, SEQ_LEN, EXPERTS, LAYERS = 64, 12, 8, 4
ON_GPU = torch.cuda.is_available()
# megatron-core 0.19 dropped backward_step's model_type argument (0.16 takes it before config).
BACKWARD_STEP_MODEL_TYPE = ((ModelType.encoder_or_decoder,)
                            if "model_type" in inspect.signature(backward_step).parameters else ())


def build_model(seed: int, options: SARAOptions, priors=None) -> GPTModel:
    spec = get_gpt_layer_local_spec(num_experts=EXPERTS)
    router_class = SARARouter
    if not ON_GPU:
        from megatron_cpu import CPUGatingSARARouter, with_sdpa_attention

        spec, router_class = with_sdpa_attention(spec), CPUGatingSARARouter
    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, moe_ffn_hidden_size=32,
        num_moe_experts=EXPERTS, moe_router_topk=2, moe_token_dispatcher_type="allgather", moe_aux_loss_coeff=1e-2,
        moe_router_load_balancing_type="aux_loss", add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=not ON_GPU, params_dtype=torch.float32,
    )
    torch.manual_seed(seed)
    model = GPTModel(config=config, transformer_layer_spec=with_sara(spec, options, priors=priors, router_class=router_class),
                     vocab_size=VOCAB, max_sequence_length=SEQ_LEN, position_embedding_type="learned_absolute")
    return model.cuda() if ON_GPU else model


def parallel_data(num_pairs: int, seed: int):
    """(anchor token lists, target token lists): targets are anchors under a fixed permutation."""
    g = torch.Generator().manual_seed(seed)
    translate = torch.randperm(VOCAB, generator=g)
    lengths = torch.randint(4, SEQ_LEN + 1, (num_pairs,), generator=g).tolist()
    anchors = [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]
    return [a.tolist() for a in anchors], [translate[a].tolist() for a in anchors]


def micro_batch(anchors, targets, examples):
    """[anchors; targets] of ``examples``, right-padded: tokens, positions, padding mask, LM loss mask."""
    rows = [anchors[i] for i in examples] + [targets[i] for i in examples]
    tokens = torch.zeros(len(rows), SEQ_LEN, dtype=torch.long)
    padding = torch.ones(len(rows), SEQ_LEN, dtype=torch.bool)
    for j, row in enumerate(rows):
        tokens[j, : len(row)], padding[j, : len(row)] = torch.tensor(row), False
    device = "cuda" if ON_GPU else "cpu"
    positions = torch.arange(SEQ_LEN).expand(len(rows), -1)
    return tokens.to(device), positions.to(device), padding.to(device), (~padding).float().to(device)


def lm_loss(loss_mask, per_token_loss):
    loss = (per_token_loss.float() * loss_mask).sum() / loss_mask.sum()
    return loss, {"lm loss": loss.detach()}


def forward_step_func(batches, use_priors, data_iterator, model):
    examples = next(data_iterator)
    tokens, positions, padding, loss_mask = batches[examples]
    pairs = len(examples)
    # live: columns [anchors; targets]; priors: the micro-batch holds the targets only
    layout = (dict(example_index=list(examples)) if use_priors
              else dict(anchor=list(range(pairs)), target=list(range(pairs, 2 * pairs))))
    with sara_batch(**layout):
        output = model(tokens, positions, None, labels=tokens, padding_mask=padding)
    return output, functools.partial(lm_loss, loss_mask)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--pairs-per-micro-batch", type=int, default=4)
    # The JS between two near-uniform random routings is ~1e-4: a large weight makes it visible here.
    parser.add_argument("--sara-weight", type=float, default=100.0)
    parser.add_argument("--priors", default=None, help="extract the anchors' routing here first and train on it")
    args = parser.parse_args(argv)

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("nccl" if ON_GPU else "gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0, inference_rng_tracker=not ON_GPU)

    num_pairs = args.micro_batches * args.pairs_per_micro_batch
    anchors, targets = parallel_data(num_pairs, seed=1)
    options = SARAOptions(sara_weight=args.sara_weight, sara_layers="middle")
    priors = None
    if args.priors:  # the anchors' routing before training, cached; training then runs targets only
        priors = extract_routing_priors(build_model(0, options), anchors, args.priors)
        print(f"priors {tuple(priors.probs.shape)} for layers {list(priors.layers)} -> {args.priors}")
    model = build_model(0, options, priors=priors)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    groups = [tuple(range(i, i + args.pairs_per_micro_batch)) for i in range(0, num_pairs, args.pairs_per_micro_batch)]
    batches = {examples: micro_batch(anchors, targets, examples) for examples in groups}
    if priors is not None:  # targets only: the anchors come from the priors file
        batches = {ex: tuple(t[len(ex):] for t in batch) for ex, batch in batches.items()}
    step_func = functools.partial(forward_step_func, batches, priors is not None)

    history = []
    for step in range(args.steps):
        optimizer.zero_grad()
        lm, data = [], iter(groups)
        # Megatron's forward_backward_no_pipelining runs exactly this per micro-batch (on a GPU call
        # get_forward_backward_func() instead; on a CPU it cannot run: it allocates on CUDA).
        for i in range(args.micro_batches):
            store = []
            output, _ = forward_step(step_func, data, model, args.micro_batches, None, store, model.config,
                                     cp_group_size=1, is_first_microbatch=i == 0, current_microbatch=i)
            backward_step(None, output, None, *BACKWARD_STEP_MODEL_TYPE, model.config)
            lm.append(store[-1]["lm loss"])
        optimizer.step()
        tracker = get_moe_layer_wise_logging_tracker()
        sara = tracker[TRACKER_NAME]["values"] / args.micro_batches  # summed over micro-batches
        balance = tracker["load_balancing_loss"]["values"] / args.micro_batches
        layers = list(model.decoder.layers[0].mlp.router.sara_layers)
        print(f"step {step:3d}  lm {torch.stack(lm).mean().item():.4f}  "
              f"sara/layer {[round(v, 5) for v in sara[layers].tolist()]}  load_balancing {balance.sum().item():.4f}")
        history.append(sara[layers].mean().item())
        clear_aux_losses_tracker()
    print(f"sara_loss (mean over the SARA layers): first step {history[0]:.3e}, last step {history[-1]:.3e}")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
