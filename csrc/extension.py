"""How the CUDA backend (``sara_kernels._C``) is built: the one description that ``setup.py`` (the
real build) and ``tests/ops/test_cuda_build.py`` (a compile-only check on machines without a GPU)
both read, so the check compiles exactly what a user's install compiles.

The kernels (``routing_js_kernels.cu``) include no torch header: they compile in seconds with
nvcc alone. The host code (``routing_js_ops.cpp``) is plain C++ against torch's headers.
"""

import os

HERE = os.path.dirname(os.path.abspath(__file__))
NAME = "sara_kernels._C"
SOURCES = ("routing_js_ops.cpp", "routing_js_kernels.cu")
# --threads: nvcc compiles the architectures of a multi-arch build in parallel. The C++ standard
# is left to torch.utils.cpp_extension, which picks the one its headers need.
NVCC_FLAGS = ("-O3", "--threads", "4")
CXX_FLAGS = ("-O3",)
# Architectures the CI compile check builds for: A100, A10/RTX 30, H100/H200 (plain and
# arch-specific), B200/GB200 (plain and arch-specific), B300/GB300, RTX 50/RTX PRO Blackwell. An
# install builds for the visible GPU, or for TORCH_CUDA_ARCH_LIST when set (where "9.0a" and
# "10.0a" are accepted), as torch.utils.cpp_extension does.
CHECK_ARCHS = ("80", "86", "90", "90a", "100", "100a", "103", "120")
# Set to 1 to install without building the extension (backend="cuda" then says how to build it).
OPT_OUT = "SARA_KERNELS_NO_CUDA"


def source_paths() -> list:
    return [os.path.join(HERE, s) for s in SOURCES]


def wanted() -> bool:
    return os.environ.get(OPT_OUT, "0") != "1"
