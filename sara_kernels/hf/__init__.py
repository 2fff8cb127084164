"""Hugging Face transformers integration of SARA. One job per module; imports run down this list:

* :mod:`.capture`: finding the router modules and choosing layers; router-logit capture
  (:func:`capture_router_logits`, :func:`install_router_hooks`, :func:`find_routers`,
  :func:`select_layers`, :func:`resolve_layers_spec`, ...).
* :mod:`.data`: parallel pairs (:func:`load_pairs` and :func:`pairs_from_dataset` with ``datasets``,
  :class:`PairDataset`, validation).
* :mod:`.collate`: pairs to batches (:class:`SARACollator`) and right padding.
* :mod:`.routing`: running a model for its routing (pooled distributions of many texts).
* :mod:`.priors`: cached anchor routing priors (:func:`extract_routing_priors`,
  :func:`load_routing_priors`, :class:`RoutingPriors`).
* :mod:`.trainer`: ``transformers.Trainer`` integration (:class:`SARATrainer`,
  :class:`SARATrainingArguments`), imported on first use so that ``import sara_kernels.hf``
  does not pull in ``transformers.Trainer`` and accelerate.
* :mod:`.trl`: TRL integration (:class:`SARASFTTrainer`, :class:`SARASFTConfig`), imported on
  first use (needs the ``trl`` extra).
"""

from .capture import (
    SIGMOID_ROUTER_FAMILIES,
    CapturedRouterLogits,
    RouterHooks,
    RouterInfo,
    capture_router_logits,
    default_score,
    find_routers,
    install_router_hooks,
    resolve_layers_spec,
    router_hooks_installed,
    select_layers,
)
from .collate import SARACollator
from .data import PairDataset, load_pairs, pairs_from_dataset, save_pairs, validate_pair
from .priors import RoutingPriors, extract_routing_priors, load_routing_priors

_TRAINER_EXPORTS = ("SARATrainer", "SARATrainingArguments", "SARAOptions")
_TRL_EXPORTS = ("SARASFTTrainer", "SARASFTConfig")

__all__ = [
    "SIGMOID_ROUTER_FAMILIES", "CapturedRouterLogits", "RouterHooks", "RouterInfo", "capture_router_logits",
    "default_score", "find_routers", "install_router_hooks", "resolve_layers_spec", "router_hooks_installed",
    "select_layers",
    "SARACollator", "PairDataset", "load_pairs", "pairs_from_dataset", "save_pairs", "validate_pair",
    "RoutingPriors", "extract_routing_priors", "load_routing_priors", *_TRAINER_EXPORTS, *_TRL_EXPORTS,
]


def __getattr__(name):
    if name in _TRAINER_EXPORTS:
        from . import trainer

        return getattr(trainer, name)
    if name in _TRL_EXPORTS:
        from . import trl

        return getattr(trl, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
