"""Argument checking and normalisation shared by every backend.

Both the reference and the Triton path see the same ``RoutingSide`` objects, so a bad
argument is rejected with the same message whichever backend runs. Checks that would
need the values of a CUDA tensor (cu_seqlens ordering) are made with an asynchronous
device assertion instead of a host sync, so a training step stays capturable.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import NamedTuple, Optional, Sequence, Union

import torch

from . import backends

Logits = Union[torch.Tensor, Sequence[torch.Tensor]]

SCORES = ("softmax", "sigmoid")
REDUCTIONS = ("mean", "sum", "none")
DIVERGENCES = ("js", "kl", "reverse_kl")


class SequenceLayout(NamedTuple):
    """Which of one side's N rows of router logits belong to which sequence: ``mask`` [B, S]
    (sequence b is rows ``[b*S, (b+1)*S)``, 1 = valid token), ``cu_seqlens`` [B+1] (packed:
    sequence b is rows ``[cu_seqlens[b], cu_seqlens[b+1])``, all valid), or neither (all N rows
    are one sequence). Checked against the logits when the loss is computed.

    What an integration builds for each side and hands to :func:`sara_kernels.term.sara_term`.
    Per-pair values (``pair_weights``) belong to the pair, not to a side, and are given beside
    the two layouts. A NamedTuple: ``sara_loss`` builds one per side on every call.
    """

    mask: Optional[torch.Tensor] = None
    cu_seqlens: Optional[torch.Tensor] = None


WHOLE = SequenceLayout()  # every row of the side is one sequence


class RoutingSide(NamedTuple):
    """One side (anchor or target) of the loss: L layers of router logits over N tokens.

    Sequence b covers rows ``[b*S, (b+1)*S)`` with per-token validity ``mask`` (mask form),
    rows ``[cu_seqlens[b], cu_seqlens[b+1])`` all valid (packed form), or all N rows
    (neither given: B = 1). A NamedTuple: built on every call, so it must cost next to nothing.
    """

    name: str
    inputs: tuple  # the tensors autograd sees: L tensors [N, E], or (one [L, N, E] tensor,)
    stacked: bool  # given as one [L, N, E] tensor
    num_layers: int
    num_tokens: int
    num_experts: int
    num_seqs: int
    seq_len: int  # S of the mask form; N otherwise
    mask: Optional[torch.Tensor]
    cu_seqlens: Optional[torch.Tensor]
    dtype: torch.dtype
    device: torch.device

    @property
    def layers(self) -> tuple:
        """L tensors [N, E] (views of the stacked tensor when given as one)."""
        return tuple(self.inputs[0].unbind(0)) if self.stacked else self.inputs


_size = torch.Tensor.size
_dtype_of = operator.attrgetter("dtype")
_device_of = operator.attrgetter("device")


def _uniform(layers) -> bool:
    """All tensors, one shape, one dtype, one device: checked in C-level loops (this runs on
    every eager call with up to ~100 tensors); the per-layer loop of ``_check_layers`` runs to
    name the culprit of a failure, and while torch.compile traces (where it costs nothing)."""
    try:
        return (len(set(map(_size, layers))) == 1 and len(set(map(_dtype_of, layers))) == 1
                and len(set(map(_device_of, layers))) == 1)
    except TypeError:  # not a tensor
        return False


def _layer_tensors(logits: Logits, arg: str):
    """(the side's input tensors, whether they are one stacked [L, N, E] tensor), after the
    structural checks of the first layer, which describes the side; the others are compared with
    it by :func:`check_layers`."""
    if isinstance(logits, torch.Tensor):
        if logits.dim() != 3:
            raise ValueError(
                f"{arg}: expected a tuple/list of [N, E] tensors or one [L, N, E] tensor, "
                f"got a tensor of shape {tuple(logits.shape)}"
            )
        if logits.shape[0] == 0:
            raise ValueError(f"{arg}: expected at least one layer, got a tensor of shape {tuple(logits.shape)}")
        _check_first(logits, arg)
        return (logits,), True
    if not isinstance(logits, (list, tuple)):
        raise TypeError(
            f"{arg}: expected a tuple/list of [N, E] tensors or one [L, N, E] tensor, "
            f"got {type(logits).__name__}"
        )
    if len(logits) == 0:
        raise ValueError(f"{arg}: expected at least one layer, got an empty {type(logits).__name__}")
    # logits[0] is always checked here: the C++ op reads a one-element list of an [L, N, E] tensor
    # as the stacked form, which a tuple of layers must not be mistaken for.
    first = logits[0]
    if torch.compiler.is_compiling() or not isinstance(first, torch.Tensor) or first.dim() != 2:
        _check_layers(logits, arg)
    _check_first(first, arg)
    return tuple(logits), False


def check_layers(side: "RoutingSide"):
    """Every layer of a side given as a tuple has the first one's shape, dtype and device. Not
    run for a backend whose registry entry says ``checks_layers``: the CUDA C++ op checks them
    itself (with the same messages) for a fraction of what this costs per layer
    (benchmarks/host_cost.py measures it). While torch.compile traces, :func:`routing_side` has
    checked them already."""
    if not side.stacked and not torch.compiler.is_compiling() and not _uniform(side.inputs):
        _check_layers(side.inputs, _logits_arg(side.name))


def _logits_arg(name: str) -> str:
    return f"{name}_logits" if name in ("anchor", "target") else "logits"


def _check_first(first: torch.Tensor, arg: str):
    if not first.is_floating_point():
        raise TypeError(f"{arg}: router logits must be floating point, got {first.dtype}")
    if first.shape[-1] < 1:
        raise ValueError(f"{arg}: expected at least one expert (E >= 1), got E = {first.shape[-1]}")


def _check_layers(layers, arg: str):
    """Names the first layer that breaks the rules (the slow path of ``_uniform``)."""
    for i, t in enumerate(layers):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{arg}[{i}]: expected a tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{arg}[{i}]: expected a [N, E] tensor, got shape {tuple(t.shape)}")
    first = layers[0]
    _check_first(first, arg)
    n, e = first.shape
    for i, t in enumerate(layers[1:], start=1):
        if t.device != first.device:
            raise ValueError(f"{arg}[{i}] is on {t.device}, {arg}[0] on {first.device}: all layers must share a device")
        if t.dtype != first.dtype:
            raise TypeError(f"{arg}[{i}] has dtype {t.dtype}, {arg}[0] {first.dtype}: all layers must share a dtype")
        if t.shape[1] != e:
            raise ValueError(f"{arg}[{i}] has E = {t.shape[1]} experts, {arg}[0] has E = {e}: E must match across layers")
        if t.shape[0] != n:
            raise ValueError(f"{arg}[{i}] has N = {t.shape[0]} tokens, {arg}[0] has N = {n}: N must match across layers")


def _check_mask(mask, num_tokens: int, device, arg: str):
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{arg}: expected a [B, S] tensor (1 = valid token), got {type(mask).__name__}")
    if mask.dim() != 2:
        raise ValueError(f"{arg}: expected a [B, S] tensor, got shape {tuple(mask.shape)}")
    if mask.dtype.is_complex:
        raise TypeError(f"{arg}: expected a bool, integer or floating mask, got {mask.dtype}")
    if mask.device != device:
        raise ValueError(f"{arg} is on {mask.device} but the logits are on {device}")
    b, s = mask.shape
    if b * s != num_tokens:
        raise ValueError(
            f"{arg}: B*S = {b}*{s} = {b * s} does not match the logits' token count N = {num_tokens} "
            "(row n of the logits is token (n // S, n % S))"
        )
    if b < 1:
        raise ValueError(f"{arg}: expected at least one sequence (B >= 1), got shape {tuple(mask.shape)}")


def _check_cu_seqlens(cu, num_tokens: int, device, arg: str):
    """Type, shape and device of cu_seqlens; its values too when they are on the CPU. Values on a
    GPU are checked on the device (``check_cu_seqlens_values``, or a kernel of the Triton path):
    reading them here would be a host sync on every step, and a graph break while compiling."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{arg}: expected an integer tensor [B+1], got {type(cu).__name__}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{arg}: expected a 1-D integer tensor [B+1] with B >= 1, got shape {tuple(cu.shape)}")
    if cu.dtype.is_floating_point or cu.dtype.is_complex or cu.dtype == torch.bool:
        raise TypeError(f"{arg}: expected an integer tensor, got {cu.dtype}")
    if cu.device != device:
        raise ValueError(f"{arg} is on {cu.device} but the logits are on {device}")
    if cu.device.type == "cpu" and not torch.compiler.is_compiling():
        if int(cu[0]) != 0:
            raise ValueError(f"{arg}: must start at 0, got cu_seqlens[0] = {int(cu[0])}")
        if bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"{arg}: must be non-decreasing, got {cu.tolist()}")
        if int(cu[-1]) != num_tokens:
            raise ValueError(f"{arg}: must end at the token count N = {num_tokens}, got cu_seqlens[-1] = {int(cu[-1])}")


