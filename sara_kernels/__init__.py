"""sara-kernels: fused Triton kernels for SARA routing alignment in Mixture-of-Experts models."""

from .api import SARALoss, routing_distribution, sara_loss

__version__ = "0.1.0"

__all__ = ["sara_loss", "SARALoss", "routing_distribution", "__version__"]
