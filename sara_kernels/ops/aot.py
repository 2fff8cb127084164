"""Ahead-of-time compilation of the Triton backend's kernels (:mod:`.triton.kernels`) for a GPU target, without a GPU.

``triton.compile`` with a ``GPUTarget`` needs the kernel's argument types spelled out: they come
from the kernels' one description of their runtime arguments (``kernels.RUNTIME_ARGS``,
``kernels.RUNTIME_ARG_TYPES``), with the logits' and mask's element types of the call. Used by the
CI compile and spill checks (tests/ops/test_aot_compile.py) and the register report
(benchmarks/kernel_resources.py).
"""

from __future__ import annotations

import contextlib
import io
import re
from typing import NamedTuple

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from .triton import kernels

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
    types = {arg: kernels.RUNTIME_ARG_TYPES[arg].format(logits=dtype, mask=mask_dtype)
             for arg in kernels.RUNTIME_ARGS[name]}
    signature = {arg: types.get(arg, "constexpr") for arg in kernel.arg_names}
    missing = [arg for arg in kernel.arg_names if signature[arg] == "constexpr" and arg not in constexprs]
    if missing:
        raise ValueError(f"meta: no type or constexpr value for {missing} of {name}")
    src = ASTSource(kernel, signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


class PtxasReport(NamedTuple):
    """What Triton's own ptxas run reported for one kernel (its flags, its ptxas)."""

    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes


def compile_with_report(name: str, arch: int, meta: dict, dtype: str = "bf16", mask_dtype: str = "i64"):
    """:func:`compile_kernel`, and the registers and spill bytes its ptxas run reported.

    Triton prints ptxas's ``-v`` log when asked (``dump_ptxas_log``) and runs ptxas only on a cache
    miss, so the compile bypasses Triton's cache. Returns (compiled kernel, :class:`PtxasReport`).
    """
    log = io.StringIO()
    with triton.knobs.nvidia.scope(), triton.knobs.compilation.scope(), contextlib.redirect_stdout(log):
        triton.knobs.nvidia.dump_ptxas_log = True
        triton.knobs.compilation.always_compile = True
        compiled = compile_kernel(name, arch, meta, dtype, mask_dtype)
    text = log.getvalue()
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if registers is None or spills is None:
        raise RuntimeError(f"{name} sm_{arch}: no ptxas resource report in Triton's log: {text[-500:]!r}")
    return compiled, PtxasReport(int(registers.group(1)), int(spills.group(1)), int(spills.group(2)))


def toolchain(arch: int) -> str:
    """The compilers behind :func:`compile_with_report`'s numbers for sm_``arch``: Triton's version and
    that of the ptxas it runs for the target (its bundled one unless ``TRITON_PTXAS*_PATH`` says otherwise)."""
    return f"Triton {triton.__version__}, ptxas {get_ptxas(arch).version}"
