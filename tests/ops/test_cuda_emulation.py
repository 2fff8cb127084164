"""The CUDA backend's kernels (csrc/routing_js_kernels.cu) run on the CPU and checked against the
float64 reference, on machines without a GPU.

tests/cuda_emulation/emulator.h stands in for CUDA (each CUDA thread a fiber, barriers for
__syncthreads and warp shuffles, so divergent shuffles fail the launch); driver.cpp runs the
kernels in the op's order (pool both sides, pair JS, reduce, pool backward) with launch
parameters the host op does not vary (splits, layers per launch), executing the kernels'
indexing, vector and scalar paths, lane groups, splits, layer groups, masks of every dtype,
cu_seqlens, priors and every reduction. The host op itself (csrc/routing_js_ops.cpp) runs on the
same stand-in through ``backend="cuda"`` in test_routing_js.py, test_compile.py,
test_bad_inputs.py and test_context_parallel.py (the emulated build of tests/conftest.py). What
neither can show (timing, the memory model, the real compiler) is left to tests/gpu/test_gpu.py.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from dataclasses import dataclass

import pytest
import torch

from sara_kernels import testing

from helpers import reference_distribution, REPO as ROOT  # noqa: E402
HERE = os.path.join(ROOT, "tests", "cuda_emulation")
CXX = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler to build the emulated kernels")

DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
REDUCTIONS = {"mean": 0, "sum": 1, "none": 2}


class Side(ctypes.Structure):
    _fields_ = [
        ("logits", ctypes.c_void_p), ("num_tokens", ctypes.c_int64), ("layer_stride", ctypes.c_int64),
        ("row_stride", ctypes.c_int64), ("col_stride", ctypes.c_int64),
        ("mask", ctypes.c_void_p), ("mask_bytes", ctypes.c_int), ("mask_float", ctypes.c_int),
        ("mask_sb", ctypes.c_int64), ("mask_ss", ctypes.c_int64),
        ("cu", ctypes.c_void_p), ("cu_bytes", ctypes.c_int), ("splits", ctypes.c_int), ("grad", ctypes.c_void_p),
    ]


class Launch(ctypes.Structure):
    _fields_ = [
        ("dtype", ctypes.c_int), ("num_layers", ctypes.c_int), ("num_experts", ctypes.c_int), ("num_seqs", ctypes.c_int),
        ("sigmoid", ctypes.c_int), ("reduction", ctypes.c_int), ("layers_per_launch", ctypes.c_int),
        ("temperature", ctypes.c_double), ("priors", ctypes.c_void_p), ("weights", ctypes.c_void_p),
        ("weights_f64", ctypes.c_int), ("grad_loss", ctypes.c_void_p), ("anchor", Side), ("target", Side),
        ("loss", ctypes.c_void_p), ("per_layer", ctypes.c_void_p), ("stats", ctypes.c_void_p),
    ]


@pytest.fixture(scope="session")
def emulated(tmp_path_factory):
    lib = tmp_path_factory.mktemp("cuda_emulation") / "emulated_kernels.so"
    cmd = [CXX, "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-Wall", "-Wno-unknown-pragmas",
           "-I", os.path.join(HERE, "include"), os.path.join(HERE, "driver.cpp"), "-o", str(lib)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    dll = ctypes.CDLL(str(lib))
    dll.sara_emu_run.argtypes = [ctypes.POINTER(Launch)]
    return dll


@dataclass(frozen=True)
class Spec:
    """One emulated run: the op's configuration and what the host op chooses or passes through
    (index dtypes, reduction, layer weights, splits, layers per launch, storage)."""

    case: testing.Case  # τ = 0.7 throughout
    index_dtype: str  # of the mask or the cu_seqlens
    reduction: str
    weights: str  # none | f32 | f64
    splits: int
    layers_per_launch: int
    storage: str  # contiguous | strided (column stride 2) | padded (row stride E + 3)

    @property
    def label(self) -> str:
        return (f"{self.case.label} {self.index_dtype} {self.reduction} w{self.weights} x{self.splits} "
                f"g{self.layers_per_launch} {self.storage}")


def spec(dtype, experts, segmentation, score, anchor, *launch) -> Spec:
    """A row of the grid: ``segmentation`` is "kind:index dtype" or "none"."""
    kind, _, index_dtype = segmentation.partition(":")
    case = testing.Case(experts=experts, segmentation=kind, score=score, dtype=dtype, anchor=anchor, temperature=0.7)
    return Spec(case, index_dtype, *launch)


SPECS = [
    spec(torch.float32, 8, "mask:int64", "softmax", "detached", "mean", "none", 1, 128, "contiguous"),
    spec(torch.bfloat16, 128, "cu_seqlens:int32", "softmax", "both", "mean", "f64", 3, 1, "contiguous"),
    spec(torch.float16, 60, "mask:bool", "sigmoid", "both", "sum", "f32", 2, 2, "padded"),
    spec(torch.bfloat16, 5, "mask:float32", "softmax", "priors", "none", "none", 1, 128, "strided"),
    spec(torch.float32, 256, "cu_seqlens:int64", "sigmoid", "detached", "none", "f64", 2, 128, "contiguous"),
    spec(torch.bfloat16, 512, "mask:int64", "softmax", "both", "sum", "none", 1, 2, "contiguous"),
    spec(torch.float32, 512, "none", "sigmoid", "both", "mean", "f32", 3, 128, "contiguous"),
    spec(torch.float16, 16, "mask:int32", "softmax", "detached", "mean", "none", 2, 1, "contiguous"),
    spec(torch.bfloat16, 64, "cu_seqlens:int32", "sigmoid", "priors", "mean", "f64", 1, 128, "padded"),
    spec(torch.float32, 128, "mask:float32", "softmax", "both", "none", "none", 2, 128, "strided"),
    spec(torch.float16, 200, "none", "softmax", "detached", "sum", "none", 1, 128, "contiguous"),
]


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x [L, N, E] stored as laid out: contiguous, every other column, or rows padded to E + 3."""
    L, N, E = x.shape
    if layout == "strided":
        wide = torch.full((L, N, 2 * E), float("nan"), dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    if layout == "padded":
        wide = torch.full((L, N, E + 3), float("nan"), dtype=x.dtype)
        wide[..., :E] = x
        return wide[..., :E]
    return x.contiguous()


def _segmentation(spec: Spec, B: int, S: int, gen) -> testing.Segmentation:
    """B sequences of S rows (a mask's sequence 1 or packed sequence 2 empty), indices in the
    spec's dtype; a float mask holds weights in [0.5, 1.5) and −0 for padding."""
    kind = spec.case.segmentation
    side = testing.segmentation(kind, B, S, gen, empty={"mask": (1,), "cu_seqlens": (2,)}.get(kind, ()), num_tokens=B * S)
    if side.mask is not None:
        mask = side.mask
        if spec.index_dtype == "float32":
            mask = torch.where(mask.bool(), torch.rand(B, S, generator=gen) + 0.5, -torch.zeros(B, S))
        return testing.Segmentation(mask.to(getattr(torch, spec.index_dtype)), None, B * S)
    if side.cu_seqlens is not None:
        return testing.Segmentation(None, side.cu_seqlens.to(getattr(torch, spec.index_dtype)), B * S)
    return side


def _side(x: torch.Tensor, mask, cu, splits: int, grad) -> Side:
    side = Side(logits=x.data_ptr(), num_tokens=x.shape[1], layer_stride=x.stride(0), row_stride=x.stride(1),
                col_stride=x.stride(2), splits=splits, grad=grad.data_ptr() if grad is not None else None)
    if mask is not None:
        side.mask, side.mask_bytes, side.mask_float = mask.data_ptr(), mask.element_size(), int(mask.is_floating_point())
        side.mask_sb, side.mask_ss = mask.stride()
    if cu is not None:
        side.cu, side.cu_bytes = cu.data_ptr(), cu.element_size()
    return side


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label.replace(" ", "-"))
def test_emulated_kernels_match_float64_reference(emulated, spec):
    case = spec.case
    gen = torch.Generator().manual_seed(case.experts * 7 + spec.splits)
    L, B, S, E, tau = 3, 4, 37, case.experts, case.temperature
    side = _segmentation(spec, B, S, gen)
    num_seqs, mask, cu, N = side.num_seqs, side.mask, side.cu_seqlens, side.num_tokens
    raw_t = torch.cat(testing.random_logits(L, N, E, generator=gen)).view(L, N, E)
    raw_a = torch.cat(testing.random_logits(L, N, E, generator=gen)).view(L, N, E)
    raw_t[0, :, min(3, E - 1)] = float("-inf")  # an expert disabled on every token of layer 0
    if mask is not None:
        raw_t[:, ~mask.reshape(-1).bool()] = float("nan")  # padding must never leak
    target = _layout(raw_t.to(case.dtype), spec.storage)
    anchor = _layout(raw_a.to(case.dtype), spec.storage)
    priors = reference_distribution(list(raw_a.double()), mask, cu_seqlens=cu).float() if case.anchor == "priors" else None
    weights = None
    if spec.weights != "none":
        weights = (torch.rand(L, generator=gen) + 0.2).to(torch.float64 if spec.weights == "f64" else torch.float32)
    upstream = torch.rand(L, num_seqs, generator=gen) + 0.5 if spec.reduction == "none" else torch.tensor([1.3])

    grad_t = torch.full((L, N, E), float("nan"), dtype=case.dtype)  # every entry must be written
    grad_a = torch.full((L, N, E), float("nan"), dtype=case.dtype) if case.anchor == "both" else None
    loss = torch.full((L * num_seqs,) if spec.reduction == "none" else (1,), float("nan"))
    per_layer, stats = torch.full((L,), float("nan")), torch.full((3 * num_seqs,), float("nan"))
    launch = Launch(dtype=DTYPES[case.dtype], num_layers=L, num_experts=E, num_seqs=num_seqs,
                  sigmoid=int(case.score == "sigmoid"), reduction=REDUCTIONS[spec.reduction],
                  layers_per_launch=spec.layers_per_launch, temperature=tau,
                  priors=priors.data_ptr() if priors is not None else None,
                  weights=weights.data_ptr() if weights is not None else None,
                  weights_f64=int(weights is not None and weights.dtype == torch.float64), grad_loss=upstream.data_ptr(),
                  anchor=_side(anchor, mask, cu, spec.splits, grad_a), target=_side(target, mask, cu, spec.splits, grad_t),
                  loss=loss.data_ptr(), per_layer=per_layer.data_ptr(), stats=stats.data_ptr())
    assert emulated.sara_emu_run(ctypes.byref(launch)) == 0

    want = testing.run(
        "reference", None if priors is not None else list(anchor.unbind(0)), list(target.unbind(0)),
        None if priors is not None else side, side, precision=torch.float64,
        upstream=upstream.double().view(L, num_seqs) if spec.reduction == "none" else upstream.double().view(()),
        anchor_probs=priors, layer_weights=weights, temperature=tau, score=case.score,
        detach_anchor=case.anchor != "both", reduction=spec.reduction,
    )
    got = testing.Run(loss.view_as(want.loss), per_layer,
                      list(grad_t.unbind(0)) + (list(grad_a.unbind(0)) if grad_a is not None else []))
    # Padding rows: exactly 0 from the kernels (the reference's are NaN there: autograd through
    # softmax of NaN padding); every other row against the reference.
    valid = side.membership().any(dim=0)
    testing.assert_matches_reference(got, want, case.dtype, rows=valid)
    for g in got.grads:
        assert bool((g[~valid] == 0).all())


