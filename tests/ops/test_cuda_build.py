"""The CUDA backend (csrc/) on machines without a GPU: its sources must compile, and asking for it
without the built extension must fail clearly.

Nothing compiled here runs. The kernels are compiled with this machine's nvcc for every
architecture in csrc/extension.py's CHECK_ARCHS, with ptxas reporting resources (a spill in a
pooling kernel is a failure: their loops are what streams the logits). The host code is
compiled (syntax and types, no object file) against the installed torch's headers, exactly the
sources and flags setup.py builds. The GPU tests of the backend itself are in tests/gpu/test_gpu.py.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch
from torch.utils import cpp_extension

import sara_kernels
from sara_kernels.ops import cuda

from helpers import REPO as ROOT  # noqa: E402
NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if "CUDA_HOME" in os.environ else None)
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine: the CUDA sources cannot be compiled here")


def _extension():
    spec = importlib.util.spec_from_file_location("sara_csrc_extension", os.path.join(ROOT, "csrc", "extension.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXT = _extension()
KERNELS = next(p for p in EXT.source_paths() if p.endswith(".cu"))
HOST = next(p for p in EXT.source_paths() if p.endswith(".cpp"))


def _cuda_includes() -> list:
    """The include directories nvcc itself uses (nvcc may be a wrapper script outside the toolkit)."""
    run = subprocess.run([NVCC, "--dryrun", "-c", "x.cu"], capture_output=True, text=True, timeout=60)
    found = re.findall(r'^#\$ (?:SYSTEM_)?INCLUDES=(.*)$', run.stderr, re.M)
    return [d for line in found for d in re.findall(r'"(?:-I)?([^"-][^"]*)"', line) if d.strip()]


@needs_nvcc
def test_kernels_compile_for_every_checked_arch_without_spills(tmp_path):
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in EXT.CHECK_ARCHS]
    cmd = [NVCC, *EXT.NVCC_FLAGS, "-std=c++17", *gencode, "-Xptxas", "-v", "-c", KERNELS, "-o", str(tmp_path / "k.o")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    report = run.stderr
    # ptxas prints, per kernel and architecture, "Compiling entry function '<name>' for 'sm_XX'" and
    # then its stack frame, spills and registers.
    entries = re.findall(r"Compiling entry function '(\w+)' for '(sm_\d+)'(.*?)(?=Compiling entry function|\Z)",
                         report, re.S)
    pooling = [(name, arch, body) for name, arch, body in entries if "pool_routing" in name]
    archs = {arch for _, arch, _ in pooling}
    assert archs == {f"sm_{a}" for a in EXT.CHECK_ARCHS}, report[-2000:]
    # 2 directions × 3 dtypes × 7 expert paddings per architecture
    assert len(pooling) == 42 * len(EXT.CHECK_ARCHS), report[-2000:]
    for name, arch, body in pooling:
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", body)
        assert spills is not None and spills.groups() == ("0", "0"), f"{name} on {arch} spills: {body.strip()[:300]}"


@needs_nvcc
def test_host_code_compiles_against_the_installed_torch(tmp_path):
    includes = [*cpp_extension.include_paths(), *_cuda_includes(), sysconfig.get_paths()["include"], os.path.dirname(HOST)]
    generated = "c10/cuda/impl/cuda_cmake_macros.h"
    if not any(os.path.exists(os.path.join(d, generated)) for d in cpp_extension.include_paths()):
        # A CPU build of torch ships c10/cuda's headers but not this one file that its CUDA build
        # generates (one macro); stand it in so the host code can be checked against CPU torch.
        os.makedirs(tmp_path / os.path.dirname(generated))
        (tmp_path / generated).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.insert(0, str(tmp_path))
    cxx = os.environ.get("CXX", "c++")
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", *EXT.CXX_FLAGS, *(f"-I{d}" for d in includes), HOST]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "warning" not in run.stderr, run.stderr[-4000:]


def test_extension_description_matches_the_sources():
    assert all(os.path.exists(p) for p in EXT.source_paths())
    assert sorted(os.listdir(os.path.join(ROOT, "csrc"))) == sorted(
        [*EXT.SOURCES, "routing_js.h", "extension.py", *(["__pycache__"] if os.path.isdir(os.path.join(ROOT, "csrc", "__pycache__")) else [])]
    ), "a file in csrc/ that the build does not compile (or a source the build lists that is missing)"


@pytest.mark.skipif(cuda.available(), reason="the CUDA extension is built here")
def test_backend_cuda_without_the_extension_says_how_to_build_it():
    logits = [torch.randn(12, 8) for _ in range(2)]
    with pytest.raises(cuda.CUDABackendUnavailable, match=r"sara_kernels\._C.*pip install --no-build-isolation -e \."):
        sara_kernels.sara_loss(logits, logits, backend="cuda")
    with pytest.raises(cuda.CUDABackendUnavailable, match="not|No module"):
        sara_kernels.routing_distribution(logits, backend="cuda")


@pytest.mark.skipif(not cuda.available(), reason="needs the built CUDA extension")
def test_cuda_backend_rejects_cpu_tensors_and_float64():
    logits = [torch.randn(12, 8) for _ in range(2)]
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        sara_kernels.sara_loss(logits, logits, backend="cuda")
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        sara_kernels.sara_loss([x.double() for x in logits], [x.double() for x in logits], backend="cuda")


def test_opting_out_skips_the_build(monkeypatch):
    monkeypatch.setenv(EXT.OPT_OUT, "1")
    assert not EXT.wanted()
    monkeypatch.delenv(EXT.OPT_OUT)
    assert EXT.wanted()
