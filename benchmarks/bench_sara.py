"""SARA loss benchmark: fused Triton op vs the eager reference, torch.compile of the
reference and (when one exists) a CUDA backend, at the router shapes of real MoE models.

    python benchmarks/bench_sara.py --out results/sara            # full sweep on a GPU
    python benchmarks/bench_sara.py --quick --out results/quick   # ~3 min subset (gpu_ci)
    TRITON_INTERPRET=1 python benchmarks/bench_sara.py --device cpu --tiny --quick --out /tmp/b
                                                                  # logic check on a CPU

Inputs are what a Hugging Face model hands over: per side a tuple of L separate bf16 [N, E]
router-logit tensors (``outputs.router_logits``), N tokens per side in sequences of
``--seq-len`` tokens, all valid (so the minimum traffic is well defined). Modes: ``detach``
(default ``detach_anchor=True``: gradient to the target side only), ``both``
(``detach_anchor=False``), ``priors`` (cached anchor distributions ``anchor_probs`` [L, B, E]
instead of anchor logits). Both sides' logits require grad, as they do when anchor and target
are two halves of one training batch.

Passes: ``fwd`` (with autograd recording, as in training), ``bwd`` (the gradient of a forward
run untimed just before, L2 flushed in between), ``fwd+bwd``. Timing is L2-cold and uses CUDA
events (see sara_kernels/programs/bench_timing.py for why). Per case and pass the results give
the median time with its p20/p80 spread, the CPU time to issue one call while the GPU is busy, the minimum bytes
the op must move, the achieved fraction of the device-to-device copy bandwidth measured in the
same run, the Triton op's speed-up over every contender, and extra peak memory; per case the
Triton op's kernels' own times and bandwidth fractions (torch.profiler). torch.compile of the
reference gets one stacked [L, N, E] tensor per side; its compile time is reported apart and
capped (--compile-timeout). Everything is written to ``--out`` (results.json, results.csv,
summary.md, PNG plots), rewritten after every case so an interrupted sweep keeps what it measured.

The parts: sara_cases.py (the sweeps and targets), sara_report.py (targets, tables, plots); one
case is measured by the package's sara_kernels/programs/bench_op.py (inputs, traffic, contenders,
timing), which ``python -m sara_kernels bench`` runs too.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

from sara_kernels.programs.bench_op import CONTENDERS, DTYPES, measure_case, progress_line
from sara_kernels.programs.bench_timing import L2Flusher, copy_bandwidth, device_problem, environment, l2_cache_bytes
from sara_kernels.programs.table import format_table

from sara_cases import MODEL_BY_NAME, MODES, TARGET_SHAPE, TARGETS, TINY_SEQ_LEN, TOKENS, full_sweep, quick_sweep, tiny_version
from sara_report import SUMMARY_COLUMNS, summary_rows, target_lines, write_results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny)")
    p.add_argument("--quick", action="store_true", help="the short sweep gpu_ci runs")
    p.add_argument("--tiny", action="store_true", help="tiny shapes for a CPU logic check")
    p.add_argument("--models", nargs="*", choices=list(MODEL_BY_NAME), help="default: all")
    p.add_argument("--tokens", nargs="*", type=int, help=f"tokens per side (default {TOKENS})")
    p.add_argument("--modes", nargs="*", choices=MODES, help="default: all")
    p.add_argument("--contenders", nargs="*", choices=list(CONTENDERS), default=list(CONTENDERS))
    p.add_argument("--compile-modes", nargs="*", default=None,
                   help="torch.compile modes to try (default: default, max-autotune-no-cudagraphs; --quick: default)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (B = N / seq_len)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per pass (default 30; quick 15; tiny 3)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--compile-timeout", type=float, default=240.0,
                   help="seconds one torch.compile may take before it is recorded as a timeout (default 240)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; cases not started by then are recorded as skipped, except the quick "
                        "sweep's headline case (default: none; --quick 140)")
    args = p.parse_args(argv)
    if args.compile_modes is None:
        args.compile_modes = ["default"] if (args.quick or args.tiny) else ["default", "max-autotune-no-cudagraphs"]
    if args.reps is None:
        args.reps = 3 if args.tiny else (15 if args.quick else 30)
    if args.warmup is None:
        args.warmup = 1 if args.tiny else 3
    if args.time_budget is None and args.quick and not args.tiny:
        args.time_budget = 140.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    problem = device_problem(device, args.tiny, " (TRITON_INTERPRET=1 for the Triton op)")
    if problem:
        print(problem)
        return 2
    os.makedirs(args.out, exist_ok=True)
    cases = quick_sweep(args) if args.quick else full_sweep(args)
    if args.tiny:
        cases = tiny_version(cases)
    l2_bytes = l2_cache_bytes(device)
    bandwidth = copy_bandwidth(device, l2_bytes)
    meta = dict(
        environment=environment(device), copy_bandwidth=bandwidth, dtype=args.dtype,
        seq_len=min(args.seq_len, TINY_SEQ_LEN) if args.tiny else args.seq_len,
        sweep="tiny" if args.tiny else ("quick" if args.quick else "full"), reps=args.reps, warmup=args.warmup,
        compile_modes=args.compile_modes, contenders=args.contenders, targets=[t[:4] for t in TARGETS],
        target_shape=TARGET_SHAPE, cases=[dataclasses.asdict(c) for c in cases],
        traffic="fwd: both sides' logits (priors mode: target logits + priors) + masks, read once; bwd: target logits "
                "read + gradient written (both mode: anchor too)",
    )
    print(f"{meta['environment']['card']}: copy bandwidth {bandwidth['gbps']:.0f} GB/s, L2 {l2_bytes / 2**20:.0f} MiB, "
          f"{len(cases)} cases")
    flush = L2Flusher(device, l2_bytes) if device.type == "cuda" else None  # CPU runs check logic, not caches
    start = time.perf_counter()
    rows = []
    for n, case in enumerate(cases, 1):
        elapsed = time.perf_counter() - start
        headline = args.quick and case.target_shape and bool(case.compile_modes)  # the last quick case
        if args.time_budget is not None and elapsed > args.time_budget and not headline:
            rows.append(dict(model=case.model, layers=case.layers, experts=case.experts, tokens=case.tokens, mode=case.mode,
                             contender="all", status="skipped", note=f"time budget of {args.time_budget:.0f} s spent"))
            continue
        print(f"[{n}/{len(cases)} {elapsed:6.1f} s] {case.describe()}", flush=True)
        case_rows = measure_case(case, device, l2_bytes, bandwidth["gbps"], flush, args,
                                 checkpoint=lambda partial: write_results(args.out, meta, rows + partial))
        print(progress_line(case_rows), flush=True)
        rows += case_rows
    meta["seconds"] = round(time.perf_counter() - start, 1)
    payload = write_results(args.out, meta, rows, final=True)
    print()
    print(format_table(summary_rows(rows), SUMMARY_COLUMNS))
    print()
    print("\n".join(target_lines(payload["targets"]) or ["no case at the target shape was measured"]))
    print(f"\nresults in {args.out} ({meta['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
