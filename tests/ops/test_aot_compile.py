"""Ahead-of-time compilation of every kernel configuration for sm_80 and sm_90, without a GPU.

The interpreter accepts programs the GPU compiler rejects (layouts, types, pointer casts), so
each constexpr configuration the launchers can pick is compiled to a cubin here:
segmentation (none / mask / cu_seqlens) × score × vector loads on/off × every tile of
``tile_config`` for the pooling kernels, priors on/off × tile for ``pair_js_fwd`` (with the
divergence and pair weights rotating through that grid); the three
logits dtypes and a bool mask on top. Compiles run in a process pool, one worker per core.
``triton.compile`` with a ``GPUTarget`` needs no device, only the ptxas shipped with Triton; the
argument types live in :mod:`sara_kernels.ops.aot`, shared with benchmarks/kernel_resources.py.

Under the interpreter the kernels are ``InterpretedFunction`` objects that cannot be compiled,
so this file then re-runs itself in a fresh process with ``TRITON_INTERPRET=0``.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest

from sara_kernels.ops import aot, contract
from sara_kernels.ops.triton import host as triton_host
from sara_kernels.ops.triton import kernels as triton_kernels


compiled_here = pytest.mark.skipif(triton_kernels.INTERPRET, reason="kernels are interpreted in this process")

ARCHS = (80, 90)
# One E per tile configuration the launcher can pick for E in 1..512.
TILE_EXPERTS = sorted({triton_host.tile_config(e)["BLOCK_E"]: e for e in range(1, contract.MAX_EXPERTS + 1)}.values())
SEGMENTATIONS = {"none": (False, False), "mask": (True, False), "cu": (False, True)}


def pooling_cases():
    """(kernel name, constexprs, dtype, mask dtype, label) for every configuration the launchers can pick.

    The full grid uses the tuple-of-layers addressing (TABLE) and, for the backward, the loss's
    scaling (PAIR); the one-tensor addressing and ``routing_distribution``'s backward change only
    a few lines of code, so they are compiled on a smaller grid that still covers every VEC.
    """
    for name in ("pool_routing_fwd", "pool_routing_bwd"):
        extra = dict(PAIR=True) if name == "pool_routing_bwd" else {}
        grid = [
            (seg, score, e, "bf16", "i64", vec, True, extra)
            for seg in SEGMENTATIONS for score in ("softmax", "sigmoid") for e in TILE_EXPERTS
            for vec in (0, aot.VECTOR_WIDTH["bf16"])
        ]
        grid += [("mask", "softmax", 128, dtype, "i1", vec, True, extra)
                 for dtype in ("fp32", "fp16") for vec in (0, aot.VECTOR_WIDTH[dtype])]
        # E = 17, 30, 60, 128: E_MULT = gcd(E, 8) = 1, 2, 4, 8; 100 and 384: E short of the tile
        # (EVEN_E off) in the pipelined loop.
        grid += [("mask", score, e, "bf16", "i64", vec, False, extra)
                 for score in ("softmax", "sigmoid") for e in (17, 30, 60, 100, 128, 384)
                 for vec in (0, aot.VECTOR_WIDTH["bf16"])]
        # The row loop without software pipelining where the table pipelines it (tune_tiles.py's contender).
        grid += [("mask", score, e, "bf16", "i64", aot.VECTOR_WIDTH["bf16"], True, dict(extra, STAGES=1))
                 for score in ("softmax", "sigmoid") for e in (128, 512)]
        if name == "pool_routing_bwd":
            grid += [(seg, "softmax", 128, "bf16", "i64", vec, table, dict(PAIR=False))
                     for seg in ("mask", "cu") for vec in (0, aot.VECTOR_WIDTH["bf16"]) for table in (False, True)]
        for seg, score, e, dtype, mask_dtype, vec, table, more in grid:
            has_mask, use_cu = SEGMENTATIONS[seg]
            meta = dict(HAS_MASK=has_mask, USE_CU=use_cu, SIGMOID=score == "sigmoid", TABLE=table, VEC=vec,
                        **{**triton_host.expert_constexprs(e), **more})
            yield name, meta, dtype, mask_dtype, f"{name} seg={seg} score={score} E={e} dtype={dtype} VEC={vec} {more}"


def small_kernel_cases():
    """pair_js_fwd (priors on/off × tile; each divergence and pair weights on/off meet both priors
    modes), reduce_pair_loss (weights × reduction), pooled_routing_fwd (tile) and check_segments."""
    divergences = list(triton_kernels.DIVERGENCES.items())
    for i, e in enumerate(TILE_EXPERTS):
        for priors in (False, True):
            name, code = divergences[(2 * i + priors) % len(divergences)]
            pair_weights = (i + priors) % 2 == 1
            meta = dict(PRIORS=priors, PAIR_WEIGHTS=pair_weights, DIVERGENCE=code, **triton_host.pair_config(e))
            yield ("pair_js_fwd", meta, "bf16", "i64",
                   f"pair_js_fwd priors={priors} divergence={name} pair_weights={pair_weights} E={e}")
        for normalize in (False, True):
            meta = dict(NORMALIZE=normalize, **triton_host.pair_config(e))
            yield "pooled_routing_fwd", meta, "bf16", "i64", f"pooled_routing_fwd normalize={normalize} E={e}"
    for weights in (False, True):
        for reduction, code in triton_kernels.REDUCTIONS.items():
            meta = dict(HAS_WEIGHTS=weights, REDUCTION=code, **triton_host.REDUCE_CONFIG)
            yield "reduce_pair_loss", meta, "bf16", "i64", f"reduce_pair_loss weights={weights} {reduction}"
    yield "check_segments", dict(triton_host.CHECK_CONFIG), "bf16", "i64", "check_segments"


def _compile_case(case, arch):
    name, meta, dtype, mask_dtype, label = case
    try:
        compiled = aot.compile_kernel(name, arch, meta, dtype, mask_dtype)
        assert compiled.asm["cubin"], "no cubin produced"
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
def test_small_kernels_compile_for_every_configuration(arch):
    compile_all(small_kernel_cases(), arch)


def test_every_tile_configuration_is_covered():
    seen = {tuple(sorted(triton_host.tile_config(e).items())) for e in TILE_EXPERTS}
    every = {tuple(sorted(triton_host.tile_config(e).items())) for e in range(1, contract.MAX_EXPERTS + 1)}
    assert seen == every and len(TILE_EXPERTS) == len(every)


@pytest.mark.skipif(not triton_kernels.INTERPRET, reason="the compile tests run directly in this process")
def test_compile_in_a_process_without_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"],
        env=env, cwd=os.path.dirname(__file__), capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert re.search(r"\b5 passed", result.stdout), result.stdout[-2000:]
