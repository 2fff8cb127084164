"""Capture per-layer router logits of a Mixture-of-Experts model with forward hooks.

SARA needs, for every MoE layer it aligns, the raw router logits [N, E] of one forward pass
*with their autograd history*. transformers (>= 5) can return them as ``outputs.router_logits``,
but that path is fragile exactly where training happens:

* it is keyed on the model's class *name*, so FSDP2 (``fully_shard`` renames the class to
  ``FSDP<Name>``) silently returns ``None``;
* loss paths that build their own output (TRL's chunked NLL, custom trainers) drop the field;
* the tuple index is the MoE-layer *position*, not the decoder-layer index, once dense layers
  exist (``mlp_only_layers``, ``decoder_sparse_step``, ``first_k_dense_replace`` ...).

:func:`capture_router_logits` therefore hooks the router modules themselves, as
:func:`~sara_kernels.hf.routers.find_routers` finds them, and keeps the layers that
:func:`~sara_kernels.layer_selection.select_layers` selects.

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
* ``early_exit=True`` (for a forward run only for its routing): the hook of the last selected
  router to run raises a private stop signal that ends the forward there (no later layer, no
  LM head) and that the block catches. The block's frames unwind like any exception's, so the
  model's own context managers (``no_grad``, autocast, transformers' output recorder) are
  restored. It is switched off, with one ``logging`` line per reason, where an interrupted
  forward would leave the framework's state behind: ``torch.compile`` (an exception raised
  inside compiled code), FSDP (its pre-forward all-gather is paired with a post-forward
  reshard and a prefetch order) and DeepSpeed ZeRO-3 (its parameter fetch and release follow a
  traced module order).

The hooks never modify outputs, never touch model classes, and are removed when the block
exits, also on an exception.
"""

from __future__ import annotations

import logging
import weakref
from typing import Optional, Sequence

import torch
from torch import nn
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from .._inputs import check_score
from ..layer_selection import LayersArg, select_layers
from .routers import RouterInfo, RoutersArg, default_score, find_routers, unwrap_compiled

__all__ = [
    "capture_router_logits",
    "early_exit_possible",
    "CapturedRouterLogits",
    "install_router_hooks",
    "router_hooks_installed",
    "RouterHooks",
]

logger = logging.getLogger(__name__)

_COMPILED_WITHOUT_HOOKS = "compiled code ignores hooks registered after its first call"


def _ran_twice(name: str) -> RuntimeError:
    return RuntimeError(
        f"router {name!r} ran twice inside one capture_router_logits block; "
        "a block captures one forward pass: use one block per forward (anchor, target)"
    )


# --------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------


class _StopForward(BaseException):
    """Ends an early-exit forward once its last selected router has run. A ``BaseException``, so
    that model code catching ``Exception`` never swallows it."""

    def __init__(self, state: "_HookState"):
        super().__init__("early exit after the last selected router")
        self.state = state


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
        self.stop_after: set = set()  # early exit: positions of the selected routers still to run

    def reset(self) -> None:
        """Forget the last block's records (in place: compiled code holds these objects)."""
        self.records.clear()
        self.called.clear()
        self.grad_modes.clear()
        self.stop_after.clear()


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
                raise _ran_twice(info.name)
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
        if state.stop_after:
            state.stop_after.discard(position)
            if not state.stop_after:
                raise _StopForward(state)
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
    if model is not unwrap_compiled(model):
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
    inner = unwrap_compiled(model) if isinstance(model, nn.Module) else model
    if isinstance(inner, nn.Module) and inner in _PERSISTENT:
        raise RuntimeError(f"install_router_hooks was already called on this {type(inner).__name__}")
    if isinstance(model, nn.Module) and _is_compiled(model):
        raise RuntimeError(
            f"install_router_hooks must be called before torch.compile: {_COMPILED_WITHOUT_HOOKS}"
        )
    hooks = RouterHooks(inner, find_routers(model, routers=routers, output_index=output_index))
    _PERSISTENT[inner] = hooks
    return hooks


