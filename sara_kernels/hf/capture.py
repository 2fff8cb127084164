"""Capture per-layer router logits of a Mixture-of-Experts model with forward hooks.

SARA needs, for every MoE layer it aligns, the raw router logits [N, E] of one forward pass
*with their autograd history*. transformers (>= 5) can return them as ``outputs.router_logits``,
but that path is fragile exactly where training happens:

* it is keyed on the model's class *name*, so FSDP2 (``fully_shard`` renames the class to
  ``FSDP<Name>``) silently returns ``None``;
* loss paths that build their own output (TRL's chunked NLL, custom trainers) drop the field;
* the tuple index is the MoE-layer *position*, not the decoder-layer index, once dense layers
  exist (``mlp_only_layers``, ``decoder_sparse_step``, ``first_k_dense_replace`` ...).

:func:`capture_router_logits` therefore hooks the router modules themselves. It finds them
from the model's own ``_can_record_outputs["router_logits"]`` ``OutputRecorder`` (router class
and output index: no per-family table to keep up to date), or from an explicit ``routers=``
argument for MoE code outside transformers, and names each by its true decoder-layer index,
parsed from the module path (``model.layers.3.mlp.gate`` -> 3).

Training-time behaviour (each decision below is tested in ``tests/hf/test_capture.py``):

* Activation checkpointing with ``use_reentrant=False`` re-runs the layers inside backward;
  a call made while autograd executes a backward pass is a recomputation and is not recorded,
  so each router is recorded once, from the forward whose logits the loss uses.
* ``use_reentrant=True`` runs the checkpointed layers under ``no_grad``: their logits can never
  carry gradient. This is *not supported* and raises a ``RuntimeError`` at the first router
  call of a grad-enabled forward (a loss built on such logits would silently train nothing).
  A forward under ``torch.no_grad()`` (e.g. the anchor side) is fine with either setting.
* ``torch.compile`` ignores hooks registered after the first compiled call. Call
  :func:`install_router_hooks` *before* compiling: it registers permanent hooks that do nothing
  until a :func:`capture_router_logits` block switches them on through a flag (the compiled
  code keeps one cache entry per flag value). Capturing on a compiled model without them
  raises a ``RuntimeError`` instead of silently recording nothing.
* A second call of the same router inside one block (outside backward) raises: one block
  captures one forward, so the anchor and target passes use one block each.

The hooks never modify outputs, never touch model classes, and are removed when the block
exits, also on an exception. Layer selection lives here too (:func:`select_layers`,
:func:`resolve_layers_spec`): which MoE layers a capture keeps is decided in one place.
"""

from __future__ import annotations

import logging
import operator
import re
import weakref
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

__all__ = [
    "capture_router_logits",
    "CapturedRouterLogits",
    "install_router_hooks",
    "RouterHooks",
    "RouterInfo",
    "find_routers",
    "select_layers",
    "default_score",
    "SIGMOID_ROUTER_FAMILIES",
]

logger = logging.getLogger(__name__)

RoutersArg = Union[None, str, type, Sequence[type], Sequence[nn.Module]]
LayersArg = Union[str, Iterable[int]]

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

_SCORES = ("softmax", "sigmoid")
_WARNED_SCORING: set = set()  # (model_type, scoring_func) already reported


# --------------------------------------------------------------------------------------------
# Finding the routers
# --------------------------------------------------------------------------------------------


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


def _unwrap(model: nn.Module) -> nn.Module:
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
                "submodule to hook: route them through one, e.g. a TopKRouter subclass with "
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
    model = _unwrap(model)
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


