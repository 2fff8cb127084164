"""The anchor's routing-only forward with and without early exit, on the demo's model.

    python benchmarks/bench_early_exit.py --machine "the development CPU box" --out benchmarks/results/early_exit_cpu_box.txt
    python benchmarks/bench_early_exit.py --batches 2 --reps 1     # logic check

The forward is the one ``SARATrainer`` runs for live anchors (``SARATermMixin._sara_anchor_routing``):
``torch.no_grad()``, ``capture_router_logits(model, layers=..., early_exit=...)``, the forward
options of a routing-only pass (``logits_to_keep=1``, no KV cache), on anchors of the demo's
synthetic corpus tokenised and right-padded as the collator does, ``--batch`` per forward. The
model is the demo's (``python -m sara_kernels demo``: a random Qwen3-MoE, 4 layers, all MoE, 8
experts, top-2), with ``--layers middle`` by default (MoE layers 1 and 2): early exit then skips
layer 2's experts, layer 3, the final norm and the one-position LM head.

Reported: the median time of a pass over the batches in each mode, timed round-robin (drift
hits both alike), and their ratio; the router logits of the two modes compared (equal); and
the fraction of the forward's FLOPs that early exit skips, counted from the model's shapes
(matrix products only: projections, attention scores and values over the padded length, router,
the top-k experts, the LM head at one position), for the demo's model on these batches and,
from the shapes alone, for Qwen3-30B-A3B with layers 7-34 (its published config, typed in here).
Ratios are what transfers between machines; absolute times are this machine's.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch

from sara_kernels.hf import SARACollator, capture_router_logits
from sara_kernels.hf.collate import pad_right, pad_token_id
from sara_kernels.hf.routing import forward_kwargs
from sara_kernels.layer_selection import resolve_layers_spec
from sara_kernels.programs.corpus import build_word_tokenizer, make_parallel_corpus
from sara_kernels.programs.demo import build_tiny_model
from sara_kernels.programs.table import format_table

from bench_packing import cpu_name


def is_moe_layer(config, layer: int) -> bool:
    """Qwen3-MoE's rule for which decoder layers have routed experts."""
    sparse = config.num_experts > 0 and (layer + 1) % config.decoder_sparse_step == 0
    return sparse and layer not in config.mlp_only_layers


def layer_flops(config, seq_len: int) -> dict:
    """FLOPs per token of one decoder layer's parts (2 per multiply-add), at padded length ``seq_len``."""
    h, hd = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    return {
        "attention": 2 * h * (2 * q + 2 * kv) + 2 * 2 * q * seq_len,  # q, k, v, o projections; scores and values
        "router": 2 * h * config.num_experts,
        "experts": config.num_experts_per_tok * 3 * 2 * h * config.moe_intermediate_size,
        "dense_mlp": 3 * 2 * h * config.intermediate_size,
    }


def forward_flops(config, layers: tuple, batch: int, seq_len: int, early_exit: bool) -> float:
    """FLOPs of a routing-only forward of [batch, seq_len] tokens; with early exit it ends at the
    router of the last layer in ``layers``."""
    parts = layer_flops(config, seq_len)
    tokens = batch * seq_len
    total = 0.0
    for layer in range(config.num_hidden_layers):
        moe = is_moe_layer(config, layer)
        if early_exit and layer == layers[-1]:
            return total + tokens * (parts["attention"] + parts["router"])
        mlp = parts["router"] + parts["experts"] if moe else parts["dense_mlp"]
        total += tokens * (parts["attention"] + mlp)
    return total + batch * 2 * config.hidden_size * config.vocab_size  # logits_to_keep=1: one position per row


