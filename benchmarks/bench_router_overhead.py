"""What SARA costs inside a training step: a transformers Qwen3-MoE step with no alignment
loss, with the eager reference SARA loss, and with each fused SARA loss that runs on the device.

    python benchmarks/bench_router_overhead.py --out results/overhead            # GPU
    python benchmarks/bench_router_overhead.py --quick --out results/overhead    # gpu_ci
    TRITON_INTERPRET=1 python benchmarks/bench_router_overhead.py --device cpu --tiny --out /tmp/o
                                                                                 # CPU logic check

The model is built from a config with random weights (nothing is downloaded): 8 MoE layers,
hidden 1024, 64 experts (top-8), bf16 parameters and AdamW, one batch of 16 × 512 = 8k tokens.
Router logits come from ``output_router_logits=True`` (``outputs.router_logits``: L tensors
[B·S, E]); the anchor is the first half of the batch and the target the second, as in SARA
training. Every variant requests the router logits (and so pays the load-balancing aux loss),
so the variants differ only by the SARA loss.

Why the extra measurements: a step takes tens of milliseconds and the fused op a fraction of
one, so step-time differences sit near the run-to-run noise. Variants are therefore timed
round-robin (drift hits all of them alike), and the op is also timed on its own at the step's
shapes, together with the router gate it rides on (the [N, H] × [H, E] linear of every
layer, forward and backward), which gives a noise-free "overhead relative to the gate".
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import sara_kernels
from sara_kernels.backends import REGISTRY
from sara_kernels.programs.table import format_table

from common import (
    copies_for,
    device_problem,
    environment,
    l2_cache_bytes,
    median,
    peak_extra_bytes,
    time_calls,
    write_csv,
    write_json,
)
from sara_contenders import skip_reason

SARA_WEIGHT = 0.1  # λ of loss = LM loss + aux loss + λ·SARA (the value does not change the cost)


@dataclass(frozen=True)
class Setup:
    layers: int
    hidden: int
    experts: int
    top_k: int
    moe_intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int  # sequences; the first half is the anchor side, the second the target side
    seq_len: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


GPU_SETUP = Setup(layers=8, hidden=1024, experts=64, top_k=8, moe_intermediate=384, heads=16, kv_heads=4,
                  vocab=32000, batch=16, seq_len=512)
TINY_SETUP = Setup(layers=2, hidden=64, experts=8, top_k=2, moe_intermediate=32, heads=4, kv_heads=2,
                   vocab=256, batch=4, seq_len=16)


def build_model(setup: Setup, device: torch.device):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=setup.vocab, hidden_size=setup.hidden, intermediate_size=4 * setup.hidden,
        moe_intermediate_size=setup.moe_intermediate, num_hidden_layers=setup.layers,
        num_attention_heads=setup.heads, num_key_value_heads=setup.kv_heads, head_dim=setup.hidden // setup.heads,
        num_experts=setup.experts, num_experts_per_tok=setup.top_k, max_position_embeddings=max(4096, setup.seq_len),
        output_router_logits=True, use_cache=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3MoeForCausalLM(config)
    model.to(torch.bfloat16).train()
    return model


def make_batch(setup: Setup, device):
    gen = torch.Generator(device="cpu").manual_seed(1)
    input_ids = torch.randint(0, setup.vocab, (setup.batch, setup.seq_len), generator=gen).to(device)
    lengths = torch.randint(setup.seq_len // 2, setup.seq_len + 1, (setup.batch,), generator=gen)
    attention_mask = (torch.arange(setup.seq_len)[None, :] < lengths[:, None]).long().to(device)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def sara_term(outputs, attention_mask, backend: str):
    """SARA between the two halves of the batch, from the step's router logits."""
    half = attention_mask.shape[0] // 2
    rows = half * attention_mask.shape[1]
    anchor = tuple(r[:rows] for r in outputs.router_logits)
    target = tuple(r[rows:] for r in outputs.router_logits)
    return sara_kernels.sara_loss(anchor, target, attention_mask[:half], attention_mask[half:], backend=backend)


def make_step(model, optimizer, batch, variant: str):
    """One optimizer step; ``variant`` is "none" (no SARA) or the SARA backend (a name of the registry)."""

    def step(*_):
        outputs = model(**batch, output_router_logits=True)
        loss = outputs.loss
        if variant != "none":
            loss = loss + SARA_WEIGHT * sara_term(outputs, batch["attention_mask"], variant)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return None

    return step