def _early_exit_blocker(model: nn.Module) -> Optional[str]:
    """Why a forward of ``model`` must not be stopped part-way (None when it may)."""
    if _is_compiled(model):
        return ("torch.compile: the stop is an exception raised inside the compiled code, which the compiled "
                "graph would have to trace")
    fsdp_classes = ()
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

        fsdp_classes = (FSDPModule, FullyShardedDataParallel)
    if any(isinstance(m, fsdp_classes) for m in model.modules()):
        return ("FSDP: each module's pre-forward all-gather is paired with a post-forward reshard and a prefetch "
                "order, which a forward stopped part-way would leave behind")
    if is_deepspeed_zero3_enabled() or any(hasattr(p, "ds_id") for p in model.parameters()):
        return ("DeepSpeed ZeRO-3: parameters are fetched and released in a traced module order, which a forward "
                "stopped part-way would leave inconsistent")
    return None


_EARLY_EXIT_OFF_LOGGED: set = set()  # reasons already logged (one line per reason and process)


def early_exit_possible(*models: nn.Module) -> bool:
    """Whether a routing-only forward of these modules (a model and the wrappers it runs in) may
    stop after its last selected router; when not, says why once per reason (``logging``, INFO)."""
    for model in models:
        reason = _early_exit_blocker(model)
        if reason is not None:
            if reason not in _EARLY_EXIT_OFF_LOGGED:
                _EARLY_EXIT_OFF_LOGGED.add(reason)
                logger.info("routing-only forwards run to the end (no early exit) under %s", reason)
            return False
    return True


def router_hooks_installed(model: nn.Module) -> bool:
    """Whether :func:`install_router_hooks` was called on ``model`` (or the model it wraps)."""
    return unwrap_compiled(model) in _PERSISTENT


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
        self.stopped_early = False  # whether an early_exit block stopped the forward after its last router

    def _freeze(self) -> None:
        self._records = list(self._records)

    def _entries(self, require: bool = True) -> list:
        positions = [pos for pos, _ in self._records]
        if len(set(positions)) != len(positions):  # compiled code skips the check in the hook
            twice = next(self.routers[p].name for p in positions if positions.count(p) > 1)
            raise _ran_twice(twice)
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
        early_exit: for a block whose one statement is a forward run only for its routing
            (e.g. under ``torch.no_grad()``): the forward stops right after the last selected
            router ran, and the block ends there, so the model call returns nothing and
            statements after it inside the block do not run. ``captured.stopped_early`` says
            whether it stopped. Off where :func:`early_exit_possible` says no (compiled,
            FSDP, ZeRO-3 models: the forward then runs to the end).

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
        early_exit: bool = False,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_score(score, option=True)
        self._model = unwrap_compiled(model)
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
                    f"before compiling: {_COMPILED_WITHOUT_HOOKS}"
                )
            all_routers = find_routers(self._model, routers=routers, output_index=output_index)
        self._selected = select_layers([r.layer for r in all_routers], layers)
        self._all_routers = all_routers
        self._score = score if score is not None else default_score(self._model)
        self._early_exit = early_exit and early_exit_possible(model)
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
        hooks.state.reset()
        if self._early_exit:
            keep = set(self._selected)
            hooks.state.stop_after.update(i for i, r in enumerate(hooks.routers) if r.layer in keep)
        self._hooks = hooks
        self._captured = CapturedRouterLogits(hooks.routers, self._selected, self._score, hooks.state.records)
        hooks.state.active = True
        return self._captured

    def __exit__(self, exc_type, exc, tb) -> bool:
        hooks, captured = self._hooks, self._captured
        hooks.state.active = False
        captured._freeze()
        hooks.state.reset()
        if hooks is not self._persistent:
            hooks.remove()
        captured.stopped_early = isinstance(exc, _StopForward) and exc.state is hooks.state
        return captured.stopped_early

