"""What SARA costs inside a training step of a real MoE architecture: the step with no alignment
loss, with the eager reference SARA loss, and with each fused SARA loss that runs on the device.

    python benchmarks/bench_router_overhead.py --out results/overhead            # GPU
    python benchmarks/bench_router_overhead.py --quick --out results/overhead    # fewer repetitions
    TRITON_INTERPRET=1 python benchmarks/bench_router_overhead.py --device cpu --tiny --out /tmp/o
                                                                                 # CPU logic check

The step part of ``python -m sara_kernels bench`` (sara_kernels/programs/bench_step.py, where the
step model and the timing are described) on its own, written as overhead.json, overhead.csv and
overhead.md: by default Qwen3-30B-A3B's routers, 8 layers deep, 4096 tokens per side, bf16.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from sara_kernels.programs.bench_archs import ARCHS, Arch, resolve_arch
from sara_kernels.programs.bench_step import (
    COLUMN_NOTES,
    COLUMNS,
    SARA_WEIGHT,
    available_variants,
    measure_step,
    step_shape,
)
from sara_kernels.programs.bench_timing import device_problem, environment, l2_cache_bytes, write_csv, write_json
from sara_kernels.programs.table import format_table

# A CPU logic check: small enough for a test, the step's structure unchanged.
TINY_ARCH = Arch("tiny", layers=2, experts=8, top_k=2, score="softmax", hidden=64, expert_width=32,
                 source="a logic check, no real model")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--arch", default="qwen3-30b-a3b", choices=list(ARCHS), type=str.lower)
    p.add_argument("--layers", type=int, default=8, help="MoE layers of the step model (default 8)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per side (default 4096)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--tiny", action="store_true", help="a tiny model for a CPU logic check")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    problem = device_problem(device, args.tiny)
    if problem:
        print(problem)
        return 2
    arch, layers, tokens = (TINY_ARCH, 2, 32) if args.tiny else (resolve_arch(args.arch), args.layers, args.tokens)
    shape = step_shape(arch, layers, tokens, seq_len=16 if args.tiny else 512, device=device)
    reps, warmup = (3, 1) if args.tiny else ((8, 3) if args.quick else (30, 5))
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    variants, notes = available_variants(device)
    print(f"{arch.name}: {layers} layers × {arch.experts} experts, hidden {arch.hidden}, {shape.tokens} tokens; "
          f"variants {variants}", flush=True)
    result = measure_step(shape, variants, device, torch.bfloat16, l2_cache_bytes(device), reps, warmup)
    rows, gate = result["rows"], result["gate_per_layer"]
    meta = dict(environment=environment(device), arch=vars(arch), step_shape=dict(
                    layers=layers, seqs_per_side=shape.seqs, seq_len=shape.seq_len, expert_width=shape.expert_width,
                    vocab=shape.vocab), params=result["params"], dtype="bf16 parameters, AdamW",
                experts_implementation=result["experts_implementation"], sara_weight=SARA_WEIGHT, reps=reps,
                warmup=warmup, gate_per_layer=gate, not_run=notes, seconds=round(time.perf_counter() - start, 1),
                columns=COLUMN_NOTES)
    write_json(os.path.join(args.out, "overhead.json"), dict(meta=meta, rows=rows))
    write_csv(os.path.join(args.out, "overhead.csv"), rows, [k for _, k in COLUMNS] + ["step_min_ms", "reps"])
    table = format_table(rows, COLUMNS)
    with open(os.path.join(args.out, "overhead.md"), "w") as f:
        env = meta["environment"]
        f.write(f"# SARA overhead in a training step of {arch.name}'s routers\n\nCard: {env['card']}; torch {env['torch']}, "
                f"triton {env['triton']}, transformers {env['transformers']}; {env['date']}.\n"
                f"Model: {layers} layers × {arch.experts} experts (top-{arch.top_k}), hidden {arch.hidden}, expert width "
                f"{shape.expert_width}, {result['params'] / 1e6:.1f}M params, experts implementation "
                f"{result['experts_implementation']}; batch {shape.batch} × {shape.seq_len} tokens. "
                f"Router gate fwd+bwd per layer: {gate['fwd_bwd_ms']:.4f} ms.\n\n```\n{table}\n```\n")
    print(table)
    print(f"router gate fwd+bwd: {gate['fwd_bwd_ms']:.4f} ms per layer; results in {args.out} ({meta['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
