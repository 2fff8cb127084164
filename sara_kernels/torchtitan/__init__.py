"""torchtitan integration of SARA (the ``[torchtitan]`` extra; ``import sara_kernels`` never imports it).

* :class:`SARAConverter`: a torchtitan model converter (``model_registry(..., converters=[SARAConverter.Config(...)])``)
  whose selected MoE layers route with :class:`SARARouter`, which attaches each layer's SARA term
  to its gate's logits, so that its gradient enters backward through the router itself.
* :class:`sara_step` with one :class:`SARAMicrobatch` per micro-batch: anchors and targets (rows,
  packed documents or cached priors) and the micro-batch's share of the step's tokens.
* :func:`sara_metrics`: the per-layer JS since the last call, for torchtitan's metrics.
"""

try:
    import torchtitan  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("sara_kernels.torchtitan needs torchtitan: pip install 'sara-kernels[torchtitan]'") from err

from ..term import SARAOptions
from .router import SARAConverter, SARAMicrobatch, SARARouter, sara_metrics, sara_step

__all__ = ["SARAConverter", "SARARouter", "SARAMicrobatch", "sara_step", "sara_metrics", "SARAOptions"]