def check_cu_seqlens_values(side: "RoutingSide"):
    """Asynchronous device assertion on a non-CPU side's cu_seqlens (the reference backend's
    check; it fails the next synchronising call with a device-side assert)."""
    cu = side.cu_seqlens
    if cu is None or (cu.device.type == "cpu" and not torch.compiler.is_compiling()):
        return
    ok = (cu[0] == 0) & (cu[-1] == side.num_tokens) & (cu[1:] >= cu[:-1]).all()
    prefix = f"{side.name}_" if side.name in ("anchor", "target") else ""
    torch._assert_async(ok, f"{prefix}cu_seqlens must start at 0, be non-decreasing and end at N = {side.num_tokens}")


def _check_layout(layout, name: str):
    if not isinstance(layout, SequenceLayout):  # a dict, say, would unpack into its keys
        arg = f"{name}_layout" if name in ("anchor", "target") else "layout"
        raise TypeError(f"{arg}: expected a sara_kernels.term.SequenceLayout, got {type(layout).__name__}")


def routing_side(logits: Logits, layout: SequenceLayout, name: str) -> RoutingSide:
    """Validate one side's logits (their first layer: :func:`check_layers` compares the others
    with it) and its layout, and describe it as a ``RoutingSide``."""
    _check_layout(layout, name)
    mask, cu_seqlens = layout
    prefix = f"{name}_" if name in ("anchor", "target") else ""
    inputs, stacked = _layer_tensors(logits, _logits_arg(name))
    first = inputs[0]
    num_layers = first.shape[0] if stacked else len(inputs)
    num_tokens, num_experts = first.shape[-2:]
    device = first.device
    if mask is not None and cu_seqlens is not None:
        raise ValueError(f"give either {prefix}mask or {prefix}cu_seqlens for the {name} side, not both")
    if mask is not None:
        _check_mask(mask, num_tokens, device, f"{prefix}mask")
        num_seqs, seq_len = mask.shape
    elif cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, num_tokens, device, f"{prefix}cu_seqlens")
        num_seqs, seq_len = cu_seqlens.shape[0] - 1, num_tokens
    else:
        num_seqs, seq_len = 1, num_tokens
    return RoutingSide(name, inputs, stacked, num_layers, num_tokens, num_experts, num_seqs, seq_len, mask,
                       cu_seqlens, first.dtype, device)


