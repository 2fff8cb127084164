"""Which MoE layers SARA aligns: ``"all"``, ``"middle"`` or explicit decoder-layer indices and ranges.

Framework-neutral (no model is inspected here): the Hugging Face capture, the cached priors, the
programs and the Megatron integration all resolve a user's choice with :func:`resolve_layers_spec`
and apply it to the MoE layers they found with :func:`select_layers`.
"""

from __future__ import annotations

import operator
from typing import Iterable, Sequence, Union

__all__ = ["LayersArg", "resolve_layers_spec", "select_layers"]

LayersArg = Union[str, Iterable[int]]


def resolve_layers_spec(layers, arg: str = "layers"):
    """Normalise a layer selection: ``"all"``, ``"middle"``, or a sequence of decoder indices.

    Strings (as given on a command line) are comma-separated items, each an index or an inclusive
    range ``"a-b"`` (``"7-34"``, ``"0,4,7-34"``, as papers write layer spans); they become the list
    of indices in the order written.
    """
    if isinstance(layers, str):
        if layers in ("all", "middle"):
            return layers
        out = []
        for item in (x.strip() for x in layers.split(",")):
            if item:
                out.extend(_layer_item(item, layers, arg))
        if not out:
            raise ValueError(f"{arg}: no layer index in {layers!r}")
        return out
    if isinstance(layers, (list, tuple)) and layers and all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        return list(layers)
    raise ValueError(f"{arg}: expected 'all', 'middle' or a non-empty list of decoder-layer indices, got {layers!r}")


def _layer_item(item: str, spec: str, arg: str) -> range:
    """One comma-separated item of a layer string: ``"7"`` or the inclusive range ``"7-34"``."""
    first, dash, last = item.partition("-")
    try:
        lo = int(first)
        hi = int(last) if dash else lo
    except ValueError:
        raise ValueError(
            f"{arg}: expected 'all', 'middle' or comma-separated decoder-layer indices and ranges "
            f"like '0,4,7-34', got {spec!r}"
        ) from None
    if lo > hi:
        raise ValueError(f"{arg}: the range {item!r} in {spec!r} is empty; write it low-high, e.g. '{hi}-{lo}'")
    return range(lo, hi + 1)


def select_layers(moe_layers: Sequence[int], layers: LayersArg = "all") -> tuple:
    """The decoder-layer indices ``layers`` selects among the MoE layers ``moe_layers``.

    ``"all"``: every MoE layer. ``"middle"``: SARA aligns the intermediate layers, where
    routing is most language-agnostic; of the K MoE layers (sorted) it drops the first and
    the last ``K // 4``, keeping the middle half (K = 8 keeps 4, K = 4 keeps 2, K <= 3 keeps
    all), so at least one layer always remains. A list of ints: exactly those decoder-layer
    indices, each of which must be an MoE layer (dense layers have no router).
    """
    available = sorted(set(moe_layers))
    if not available:
        raise ValueError("select_layers: the model has no MoE layer")
    if isinstance(layers, str):
        if layers == "all":
            return tuple(available)
        if layers == "middle":
            drop = len(available) // 4
            return tuple(available[drop : len(available) - drop])
        raise ValueError(f"layers must be 'all', 'middle' or a list of decoder-layer indices, got {layers!r}")
    try:
        chosen = list(layers)
    except TypeError:
        raise TypeError(f"layers must be 'all', 'middle' or a list of decoder-layer indices, got {layers!r}") from None
    if not chosen:
        raise ValueError("layers is empty: select at least one MoE layer")
    bad_type = [x for x in chosen if isinstance(x, bool) or not hasattr(x, "__index__")]
    if bad_type:
        raise TypeError(f"layers must hold int decoder-layer indices, got {bad_type}")
    chosen = [operator.index(x) for x in chosen]
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        raise ValueError(f"layers={chosen}: {unknown} are not MoE layers of this model; its MoE layers are {available}")
    return tuple(sorted(set(chosen)))
