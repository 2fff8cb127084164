"""A few fwd+bwd steps of one fused backend at one bench_sara shape: the program that
scripts/gpu_profile.sh runs under Nsight Compute (ncu) to see why a pooling kernel streams below
copy bandwidth (memory throughput, occupancy, warp stall reasons).

    python benchmarks/profile_kernels.py --backend cuda --model Qwen3-30B-A3B --tokens 16384
    TRITON_INTERPRET=1 python benchmarks/profile_kernels.py --backend triton --device cpu --tokens 64   # logic check

The inputs are bench_sara's (bf16 tuple of L [N, E] leaves per side, 512-token sequences, all
valid, anchor detached). ``--warmup`` steps come first (Triton's JIT compile, the launch plans),
so ``ncu --launch-skip`` can skip their kernels; then ``--steps`` profiled steps.
"""

from __future__ import annotations

import argparse
import sys

import torch

from sara_kernels import backends
from sara_kernels.programs.bench_op import loss_function, make_inputs

from sara_cases import MODEL_BY_NAME, make_case


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=backends.FUSED, required=True)
    p.add_argument("--model", default="Qwen3-30B-A3B", choices=list(MODEL_BY_NAME))
    p.add_argument("--tokens", type=int, default=16384, help="tokens per side")
    p.add_argument("--mode", default="detach", choices=["detach", "both", "priors"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    settings = argparse.Namespace(seq_len=512, dtype="bf16", compile_modes=[], contenders=[args.backend])
    case = make_case(MODEL_BY_NAME[args.model], args.tokens, args.mode, settings, compiled=False)
    device = torch.device(args.device)
    inputs = make_inputs(case, device, copies=1)
    loss_fn = loss_function(case, args.backend)
    for _ in range(args.warmup + args.steps):
        loss = loss_fn(inputs.anchors[0], inputs.targets[0], inputs.mask, inputs.priors[0])
        torch.autograd.grad(loss, inputs.diff_inputs(0, case.mode))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    print(f"{args.backend}: {case.describe()}: {args.warmup} + {args.steps} fwd+bwd steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
