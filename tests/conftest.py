"""Test set-up: without a GPU the Triton kernels run under the Triton interpreter, and the CUDA
backend runs as an emulated build on CPU tensors.

TRITON_INTERPRET is read when the kernels are defined, so it is set here, before any test
module imports sara_kernels. With a GPU the same tests compile and run the real kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cuda_emulation.extension import CXX, build_emulated_extension, load_emulated_extension  # noqa: E402
from sara_kernels import backends  # noqa: E402

# The fixture that makes a backend usable in a test, for the backends that need one.
_SET_UP = {"cuda": "cuda_backend"}


@pytest.fixture(scope="session")
def emulated_cuda_extension(tmp_path_factory):
    """The emulated build of sara_kernels._C, loaded (its ops registered) once per session."""
    from sara_kernels.ops import cuda

    if cuda.available() or torch.cuda.is_available():
        pytest.skip("a GPU or the built CUDA extension is here: the emulated build would register the same ops")
    if CXX is None:
        pytest.skip("no C++ compiler to build the emulated CUDA backend")
    return load_emulated_extension(build_emulated_extension(str(tmp_path_factory.mktemp("emulated_extension"))))


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


def _usable(request, name: str) -> str:
    if name in _SET_UP:
        return request.getfixturevalue(_SET_UP[name])
    return name


@pytest.fixture(params=backends.FUSED)
def fused_backend(request):
    """Each fused backend of the registry in turn: Triton (interpreted without a GPU) and the CUDA
    extension (its emulated build without one)."""
    return _usable(request, request.param)


@pytest.fixture(params=backends.NAMES)
def any_backend(request):
    """Each backend of the registry in turn, the reference included."""
    return _usable(request, request.param)
