"""CPU time per call of the fused op's host path, measurable on a machine without a GPU.

    python benchmarks/host_cost.py                       # 48 layers x 128 experts, bf16
    python benchmarks/host_cost.py --layers 16 --experts 64 --json /tmp/host.json

What is timed, per backend and input form (a tuple of L [N, E] leaves, or one [L, N, E] leaf):
``sara_loss`` forward under no_grad, forward with autograd recording, and forward +
``torch.autograd.grad`` (a training step's share), as the median of many calls with p20/p80.
Beside them, the "floor" row: forward + grad of a trivial ``autograd.Function`` over the same
leaves, i.e. what PyTorch's own engine costs for a loss of L inputs whatever the op does.

- triton: the Python path with the interpreter off, up to and including ``sara_kernels.ops.triton.host.launch``'s
  lookup of the compiled kernel (argument checks, launch plans, pointer tables, output
  allocation, the specialisation key of every launch, autograd); every lookup finds a compiled
  kernel whose launcher does nothing. Not included: Triton's compiled launcher itself, and the
  pinned-memory copy of a new pointer table (the table cache hits in a loop over the same
  tensors, as in training).
- cuda: csrc/ built against the CPU stand-in of CUDA (tests/cuda_emulation) with kernel launches
  skipped: the C++ argument handling, launch planning, dispatcher and autograd, on CPU tensors.
  Not included: the CUDA driver's launch cost (a few µs per launch on a real GPU).

These are CPU-side numbers of this machine, not of a GPU host (bench_sara.py measures those:
``cpu_ms_per_call`` while the GPU is busy). They tell whether a change made the host path
cheaper or dearer, and how far it sits above the autograd floor.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ["TRITON_INTERPRET"] = "0"  # the launches are stubbed below; the interpreter would hide the host path

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import sara_kernels  # noqa: E402
from cuda_emulation.extension import build_emulated_extension, load_emulated_extension  # noqa: E402
from sara_kernels import backends  # noqa: E402
from sara_kernels.ops import cuda  # noqa: E402
from sara_kernels.ops import triton as triton_backend  # noqa: E402
from sara_kernels.ops.triton import host as triton_host  # noqa: E402
from sara_kernels.programs.table import format_table  # noqa: E402


class _CompiledNothing:
    """Stands in for every compiled kernel: ``compiled[grid](*args)`` returns at once."""

    def __getitem__(self, grid):
        return lambda *args: None


class _EveryKernelCompiled(dict):
    def get(self, key, default=None):
        return _CompiledNothing(), ()


def stub_triton_launches():
    """The Triton backend on CPU tensors, kernels not run: its Python host path alone, through
    ``launch`` (its key and lookup), with the compiled launchers replaced by no-ops."""
    triton_host._COMPILED = _EveryKernelCompiled()
    triton_backend.runs_on = lambda device: True


def load_cuda_without_kernels(out_dir: str):
    cuda._C = load_emulated_extension(build_emulated_extension(out_dir, skip_kernels=True, optimize="-O2"))


class _Floor(torch.autograd.Function):
    """A loss of the leaves that does nothing: the autograd engine's own cost."""

    @staticmethod
    def forward(ctx, *leaves):
        ctx.num_leaves = len(leaves)
        return leaves[0].new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return (None,) * ctx.num_leaves


def time_us(fn, reps: int, warmup: int = 20) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    q = statistics.quantiles(times, n=10)
    return dict(median_us=round(statistics.median(times), 1), p20_us=round(q[1], 1), p80_us=round(q[7], 1))


def measure(backend: str, stacked: bool, args) -> list:
    gen = torch.Generator().manual_seed(0)
    L, N, E, S = args.layers, args.tokens, args.experts, args.seq_len

    def side():
        if stacked:
            return torch.randn(L, N, E, generator=gen).to(torch.bfloat16).requires_grad_()
        return tuple(torch.randn(N, E, generator=gen).to(torch.bfloat16).requires_grad_() for _ in range(L))

    anchor, target = side(), side()
    leaves = [target] if stacked else list(target)
    mask = torch.ones(N // S, S, dtype=torch.int64)

    def loss():
        return sara_kernels.sara_loss(anchor, target, mask, mask, backend=backend)

    def forward_no_grad():
        with torch.no_grad():
            loss()

    if backend == "floor":
        calls = {"fwd+bwd": lambda: torch.autograd.grad(_Floor.apply(*leaves), leaves, allow_unused=True)}
    else:
        calls = {"fwd (no_grad)": forward_no_grad, "fwd": loss, "fwd+bwd": lambda: torch.autograd.grad(loss(), leaves)}
    form = f"stacked [{L}, {N}, {E}]" if stacked else f"tuple of {L} [{N}, {E}]"
    return [dict(backend=backend, form=form, call=name, **time_us(fn, args.reps)) for name, fn in calls.items()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--tokens", type=int, default=512, help="tokens per side (only allocation sizes depend on it)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--reps", type=int, default=500)
    p.add_argument("--backends", nargs="*", default=list(backends.FUSED), choices=backends.FUSED)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    if torch.cuda.is_available():
        print("a GPU is here: use bench_sara.py, which measures the host time on the real launch path")
        return 2
    torch.set_num_threads(1)  # the host path is single-threaded; small torch ops must not fan out
    stub_triton_launches()
    rows = []
    with tempfile.TemporaryDirectory() as build_dir:
        if "cuda" in args.backends:
            load_cuda_without_kernels(build_dir)
        for stacked in (False, True):
            for backend in [*args.backends, "floor"]:
                rows += measure(backend, stacked, args)
    columns = [("backend", "backend"), ("inputs", "form"), ("call", "call"), ("median µs", "median_us"),
               ("p20", "p20_us"), ("p80", "p80_us")]
    print(f"CPU time per call, host path only (kernels not run), bf16, {torch.__version__}, "
          f"{os.cpu_count()} CPUs, 1 torch thread")
    print(format_table(rows, columns))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), torch=torch.__version__, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
