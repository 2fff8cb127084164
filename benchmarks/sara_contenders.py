"""Contenders of bench_sara.py: the fused ops (Triton, CUDA C++) and what they are measured against.

A contender is a name, an input form and a builder returning ``loss(anchor, target, mask,
priors)``; adding one is one entry in ``CONTENDERS`` (and a skip reason if it cannot always run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

import sara_kernels
from sara_kernels import backends

from sara_cases import Case


def loss_function(case: Case, backend: str) -> Callable:
    """(anchor, target, mask, priors) -> scalar loss through ``sara_kernels.sara_loss``."""
    detach = case.mode != "both"

    def loss(anchor, target, mask, priors):
        return sara_kernels.sara_loss(
            anchor, target, None if priors is not None else mask, mask, anchor_probs=priors,
            score=case.score, detach_anchor=detach, backend=backend,
        )

    return loss


def _compiled_reference(case: Case, mode: str) -> Callable:
    torch._dynamo.reset()  # a fresh compile per case and mode: no cache-limit fallback to eager
    return torch.compile(loss_function(case, "reference"), mode=mode, dynamic=False)


@dataclass
class Contender:
    name: str  # a key of CONTENDERS
    variant: str  # torch.compile mode, else ""
    build: Callable[[], Callable]  # returns the loss function; may raise (a bad compile mode)
    stacked: bool = False  # inputs as one [L, N, E] tensor per side instead of a tuple of L [N, E]


# The fused ops, whose kernels the profiler breaks down.
FUSED = backends.FUSED


def _backend(name: str):
    return lambda case, variant: loss_function(case, name)


# name -> (input form stacked?, builder(case, variant)): every backend of the registry, and the
# reference under torch.compile. torch.compile gets the stacked form because compiling over a
# tuple of L tensors per side took much longer than over one stacked tensor, too long for a
# sweep; each run's compile times are in benchmarks/results/ (the summaries' "compile s").
CONTENDERS = {**{name: (False, _backend(name)) for name in backends.NAMES}, "compile": (True, _compiled_reference)}


def skip_reason(name: str, device: torch.device) -> Optional[str]:
    entry = backends.REGISTRY.get(name)
    if entry is None:  # torch.compile of the reference runs anywhere
        return None
    try:
        entry.module.require()
    except RuntimeError as e:
        return str(e)
    if not entry.runs_on(device):
        return f"does not run on {device.type} tensors{entry.device_hint}"
    return None


def make_contenders(case: Case, device: torch.device, requested: list) -> tuple:
    """(runnable contenders, rows for the ones skipped). Contenders are built when measured,
    so a torch.compile mode that fails is recorded as a failure of that mode only."""
    runnable, skipped = [], []
    for name in requested:
        reason = skip_reason(name, device)
        if name == "compile" and not case.compile_modes:
            reason = reason or "not in this sweep's compiled cases"
        if reason:
            skipped.append(dict(contender=name, variant="", status="skipped", note=reason))
            continue
        stacked, builder = CONTENDERS[name]
        for variant in (case.compile_modes if name == "compile" else ("",)):
            runnable.append(Contender(name, variant, lambda b=builder, v=variant: b(case, v), stacked))
    return runnable, skipped
