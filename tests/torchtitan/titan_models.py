"""Small torchtitan 0.3.0 MoE models for the tests, built on the CPU from torchtitan's own configs.

``build_model`` takes Qwen3's ``debugmodel_moe`` (softmax router, 64 experts) or DeepSeek-V3's
``debugmodel`` with DeepSeek-V3's sigmoid, node-limited routing (``ROUTERS``), keeps the first
layers, and replaces one piece torchtitan cannot run on a CPU: FlexAttention has no CPU backward,
so each layer's ``attention.inner_attention`` becomes ``SDPA_STAND_IN``, torchtitan's own
``ScaledDotProductAttention`` (plain causal attention; it takes no document masks).
``CPUMemoryMonitorStandIn`` replaces the one piece of torchtitan's ``MetricsProcessor`` that needs
an accelerator.
"""

from __future__ import annotations

import copy

import torch
from torchtitan.components.metrics import DeviceMemStats
from torchtitan.models import deepseek_v3, qwen3
from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention
from torchtitan.models.common.moe import TokenChoiceTopKRouter

from sara_kernels.torchtitan import SARAConverter, SARAOptions

SDPA_STAND_IN = ScaledDotProductAttention.Config

#: (model family, flavor, number of decoder layers kept, router overrides)
ROUTERS = {
    "qwen3_softmax": (qwen3, "debugmodel_moe", 2, {}),
    # DeepSeek-V3's own routing (671B): sigmoid scores, experts in groups, a limited number of groups per token.
    "deepseek_sigmoid": (deepseek_v3, "debugmodel", 3,
                         dict(score_func="sigmoid", num_expert_groups=4, num_limited_groups=2, route_norm=True)),
}


class CPUMemoryMonitorStandIn:
    """Stands in for torchtitan's ``build_device_memory_monitor()`` in ``MetricsProcessor.__init__``:
    ``DeviceMemoryMonitor.__init__`` (``components/metrics.py``) calls ``device_module.get_device_name``,
    and without an accelerator ``device_module`` is ``torch.cuda``. A CPU has no device memory to report."""

    device_name = "cpu"

    def get_peak_stats(self) -> DeviceMemStats:
        return DeviceMemStats(max_active_gib=0.0, max_active_pct=0.0, max_reserved_gib=0.0, max_reserved_pct=0.0,
                              num_alloc_retries=0, num_ooms=0)

    def reset_peak_stats(self) -> None:
        pass


def model_config(name: str, options: SARAOptions | None = None, priors: str | None = None):
    family, flavor, num_layers, router = ROUTERS[name]
    spec = family.model_registry(flavor, attn_backend="flex")
    cfg = copy.deepcopy(spec.model)
    cfg.layers = cfg.layers[:num_layers]
    for _, _, parent, attr in list(cfg.traverse(FlexAttention.Config)):
        setattr(parent, attr, SDPA_STAND_IN())
    for _, router_cfg, _, _ in cfg.traverse(TokenChoiceTopKRouter.Config):
        for key, value in router.items():
            setattr(router_cfg, key, value)
    if options is not None:
        cfg = SARAConverter.Config(options=options, priors=priors).build().convert(cfg)
    return spec, cfg


def init_full_model(cfg, seed: int):
    """The model with every parameter and buffer drawn from ``seed`` (float32, CPU)."""
    with torch.device("meta"):
        model = cfg.build()
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights(buffer_device=torch.device("cpu"))
    return model


def gate_logits_recorder(model) -> dict:
    """{decoder layer: [gate logits with autograd history, one per forward call]}, recorded before SARA's hook."""
    seen: dict = {}
    for name, module in model.named_modules():
        if isinstance(module, TokenChoiceTopKRouter):
            layer = int(name.split(".")[1])
            module.gate.register_forward_hook(lambda m, i, out, layer=layer: seen.setdefault(layer, []).append(out),
                                              prepend=True)
    return seen
