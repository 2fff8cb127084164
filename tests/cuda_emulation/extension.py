"""The emulated build of ``sara_kernels._C``: csrc/'s host op and kernels compiled by the host
compiler against the CPU stand-in of CUDA (``include/`` and ``emulator.h`` here) and the installed
torch, so the same ops register for CPU tensors. Used by tests/conftest.py (the CUDA backend in
the CPU suite) and benchmarks/host_cost.py (the host path's CPU time, kernels skipped)."""

import importlib.util
import os
import shutil
import subprocess
import sysconfig

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(os.path.dirname(HERE)), "csrc")
INCLUDE = os.path.join(HERE, "include")
CXX = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def build_emulated_extension(out_dir: str, skip_kernels: bool = False, optimize: str = "-O1") -> str:
    """Compiles and links the emulated build into ``out_dir``; returns the shared library's path.
    ``skip_kernels``: launches are accepted and no block runs (for timing the host path alone)."""
    from torch.utils import cpp_extension

    includes = [INCLUDE, CSRC, *cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    defines = ["-DSARA_KERNELS_EMULATED"] + (["-DSARA_EMULATOR_SKIP_KERNELS"] if skip_kernels else [])
    common = [CXX, "-std=c++20", optimize, "-fPIC", "-pthread", *defines, *(f"-I{d}" for d in includes)]
    objects, compiles = [], []
    for source, language in (("routing_js_ops.cpp", []), ("routing_js_kernels.cu", ["-x", "c++"])):
        objects.append(os.path.join(out_dir, source + ".o"))
        compiles.append(subprocess.Popen([*common, *language, "-c", os.path.join(CSRC, source), "-o", objects[-1]],
                                         stderr=subprocess.PIPE, text=True))
    for run in compiles:
        _, err = run.communicate(timeout=900)
        if run.returncode != 0:
            raise RuntimeError(f"emulated build failed:\n{err[-4000:]}")
    lib_dir = cpp_extension.library_paths()[0]
    library = os.path.join(out_dir, "_C.so")
    link = subprocess.run([CXX, "-shared", "-pthread", *objects, f"-L{lib_dir}", f"-Wl,-rpath,{lib_dir}", "-ltorch",
                           "-ltorch_cpu", "-lc10", "-o", library], capture_output=True, text=True, timeout=300)
    if link.returncode != 0:
        raise RuntimeError(f"emulated build failed to link:\n{link.stderr[-4000:]}")
    return library


def load_emulated_extension(library: str):
    """Loads the emulated build (registering its ops and their fakes) without making it the
    backend: the caller sets ``sara_kernels.ops.cuda._C`` to the returned module where it wants it."""
    from sara_kernels.ops import cuda

    spec = importlib.util.spec_from_file_location("sara_kernels._C", library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cuda._register_fakes()
    return module
