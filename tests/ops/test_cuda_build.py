"""The CUDA backend (csrc/) on machines without a GPU: its sources must compile, and asking for it
without the built extension must fail clearly.

Nothing compiled here runs. The kernels are compiled with this machine's nvcc for every
architecture in csrc/extension.py's CHECK_ARCHS in one nvcc call, with ptxas reporting resources
(a spill in a pooling kernel is a failure: their loops are what streams the logits), and the
forward's SASS is read back with cuobjdump to check that its loads issue together. The host code is
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


@pytest.fixture(scope="module")
def kernel_build(tmp_path_factory):
    """The kernels compiled for every architecture of CHECK_ARCHS in one nvcc call (its --threads
    compile them in parallel): the object file and ptxas's resource report."""
    out = tmp_path_factory.mktemp("cuda_kernels") / "kernels.o"
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in EXT.CHECK_ARCHS]
    cmd = [NVCC, *EXT.NVCC_FLAGS, "-std=c++17", *gencode, "-Xptxas", "-v", "-c", KERNELS, "-o", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return out, run.stderr


@needs_nvcc
def test_kernels_compile_for_every_checked_arch_without_spills(kernel_build):
    _, report = kernel_build
    # ptxas prints, per kernel and architecture, "Compiling entry function '<name>' for 'sm_XX[a]'"
    # and then its stack frame, spills and registers.
    entries = re.findall(r"Compiling entry function '(\w+)' for '(sm_\w+)'(.*?)(?=Compiling entry function|\Z)",
                         report, re.S)
    pooling = [(name, arch, body) for name, arch, body in entries if "pool_routing" in name]
    archs = {arch for _, arch, _ in pooling}
    assert archs == {f"sm_{a}" for a in EXT.CHECK_ARCHS}, report[-2000:]
    # 2 directions × 3 dtypes × 7 expert paddings per architecture
    assert len(pooling) == 42 * len(EXT.CHECK_ARCHS), report[-2000:]
    for name, arch, body in pooling:
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", body)
        assert spills is not None and spills.groups() == ("0", "0"), f"{name} on {arch} spills: {body.strip()[:300]}"


def _cuobjdump():
    try:
        from triton.backends.nvidia import compiler

        bundled = os.path.join(os.path.dirname(compiler.__file__), "bin", "cuobjdump")
    except ImportError:
        bundled = None
    return shutil.which("cuobjdump") or (bundled if bundled and os.path.exists(bundled) else None)


SASS_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
# The forward kernel for bf16 logits and 65-128 experts (E_PAD 128: 16 lanes of 8 experts per row,
# 4 rows per lane and iteration): pool_routing_fwd<BF16, PoolTile<8, 16, BF16>>.
FORWARD_BF16_E128 = "pool_routing_fwdINS0_4BF16ENS0_8PoolTileILi8ELi16E"


def _registers(operands: str) -> set:
    found = set()
    for number, wide in re.findall(r"\bR(\d+)(\.64)?", operands):
        found.update({int(number), int(number) + 1} if wide else {int(number)})
    return found


def loads_before_the_mask_is_read(sass: str):
    """In a forward kernel's SASS, from its first load of a 1-byte mask element to the first
    instruction that reads a loaded mask byte (the test of a token's validity): how many mask
    loads and how many 16-byte logits loads issue."""
    instructions = SASS_INSTRUCTION.findall(sass)
    is_mask_load = lambda op: op.startswith("LDG") and ".U8" in op and "CONSTANT" not in op  # noqa: E731
    first = next(i for i, (op, _) in enumerate(instructions) if is_mask_load(op))
    loaded, mask_loads, logits_loads = set(), 0, 0
    for op, operands in instructions[first:]:
        # Every operand after the first is read (the first is the destination, except for stores).
        read = _registers(operands if op.startswith(("ST", "RED")) else operands.partition(",")[2])
        if read & loaded:
            break
        if is_mask_load(op):
            mask_loads += 1
            loaded |= _registers(operands.partition(",")[0])
        elif op.startswith("LDG") and ".128" in op:
            logits_loads += 1
    return mask_loads, logits_loads


@needs_nvcc
@pytest.mark.skipif(_cuobjdump() is None, reason="no cuobjdump (CUDA toolkit or Triton's bundled copy) to disassemble")
def test_masked_rows_issue_every_load_before_reading_the_mask(kernel_build):
    """In the SASS of every checked architecture: a lane's 4 mask loads of an
    iteration issue together, and its 4 rows' logits loads issue before any mask byte is read, so
    no load waits on the mask's round trip (a mask of 1-byte elements, the one bool masks take)."""
    obj, report = kernel_build
    name = re.search(rf"Compiling entry function '(\w*{FORWARD_BF16_E128}\w*)'", report).group(1)
    run = subprocess.run([_cuobjdump(), "-sass", "-fun", name, str(obj)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    per_arch = dict(re.findall(r"code for (sm_\w+)\s+(.*?)(?=code for sm_|\Z)", run.stdout, re.S))
    assert sorted(per_arch) == sorted(f"sm_{a}" for a in EXT.CHECK_ARCHS), sorted(per_arch)
    for arch, sass in per_arch.items():
        assert loads_before_the_mask_is_read(sass) == (4, 4), arch


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


def test_cuda_backend_rejects_another_devices_tensors_and_float64(cuda_backend):
    """Runs in every configuration: on the built extension (a GPU machine, where CPU tensors are
    another device's) and on the emulated build of the CPU suite (whose ops run on CPU tensors:
    there meta tensors are another device's). Both the Python API's checks and the C++ op's own
    (which guard direct calls of torch.ops.sara_kernels.*) are exercised."""
    native = cuda._C.DEVICE_TYPE
    foreign = "cpu" if native == "cuda" else "meta"
    logits = [torch.randn(12, 8, device=foreign) for _ in range(2)]
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors, got tensors on " + foreign):
        sara_kernels.sara_loss(logits, logits, backend="cuda")
    doubles = [torch.randn(12, 8, dtype=torch.float64, device=native) for _ in range(2)]
    with pytest.raises(TypeError, match="backend='cuda' takes float32, bfloat16 or float16 logits"):
        sara_kernels.sara_loss(doubles, doubles, backend="cuda")
    with pytest.raises(TypeError, match="the CUDA backend takes float32, bfloat16 or float16 logits"):
        torch.ops.sara_kernels.cuda_routing_distribution.default(doubles, None, None, "softmax", 1.0, True)


def test_opting_out_skips_the_build(monkeypatch):
    monkeypatch.setenv(EXT.OPT_OUT, "1")
    assert not EXT.wanted()
    monkeypatch.delenv(EXT.OPT_OUT)
    assert EXT.wanted()
