"""Registers and spills of every pooling-kernel tile, from ptxas, without a GPU.

    TRITON_INTERPRET=0 python benchmarks/kernel_resources.py [--arch 90] [--dtype bf16]

Why: the kernels are memory-bound, so what decides their speed on a card is how many bytes each
SM keeps in flight, which the register count bounds (65536 registers per SM) and spills
destroy. ptxas reports both for a target architecture without a device, so the tile table
(``triton_host.tile_config``, with the architecture's ``SPILL_FREE_TILES`` entries) can be
sanity-checked on a CPU machine before GPU time is spent. The numbers are those of Triton's own
ptxas run (its ptxas and flags); tests/ops/test_aot_compile.py asserts that none spills.
"""

from __future__ import annotations

import argparse

from sara_kernels.ops import aot
from sara_kernels.ops.triton import host as triton_host
from sara_kernels.ops.triton import kernels as triton_kernels

REGISTERS_PER_SM = 65536


def ptxas_path(arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def resources(name: str, experts: int, sigmoid: bool, dtype: str, arch: int, vec: int):
    meta = dict(HAS_MASK=True, USE_CU=False, SIGMOID=sigmoid, TABLE=True, VEC=vec,
                **triton_host.expert_constexprs(experts))
    meta = triton_host.spill_free(meta, name, arch)
    if name == "pool_routing_bwd":
        meta["PAIR"] = True
    compiled, report = aot.compile_with_report(name, arch, meta, dtype)
    warps = meta["num_warps"]
    blocks = REGISTERS_PER_SM // (report.registers * 32 * warps)  # an upper bound: ignores allocation granularity
    return dict(regs=report.registers, spills=report.spill_stores, block_n=meta["BLOCK_N"], stages=meta["STAGES"],
                maxnreg=meta.get("maxnreg", "-"), warps=warps, warps_per_sm=blocks * warps,
                shared=compiled.metadata.shared)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--unaligned", action="store_true", help="element loads (VEC = 0) instead of 16-byte vectors")
    args = parser.parse_args()
    if triton_kernels.INTERPRET:
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    vec = 0 if args.unaligned else aot.VECTOR_WIDTH[args.dtype]
    print(f"sm_{args.arch}, {args.dtype} logits, mask segmentation, VEC {vec}; Triton's own ptxas run "
          f"({ptxas_path(args.arch)}); spills: bytes stored")
    print(f"{'kernel':17s} {'E':>4s} {'score':8s} {'BLOCK_N':>7s} {'stages':>6s} {'warps':>5s} {'maxnreg':>7s} "
          f"{'regs':>5s} {'spills':>6s} {'warps/SM':>8s} {'smem B':>6s}")
    for name in ("pool_routing_fwd", "pool_routing_bwd"):
        for experts in (8, 16, 64, 128, 256, 512):
            for sigmoid in (False, True):
                r = resources(name, experts, sigmoid, args.dtype, args.arch, vec)
                score = "sigmoid" if sigmoid else "softmax"
                print(f"{name:17s} {experts:4d} {score:8s} {r['block_n']:7d} {r['stages']:6d} {r['warps']:5d} "
                      f"{r['maxnreg']:>7} {r['regs']:5d} {r['spills']:6d} {r['warps_per_sm']:8d} {r['shared']:6d}")


if __name__ == "__main__":
    main()