def test_a_launch_reports_its_own_status_not_an_earlier_error(emulated):
    """An error some earlier call left pending (cudaGetLastError would return and clear it) is not
    this launch's failure: the launch wrappers return the launch's own status."""
    emulated.sara_emu_launch_status_after_a_pending_error.restype = ctypes.c_int
    assert emulated.sara_emu_launch_status_after_a_pending_error() == 0


KERNELS = {  # name: (kernel body over float v = threadIdx.x, block size, whether the launch must fail)
    "shuffle skipped by half a warp": ("if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);", 32, True),
    "__syncthreads skipped by a warp": ("if (threadIdx.x < 32) __syncthreads();", 64, True),
    "every thread at each barrier": ("__syncthreads(); v = __shfl_xor_sync(0xffffffffu, v, 1); __syncthreads();", 64,
                                     False),
}


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_divergent_barriers_fail_the_launch(tmp_path, name):
    """The emulator's own guard: a kernel where some threads skip a shuffle or a __syncthreads the
    others reach must fail, or the tests above could not catch that bug in the real kernels; the
    same barriers reached by every thread must not."""
    body, threads, fails = KERNELS[name]
    source = tmp_path / "kernel.cpp"
    source.write_text(
        '#include "emulator.h"\n'
        "__global__ void kernel(float* out) {\n"
        "  float v = threadIdx.x;\n"
        f"  {body}\n"
        "  out[threadIdx.x] = v;\n"
        "}\n"
        "int main() {\n"
        f"  float out[{threads}];\n"
        "  cudaLaunchConfig_t c{};\n"
        f"  c.gridDim = dim3(2); c.blockDim = dim3({threads});\n"
        "  if (cudaLaunchKernelEx(&c, kernel, static_cast<float*>(out)) != cudaSuccess) return 3;\n"
        f"  for (int t = 0; t < {threads}; ++t) if (out[t] != float(t ^ 1)) return 4;  // the shuffle's result\n"
        "  return 0;\n"
        "}\n"
    )
    exe = tmp_path / "kernel"
    build = subprocess.run([CXX, "-std=c++20", "-pthread", "-I", HERE, str(source), "-o", str(exe)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    if fails:
        assert run.returncode == 3 and "divergent control flow" in run.stderr, (run.returncode, run.stderr)
    else:
        assert run.returncode == 0, (run.returncode, run.stderr)