def available_variants(device) -> tuple:
    """(variants to run, notes on the ones left out): "none", then every backend of the registry
    that runs on ``device``, the reference (which runs anywhere) before the fused ones; a note
    says why each other backend is left out."""
    variants, notes = ["none"], {}
    for name in sorted(REGISTRY, key=lambda name: REGISTRY[name].fused):
        reason = skip_reason(name, device)
        if reason:
            notes[name] = reason
        else:
            variants.append(name)
    return variants, notes


def time_steps(model, optimizer, batch, variants, device, reps: int, warmup: int) -> dict:
    """Median step time per variant, timed round-robin so slow drift affects all alike; plus
    extra peak memory of one step beyond the parameters, gradients and optimizer state."""
    steps = {v: make_step(model, optimizer, batch, v) for v in variants}
    for v in variants:
        time_calls(device, steps[v], copies=1, reps=warmup, warmup=0)
    times = {v: [] for v in variants}
    for _ in range(reps):
        for v in variants:
            times[v] += time_calls(device, steps[v], copies=1, reps=1, warmup=0)
    memory = {v: peak_extra_bytes(device, steps[v])[1] for v in variants}
    return {v: dict(median_ms=median(times[v]), min_ms=min(times[v]), reps=len(times[v]), extra_peak_bytes=memory[v])
            for v in variants}


