"""Which fused backend ``backend="auto"`` runs when several can: the one that benchmarks/bench_sara.py
measured fastest on that GPU architecture, at the measured expert count nearest to the call's.

``MEASURED`` maps a compute capability ("9.0") to expert counts ``E -> (backend, {backend: ms})``:
the fastest, and the fwd+bwd wall time per call (median, L2-cold, tuple inputs) of each fused
contender in one run, summed over every shape and mode measured at that E. It is written by
``python benchmarks/choose_auto.py RESULTS.json... --write`` from bench_sara runs and committed
with those results (benchmarks/results/); never by hand. An architecture with no measurement
runs the registry's first fused backend (Triton, the backend measured first).

Why the expert count: E sets the tile sizes, the register budget and the work per token of the
backends' kernels, and it is fixed for a model, so under torch.compile the choice never depends
on a dimension that varies from step to step. The token count moves the backends' times the same
way (traffic), while their difference in host cost per call is fixed; choose_auto.py says when
the winner at one E changes with the token count, which this table would then hide.
"""

from __future__ import annotations

import math

import torch

from .. import backends

# --- written by benchmarks/choose_auto.py: begin ---
MEASURED: dict = {}
# --- written by benchmarks/choose_auto.py: end ---


def capability(device: torch.device) -> str:
    """"major.minor" of a CUDA device. torch.compile folds it to a constant while tracing
    (dynamo constant-folds ``get_device_properties`` and treats its result as a constant)."""
    props = torch.cuda.get_device_properties(device)
    return f"{props.major}.{props.minor}"


def _further(a, b, c, d) -> bool:
    """Whether a/b is further from 1 than c/d on a log scale (positive integers). Integer
    arithmetic only, so it also traces with symbolic sizes."""
    return max(a, b) * min(c, d) > max(c, d) * min(a, b)


def nearest_measured(measured_experts, experts: int) -> int:
    """The measured expert count closest to ``experts`` by ratio (the smaller one on a tie)."""
    best = None
    for e in sorted(measured_experts):
        if best is None or _further(best, experts, e, experts):
            best = e
    return best


def faster_fused_backend(device: torch.device, experts: int, candidates=backends.FUSED) -> str:
    """Of ``candidates`` (fused backends that can take the call), the one for a call with
    ``experts`` experts on ``device`` (a CUDA device): the fastest measured there, the first
    candidate where none of them was measured."""
    measured = MEASURED.get(capability(device))
    if not measured:
        return candidates[0]
    times = measured[nearest_measured(measured, experts)][1]
    best = candidates[0]
    for name in candidates[1:]:  # a loop, not min(key=...), which dynamo cannot trace
        if times.get(name, math.inf) < times.get(best, math.inf):
            best = name
    return best