def select_layers(moe_layers: Sequence[int], layers: LayersArg = "all") -> tuple:
    """The decoder-layer indices ``layers`` selects among the MoE layers ``moe_layers``.

    ``"all"``: every MoE layer. ``"middle"``: SARA aligns the intermediate layers, where
    routing is most language-agnostic; of the K MoE layers (sorted) it drops the first and
    the last ``K // 4``, keeping the middle half (K = 8 keeps 4, K = 4 keeps 2, K <= 3 keeps
    all), so at least one layer always remains. A list of ints: exactly those decoder-layer
    indices, each of which must be an MoE layer (dense layers have no router).
    """
    available = sorted(set(moe_layers))
    if not available:
        raise ValueError("select_layers: the model has no MoE layer")
    if isinstance(layers, str):
        if layers == "all":
            return tuple(available)
        if layers == "middle":
            drop = len(available) // 4
            return tuple(available[drop : len(available) - drop])
        raise ValueError(f"layers must be 'all', 'middle' or a list of decoder-layer indices, got {layers!r}")
    try:
        chosen = list(layers)
    except TypeError:
        raise TypeError(f"layers must be 'all', 'middle' or a list of decoder-layer indices, got {layers!r}") from None
    if not chosen:
        raise ValueError("layers is empty: select at least one MoE layer")
    bad_type = [x for x in chosen if isinstance(x, bool) or not hasattr(x, "__index__")]
    if bad_type:
        raise TypeError(f"layers must hold int decoder-layer indices, got {bad_type}")
    chosen = [operator.index(x) for x in chosen]
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        raise ValueError(f"layers={chosen}: {unknown} are not MoE layers of this model; its MoE layers are {available}")
    return tuple(sorted(set(chosen)))


def default_score(model) -> str:
    """``"sigmoid"`` for sigmoid-scored routers, ``"softmax"`` otherwise (how SARA turns logits into a distribution).

    A router's own scoring is the natural one to align: ``"sigmoid"`` (normalised sigmoid)
    when the config, or its ``text_config``, has ``scoring_func == "sigmoid"`` or a
    ``model_type`` in :data:`SIGMOID_ROUTER_FAMILIES` (deepseek_v3, glm4_moe, ...);
    ``"softmax"`` over all experts for everything else, including modules without a config.
    Accepts a model (compiled or not) or a config.
    """
    config = getattr(_unwrap(model), "config", model if not isinstance(model, nn.Module) else None)
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


# --------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------


def _in_backward() -> bool:
    """Whether autograd is executing a backward pass on this thread (activation recomputation)."""
    return torch._C._current_graph_task_id() != -1


def _select_output(output, info: RouterInfo):
    """The logits tensor in a router's output (``None`` when the router returned none)."""
    if isinstance(output, torch.Tensor):
        if info.strict:
            raise TypeError(
                f"router {info.name!r} returns a bare tensor but output_index={info.output_index}; "
                "pass output_index=None for routers that return the logits directly"
            )
        return output
    if isinstance(output, (tuple, list)):
        index = 0 if info.output_index is None else info.output_index
        if not -len(output) <= index < len(output):
            raise IndexError(
                f"output_index={index} is out of range for router {info.name!r}, which returns {len(output)} values"
            )
        logits = output[index]
        if logits is not None and not isinstance(logits, torch.Tensor):
            raise TypeError(
                f"output {index} of router {info.name!r} is a {type(logits).__name__}, not the logits tensor; "
                "set output_index= to the position of the router logits"
            )
        return logits
    raise TypeError(
        f"router {info.name!r} returns a {type(output).__name__}; expected the logits tensor or a tuple holding it"
    )


class _HookState:
    """What the hooks read and write. One long-lived object per set of hooks, so that compiled
    code guards on ``active`` (a bool) and appends to ``records`` (a list that is cleared, never
    replaced): entering a block never forces a recompile beyond the first one per flag value."""

    def __init__(self):
        self.active = False
        self.records: list = []  # (router position, logits tensor as the router returned it)
        self.called: set = set()  # routers recorded in this block (eager only)
        self.grad_modes: list = []  # grad mode of each model call in flight (eager only)


