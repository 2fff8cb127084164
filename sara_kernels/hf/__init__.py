"""Hugging Face transformers integration of SARA.

* :mod:`.capture`: router-logit capture from MoE models' router modules
  (:func:`capture_router_logits`, :func:`install_router_hooks`, :func:`find_routers`, ...).
* :mod:`.data`: parallel pairs (:func:`load_pairs`, :class:`PairDataset`, validation) and the
  built-in pseudo-language corpus and word tokenizer used by the demo and tests.
* :mod:`.priors`: cached anchor routing priors (:func:`extract_routing_priors`,
  :func:`load_routing_priors`, :class:`RoutingPriors`).
* :mod:`.trainer`: ``transformers.Trainer`` integration (:class:`SARATrainer`,
  :class:`SARATrainingArguments`, :class:`SARACollator`), imported on first use.
"""

from .capture import (
    CapturedRouterLogits,
    RouterHooks,
    RouterInfo,
    SIGMOID_ROUTER_FAMILIES,
    capture_router_logits,
    default_score,
    find_routers,
    install_router_hooks,
    select_layers,
)

# SARA training: pairs, cached priors (eager, light) and the Trainer integration (imported on
# first use, so that `import sara_kernels.hf` does not pull in transformers.Trainer/accelerate).
from .data import PairDataset, build_word_tokenizer, load_pairs, make_parallel_corpus, validate_pair
from .priors import RoutingPriors, extract_routing_priors, load_routing_priors

_TRAINER_EXPORTS = ("SARATrainer", "SARATrainingArguments", "SARACollator")


def __getattr__(name):
    if name in _TRAINER_EXPORTS:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