def check_pair(anchor: RoutingSide, target: RoutingSide):
    if anchor.device != target.device:
        raise ValueError(f"anchor_logits are on {anchor.device}, target_logits on {target.device}: both must share a device")
    if anchor.num_layers != target.num_layers:
        raise ValueError(
            f"anchor_logits have L = {anchor.num_layers} layers, target_logits L = {target.num_layers}: "
            "the layer counts must match"
        )
    if anchor.num_experts != target.num_experts:
        raise ValueError(
            f"anchor_logits have E = {anchor.num_experts} experts, target_logits E = {target.num_experts}: E must match"
        )
    if anchor.num_seqs != target.num_seqs:
        raise ValueError(
            f"the anchor side has B = {anchor.num_seqs} sequences, the target side B = {target.num_seqs}: "
            "anchor_mask/anchor_cu_seqlens and target_mask/target_cu_seqlens must describe the same number of pairs"
        )


def prepare_pair(anchor_logits, target_logits, anchor_layout: SequenceLayout, target_layout: SequenceLayout,
                 anchor_probs):
    """Validate both sides (as :func:`routing_side` does); returns (anchor side or None in priors
    mode, target side, priors or None)."""
    target = routing_side(target_logits, target_layout, "target")
    if anchor_probs is not None:
        if anchor_logits is not None:
            raise ValueError("give either anchor_logits or anchor_probs (cached priors), not both")
        _check_layout(anchor_layout, "anchor")
        if anchor_layout.mask is not None or anchor_layout.cu_seqlens is not None:
            raise ValueError("anchor_mask/anchor_cu_seqlens describe anchor logits; with anchor_probs leave them None")
        check_priors(anchor_probs, target)
        return None, target, anchor_probs
    if anchor_logits is None:
        raise ValueError("anchor_logits is None: give anchor logits or cached priors via anchor_probs")
    anchor = routing_side(anchor_logits, anchor_layout, "anchor")
    check_pair(anchor, target)
    return anchor, target, None


