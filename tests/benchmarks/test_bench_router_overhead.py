"""benchmarks/bench_router_overhead.py times every backend of the registry that runs on the device,
the reference before the fused ones, and says why each other backend is left out."""

import os
import sys

import pytest
import torch

from sara_kernels import backends
from sara_kernels.ops.triton import kernels as triton_kernels

from helpers import REPO
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import bench_router_overhead  # noqa: E402

CPU = torch.device("cpu")
UNFUSED = [name for name in backends.NAMES if name not in backends.FUSED]  # run anywhere, before the fused ones
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the view from a machine without a GPU")


def test_left_out_backends_say_why(monkeypatch):
    monkeypatch.setattr(triton_kernels, "INTERPRET", False)
    variants, notes = bench_router_overhead.available_variants(CPU)
    assert variants == ["none", *UNFUSED]
    assert set(notes) == set(backends.FUSED)
    assert "TRITON_INTERPRET=1" in notes["triton"] and "sara_kernels._C" in notes["cuda"]


def test_interpreted_triton_runs_on_the_cpu():
    variants, notes = bench_router_overhead.available_variants(CPU)
    assert variants == ["none", *UNFUSED, "triton"] and set(notes) == set(backends.FUSED) - {"triton"}


def test_a_backend_that_runs_here_is_a_variant(cuda_backend):
    """The emulated CUDA build takes CPU tensors (tests/conftest.py)."""
    assert bench_router_overhead.available_variants(CPU) == (["none", *UNFUSED, *backends.FUSED], {})
