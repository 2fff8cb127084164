"""Ahead-of-time compilation of the Triton backend's kernels (:mod:`.triton.kernels`) for a GPU target, without a GPU.

``triton.compile`` with a ``GPUTarget`` needs the kernel's argument types spelled out; they are
written once, here, for the CI compile check (tests/ops/test_aot_compile.py) and the register
report (benchmarks/kernel_resources.py). The logits' and mask's element types vary per call.
"""

from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .triton import kernels

_LAYOUT_ARGS = {
    "table_ptr": "*i64", "stride_l": "i64", "stride_n": "i64", "stride_e": "i64",
    "mask_sb": "i64", "mask_ss": "i64", "cu_ptr": "*i32", "cu_stride": "i64",
    "L": "i32", "B": "i32", "N": "i64", "S": "i64", "E_DIV": "i32", "inv_tau": "fp32", "SPLITS": "i32",
}
SIGNATURES = {
    "pool_routing_fwd": {**_LAYOUT_ARGS, "partial_ptr": "*fp32", "count_ptr": "*fp32"},
    "pool_routing_bwd": {
        **_LAYOUT_ARGS, "coef_ptr": "*fp32", "coef_sl": "i64", "coef_sb": "i64", "coef_se": "i64",
        "scale_ptr": "*fp32", "scale_sl": "i64", "scale_sb": "i64", "layer_coef_ptr": "*fp32",
        "count_ptr": "*fp32", "count_stride": "i64",
    },
    "pair_js_fwd": {
        "a_partial_ptr": "*fp32", "a_count_ptr": "*fp32", "t_partial_ptr": "*fp32", "t_count_ptr": "*fp32",
        "prior_ptr": "*fp32", "prior_sl": "i64", "prior_sb": "i64", "prior_se": "i64",
        "js_ptr": "*fp32", "ga_ptr": "*fp32", "gt_ptr": "*fp32", "stats_ptr": "*fp32",
        "B": "i32", "E": "i32", "A_SPLITS": "i32", "T_SPLITS": "i32",
    },
    "reduce_pair_loss": {
        "js_ptr": "*fp32", "stats_ptr": "*fp32", "weight_ptr": "*fp64", "loss_ptr": "*fp32",
        "per_layer_ptr": "*fp32", "layer_coef_ptr": "*fp32", "L": "i32", "B": "i32",
    },
    "pooled_routing_fwd": {
        "partial_ptr": "*fp32", "count_ptr": "*fp32", "probs_ptr": "*fp32", "total_ptr": "*fp32",
        "B": "i32", "E": "i32", "SPLITS": "i32",
    },
    "check_segments": {"cu_ptr": "*i32", "cu_stride": "i64", "B": "i32", "N": "i64"},
}
# Elements per 16-byte vector, the VEC that triton.host.vector_width picks for each logits dtype.
VECTOR_WIDTH = {"fp32": 4, "bf16": 8, "fp16": 8}
_OPTIONS = ("num_warps", "maxnreg", "enable_fp_fusion", "debug")


def compile_kernel(name: str, arch: int, meta: dict, dtype: str = "bf16", mask_dtype: str = "i64"):
    """Compile kernel ``name`` of :mod:`.triton.kernels` for sm_``arch``; ``meta`` holds its constexprs and
    launch options as the launchers pass them (``tile_config`` / ``pair_config`` included)."""
    if kernels.INTERPRET:
        raise RuntimeError("TRITON_INTERPRET=1: the kernels are interpreted in this process and cannot be compiled")
    kernel = getattr(kernels, name)
    constexprs = dict(meta)
    options = {k: constexprs.pop(k) for k in _OPTIONS if k in constexprs}
    if kernel.debug:
        options["debug"] = True
    types = {**SIGNATURES[name], "x0_ptr": f"*{dtype}", "grad_ptr": f"*{dtype}", "mask_ptr": f"*{mask_dtype}"}
    signature = {arg: types.get(arg, "constexpr") for arg in kernel.arg_names}
    missing = [arg for arg in kernel.arg_names if signature[arg] == "constexpr" and arg not in constexprs]
    if missing:
        raise ValueError(f"meta: no type or constexpr value for {missing} of {name}")
    src = ASTSource(kernel, signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
