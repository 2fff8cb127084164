"""Hugging Face transformers integration: router-logit capture (and, later, trainer/priors helpers)."""

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
