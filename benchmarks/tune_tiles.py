"""Measure the pooling kernels alone for candidate tiles: the evidence behind ``tile_config``.

    python benchmarks/tune_tiles.py --out results/tiles              # GPU
    TRITON_INTERPRET=1 python benchmarks/tune_tiles.py --device cpu --tiny --out /tmp/t   # logic check

For each real-model router shape (48×128, 58×256 sigmoid, 48×512, 32×8, 16×64; bf16, tuple of
L [N, E] tensors, 512-token sequences, all valid; ``--models`` picks some) and each candidate
(num_warps, BLOCK_N, and the row loop: unpipelined, or software-pipelined over 3 stages with
ptxas's register count capped at 64 or left free), the
forward kernel (``pool_routing_fwd``, both sides' logits read once) and the backward kernel
(``pool_routing_bwd``, the target read again and its gradient written) are timed on the GPU's
own timeline (torch.profiler), L2-cold (inputs rotated over copies), and reported as a fraction
of the copy bandwidth measured in the same run. The row marked ``table`` is what
``tile_config`` picks today; every candidate runs with its own options, without the
architecture's ``SPILL_FREE_TILES`` entries, which the launchers add where a tile spills.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import triton

from sara_kernels.ops.triton import host as triton_host

from sara_kernels.programs.bench_archs import ARCHS
from sara_kernels.programs.bench_timing import copies_for, copy_bandwidth, device_problem, environment, l2_cache_bytes, \
    percentile, time_calls, write_json
from sara_kernels.programs.table import format_table

# (name, layers, experts, score, tokens per side), the router shapes from the table of real models.
SHAPES = [(ARCHS[key].name, ARCHS[key].layers, ARCHS[key].experts, ARCHS[key].score, tokens) for key, tokens in (
    ("qwen3-30b-a3b", 16384), ("deepseek-v3", 8192), ("qwen3-next-80b-a3b", 8192), ("mixtral-8x7b", 16384),
    ("olmoe-1b-7b", 16384))]
ELEMENTS_PER_THREAD = (16, 32, 64)
WARPS = (4, 8)
# (STAGES, maxnreg): the loop as measured before pipelining, and pipelined with and without the cap.
PIPELINES = ((1, None), (3, 64), (3, None))
SEQ_LEN = 512


def candidates(experts: int) -> list:
    """(num_warps, BLOCK_N, STAGES, maxnreg): a tile of ELEMENTS_PER_THREAD fp32 values per
    thread, each with every PIPELINES entry."""
    block_e = triton_host.tile_config(experts)["BLOCK_E"]
    out = []
    for warps in WARPS:
        for per_thread in ELEMENTS_PER_THREAD:
            block_n = per_thread * 32 * warps // block_e
            if 1 <= block_n <= 256:
                out += [(warps, block_n, *pipeline) for pipeline in PIPELINES]
    return sorted(set(out), key=lambda c: (c[0], c[1], c[2], c[3] or 0))


def kernel_ms(device, call, kernel: str, copies: int, reps: int) -> float:
    """Milliseconds of ``kernel`` per ``call`` on the GPU's own timeline (torch.profiler): CUDA
    events around a Python call would also count the host's launch work, which for small shapes
    is longer than the kernel. On the CPU (a logic check) the median wall time of the call."""
    if device.type != "cuda":
        return percentile(time_calls(device, call, copies=copies, reps=reps, warmup=1), 50)
    from torch.profiler import ProfilerActivity, profile

    for i in range(2):
        call(i % copies, None)
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for r in range(reps):
            call(r % copies, None)
        torch.cuda.synchronize(device)
    total_us = sum(getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0)
                   for e in prof.key_averages() if e.key == kernel)
    return total_us / 1e3 / reps


def measure_shape(name, layers, experts, score, tokens, device, l2_bytes, copy_gbps, reps, tiny, stages_only) -> list:
    dtype = torch.bfloat16
    seqs = max(1, tokens // SEQ_LEN)
    seq_len = tokens // seqs
    mask = torch.ones(seqs, seq_len, dtype=torch.int64, device=device)
    side_bytes = layers * tokens * experts * 2
    copies = copies_for(2 * side_bytes, l2_bytes)
    sides = [[torch.randn(tokens, experts, device=device, dtype=dtype) for _ in range(layers)] for _ in range(2 * copies)]
    coef = torch.randn(layers, seqs, experts, device=device)
    scale = torch.ones((), device=device)
    layer_coef = torch.full((layers,), 1e-3, device=device)
    count = torch.full((seqs,), float(seq_len), device=device)
    default = triton_host.tile_config(experts)
    rows = []
    original, spill_free_tiles = triton_host.tile_config, triton_host.SPILL_FREE_TILES
    tiles = candidates(experts)
    if stages_only:
        tiles = [t for t in tiles if t[:2] == (default["num_warps"], default["BLOCK_N"])]
    for warps, block_n, stages, maxnreg in tiles:
        tile = dict(default, num_warps=warps, BLOCK_N=block_n, STAGES=stages, maxnreg=maxnreg)
        if maxnreg is None:
            del tile["maxnreg"]
        triton_host.tile_config = lambda e, tile=tile: dict(tile)  # a fresh dict per call, as tile_config returns
        triton_host.SPILL_FREE_TILES = {}  # each candidate runs with its own options, on any architecture
        triton_host.clear_plans()
        try:
            def fwd(i, _):
                triton_host.pool_fwd(sides[2 * i], mask, None, score, 1.0, device)
                triton_host.pool_fwd(sides[2 * i + 1], mask, None, score, 1.0, device)

            def bwd(i, _):
                triton_host.pool_bwd(sides[2 * i + 1], mask, None, coef, scale, layer_coef, count, score, 1.0, device)

            start = time.perf_counter()
            fwd(0, None), bwd(0, None)
            compile_s = time.perf_counter() - start
            ms_fwd = kernel_ms(device, fwd, "pool_routing_fwd", copies, reps)
            ms_bwd = kernel_ms(device, bwd, "pool_routing_bwd", copies, reps)
        finally:
            triton_host.tile_config, triton_host.SPILL_FREE_TILES = original, spill_free_tiles
            triton_host.clear_plans()
        row = dict(model=name, layers=layers, experts=experts, score=score, tokens=tokens, warps=warps, block_n=block_n,
                   stages=stages, maxnreg=maxnreg, table=tile == default,
                   compile_s=round(compile_s, 2))
        for pass_name, ms, nbytes in (("fwd", ms_fwd, 2 * side_bytes), ("bwd", ms_bwd, 2 * side_bytes)):
            row[f"{pass_name}_ms"] = round(ms, 4)
            row[f"{pass_name}_bw"] = round(nbytes / (ms * 1e-3) / 1e9 / copy_gbps, 3)
        rows.append(row)
        print(f"  warps={warps} BLOCK_N={block_n} STAGES={stages} maxnreg={maxnreg}: "
              f"fwd {row['fwd_ms']} ms ({row['fwd_bw']:.2f}), bwd {row['bwd_ms']} ms ({row['bwd_bw']:.2f})"
              f"{'  <- table' if row['table'] else ''}", flush=True)
    return rows


COLUMNS = [("model", "model"), ("E", "experts"), ("warps", "warps"), ("BLOCK_N", "block_n"), ("stages", "stages"),
           ("maxnreg", "maxnreg"), ("table", "table"),
           ("fwd ms", "fwd_ms"), ("fwd bw", "fwd_bw"), ("bwd ms", "bwd_ms"), ("bwd bw", "bwd_bw")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes for a CPU logic check")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--time-budget", type=float, default=150.0, help="seconds; shapes not started by then are skipped")
    p.add_argument("--models", nargs="+", choices=[shape[0] for shape in SHAPES], help="only these shapes")
    p.add_argument("--stages-only", action="store_true",
                   help="only the table's num_warps and BLOCK_N, with each row loop (pipelining on vs off)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    problem = device_problem(device, args.tiny, " (TRITON_INTERPRET=1)")
    if problem:
        print(problem)
        return 2
    os.makedirs(args.out, exist_ok=True)
    l2_bytes = l2_cache_bytes(device)
    bandwidth = copy_bandwidth(device, l2_bytes)
    env = environment(device)
    print(f"{env['card']}: copy bandwidth {bandwidth['gbps']:.0f} GB/s, triton {triton.__version__}")
    shapes = [shape for shape in SHAPES if not args.models or shape[0] in args.models]
    if args.tiny:
        shapes = [(n, min(l, 2), e, s, 64) for n, l, e, s, _ in shapes[:2]]
    rows, skipped, start = [], [], time.perf_counter()
    for shape in shapes:
        if time.perf_counter() - start > args.time_budget:
            skipped.append(shape[0])
            continue
        print(f"{shape[0]}: L={shape[1]} E={shape[2]} {shape[3]} N={shape[4]}/side", flush=True)
        rows += measure_shape(*shape, device, l2_bytes, bandwidth["gbps"], 2 if args.tiny else args.reps, args.tiny,
                              args.stages_only)
        write_json(os.path.join(args.out, "tiles.json"), dict(environment=env, copy_bandwidth=bandwidth, rows=rows,
                                                              skipped=skipped))
    table = format_table(rows, COLUMNS)
    with open(os.path.join(args.out, "tiles.md"), "w") as f:
        f.write(f"# Pooling kernels per tile: {env['card']}, triton {triton.__version__}, {env['date']}\n\n"
                f"Copy bandwidth {bandwidth['gbps']:.0f} GB/s; bf16 logits, L2-cold, median of {args.reps}; "
                f"bw = minimum traffic / time / copy bandwidth.\n\n```\n{table}\n```\n"
                + (f"\nSkipped for the time budget: {', '.join(skipped)}\n" if skipped else ""))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
