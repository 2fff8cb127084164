"""sara-kernels: fused Triton kernels for SARA routing alignment in Mixture-of-Experts models.

The API is imported on first use, so that ``python -m sara_kernels CMD -h`` does not wait for torch.
"""

from ._version import __version__

__all__ = ["sara_loss", "SARALoss", "routing_distribution", "__version__"]
_API = ("sara_loss", "SARALoss", "routing_distribution")


def __getattr__(name):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
