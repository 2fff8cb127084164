"""Test set-up: without a GPU the Triton kernels run under the Triton interpreter, and the CUDA
backend runs as an emulated build on CPU tensors.

TRITON_INTERPRET is read when the kernels are defined, so it is set here, before any test
module imports sara_kernels. With a GPU the same tests compile and run the real kernels.
"""

import importlib.util
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
EMULATION_INCLUDE = os.path.join(ROOT, "tests", "cuda_emulation", "include")
CXX = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def build_emulated_extension(out_dir: str) -> str:
    """csrc/'s host op and kernels compiled by the host compiler against the CPU stand-in of CUDA
    (tests/cuda_emulation/) and this torch: the same ops, registered for CPU tensors. Returns the
    path of the shared library."""
    from torch.utils import cpp_extension

    includes = [EMULATION_INCLUDE, CSRC, *cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    common = [CXX, "-std=c++20", "-O1", "-fPIC", "-pthread", "-DSARA_KERNELS_EMULATED", *(f"-I{d}" for d in includes)]
    objects, compiles = [], []
    for source, language in (("routing_js_ops.cpp", []), ("routing_js_kernels.cu", ["-x", "c++"])):
        objects.append(os.path.join(out_dir, source + ".o"))
        compiles.append(subprocess.Popen([*common, *language, "-c", os.path.join(CSRC, source), "-o", objects[-1]],
                                         stderr=subprocess.PIPE, text=True))
    for run in compiles:
        _, err = run.communicate(timeout=900)
        assert run.returncode == 0, err[-4000:]
    lib_dir = cpp_extension.library_paths()[0]
    library = os.path.join(out_dir, "_C.so")
    link = subprocess.run([CXX, "-shared", "-pthread", *objects, f"-L{lib_dir}", f"-Wl,-rpath,{lib_dir}", "-ltorch",
                           "-ltorch_cpu", "-lc10", "-o", library], capture_output=True, text=True, timeout=300)
    assert link.returncode == 0, link.stderr[-4000:]
    return library


@pytest.fixture(scope="session")
def emulated_cuda_extension(tmp_path_factory):
    """The emulated build of sara_kernels._C, loaded (its ops registered) once per session."""
    from sara_kernels.ops import cuda

    if cuda.available() or torch.cuda.is_available():
        pytest.skip("a GPU or the built CUDA extension is here: the emulated build would register the same ops")
    if CXX is None:
        pytest.skip("no C++ compiler to build the emulated CUDA backend")
    return load_emulated_extension(build_emulated_extension(str(tmp_path_factory.mktemp("emulated_extension"))))


def load_emulated_extension(library: str):
    """Loads the emulated build (registering its ops and their fakes) without making it the
    backend: ``cuda_backend`` (or a test's own monkeypatch of ``cuda._C``) does that."""
    from sara_kernels.ops import cuda

    spec = importlib.util.spec_from_file_location("sara_kernels._C", library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cuda._register_fakes()
    return module


@pytest.fixture
def cuda_backend(request, monkeypatch):
    """Makes ``backend="cuda"`` usable in a test: the built extension on a GPU machine, otherwise
    the emulated build on CPU tensors (for this test only: elsewhere the extension stays absent)."""
    from sara_kernels.ops import cuda

    if cuda.available():
        if not torch.cuda.is_available():
            pytest.skip("the CUDA extension is built but no GPU is here")
    else:
        monkeypatch.setattr(cuda, "_C", request.getfixturevalue("emulated_cuda_extension"))
    return "cuda"


@pytest.fixture(params=["triton", "cuda"])
def fused_backend(request):
    """Each fused backend in turn: Triton (interpreted without a GPU) and the CUDA extension."""
    return request.getfixturevalue("cuda_backend") if request.param == "cuda" else request.param