def time_gate(setup: Setup, device, l2_bytes: int, reps: int, warmup: int) -> dict:
    """The router gate of one layer (x [N, H] · Wᵀ [H, E], no bias), forward and fwd+bwd, bf16,
    rotating over L2-cold input copies like the SARA op's inputs."""
    n = setup.tokens
    copies = copies_for(n * setup.hidden * 2, l2_bytes)
    xs = [torch.randn(n, setup.hidden, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(copies)]
    w = torch.randn(setup.experts, setup.hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    upstream = torch.randn(n, setup.experts, device=device, dtype=torch.bfloat16)

    def fwd(i, _):
        return F.linear(xs[i], w)

    def fwd_bwd(i, _):
        return torch.autograd.grad(F.linear(xs[i], w), (xs[i], w), upstream)

    return dict(
        fwd_ms=median(time_calls(device, fwd, copies=copies, reps=reps, warmup=warmup)),
        fwd_bwd_ms=median(time_calls(device, fwd_bwd, copies=copies, reps=reps, warmup=warmup)),
        copies=copies,
    )


def time_sara_alone(setup: Setup, backends, device, l2_bytes: int, reps: int, warmup: int) -> dict:
    """SARA fwd+bwd on its own at the step's shapes: L tensors [N/2, E] bf16 per side, the
    step's attention mask, L2-cold input copies."""
    half_tokens = setup.tokens // 2
    side_bytes = setup.layers * half_tokens * setup.experts * 2
    copies = copies_for(2 * side_bytes, l2_bytes)
    batch = make_batch(setup, device)
    mask = batch["attention_mask"]
    half = setup.batch // 2

    def side():
        return tuple(torch.randn(half_tokens, setup.experts, device=device, dtype=torch.bfloat16, requires_grad=True)
                     for _ in range(setup.layers))

    anchors = [side() for _ in range(copies)]
    targets = [side() for _ in range(copies)]
    results = {}
    for backend in backends:
        def fwd_bwd(i, _, backend=backend):
            loss = sara_kernels.sara_loss(anchors[i], targets[i], mask[:half], mask[half:], backend=backend)
            return torch.autograd.grad(loss, targets[i])

        results[backend] = dict(fwd_bwd_ms=median(time_calls(device, fwd_bwd, copies=copies, reps=reps, warmup=warmup)),
                                copies=copies)
    return results


def overhead_rows(steps: dict, gate: dict, alone: dict, setup: Setup) -> list:
    base = steps["none"]["median_ms"]
    gate_all_layers = gate["fwd_bwd_ms"] * setup.layers
    rows = []
    for variant, r in steps.items():
        added = r["median_ms"] - base
        row = dict(
            variant=variant, step_ms=round(r["median_ms"], 3), step_min_ms=round(r["min_ms"], 3), reps=r["reps"],
            added_ms=round(added, 3), overhead_pct_of_step=round(100 * added / base, 3),
            added_vs_all_gates=round(added / gate_all_layers, 3),
            extra_peak_mb=None if r["extra_peak_bytes"] is None else round(r["extra_peak_bytes"] / 2**20, 1),
        )
        if variant in alone:
            op = alone[variant]["fwd_bwd_ms"]
            row.update(op_alone_ms=round(op, 4), op_alone_pct_of_step=round(100 * op / base, 3),
                       op_alone_vs_all_gates=round(op / gate_all_layers, 3))
        rows.append(row)
    return rows


COLUMNS = [
    ("variant", "variant"), ("step ms", "step_ms"), ("+ms", "added_ms"), ("% of step", "overhead_pct_of_step"),
    ("÷ gates", "added_vs_all_gates"), ("op alone ms", "op_alone_ms"), ("op % of step", "op_alone_pct_of_step"),
    ("op ÷ gates", "op_alone_vs_all_gates"), ("extra peak MB", "extra_peak_mb"),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (gpu_ci)")
    p.add_argument("--tiny", action="store_true", help="a tiny model for a CPU logic check")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    problem = device_problem(device, args.tiny)
    if problem:
        print(problem)
        return 2
    setup = TINY_SETUP if args.tiny else GPU_SETUP
    reps, warmup = (3, 1) if args.tiny else ((8, 3) if args.quick else (30, 5))
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    l2_bytes = l2_cache_bytes(device)
    variants, notes = available_variants(device)

    model = build_model(setup, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    batch = make_batch(setup, device)
    params = sum(p.numel() for p in model.parameters())
    print(f"Qwen3-MoE {setup.layers} layers × {setup.experts} experts, hidden {setup.hidden}, {params / 1e6:.1f}M params, "
          f"{setup.tokens} tokens; variants {variants}", flush=True)
    steps = time_steps(model, optimizer, batch, variants, device, reps, warmup)
    experts_impl = getattr(model.config, "_experts_implementation", None)
    del model, optimizer
    gate = time_gate(setup, device, l2_bytes, 10 * reps, warmup)
    alone = time_sara_alone(setup, [v for v in variants if v != "none"], device, l2_bytes, 10 * reps, warmup)
    rows = overhead_rows(steps, gate, alone, setup)

    meta = dict(
        environment=environment(device), setup=asdict(setup), params=params, dtype="bf16 parameters, AdamW",
        experts_implementation=experts_impl, sara_weight=SARA_WEIGHT, reps=reps, warmup=warmup,
        gate_per_layer=gate, not_run=notes, seconds=round(time.perf_counter() - start, 1),
        columns={
            "added_ms": "step time minus the step without SARA (median of round-robin steps)",
            "added_vs_all_gates": "added_ms / (router gate fwd+bwd × layers)",
            "op_alone_ms": "SARA fwd+bwd timed on its own at the step's shapes (L2-cold)",
            "extra_peak_mb": "peak memory of one step beyond parameters, gradients and optimizer state",
        },
    )
    write_json(os.path.join(args.out, "overhead.json"), dict(meta=meta, rows=rows))
    write_csv(os.path.join(args.out, "overhead.csv"), rows, [k for _, k in COLUMNS] + ["step_min_ms", "reps"])
    table = format_table(rows, COLUMNS)
    with open(os.path.join(args.out, "overhead.md"), "w") as f:
        env = meta["environment"]
        f.write(f"# SARA overhead in a Qwen3-MoE training step\n\nCard: {env['card']}; torch {env['torch']}, "
                f"triton {env['triton']}, transformers {env['transformers']}; {env['date']}.\n"
                f"Model: {setup.layers} layers × {setup.experts} experts (top-{setup.top_k}), hidden {setup.hidden}, "
                f"{params / 1e6:.1f}M params, experts implementation {experts_impl}; batch {setup.batch} × {setup.seq_len} "
                f"tokens. Router gate fwd+bwd per layer: {gate['fwd_bwd_ms']:.4f} ms.\n\n```\n{table}\n```\n")
    print(table)
    print(f"router gate fwd+bwd: {gate['fwd_bwd_ms']:.4f} ms per layer; results in {args.out} ({meta['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