def check_priors(anchor_probs, target: RoutingSide):
    if not isinstance(anchor_probs, torch.Tensor):
        raise TypeError(f"anchor_probs: expected a [L, B, E] tensor, got {type(anchor_probs).__name__}")
    if not anchor_probs.is_floating_point():
        raise TypeError(f"anchor_probs: expected a floating-point tensor, got {anchor_probs.dtype}")
    expected = (target.num_layers, target.num_seqs, target.num_experts)
    if tuple(anchor_probs.shape) != expected:
        raise ValueError(
            f"anchor_probs: expected shape [L, B, E] = {list(expected)} to match target_logits and the target "
            f"segmentation, got {list(anchor_probs.shape)}"
        )
    if anchor_probs.device != target.device:
        raise ValueError(f"anchor_probs is on {anchor_probs.device} but target_logits are on {target.device}")


def check_temperature(value, name: str = "temperature", *, option: bool = False):
    """τ, which divides the logits: a real number (not a bool), finite and > 0.

    ``option=True`` for the integrations' settings (SARAOptions, extract_routing_priors): their
    errors have always been a ValueError worded "<name> must be ...", which users and tests match.
    """
    # The float test first: isinstance against the numbers ABC costs microseconds on every call.
    real = type(value) is float or (not isinstance(value, bool) and isinstance(value, numbers.Real))
    if real and math.isfinite(value) and value > 0:
        return
    if option:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if not real:
        raise TypeError(f"{name}: expected a positive number, got {type(value).__name__}")
    raise ValueError(f"{name}: expected a finite number > 0, got {value}")


def check_score(value, name: str = "score", *, option: bool = False):
    """One of ``SCORES``; with ``option=True`` (SARAOptions, the capture) also None, the model
    family's own score, and the error worded as those settings' errors always were."""
    if value in SCORES or (option and value is None):
        return
    if option:
        raise ValueError(f"{name} must be one of {SCORES} or None, got {value!r}")
    raise ValueError(f"{name}: expected one of {SCORES}, got {value!r}")


def check_divergence(value, name: str = "divergence"):
    """One of ``DIVERGENCES`` (``name``: the option's name where it is given, e.g. ``sara_divergence``)."""
    if value not in DIVERGENCES:
        raise ValueError(f"{name}: expected one of {DIVERGENCES}, got {value!r}")


def check_options(temperature, score: str, reduction: Optional[str], backend: str, divergence: str = "js"):
    check_temperature(temperature)
    check_score(score)
    if reduction is not None and reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    check_divergence(divergence)
    backends.check_backend(backend)


# Pinned sources of copies recorded into a CUDA graph: every replay reads them again, so they
# must outlive the capture. Keyed by content: capturing the same small table again (a graph
# rebuilt every few steps, or the same step captured for several shapes of batch) reuses the
# buffer instead of adding one per capture, so the set grows only with distinct contents.
_GRAPH_COPY_SOURCES = {}


def host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small host tensor to ``device`` without a host sync: through pinned memory and a
    non-blocking copy on CUDA (a pageable copy would wait for the stream, and is illegal while
    a CUDA graph is being captured)."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return host.to(device)
    if torch.cuda.is_current_stream_capturing():
        key = (host.dtype, tuple(host.shape), host.numpy().tobytes())
        pinned = _GRAPH_COPY_SOURCES.get(key)
        if pinned is None:
            pinned = _GRAPH_COPY_SOURCES[key] = host.pin_memory()
    else:
        pinned = host.pin_memory()
    return pinned.to(device, non_blocking=True)