def qwen3_30b_a3b_config():
    """Qwen3-30B-A3B's shapes (its config.json), for the FLOPs count only: no weights."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        decoder_sparse_step=1, mlp_only_layers=[],
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="middle", help="SARA's layer selection (as sara_layers)")
    p.add_argument("--batch", type=int, default=16, help="anchors per forward (the demo's batch size)")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--reps", type=int, default=21, help="timed passes over the batches")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seq-30b", type=int, default=512, help="anchor length for the Qwen3-30B-A3B FLOPs count")
    p.add_argument("--machine", default="this machine", help="what to call the machine in the report")
    p.add_argument("--out", help="write the report here as text")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    tokenizer = build_word_tokenizer()
    model = build_tiny_model(tokenizer).train()  # the mode the trainer runs the anchor forward in
    encoder = SARACollator(tokenizer)
    pairs = make_parallel_corpus(args.batch * args.batches)
    anchors = [encoder.encode(p["anchor"], f"anchor {i}") for i, p in enumerate(pairs)]
    pad = pad_token_id(tokenizer)
    padded = [pad_right(anchors[i : i + args.batch], pad) for i in range(0, len(anchors), args.batch)]
    batches = [{"input_ids": ids, "attention_mask": mask} for ids, mask in padded]
    options = forward_kwargs(model, lm_head=False)
    layers = resolve_layers_spec(args.layers)

    def anchor_forward(inputs, early_exit: bool):
        with torch.no_grad(), capture_router_logits(model, layers=layers, early_exit=early_exit) as captured:
            model(**inputs, **options)
        return captured

    modes = {"full forward": False, "early exit": True}
    for inputs in batches:  # warm-up, and the two modes' router logits compared
        full, early = (anchor_forward(inputs, flag) for flag in modes.values())
        if not early.stopped_early or full.layers != early.layers or not all(
            torch.equal(a, b) for a, b in zip(full.logits, early.logits)
        ):
            raise SystemExit("early exit did not stop, or its router logits differ from the full forward's")
    selected = full.layers
    pass_ms = {mode: [] for mode in modes}
    for _ in range(args.reps):
        elapsed = dict.fromkeys(modes, 0.0)
        for inputs in batches:
            for mode, flag in modes.items():
                start = time.perf_counter()
                anchor_forward(inputs, flag)
                elapsed[mode] += time.perf_counter() - start
        for mode in modes:
            pass_ms[mode].append(1e3 * elapsed[mode])
    median = {mode: statistics.median(pass_ms[mode]) for mode in modes}

    config = model.config
    demo_flops = {mode: sum(forward_flops(config, selected, *b["input_ids"].shape, flag) for b in batches)
                  for mode, flag in modes.items()}
    big, big_layers = qwen3_30b_a3b_config(), tuple(range(7, 35))
    big_flops = {mode: forward_flops(big, big_layers, 1, args.seq_30b, flag) for mode, flag in modes.items()}
    rows = [dict(mode=mode, pass_ms=f"{median[mode]:.1f}", ratio=f"{median[mode] / median['full forward']:.3f}",
                 flops=f"{demo_flops[mode] / demo_flops['full forward']:.3f}",
                 big=f"{big_flops[mode] / big_flops['full forward']:.3f}") for mode in modes]
    lengths = [int(b["attention_mask"].shape[1]) for b in batches]
    machine = f"{args.machine} ({cpu_name()}, {os.cpu_count()} CPUs, {args.threads} torch thread(s))"
    header = [
        "# benchmarks/bench_early_exit.py: the anchor's routing-only forward with and without early exit, "
        f"on {machine}, {datetime.date.today().isoformat()}",
        f"# torch {torch.__version__}; the demo's model (Qwen3-MoE hidden {config.hidden_size}, "
        f"{config.num_hidden_layers} layers, {config.num_experts} experts, top-{config.num_experts_per_tok}, "
        f"vocabulary {config.vocab_size}); layers={args.layers!r} -> {list(selected)}; {args.batches} batches of "
        f"{args.batch} anchors, padded lengths {min(lengths)}-{max(lengths)}; median of {args.reps} round-robin passes",
        "# the time ratio is the result; absolute times are this machine's, under whatever else it ran",
        "# router logits of the two modes: equal (torch.equal) on every batch",
        "# FLOPs: matrix products counted from the shapes; Qwen3-30B-A3B: layers 7-34 of 48, one anchor of "
        f"{args.seq_30b} tokens, shapes only (nothing run)",
    ]
    table = format_table(rows, [("mode", "mode"), ("ms per pass", "pass_ms"), ("time / full", "ratio"),
                                ("FLOPs / full (demo)", "flops"), ("FLOPs / full (Qwen3-30B-A3B)", "big")])
    report = "\n".join(header) + "\n" + table
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
