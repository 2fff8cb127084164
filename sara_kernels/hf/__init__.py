"""Hugging Face transformers integration of SARA. One job per module; imports run down this list:

* :mod:`.routers`: finding the router modules (:func:`find_routers`, :func:`default_score`).
* :mod:`.capture`: router-logit capture with forward hooks (:func:`capture_router_logits`,
  :func:`install_router_hooks`); the layers it keeps are chosen by
  :mod:`sara_kernels.layer_selection` (:func:`select_layers`, :func:`resolve_layers_spec`).
* :mod:`.data`: parallel pairs (:func:`load_pairs` and :func:`pairs_from_dataset` with ``datasets``,
  :class:`PairDataset`, validation).
* :mod:`.collate`: pairs to batches (:class:`SARACollator`) and right padding.
* :mod:`.routing`: running a model for its routing (pooled distributions of many texts).
* :mod:`.priors`: cached anchor routing priors (:func:`extract_routing_priors`, :func:`save_routing_priors`,
  :func:`load_routing_priors`, :class:`RoutingPriors`).
* :mod:`.term`: the SARA term of a Trainer step (capture, scaling, metrics) that both trainers
  use; its options (:class:`SARAOptions`) and loss call are :mod:`sara_kernels.term`.
* :mod:`.trainer`: ``transformers.Trainer`` integration (:class:`SARATrainer`,
  :class:`SARATrainingArguments`), imported on first use so that ``import sara_kernels.hf``
  does not pull in ``transformers.Trainer`` and accelerate.
* :mod:`.trl`: TRL integration (:class:`SARASFTTrainer`, :class:`SARASFTConfig`), imported on
  first use (needs the ``trl`` extra).
"""

from ..layer_selection import resolve_layers_spec, select_layers
from ..term import SARAOptions
from .capture import CapturedRouterLogits, RouterHooks, capture_router_logits, install_router_hooks, router_hooks_installed
from .collate import SARACollator
from .data import PairDataset, load_pairs, pairs_from_dataset, save_pairs, validate_pair
from .priors import RoutingPriors, extract_routing_priors, load_routing_priors, save_routing_priors
from .routers import SIGMOID_ROUTER_FAMILIES, RouterInfo, default_score, find_routers

_TRAINER_EXPORTS = ("SARATrainer", "SARATrainingArguments")
_TRL_EXPORTS = ("SARASFTTrainer", "SARASFTConfig")

__all__ = [
    "SIGMOID_ROUTER_FAMILIES", "CapturedRouterLogits", "RouterHooks", "RouterInfo", "capture_router_logits",
    "default_score", "find_routers", "install_router_hooks", "resolve_layers_spec", "router_hooks_installed",
    "select_layers",
    "SARACollator", "PairDataset", "load_pairs", "pairs_from_dataset", "save_pairs", "validate_pair",
    "RoutingPriors", "extract_routing_priors", "load_routing_priors", "save_routing_priors", "SARAOptions",
    *_TRAINER_EXPORTS, *_TRL_EXPORTS,
]


def __getattr__(name):
    if name in _TRAINER_EXPORTS:
        from . import trainer

        return getattr(trainer, name)
    if name in _TRL_EXPORTS:
        from . import trl

        return getattr(trl, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
