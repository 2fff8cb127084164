"""Ahead-of-time compilation of every kernel configuration for sm_80 and sm_90, and ptxas's spill
report for every tile on each architecture of ``triton_host.SPILL_CHECKED_ARCHS``, without a GPU.

The interpreter accepts programs the GPU compiler rejects (layouts, types, pointer casts), so
each constexpr configuration the launchers can pick is compiled to a cubin here:
segmentation (none / mask / cu_seqlens) × score × vector loads on/off × every tile of
``tile_config`` for the pooling kernels, priors on/off × tile for ``pair_js_fwd`` (with the
divergence and pair weights rotating through that grid); the three
logits dtypes and a bool mask on top. Compiles run in a process pool, one worker per core, and
each (configuration, architecture) is compiled once per session: the spill check reads the
reports of the sm_80 and sm_90 compiles and compiles only its other architectures' grid.
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

from typing import NamedTuple

import pytest

from sara_kernels.ops import aot, contract
from sara_kernels.ops.triton import host as triton_host
from sara_kernels.ops.triton import kernels as triton_kernels


compiled_here = pytest.mark.skipif(triton_kernels.INTERPRET, reason="kernels are interpreted in this process")

ARCHS = (80, 90)
# One E per tile configuration the launcher can pick for E in 1..512.
TILE_EXPERTS = sorted({triton_host.tile_config(e)["BLOCK_E"]: e for e in range(1, contract.MAX_EXPERTS + 1)}.values())
SEGMENTATIONS = {"none": (False, False), "mask": (True, False), "cu": (False, True)}


class Case(NamedTuple):
    name: str  # the kernel's, in triton.kernels
    meta: dict  # constexprs and launch options
    dtype: str  # of the logits
    mask_dtype: str
    label: str
    from_table: bool = True  # a tile the launchers pick (not one of tune_tiles.py's contenders)


def pooling_cases(arch: int):
    """Every configuration of the pooling kernels the launchers can pick on Triton target ``arch``.

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
                        **triton_host.expert_constexprs(e))
            meta = {**triton_host.spill_free(meta, name, arch), **more}
            yield Case(name, meta, dtype, mask_dtype,
                       f"{name} seg={seg} score={score} E={e} dtype={dtype} VEC={vec} TABLE={table} {more}",
                       from_table="STAGES" not in more)


def small_kernel_cases():
    """pair_js_fwd (priors on/off × tile; each divergence and pair weights on/off meet both priors
    modes), reduce_pair_loss (weights × reduction), pooled_routing_fwd (tile) and check_segments."""
    divergences = list(triton_kernels.DIVERGENCES.items())
    for i, e in enumerate(TILE_EXPERTS):
        for priors in (False, True):
            name, code = divergences[(2 * i + priors) % len(divergences)]
            pair_weights = (i + priors) % 2 == 1
            meta = dict(PRIORS=priors, PAIR_WEIGHTS=pair_weights, DIVERGENCE=code, **triton_host.pair_config(e))
            yield Case("pair_js_fwd", meta, "bf16", "i64",
                       f"pair_js_fwd priors={priors} divergence={name} pair_weights={pair_weights} E={e}")
        for normalize in (False, True):
            meta = dict(NORMALIZE=normalize, **triton_host.pair_config(e))
            yield Case("pooled_routing_fwd", meta, "bf16", "i64", f"pooled_routing_fwd normalize={normalize} E={e}")
    for weights in (False, True):
        for reduction, code in triton_kernels.REDUCTIONS.items():
            meta = dict(HAS_WEIGHTS=weights, REDUCTION=code, **triton_host.REDUCE_CONFIG)
            yield Case("reduce_pair_loss", meta, "bf16", "i64", f"reduce_pair_loss weights={weights} {reduction}")
    yield Case("check_segments", dict(triton_host.CHECK_CONFIG), "bf16", "i64", "check_segments")


def _compile_case(case: Case, arch: int):
    """(None, ptxas's report), or (the failure naming the configuration, None)."""
    try:
        compiled, report = aot.compile_with_report(case.name, arch, case.meta, case.dtype, case.mask_dtype)
        assert compiled.asm["cubin"], "no cubin produced"
    except Exception as exc:
        return f"{case.label} sm_{arch}: {type(exc).__name__}: {exc}", None
    return None, report


# (kernel, constexprs and options, dtypes, arch) -> _compile_case's result, for the session.
_COMPILED = {}


def compile_all(cases, arch: int) -> dict:
    """Each case's (failure, report) by label, compiling those not compiled yet in this session."""
    cases = list(cases)
    keys = {case.label: (case.name, tuple(sorted(case.meta.items())), case.dtype, case.mask_dtype, arch)
            for case in cases}
    todo = [case for case in cases if keys[case.label] not in _COMPILED]
    if todo:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=os.cpu_count() or 2, mp_context=context) as pool:
            for case, result in zip(todo, pool.map(_compile_case, todo, [arch] * len(todo))):
                _COMPILED[keys[case.label]] = result
    return {case.label: _COMPILED[keys[case.label]] for case in cases}


def assert_compiled(cases, arch: int):
    failures = [failure for failure, _ in compile_all(cases, arch).values() if failure]
    assert not failures, "\n".join(failures)


@compiled_here
@pytest.mark.parametrize("arch", ARCHS)
def test_pooling_kernels_compile_for_every_configuration(arch):
    assert_compiled(pooling_cases(arch), arch)


@compiled_here
@pytest.mark.parametrize("arch", ARCHS)
def test_small_kernels_compile_for_every_configuration(arch):
    assert_compiled(small_kernel_cases(), arch)