def _make_router_hook(state: _HookState, position: int, info: RouterInfo):
    def router_hook(module, args, output):
        if not state.active:
            return None
        logits = _select_output(output, info)
        if logits is None:
            return None
        if not torch.compiler.is_compiling():
            if _in_backward():
                return None  # recomputation by activation checkpointing: recorded in the forward
            if position in state.called:
                raise RuntimeError(
                    f"router {info.name!r} ran twice inside one capture_router_logits block; "
                    "a block captures one forward pass: use one block per forward (anchor, target)"
                )
            if state.grad_modes and state.grad_modes[-1] and not torch.is_grad_enabled():
                raise RuntimeError(
                    f"router {info.name!r} ran under no_grad inside a forward called with grad enabled, so its "
                    "logits carry no gradient: this is what activation checkpointing with use_reentrant=True does, "
                    "which capture_router_logits does not support. Use use_reentrant=False (the transformers default: "
                    "activation_checkpointing_enable(activation_checkpointing_kwargs={'use_reentrant': False})), "
                    "or run passes that need no gradient under torch.no_grad()."
                )
            state.called.add(position)
        state.records.append((position, logits))
        return None

    return router_hook


def _make_call_hooks(state: _HookState):
    def pre_hook(module, args):
        if state.active and not torch.compiler.is_compiling():
            state.grad_modes.append(torch.is_grad_enabled())

    def post_hook(module, args, output):
        if state.active and not torch.compiler.is_compiling() and state.grad_modes:
            state.grad_modes.pop()

    return pre_hook, post_hook


def _is_compiled(model: nn.Module) -> bool:
    if model is not _unwrap(model):
        return True
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


