"""Package metadata lives in pyproject.toml. This file adds the optional CUDA extension
``sara_kernels._C`` (csrc/, described in csrc/extension.py): built when torch with CUDA and a
CUDA toolkit are importable at build time (``pip install --no-build-isolation -e .``) and
``SARA_KERNELS_NO_CUDA`` is not 1; otherwise the package installs without it, and
``backend="cuda"`` raises an error that says how to build it."""

import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))
import extension  # noqa: E402  (csrc/extension.py)


def cuda_extension() -> dict:
    if not extension.wanted():
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:  # isolated build without torch: a CPU-only install
        return {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return {}
    sources = [os.path.relpath(p, os.path.dirname(os.path.abspath(__file__))) for p in extension.source_paths()]
    ext = CUDAExtension(
        extension.NAME,
        sources,
        include_dirs=[extension.HERE],
        extra_compile_args={"cxx": list(extension.CXX_FLAGS), "nvcc": list(extension.NVCC_FLAGS)},
    )
    return dict(ext_modules=[ext], cmdclass={"build_ext": BuildExtension})


setup(**cuda_extension())
