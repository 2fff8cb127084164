"""Packed (padding-free) against padded SARATrainer steps on a length-skewed set of pairs.

    python benchmarks/bench_packing.py --machine "the development CPU box" --out benchmarks/results/packing_cpu_box.txt
    python benchmarks/bench_packing.py --pairs 8 --batch 4 --reps 1 --json /tmp/p.json   # logic check

The pairs are instruction-like and uneven: each joins k sentence pairs of the synthetic parallel
corpus, with k = 1 for most pairs and a long tail (k from ``--skew``), so a padded batch is mostly
padding whenever it holds one long pair. The model is a random Qwen3-MoE built from a config
(nothing is downloaded). One step is what ``Trainer.training_step`` does for one micro-batch —
collating the pairs, the anchor's no-grad forward, the target's forward with SARA, the
backward — with ``sara_packing`` off and on, on the same batches, timed round-robin (drift
hits both alike) as the median over ``--reps`` passes over the batches.

Reported per mode: the padding fraction (padded positions over all positions the forwards
run, after each side is trimmed to its longest sequence), the median step time, and the
packed/padded ratios; plus the largest relative difference of the two modes' losses, which
shows they compute the same step. Ratios are what transfers between machines; absolute times
are this machine's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time

import torch

from sara_kernels.hf import SARATrainer, SARATrainingArguments
from sara_kernels.programs.corpus import build_word_tokenizer, make_parallel_corpus
from sara_kernels.programs.table import format_table


def skewed_pairs(num_pairs: int, skew: list[int], seed: int = 0) -> list[dict]:
    """Pairs joining k sentence pairs each, k drawn from ``skew`` (one entry per draw outcome)."""
    rng = random.Random(seed)
    counts = [rng.choice(skew) for _ in range(num_pairs)]
    sentences = make_parallel_corpus(sum(counts), seed=seed)
    pairs, start = [], 0
    for k in counts:
        chunk = sentences[start : start + k]
        start += k
        pairs.append({"anchor": " ".join(p["anchor"] for p in chunk), "target": " ".join(p["target"] for p in chunk)})
    return pairs


def tiny_model(tokenizer, args):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        moe_intermediate_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=args.hidden // 4, num_experts=args.experts, num_experts_per_tok=2,
        max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return Qwen3MoeForCausalLM(config)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def padding_fraction(batch, num_pairs: int) -> float:
    """Padded positions over the positions the two forwards run (each side trimmed to its longest)."""
    if "attention_mask" not in batch:
        return 0.0
    mask = batch["attention_mask"]
    run = 0
    for side in (mask[:num_pairs], mask[num_pairs:]):
        run += side.shape[0] * int(side.sum(dim=1).max())
    return 1.0 - float(mask.sum()) / run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="pairs per micro-batch")
    p.add_argument("--skew", type=int, nargs="+", default=[1] * 12 + [2, 3, 4, 12],
                   help="sentences per pair, one value drawn uniformly per pair")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--reps", type=int, default=5, help="timed passes over the batches")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--machine", default="this machine", help="what to call the machine in the report")
    p.add_argument("--json", help="write the results here as JSON")
    p.add_argument("--out", help="write the report here as text")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    tokenizer = build_word_tokenizer()
    pairs = skewed_pairs(args.pairs, args.skew)
    batches = [pairs[i : i + args.batch] for i in range(0, len(pairs), args.batch)]
    model = tiny_model(tokenizer, args)
    trainers = {}
    output_dir = tempfile.mkdtemp(prefix="bench_packing_")  # the Trainer insists on one; nothing is saved
    for mode in ("padded", "packed"):
        targs = SARATrainingArguments(output_dir=output_dir, use_cpu=True, report_to="none", sara_weight=1.0,
                                      sara_packing=mode == "packed", disable_tqdm=True, save_strategy="no")
        trainers[mode] = SARATrainer(model=model, args=targs, train_dataset=pairs, processing_class=tokenizer)

    def step(mode, examples):
        trainer = trainers[mode]
        start = time.perf_counter()
        loss = trainer.training_step(model, trainer.data_collator(examples))
        elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        return elapsed, float(loss)

    for mode in trainers:  # warm-up: first calls allocate and build the masks' code paths
        step(mode, batches[0])
    times = {mode: [] for mode in trainers}
    losses = {mode: [] for mode in trainers}
    for _ in range(args.reps):
        for examples in batches:
            for mode in trainers:
                elapsed, loss = step(mode, examples)
                times[mode].append(elapsed)
                losses[mode].append(loss)
    pass_ms = {mode: 1e3 * statistics.median(
        sum(times[mode][r * len(batches) : (r + 1) * len(batches)]) for r in range(args.reps)) for mode in trainers}
    padding = {mode: statistics.mean(padding_fraction(trainers[mode].data_collator(b), len(b)) for b in batches)
               for mode in trainers}
    loss_diff = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(losses["padded"], losses["packed"]))
    rows = [dict(mode=mode, padding=f"{padding[mode]:.3f}", pass_ms=f"{pass_ms[mode]:.1f}",
                 ratio=f"{pass_ms[mode] / pass_ms['padded']:.3f}") for mode in trainers]
    lengths = [len(tokenizer(p["target"])["input_ids"]) for p in pairs]
    machine = f"{args.machine} ({cpu_name()}, {os.cpu_count()} CPUs, {args.threads} torch thread(s))"
    header = [
        f"# benchmarks/bench_packing.py: SARATrainer steps, padded vs packed (sara_packing=True), on {machine}, "
        f"{datetime.date.today().isoformat()}",
        f"# torch {torch.__version__}; {args.pairs} pairs, {args.batch} per micro-batch, {len(batches)} batches; target "
        f"lengths {min(lengths)}-{max(lengths)} tokens (median {statistics.median(lengths):.0f}); Qwen3-MoE hidden "
        f"{args.hidden}, {args.layers} layers, {args.experts} experts; median of {args.reps} passes over the batches",
        f"# losses of the two modes agree to a relative {loss_diff:.1e} (the same step)",
    ]
    table = format_table(rows, [("mode", "mode"), ("padding fraction", "padding"), ("ms per pass", "pass_ms"),
                                ("time / padded", "ratio")])
    report = "\n".join(header) + "\n" + table
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), machine=machine, torch=torch.__version__, padding_fraction=padding,
                           pass_ms=pass_ms, time_ratio=pass_ms["packed"] / pass_ms["padded"],
                           loss_max_rel_diff=loss_diff), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