class RouterHooks:
    """Forward hooks on a model's routers, inactive unless a capture block is open.

    Made by :func:`install_router_hooks` (permanent, for ``torch.compile``) or internally for
    one :func:`capture_router_logits` block. ``remove()`` takes every hook off.
    """

    def __init__(self, model: nn.Module, routers: Sequence[RouterInfo]):
        # A weak reference: _PERSISTENT maps the model to this object, and a strong one here
        # would keep every model that ever had install_router_hooks alive (weak-key dict values
        # must not reference their key).
        self._model_ref = weakref.ref(model)
        self.routers = tuple(routers)
        self.state = _HookState()
        self._handles = []
        for position, info in enumerate(self.routers):
            self._handles.append(info.module.register_forward_hook(_make_router_hook(self.state, position, info)))
        pre_hook, post_hook = _make_call_hooks(self.state)
        self._handles.append(model.register_forward_pre_hook(pre_hook))
        self._handles.append(model.register_forward_hook(post_hook, always_call=True))
        logger.debug(
            "hooked %d routers of %s: %s", len(self.routers), type(model).__name__, [r.name for r in self.routers]
        )

    def remove(self) -> None:
        """Remove the hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.state.active = False
        model = self.model
        if model is not None and _PERSISTENT.get(model) is self:
            del _PERSISTENT[model]

    @property
    def model(self) -> Optional[nn.Module]:
        """The hooked model (``None`` once it has been garbage-collected)."""
        return self._model_ref()

    @property
    def removed(self) -> bool:
        return not self._handles


_PERSISTENT: "weakref.WeakKeyDictionary[nn.Module, RouterHooks]" = weakref.WeakKeyDictionary()


def install_router_hooks(
    model: nn.Module, *, routers: RoutersArg = None, output_index: Optional[int] = None
) -> RouterHooks:
    """Install permanent, inactive router hooks, so that capture works on a ``torch.compile``-d model.

    Compiled code only runs hooks that existed when it was traced, so call this *before*
    ``torch.compile(model)`` (or ``model.compile()``). Later :func:`capture_router_logits`
    blocks on the model (or its compiled wrapper) reuse these hooks and only flip their
    ``active`` flag. Outside a block the hooks return at once. ``routers`` and
    ``output_index`` are as in :func:`find_routers`; call ``.remove()`` on the result to
    uninstall.
    """
    inner = _unwrap(model) if isinstance(model, nn.Module) else model
    if isinstance(inner, nn.Module) and inner in _PERSISTENT:
        raise RuntimeError(f"install_router_hooks was already called on this {type(inner).__name__}")
    if isinstance(model, nn.Module) and _is_compiled(model):
        raise RuntimeError(
            "install_router_hooks must be called before torch.compile: compiled code ignores hooks "
            "registered after its first call"
        )
    hooks = RouterHooks(inner, find_routers(model, routers=routers, output_index=output_index))
    _PERSISTENT[inner] = hooks
    return hooks


def router_hooks_installed(model: nn.Module) -> bool:
    """Whether :func:`install_router_hooks` was called on ``model`` (or the model it wraps)."""
    return _unwrap(model) in _PERSISTENT


# --------------------------------------------------------------------------------------------
# The capture block
# --------------------------------------------------------------------------------------------


class CapturedRouterLogits:
    """Router logits recorded by one :func:`capture_router_logits` block.

    ``layers[i]`` is the decoder-layer index of ``logits[i]`` (an [N, E] tensor, N = batch*seq
    tokens, row n = token (n // S, n % S), with autograd history when the forward had grad);
    entries are sorted by layer and, within a layer, by call order. Only selected layers whose
    router ran are listed. ``names`` gives the router module paths, ``score`` the scoring SARA
    should use (``"softmax"`` / ``"sigmoid"``). Readable inside the block after the forward, and
    after it.
    """

    def __init__(self, routers: Sequence[RouterInfo], selected: Sequence[int], score: str, live: list):
        self.routers = tuple(routers)
        self.selected_layers = tuple(selected)
        self.score = score
        self._records = live  # the hooks' list while the block is open, a private copy after

    def _freeze(self) -> None:
        self._records = list(self._records)

    def _entries(self, require: bool = True) -> list:
        positions = [pos for pos, _ in self._records]
        if len(set(positions)) != len(positions):  # compiled code skips the check in the hook
            twice = next(self.routers[p].name for p in positions if positions.count(p) > 1)
            raise RuntimeError(
                f"router {twice!r} ran twice inside one capture_router_logits block; "
                "a block captures one forward pass: use one block per forward (anchor, target)"
            )
        keep = set(self.selected_layers)
        entries = [(self.routers[pos], logits) for pos, logits in self._records if self.routers[pos].layer in keep]
        if not entries and require:
            raise RuntimeError(
                "no router logits were captured: call the model inside the capture_router_logits block. "
                "If you did, the routers never ran as modules (e.g. gpt_oss with MXFP4 weights or hub kernels "
                "computes the router inline) or the model was compiled without install_router_hooks first."
            )
        entries.sort(key=lambda entry: entry[0].layer)  # stable: call order within a layer
        return entries

    @property
    def layers(self) -> tuple:
        """Decoder-layer indices of the captured MoE layers, in order."""
        return tuple(info.layer for info, _ in self._entries())

    @property
    def names(self) -> tuple:
        """Module paths of the routers that produced ``logits``."""
        return tuple(info.name for info, _ in self._entries())

    @property
    def logits(self) -> tuple:
        """One [N, E] router-logit tensor per entry of ``layers`` ([B, S, E] outputs are flattened)."""
        out = []
        for info, logits in self._entries():
            if logits.dim() == 3:
                logits = logits.reshape(-1, logits.shape[-1])
            elif logits.dim() != 2:
                raise ValueError(
                    f"router {info.name!r} returned logits of shape {tuple(logits.shape)}; "
                    "expected [N, E] or [B, S, E] (check output_index)"
                )
            out.append(logits)
        return tuple(out)

    def __len__(self) -> int:
        """Number of captured entries (0 before the forward; ``layers`` and ``logits`` raise then)."""
        return len(self._entries(require=False))

    def __repr__(self) -> str:
        return (
            f"CapturedRouterLogits(selected_layers={list(self.selected_layers)}, "
            f"recorded={len(self._records)}, score={self.score!r})"
        )


class capture_router_logits:
    """Record the router logits of the MoE layers during one forward pass inside a ``with`` block.

    >>> with capture_router_logits(model) as captured:
    ...     model(input_ids=ids, attention_mask=mask)
    >>> captured.layers   # decoder-layer indices of the MoE layers, dense layers skipped
    >>> captured.logits   # matching [N, E] tensors with autograd history

    Args:
        model: a transformers (>= 5) MoE model whose class declares a ``router_logits``
            recorder in ``_can_record_outputs`` (possibly compiled, FSDP2-sharded or
            gradient-checkpointed), or any ``nn.Module`` with ``routers=`` given.
        routers: which modules are routers when the model declares none (or to override):
            a class, a module-path regex (``re.fullmatch``) or a list of modules. See
            :func:`find_routers` for this and for the layer-index rule.
        output_index: position of the logits in a tuple router output; ``None`` = the
            recorder's index, or for explicit routers a bare tensor / element 0.
        layers: ``"all"`` (default), ``"middle"`` (middle half of the MoE layers, see
            :func:`select_layers`) or a list of decoder-layer indices.
        score: ``"softmax"`` or ``"sigmoid"`` stored as ``captured.score`` for ``sara_loss``;
            default :func:`default_score` of the model.

    Hooks are active only inside the block and removed when it exits (also on an exception);
    with :func:`install_router_hooks` they stay installed and only get switched on and off.
    The capture does not read ``outputs.router_logits``, so loss paths that drop it still work.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        routers: RoutersArg = None,
        output_index: Optional[int] = None,
        layers: LayersArg = "all",
        score: Optional[str] = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if score is not None and score not in _SCORES:
            raise ValueError(f"score must be one of {_SCORES} or None, got {score!r}")
        self._model = _unwrap(model)
        self._persistent = _PERSISTENT.get(self._model)
        if self._persistent is not None:
            if routers is not None or output_index is not None:
                raise ValueError(
                    "this model has hooks from install_router_hooks; pass routers=/output_index= there, not here"
                )
            all_routers = self._persistent.routers
        else:
            if _is_compiled(model):
                raise RuntimeError(
                    "capture_router_logits on a torch.compile-d model needs install_router_hooks(model) called "
                    "before compiling: compiled code ignores hooks registered after its first call"
                )
            all_routers = find_routers(self._model, routers=routers, output_index=output_index)
        self._selected = select_layers([r.layer for r in all_routers], layers)
        self._all_routers = all_routers
        self._score = score if score is not None else default_score(self._model)
        self._hooks: Optional[RouterHooks] = None
        self._captured: Optional[CapturedRouterLogits] = None

    @property
    def layers(self) -> tuple:
        """Decoder-layer indices this capture records (known before the block runs)."""
        return tuple(self._selected)

    def __enter__(self) -> CapturedRouterLogits:
        if self._hooks is not None:
            raise RuntimeError("a capture_router_logits object can be entered once; create a new one per block")
        if self._persistent is not None:
            if self._persistent.removed:
                raise RuntimeError("the hooks from install_router_hooks were removed")
            if self._persistent.state.active:
                raise RuntimeError("a capture_router_logits block is already open on this model")
            hooks = self._persistent
        else:
            keep = set(self._selected)
            hooks = RouterHooks(self._model, [r for r in self._all_routers if r.layer in keep])
        state = hooks.state
        state.records.clear()
        state.called.clear()
        state.grad_modes.clear()
        self._hooks = hooks
        self._captured = CapturedRouterLogits(hooks.routers, self._selected, self._score, state.records)
        state.active = True
        return self._captured

    def __exit__(self, exc_type, exc, tb) -> None:
        hooks, captured = self._hooks, self._captured
        hooks.state.active = False
        captured._freeze()
        hooks.state.records.clear()
        hooks.state.called.clear()
        hooks.state.grad_modes.clear()
        if hooks is not self._persistent:
            hooks.remove()
        return None


def resolve_layers_spec(layers, arg: str = "layers"):
    """Normalise a layer selection: ``"all"``, ``"middle"``, or a sequence of decoder indices.

    Strings of comma-separated integers ("3,4,5", as given on a command line) become a list.
    """
    if isinstance(layers, str):
        if layers in ("all", "middle"):
            return layers
        try:
            out = [int(x) for x in layers.split(",") if x.strip()]
        except ValueError:
            raise ValueError(
                f"{arg}: expected 'all', 'middle' or comma-separated decoder-layer indices, got {layers!r}"
            ) from None
        if not out:
            raise ValueError(f"{arg}: no layer index in {layers!r}")
        return out
    if isinstance(layers, (list, tuple)) and layers and all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        return list(layers)
    raise ValueError(f"{arg}: expected 'all', 'middle' or a non-empty list of decoder-layer indices, got {layers!r}")