def layer_weight_tensor(layer_weights, num_layers: int, device) -> Optional[torch.Tensor]:
    """``None`` (equal weights) or a floating tensor [L] on ``device`` (float64 from Python numbers;
    the reduction casts it to the loss's dtype).

    Python sequences are checked for non-negative values with a positive sum; a tensor is
    checked for its shape only, because reading its values would synchronise the device.
    """
    if layer_weights is None:
        return None
    if isinstance(layer_weights, torch.Tensor):
        if layer_weights.shape != (num_layers,):
            raise ValueError(f"layer_weights: expected shape [L] = [{num_layers}], got {list(layer_weights.shape)}")
        if not layer_weights.is_floating_point():
            raise TypeError(f"layer_weights: expected a floating-point tensor, got {layer_weights.dtype}")
        if layer_weights.device != device:
            raise ValueError(f"layer_weights is on {layer_weights.device} but the logits are on {device}")
        return layer_weights
    try:
        values = [float(w) for w in layer_weights]
    except (TypeError, ValueError):
        raise TypeError("layer_weights: expected a sequence of L numbers or a [L] tensor") from None
    if len(values) != num_layers:
        raise ValueError(f"layer_weights: expected L = {num_layers} weights, got {len(values)}")
    key = (tuple(values), device)
    cached = _WEIGHTS.get(key)
    if cached is not None:
        return cached
    if any(not math.isfinite(w) or w < 0 for w in values) or sum(values) <= 0:
        raise ValueError(f"layer_weights: expected finite non-negative weights with a positive sum, got {values}")
    if len(_WEIGHTS) >= _WEIGHTS_CACHE_SIZE:
        _WEIGHTS.pop(next(iter(_WEIGHTS)))
    weights = _WEIGHTS[key] = host_to_device(torch.tensor(values, dtype=torch.float64), device)
    return weights


_PAIR_WEIGHTS_EXPECTED = "pair_weights: expected finite weights >= 0"


def pair_weight_tensor(pair_weights, num_seqs: int, device) -> Optional[torch.Tensor]:
    """``None`` (every pair weighs 1) or a floating tensor [B] on ``device``.

    The values must be finite and >= 0. A CPU tensor or a Python sequence is checked here; a
    tensor on a GPU (or while torch.compile traces) by an asynchronous device assertion, as
    cu_seqlens are (:func:`check_cu_seqlens_values`): reading its values here would be a host sync
    on every step.
    """
    if pair_weights is None:
        return None
    if not isinstance(pair_weights, torch.Tensor):
        try:
            values = torch.tensor([float(w) for w in pair_weights], dtype=torch.float64)
        except (TypeError, ValueError):
            raise TypeError("pair_weights: expected a sequence of B numbers or a [B] tensor") from None
        _check_pair_weight_shape(values, num_seqs)
        _check_pair_weight_values(values)
        return host_to_device(values, device)
    _check_pair_weight_shape(pair_weights, num_seqs)
    if not pair_weights.is_floating_point():
        raise TypeError(f"pair_weights: expected a floating-point tensor, got {pair_weights.dtype}")
    if pair_weights.device != device:
        raise ValueError(f"pair_weights is on {pair_weights.device} but the logits are on {device}")
    _check_pair_weight_values(pair_weights)
    return pair_weights


def _check_pair_weight_shape(weights: torch.Tensor, num_seqs: int):
    if weights.shape != (num_seqs,):
        raise ValueError(f"pair_weights: expected shape [B] = [{num_seqs}] (one weight per pair), got {list(weights.shape)}")


def _check_pair_weight_values(weights: torch.Tensor):
    good = torch.isfinite(weights) & (weights >= 0)
    if weights.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(good.all()):
            bad = torch.nonzero(~good).flatten().tolist()
            raise ValueError(f"{_PAIR_WEIGHTS_EXPECTED}, got pair_weights[{bad[0]}] = {weights[bad[0]].item()}")
    else:
        torch._assert_async(good.all(), _PAIR_WEIGHTS_EXPECTED)


# Device copies of Python-number layer weights: a training loop passes the same list every
# step, and a copy per step would cost a pinned allocation and an H2D transfer each time.
# Nothing writes to them (the backends only read the weights).
_WEIGHTS = {}
_WEIGHTS_CACHE_SIZE = 16
