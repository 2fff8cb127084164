"""Megatron-core integration of SARA (the ``[megatron]`` extra; ``import sara_kernels`` never imports it).

* :mod:`.router`: :func:`with_sara` (options: :class:`sara_kernels.term.SARAOptions`; a layer/block spec whose MoE layers use :class:`SARARouter`,
  which attaches each selected layer's SARA term with ``MoEAuxLossAutoScaler`` and logs it in
  Megatron's aux-loss tracker as ``"sara_loss"``) and :class:`sara_batch` (the micro-batch's
  anchors/targets, example indices, packed sequences).
* :mod:`.priors`: :func:`extract_routing_priors` from a Megatron model, in the format
  :func:`sara_kernels.hf.load_routing_priors` reads.
"""

try:
    import megatron.core  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sara_kernels.megatron needs megatron-core: pip install 'sara-kernels[megatron]'"
    ) from err

from .priors import extract_routing_priors
from ..term import SARAOptions
from .router import KEPT_TRACKER_NAME, TRACKER_NAME, SARARouter, moe_layer_indices, sara_batch, with_sara

__all__ = [
    "with_sara", "sara_batch", "SARARouter", "SARAOptions", "moe_layer_indices", "TRACKER_NAME", "KEPT_TRACKER_NAME",
    "extract_routing_priors",
]
