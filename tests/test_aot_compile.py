"""Ahead-of-time compilation of every kernel configuration for sm_80 and sm_90, without a GPU.

The interpreter accepts programs the GPU compiler rejects (layouts, types, pointer casts), so
each constexpr configuration the launchers can pick is compiled to a cubin here:
segmentation (none / mask / cu_seqlens) × score × vector loads on/off × every tile of
``tile_config`` for the pooling kernels, priors on/off × tile for ``pair_js_fwd``; the three
logits dtypes and a bool mask on top. Compiles run in a process pool, one worker per core. ``triton.compile`` with a ``GPUTarget`` needs no device, only the ptxas shipped with Triton.

Under the interpreter the kernels are ``InterpretedFunction`` objects that cannot be compiled,
so this file then re-runs itself in a fresh process with ``TRITON_INTERPRET=0``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sara_kernels.ops import routing_js


compiled_here = pytest.mark.skipif(routing_js.INTERPRET, reason="kernels are interpreted in this process")

ARCHS = (80, 90)
# One E per tile configuration the launcher can pick for E in 1..512.
TILE_EXPERTS = sorted({routing_js.tile_config(e)["BLOCK_E"]: e for e in range(1, routing_js.MAX_EXPERTS + 1)}.values())
SEGMENTATIONS = {"none": (False, False), "mask": (True, False), "cu": (False, True)}

_POOL_ARGS = {
    "table_ptr": "*i64", "mask_sb": "i64", "mask_ss": "i64", "cu_ptr": "*i32", "cu_stride": "i64",
    "L": "i32", "B": "i32", "N": "i64", "E": "i32", "S": "i64", "inv_tau": "fp32", "SPLITS": "i32",
}
POOL_FWD_SIG = {**_POOL_ARGS, "partial_ptr": "*fp32", "count_ptr": "*fp32"}
POOL_BWD_SIG = {
    **_POOL_ARGS, "coef_ptr": "*fp32", "scale_ptr": "*fp32", "scale_sl": "i64", "scale_sb": "i64",
    "count_ptr": "*fp32", "grad_sl": "i64",
}
PAIR_SIG = {
    "a_partial_ptr": "*fp32", "a_count_ptr": "*fp32", "t_partial_ptr": "*fp32", "t_count_ptr": "*fp32",
    "prior_ptr": "*fp32", "prior_sl": "i64", "prior_sb": "i64", "prior_se": "i64",
    "js_ptr": "*fp32", "ga_ptr": "*fp32", "gt_ptr": "*fp32",
    "a_total_ptr": "*fp32", "t_total_ptr": "*fp32", "valid_ptr": "*fp32",
    "B": "i32", "E": "i32", "A_SPLITS": "i32", "T_SPLITS": "i32",
}


def compile_kernel(kernel, types, meta, arch):
    meta = dict(meta)
    options = {k: meta.pop(k) for k in ("num_warps", "enable_fp_fusion") if k in meta}
    signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
    missing = [n for n in kernel.arg_names if signature[n] == "constexpr" and n not in meta]
    assert not missing, f"no type or constexpr value for {missing}"
    src = ASTSource(kernel, signature, constexprs=meta)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    assert compiled.asm["cubin"], "no cubin produced"


VEC = {"fp32": 4, "bf16": 8, "fp16": 8}  # 16-byte vectors, as routing_js.vector_width picks them


def pooling_cases():
    """(kernel name, types, constexprs, label) for every configuration the launchers can pick."""
    for name, sig in (("pool_routing_fwd", POOL_FWD_SIG), ("pool_routing_bwd", POOL_BWD_SIG)):
        grid = [
            (seg, score, e, "bf16", "i64", vec)
            for seg in SEGMENTATIONS for score in ("softmax", "sigmoid") for e in TILE_EXPERTS for vec in (0, VEC["bf16"])
        ]
        grid += [("mask", "softmax", 128, dtype, "i1", vec) for dtype in ("fp32", "fp16") for vec in (0, VEC[dtype])]
        for seg, score, e, dtype, mask_type, vec in grid:
            has_mask, use_cu = SEGMENTATIONS[seg]
            types = {**sig, "x0_ptr": f"*{dtype}", "mask_ptr": f"*{mask_type}"}
            if name == "pool_routing_bwd":
                types["grad_ptr"] = f"*{dtype}"
            meta = dict(HAS_MASK=has_mask, USE_CU=use_cu, SIGMOID=score == "sigmoid", VEC=vec, **routing_js.tile_config(e))
            yield name, types, meta, f"{name} seg={seg} score={score} E={e} dtype={dtype} VEC={vec}"


def pair_cases():
    for priors in (False, True):
        for e in TILE_EXPERTS:
            yield "pair_js_fwd", PAIR_SIG, dict(PRIORS=priors, **routing_js.pair_config(e)), f"pair_js_fwd priors={priors} E={e}"


def _compile_case(case, arch):
    name, types, meta, label = case
    try:
        compile_kernel(getattr(routing_js, name), types, meta, arch)
    except Exception as exc:  # name the configuration that failed
        return f"{label} sm_{arch}: {type(exc).__name__}: {exc}"
    return None


def compile_all(cases, arch):
    cases = list(cases)
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2, mp_context=context) as pool:
        failures = [f for f in pool.map(_compile_case, cases, [arch] * len(cases)) if f]
    assert not failures, "\n".join(failures)


@compiled_here
@pytest.mark.parametrize("arch", ARCHS)
def test_pooling_kernels_compile_for_every_configuration(arch):
    compile_all(pooling_cases(), arch)


@compiled_here
@pytest.mark.parametrize("arch", ARCHS)
def test_pair_kernel_compiles_for_every_configuration(arch):
    compile_all(pair_cases(), arch)


def test_every_tile_configuration_is_covered():
    seen = {tuple(sorted(routing_js.tile_config(e).items())) for e in TILE_EXPERTS}
    every = {tuple(sorted(routing_js.tile_config(e).items())) for e in range(1, routing_js.MAX_EXPERTS + 1)}
    assert seen == every and len(TILE_EXPERTS) == len(every)


@pytest.mark.skipif(not routing_js.INTERPRET, reason="the compile tests run directly in this process")
def test_compile_in_a_process_without_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"],
        env=env, cwd=os.path.dirname(__file__), capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert re.search(r"\b5 passed", result.stdout), result.stdout[-2000:]
