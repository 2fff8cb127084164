"""Finding the router modules of a Mixture-of-Experts model and the scoring SARA should use.

:func:`find_routers` reads them from the model's own ``_can_record_outputs["router_logits"]``
``OutputRecorder`` (router class and output index: no per-family table to keep up to date), or
takes an explicit ``routers=`` argument for MoE code outside transformers, and names each by its
true decoder-layer index, parsed from the module path (``model.layers.3.mlp.gate`` -> 3). The
hooks that record what they return live in :mod:`.capture`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from torch import nn

__all__ = ["RouterInfo", "RoutersArg", "SIGMOID_ROUTER_FAMILIES", "default_score", "find_routers", "unwrap_compiled"]

logger = logging.getLogger(__name__)

RoutersArg = Union[None, str, type, Sequence[type], Sequence[nn.Module]]

#: ``model_type`` of the transformers families whose router scores each expert with an independent
#: sigmoid (DeepSeek-V3-style gates, read off transformers 5.24). For them SARA uses the
#: normalised sigmoid; every other family uses softmax over all experts.
SIGMOID_ROUTER_FAMILIES = frozenset(
    {
        "deepseek_v3",
        "deepseek_v32",
        "glm4_moe",
        "glm4_moe_lite",
        "glm4v_moe",
        "glm4v_moe_text",
        "glm_moe_dsa",
        "dots1",
        "kimi_linear",
        "llama4",
        "llama4_text",
    }
)

_WARNED_SCORING: set = set()  # (model_type, scoring_func) already reported


@dataclass(frozen=True)
class RouterInfo:
    """One hooked router: its module path, decoder-layer index and which output holds the logits.

    ``output_index`` is ``None`` for "a bare tensor output, else element 0". ``strict`` says
    whether a bare tensor output is an error when an index was given (explicit routers) or is
    taken as the logits (transformers recorders, matching transformers' own capture).
    """

    name: str
    layer: int
    module: nn.Module
    output_index: Optional[int]
    strict: bool


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile(model)`` wrapper (``OptimizedModule``) holds, else ``model``."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def _layer_from_path(name: str) -> Optional[int]:
    """First purely numeric component of a module path: the index in the decoder ModuleList."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def _recorder_specs(module: nn.Module) -> list:
    """The ``router_logits`` entries of ``type(module)._can_record_outputs`` (possibly empty).

    Read from the class (inherited through FSDP2's renamed subclass) instead of transformers'
    name-keyed registry, which is what breaks under ``fully_shard``.
    """
    table = getattr(type(module), "_can_record_outputs", None)
    if not isinstance(table, dict) or "router_logits" not in table:
        return []
    specs = table["router_logits"]
    return list(specs) if isinstance(specs, (list, tuple)) else [specs]


def _spec_matcher(spec):
    """(predicate(name, module), output index) for one recorder entry, as transformers reads it.

    An ``OutputRecorder`` gives a target class and/or a class-name suffix, an optional layer
    name and its index; a bare class or string means index 1 (transformers' convention for
    non-hidden-state outputs).
    """
    if hasattr(spec, "target_class") and hasattr(spec, "index"):
        target, class_name, layer_name, index = spec.target_class, spec.class_name, spec.layer_name, spec.index
    elif isinstance(spec, str):
        target, class_name, layer_name, index = None, spec, None, 1
    elif isinstance(spec, type):
        target, class_name, layer_name, index = spec, None, None, 1
    else:
        raise TypeError(f"unrecognised router_logits recorder {spec!r} in _can_record_outputs")

    def matches(name: str, module: nn.Module) -> bool:
        hit = (target is not None and isinstance(module, target)) or (
            class_name is not None and name.endswith(class_name)
        )
        if hit and layer_name is not None:
            hit = "." + layer_name.strip(".") + "." in "." + name + "."
        return hit

    return matches, index


def _hf_routers(model: nn.Module) -> list[tuple[str, nn.Module, Optional[int], str]]:
    """Routers declared by the ``router_logits`` recorders of every (sub)model in ``model``.

    Each entry is (module path, router, output index, path relative to the declaring model):
    the layer index is read from the relative path, so that a wrapper whose own path holds a
    number (``members.0.model.layers.3.mlp.gate``) does not shift it.
    """
    found: dict[int, tuple[str, nn.Module, Optional[int], str]] = {}
    declared = False
    for prefix, owner in model.named_modules():
        specs = _recorder_specs(owner)
        if not specs:
            continue
        declared = True
        matchers = [_spec_matcher(spec) for spec in specs]
        # named_modules lists owners before their submodels, so a nested model's own recorder
        # overrides its parent's for the routers inside it, as in transformers' own capture.
        for sub_name, module in owner.named_modules(prefix=prefix):
            for matches, index in matchers:
                if matches(sub_name, module):
                    local = sub_name[len(prefix) + 1 :] if prefix else sub_name
                    found[id(module)] = (sub_name, module, index, local)
                    break
    if not declared:
        # A Megatron model declares no recorder; say why its routers cannot be captured rather
        # than pointing to routers=, which would only reach the same refusal.
        _refuse_post_topk_routers([(name, module) for name, module in model.named_modules()])
        raise ValueError(
            f"{type(model).__name__} declares no 'router_logits' OutputRecorder in _can_record_outputs: "
            "expected a transformers (>= 5) Mixture-of-Experts model such as Qwen3MoeForCausalLM. "
            "For other MoE code name the routers: routers=<router class | module-path regex | list of modules>."
        )
    if not found:
        raise ValueError(
            f"{type(model).__name__} declares a 'router_logits' recorder but contains no module it matches: "
            "every layer is dense (check mlp_only_layers / decoder_sparse_step / first_k_dense_replace), or the "
            "routers were replaced by a fused/quantised implementation; pass routers= to name the modules that "
            "compute the router logits."
        )
    order = {id(m): i for i, m in enumerate(model.modules())}
    return sorted(found.values(), key=lambda entry: order[id(entry[1])])


def _explicit_routers(model: nn.Module, routers) -> list[tuple[str, nn.Module]]:
    """Modules named by ``routers=`` (a class or classes, a path regex, or modules), model order."""
    named = list(model.named_modules())
    if isinstance(routers, str):
        try:
            pattern = re.compile(routers)
        except re.error as err:
            raise ValueError(f"routers={routers!r} is not a valid regular expression: {err}") from None
        picked = [(n, m) for n, m in named if n and pattern.fullmatch(n)]
        what = f"module path matching (re.fullmatch) {routers!r}"
    elif isinstance(routers, type) or (
        isinstance(routers, (list, tuple)) and routers and all(isinstance(r, type) for r in routers)
    ):
        classes = (routers,) if isinstance(routers, type) else tuple(routers)
        if not all(issubclass(c, nn.Module) for c in classes):
            raise TypeError(f"routers= classes must be nn.Module subclasses, got {classes}")
        picked = [(n, m) for n, m in named if isinstance(m, classes)]
        what = "module of class " + " | ".join(c.__name__ for c in classes)
    elif isinstance(routers, (list, tuple)) and routers and all(isinstance(r, nn.Module) for r in routers):
        names = {id(m): n for n, m in named}
        missing = [type(r).__name__ for r in routers if id(r) not in names]
        if missing:
            raise ValueError(f"routers= modules {missing} are not submodules of {type(model).__name__}")
        picked = [(names[id(r)], r) for r in routers]
        if len({id(m) for _, m in picked}) != len(picked):
            raise ValueError("routers= lists the same module twice")
        return picked
    else:
        raise TypeError(
            "routers= takes a router class (or a list of classes), a module-path regex string, "
            f"or a non-empty list of router modules; got {routers!r}"
        )
    if not picked:
        raise ValueError(f"routers={routers!r}: {type(model).__name__} has no {what}")
    return picked


def _is_megatron_topk_router(module: nn.Module) -> bool:
    """Whether ``module`` runs Megatron-core's ``TopKRouter.forward``, which returns post-top-k
    probabilities and a routing map rather than logits.

    Matched by class name and module path, so megatron is never imported. A subclass that
    overrides ``forward`` outside megatron (e.g. to return the logits) is not matched.
    """
    cls = type(module)
    forward_module = getattr(getattr(cls, "forward", None), "__module__", None) or ""
    return forward_module.startswith("megatron.") and any(
        base.__name__ == "TopKRouter" and base.__module__.startswith("megatron.") for base in cls.__mro__
    )


def _refuse_post_topk_routers(entries) -> None:
    for name, module, *_ in entries:
        if _is_megatron_topk_router(module):
            raise ValueError(
                f"router {name!r} is a Megatron-core TopKRouter: it returns (probs, routing_map), the "
                "routing probabilities after top-k selection (zero for unselected experts) and a boolean map, not "
                "the router logits SARA aligns. Megatron computes the logits in TopKRouter.gating(), with no "
                "submodule to hook. For training on Megatron-core use sara_kernels.megatron: with_sara(layer_spec, "
                "SARAOptions(sara_weight=...)) puts SARA inside the router through the layer spec, with sara_batch(...) "
                "around each micro-batch's model call (pip install 'sara-kernels[megatron]'). "
                "To capture here instead, route the logits through a submodule, e.g. a TopKRouter subclass with "
                "self.logits = torch.nn.Identity() and gating(self, input) returning self.logits(super().gating(input)), "
                "then pass routers=r'.*\\.router\\.logits'; or compute the logits yourself and pass them to sara_loss."
            )


def find_routers(model: nn.Module, *, routers: RoutersArg = None, output_index: Optional[int] = None) -> tuple:
    """The router modules :func:`capture_router_logits` hooks, as :class:`RouterInfo` in model order.

    ``routers=None``: the modules matched by the model's ``_can_record_outputs["router_logits"]``
    recorders (of the model and every transformers submodel in it), with the recorder's output
    index. Otherwise ``routers`` names them: a router class (or list of classes), a regular
    expression that must *fully* match the module path (e.g. ``r"blocks\\.\\d+\\.moe\\.router"``),
    or a list of the router modules themselves.

    ``output_index`` (an int) overrides which element of a tuple output holds the logits;
    ``None`` keeps the recorder's index, or for explicit routers takes a bare tensor output as
    is and element 0 of a tuple.

    Layer index rule: when every router's module path has a numeric component, the first one
    is its decoder-layer index (``model.layers.3.mlp.gate`` -> 3; several routers may share a
    layer); for recorder-found routers the path is taken relative to the transformers model
    that declares the recorder, so wrappers around it do not change the index. Otherwise
    routers are numbered 0, 1, ... in order of appearance: the order of ``routers`` when it
    is a list of modules, of ``model.named_modules()`` else.

    A Megatron-core ``TopKRouter`` is refused with a ``ValueError`` that says what to hook
    instead: it returns post-top-k probabilities and a routing map, and aligning those in
    place of logits would train silently on the wrong distribution.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if output_index is not None and (isinstance(output_index, bool) or not isinstance(output_index, int)):
        raise TypeError(f"output_index must be an int or None, got {output_index!r}")
    model = unwrap_compiled(model)
    if routers is None:
        entries = [
            (name, module, index if output_index is None else output_index, False, local)
            for name, module, index, local in _hf_routers(model)
        ]
    else:
        strict = output_index is not None
        entries = [(name, module, output_index, strict, name) for name, module in _explicit_routers(model, routers)]
    _refuse_post_topk_routers(entries)

    parsed = [_layer_from_path(local) for *_, local in entries]
    if any(layer is None for layer in parsed):
        parsed = list(range(len(entries)))
    return tuple(
        RouterInfo(name=name, layer=layer, module=module, output_index=index, strict=strict)
        for (name, module, index, strict, _), layer in zip(entries, parsed)
    )



def default_score(model) -> str:
    """``"sigmoid"`` for sigmoid-scored routers, ``"softmax"`` otherwise (how SARA turns logits into a distribution).

    A router's own scoring is the natural one to align: ``"sigmoid"`` (normalised sigmoid)
    when the config, or its ``text_config``, has ``scoring_func == "sigmoid"`` or a
    ``model_type`` in :data:`SIGMOID_ROUTER_FAMILIES` (deepseek_v3, glm4_moe, ...);
    ``"softmax"`` over all experts for everything else, including modules without a config.
    Accepts a model (compiled or not) or a config.
    """
    config = getattr(unwrap_compiled(model), "config", model if not isinstance(model, nn.Module) else None)
    configs = [c for c in (config, getattr(config, "text_config", None)) if c is not None]
    for cfg in configs:
        scoring = getattr(cfg, "scoring_func", None)
        if scoring == "sigmoid" or getattr(cfg, "model_type", None) in SIGMOID_ROUTER_FAMILIES:
            return "sigmoid"
        family = getattr(cfg, "model_type", type(cfg).__name__)
        if isinstance(scoring, str) and scoring != "softmax" and (family, scoring) not in _WARNED_SCORING:
            _WARNED_SCORING.add((family, scoring))
            logger.warning(
                "scoring_func=%r of %s has no SARA equivalent; using softmax (pass score= to choose)", scoring, family
            )
    return "softmax"