def spill_checked_cases(arch: int):
    """The configurations whose spills are checked on ``arch``: on sm_80 and sm_90 every one the
    launchers pick (compiled anyway above); on the others the pooling kernels' grid, which holds
    every tile and every key of ``SPILL_FREE_TILES``."""
    cases = [case for case in pooling_cases(arch) if case.from_table]
    return cases + list(small_kernel_cases()) if arch in ARCHS else cases


def other_toolchain(arch: int):
    """Why the spill check cannot judge ``arch`` here (None where it can): ``SPILL_FREE_TILES`` holds
    for the Triton and ptxas it was derived with; another version allocates registers differently,
    so its spills say nothing about this code (CI resolves the version the table names)."""
    found, derived = aot.toolchain(arch), triton_host.SPILL_FREE_TOOLCHAIN[arch]
    if found == derived:
        return None
    return (f"sm_{arch}: SPILL_FREE_TILES was derived with {derived}, this is {found}: "
            "derive it again with benchmarks/spill_free_tiles.py")


@compiled_here
@pytest.mark.parametrize("arch", triton_host.SPILL_CHECKED_ARCHS)
def test_every_tile_compiles_without_spills(arch):
    if other_toolchain(arch):
        pytest.skip(other_toolchain(arch))
    results = compile_all(spill_checked_cases(arch), arch)
    failures = [failure for failure, _ in results.values() if failure]
    assert not failures, "\n".join(failures)
    spilled = [f"{label}: {r.spill_stores} B spill stores, {r.spill_loads} B loads at {r.registers} registers"
               for label, (_, r) in results.items() if r.spill_stores or r.spill_loads]
    assert not spilled, f"sm_{arch}:\n" + "\n".join(spilled)


def test_every_tile_configuration_is_covered():
    seen = {tuple(sorted(triton_host.tile_config(e).items())) for e in TILE_EXPERTS}
    every = {tuple(sorted(triton_host.tile_config(e).items())) for e in range(1, contract.MAX_EXPERTS + 1)}
    assert seen == every and len(TILE_EXPERTS) == len(every)


def test_spill_free_entries_name_reachable_tiles_and_only_raise_registers():
    tiles = {triton_host.tile_config(e)["BLOCK_E"]: triton_host.tile_config(e) for e in TILE_EXPERTS}
    for (arch, kernel, score, block_e, vec), options in triton_host.SPILL_FREE_TILES.items():
        assert arch in triton_host.SPILL_CHECKED_ARCHS and kernel in ("pool_routing_fwd", "pool_routing_bwd")
        assert score in ("softmax", "sigmoid") and vec in {0, *aot.VECTOR_WIDTH.values()} and block_e in tiles
        assert options and set(options) <= {"maxnreg", "num_warps"}
        assert options.get("maxnreg", 256) > tiles[block_e].get("maxnreg", 0)
        assert options.get("num_warps", 8) >= tiles[block_e]["num_warps"]


def test_plans_take_the_spill_free_entries_of_the_device_architecture(monkeypatch):
    """A plan for a CUDA device gets the entry of the highest checked architecture not above its
    capability, separately for each direction; off CUDA (or below sm_80) the table's own tile."""
    import torch

    # The newest architecture's entry: a lookup that took the lowest checked architecture would miss it.
    (arch, kernel, score, block_e, vec), options = max(triton_host.SPILL_FREE_TILES.items())
    props = type("Properties", (), {"multi_processor_count": 132})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    dtype = torch.float32 if vec == aot.VECTOR_WIDTH["fp32"] else torch.bfloat16
    logits = torch.empty(2, 64, block_e, dtype=dtype)  # E fills the tile
    mask = torch.ones(4, 16, dtype=torch.bool)
    table = triton_host.expert_constexprs(block_e)
    for capability, expected in [(divmod(arch, 10), arch), ((arch // 10, arch % 10 + 1), arch), ((7, 5), None)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        monkeypatch.setattr(triton_host, "_TARGET_ARCH", {})
        monkeypatch.setattr(triton_host, "_PLANS", triton_host.OrderedDict())
        device = torch.device("cuda", 0)
        assert triton_host.target_arch(device) == expected
        plan = triton_host.side_plan(logits, mask, None, score, 1.0, vec, device)
        for name, meta in (("pool_routing_fwd", plan.meta), ("pool_routing_bwd", plan.bwd_meta)):
            entry = triton_host.SPILL_FREE_TILES.get((expected, name, score, block_e, vec), {})
            assert all(meta.get(k) == entry.get(k, table.get(k)) for k in ("maxnreg", "num_warps"))
        if expected == arch:
            assert {k: (plan.meta if kernel == "pool_routing_fwd" else plan.bwd_meta)[k] for k in options} == options
    cpu_plan = triton_host.side_plan(logits, mask, None, score, 1.0, vec, torch.device("cpu"))
    assert all(cpu_plan.meta.get(k) == cpu_plan.bwd_meta.get(k) == table.get(k) for k in ("maxnreg", "num_warps"))


@pytest.mark.skipif(not triton_kernels.INTERPRET, reason="the compile tests run directly in this process")
def test_compile_in_a_process_without_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"],
        env=env, cwd=os.path.dirname(__file__), capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    skipped = sum(other_toolchain(arch) is not None for arch in triton_host.SPILL_CHECKED_ARCHS)
    assert re.search(rf"\b{7 + len(triton_host.SPILL_CHECKED_ARCHS) - skipped} passed", result.stdout), \
        result.stdout[-2000:]
