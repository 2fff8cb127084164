"""sara-kernels: fused Triton kernels for SARA routing alignment in Mixture-of-Experts models."""

from ._version import __version__
from .api import SARALoss, routing_distribution, sara_loss

__all__ = ["sara_loss", "SARALoss", "routing_distribution", "__version__"]
