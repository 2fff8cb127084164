"""The backends: one registry that every list of backend names derives from.

A backend is its module plus an entry here. The module provides ``available()``,
``runs_on(device)``, ``require()`` (raises, saying what is missing, when not available), what it
takes (``DTYPES``: the logits dtypes, None for every floating dtype; ``MAX_EXPERTS``, ``MAX_SEQS``:
None for no limit) and the entry points on validated sides
(:class:`sara_kernels._inputs.RoutingSide`)::

    sara_loss(anchor, target, anchor_probs, layer_weights, pair_weights, score, temperature, detach_anchor,
              reduction, divergence)
        -> (loss, detached per-layer weighted mean divergence [L])
    pooled_distribution(side, score, temperature, normalize=True)
        -> (P [L, B, E], n_b [B]) with autograd into the logits; the sums n_b·P without ``normalize``

(``routing_distribution`` is ``pooled_distribution``'s P, and context parallelism pools the sums
through :mod:`sara_kernels.distributed`, for every backend alike.)

Nothing is imported here: the names (what the command line offers before it imports torch) cost
nothing, and a backend's module is imported when its entry is first used.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple


class Backend(NamedTuple):
    name: str
    module_name: str
    fused: bool  # kernels of its own (a candidate of backend="auto" on CUDA), not the PyTorch reference
    summary: str  # what it is, in a few words, for help texts
    checks_layers: bool = False  # checks every layer of a tuple itself (see _inputs.check_layers)
    device_hint: str = ""  # appended to the error for tensors on a device it does not run on

    @property
    def module(self):
        return importlib.import_module(self.module_name)

    def available(self) -> bool:
        return self.module.available()

    def runs_on(self, device) -> bool:
        return self.module.runs_on(device)


REGISTRY = {
    "triton": Backend("triton", "sara_kernels.ops.triton", fused=True,
                      summary="the Triton kernels",
                      device_hint=" (set TRITON_INTERPRET=1 before importing sara_kernels to run the kernels on the CPU)"),
    "cuda": Backend("cuda", "sara_kernels.ops.cuda", fused=True, summary="the CUDA C++ extension, when built",
                    checks_layers=True),
    "reference": Backend("reference", "sara_kernels.reference", fused=False, summary="the PyTorch reference"),
}
NAMES = tuple(REGISTRY)
FUSED = tuple(name for name, backend in REGISTRY.items() if backend.fused)
CHOICES = ("auto", *NAMES)  # what ``backend=`` accepts
AUTO_SUMMARY = "on CUDA the fused backend measured faster (sara_kernels.ops.backend_choice), the reference otherwise"
# The help of every backend option (the ``sara_backend`` training option, the commands' ``--backend``).
HELP = "; ".join([f"'auto': {AUTO_SUMMARY}", *(f"'{b.name}': {b.summary}" for b in REGISTRY.values())]) + "."


def check_backend(value, name: str = "backend") -> None:
    """The one check of a backend option, ``name`` being the option's name where it is given."""
    if value not in CHOICES:
        raise ValueError(f"{name}: expected one of {CHOICES}, got {value!r}")


def available_fused() -> list:
    """The fused backends usable in this process (the extension built, for ``"cuda"``)."""
    return [name for name in FUSED if REGISTRY[name].available()]
