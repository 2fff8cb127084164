"""The Triton backend's custom ops (torch.library, with the contract's schemas and fakes) and
its autograd Functions; ``sara_loss`` and ``pooled_distribution`` are the backend's entry points."""

from __future__ import annotations

import functools
from typing import List, NamedTuple, Optional, Tuple

import torch

from ..._inputs import RoutingSide
from .. import contract
from .host import REDUCE_CONFIG, _placeholder, launch, pair_config, pool_bwd, pool_fwd, runtime_args
from .kernels import DIVERGENCES, REDUCTIONS, pair_js_fwd, pooled_routing_fwd, reduce_pair_loss


def _unpack(logits: List[torch.Tensor]):
    """The kernels' view of a side's logits: the [L, N, E] tensor itself when given as one."""
    return logits[0] if len(logits) == 1 and logits[0].dim() == 3 else logits


# ----------------------------------------------------------------------------------------
# The op: torch.library custom ops for torch.compile, called directly in eager mode
# ----------------------------------------------------------------------------------------


def _op(name: str):
    """Register ``fn`` as the custom op ``sara_kernels::name`` with the contract's schema and fake
    implementation (opaque to torch.compile) and return a function that calls the op while
    compiling and ``fn`` itself otherwise.

    Why two paths and not the one op with ``register_autograd`` (fixed arity, Tensor[] gradients,
    as the CUDA backend's C++ op): in eager mode a Python custom op's dispatcher round trip and
    its generated autograd wrapper cost the host about three times what the autograd Function
    costs, per step (benchmarks/results/custom_op_eager_overhead_cpu_box.txt), which is the
    launch overhead the host path exists to avoid. The schemas and fakes are still checked in every
    CPU run (tests/ops/test_compile.py: opcheck and fullgraph compiles). Why custom ops and not
    triton_op + wrap_triton: the launchers read data pointers to build the layer table, which the
    FakeTensors of a trace do not have."""

    def register(fn):
        op = torch.library.custom_op(f"sara_kernels::{name}", fn, mutates_args=(), schema=contract.SCHEMAS[name])
        op.register_fake(contract.FAKES[name])

        @functools.wraps(fn)
        def call(*args):
            return op(*args) if torch.compiler.is_compiling() else fn(*args)

        call.op = op
        return call

    return register


@_op("sara_loss_fwd")
def sara_loss_fwd(
    anchor: List[torch.Tensor], target: List[torch.Tensor],
    anchor_mask: Optional[torch.Tensor], anchor_cu_seqlens: Optional[torch.Tensor],
    target_mask: Optional[torch.Tensor], target_cu_seqlens: Optional[torch.Tensor],
    anchor_probs: Optional[torch.Tensor], layer_weights: Optional[torch.Tensor], pair_weights: Optional[torch.Tensor],
    score: str, temperature: float, reduction: str, divergence: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, per-layer weighted mean divergence [L], π·G^a, π·G^t [L, B, E], stats [3, B] = (n^a, n^t, π), k [L]).

    A side is a list of [N, E] tensors or a one-element list holding one [L, N, E] tensor;
    ``anchor`` is empty with priors (``anchor_probs`` [L, B, E]). loss is [L, B] for "none".
    """
    device = target[0].device
    t_logits = _unpack(target)
    t_partial, t_count = pool_fwd(t_logits, target_mask, target_cu_seqlens, score, temperature, device)
    if anchor_probs is None:
        a_partial, a_count = pool_fwd(_unpack(anchor), anchor_mask, anchor_cu_seqlens, score, temperature, device)
        priors, prior_strides = _placeholder(device), (0, 0, 0)
    else:
        a_partial, a_count = t_partial, t_count
        priors, prior_strides = anchor_probs, anchor_probs.stride()
    L, B, _, E = t_partial.shape
    new = functools.partial(torch.empty, dtype=torch.float32, device=device)
    js, ga, gt, stats = new((L, B)), new((L, B, E)), new((L, B, E)), new((3, B))
    prior_sl, prior_sb, prior_se = prior_strides
    args = runtime_args(pair_js_fwd, dict(
        a_partial_ptr=a_partial, a_count_ptr=a_count, t_partial_ptr=t_partial, t_count_ptr=t_count,
        prior_ptr=priors, prior_sl=prior_sl, prior_sb=prior_sb, prior_se=prior_se,
        pair_weight_ptr=_placeholder(device) if pair_weights is None else pair_weights.to(torch.float32).contiguous(),
        js_ptr=js, ga_ptr=ga, gt_ptr=gt, stats_ptr=stats, B=B, E=E, A_SPLITS=a_partial.shape[2],
        T_SPLITS=t_partial.shape[2]))
    launch(pair_js_fwd, (L, B), args, {"PRIORS": anchor_probs is not None, "PAIR_WEIGHTS": pair_weights is not None,
                                       "DIVERGENCE": DIVERGENCES[divergence], **pair_config(E)}, device)
    per_layer, layer_coef = new(L), new(L)
    loss = js if reduction == "none" else new(())
    weights = layer_weights if layer_weights is not None else _placeholder(device)
    args = runtime_args(reduce_pair_loss, {
        "js_ptr": js, "stats_ptr": stats, "weight_ptr": weights, "loss_ptr": loss, "per_layer_ptr": per_layer,
        "layer_coef_ptr": layer_coef, "L": L, "B": B})
    launch(reduce_pair_loss, (1,), args,
           {"HAS_WEIGHTS": layer_weights is not None, "REDUCTION": REDUCTIONS[reduction], **REDUCE_CONFIG}, device)
    return loss, per_layer, ga, gt, stats, layer_coef


@_op("sara_loss_bwd")
def sara_loss_bwd(
    grad_loss: torch.Tensor, anchor: List[torch.Tensor], target: List[torch.Tensor],
    anchor_mask: Optional[torch.Tensor], anchor_cu_seqlens: Optional[torch.Tensor],
    target_mask: Optional[torch.Tensor], target_cu_seqlens: Optional[torch.Tensor],
    ga: torch.Tensor, gt: torch.Tensor, stats: torch.Tensor, layer_coef: torch.Tensor,
    score: str, temperature: float, anchor_grad: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(∂/∂anchor [L, N_a, E] or an empty tensor, ∂/∂target [L, N_t, E]) in the logits' dtype."""
    device = target[0].device
    grad_t = pool_bwd(_unpack(target), target_mask, target_cu_seqlens, gt, grad_loss, layer_coef, stats[1],
                      score, temperature, device)
    if not anchor_grad:
        return grad_loss.new_empty(0), grad_t
    grad_a = pool_bwd(_unpack(anchor), anchor_mask, anchor_cu_seqlens, ga, grad_loss, layer_coef, stats[0],
                      score, temperature, device)
    return grad_a, grad_t


@_op("routing_distribution_fwd")
def routing_distribution_fwd(
    logits: List[torch.Tensor], mask: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
    score: str, temperature: float, normalize: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(P [L, B, E], n_b [B]), float32; without ``normalize`` the sums n_b·P instead of P."""
    device = logits[0].device
    partial, count = pool_fwd(_unpack(logits), mask, cu_seqlens, score, temperature, device)
    L, B, splits, E = partial.shape
    probs = torch.empty((L, B, E), dtype=torch.float32, device=device)
    total = torch.empty(B, dtype=torch.float32, device=device)
    args = runtime_args(pooled_routing_fwd, {"partial_ptr": partial, "count_ptr": count, "probs_ptr": probs,
                                                 "total_ptr": total, "B": B, "E": E, "SPLITS": splits})
    launch(pooled_routing_fwd, (L, B), args, {"NORMALIZE": normalize, **pair_config(E)}, device)
    return probs, total


@_op("routing_distribution_bwd")
def routing_distribution_bwd(
    grad_probs: torch.Tensor, logits: List[torch.Tensor], mask: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor], count: torch.Tensor, score: str, temperature: float, normalize: bool,
) -> torch.Tensor:
    """∂/∂logits [L, N, E] for an upstream gradient [L, B, E] of P (of the sums without ``normalize``:
    the kernel's division by n_b then divides by one)."""
    if not normalize:
        count = torch.ones((), dtype=torch.float32, device=count.device).expand(count.shape[0])
    return pool_bwd(_unpack(logits), mask, cu_seqlens, grad_probs, None, None, count, score, temperature,
                    logits[0].device)


def _side_grads(grad: torch.Tensor, stacked: bool):
    """The gradient in the form the side was given: the [L, N, E] buffer or its per-layer views."""
    return (grad,) if stacked else grad.unbind(0)


def _no_double_backward():
    # The backward launches kernels that autograd cannot see through: a second derivative would
    # silently come out as zero, so ask for it to fail instead.
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError("sara_kernels: the Triton backend does not support double backward (create_graph=True); "
                           "use backend='reference'")


class LossCall(NamedTuple):
    """One ``SARALossFunction`` call but its logits: the op's other arguments by name and how the
    logits split into the two sides (a NamedTuple: built on every call). Autograd gives gradients
    only to tensors passed to ``apply`` directly, so the logits cross it as arguments of their own
    (a side is L tensors, or one); everything else travels here, so an argument of the op is a field,
    never a position."""

    anchor_mask: Optional[torch.Tensor]
    anchor_cu_seqlens: Optional[torch.Tensor]
    target_mask: Optional[torch.Tensor]
    target_cu_seqlens: Optional[torch.Tensor]
    anchor_probs: Optional[torch.Tensor]
    layer_weights: Optional[torch.Tensor]
    pair_weights: Optional[torch.Tensor]
    score: str
    temperature: float
    detach_anchor: bool
    reduction: str
    divergence: str
    num_anchor: int  # the first ``num_anchor`` logits are the anchor side's (0 with priors)
    anchor_stacked: bool
    target_stacked: bool


class SARALossFunction(torch.autograd.Function):
    """The one autograd definition of the fused loss, eager and compiled alike: forward and
    backward call the custom ops above (the ops themselves under torch.compile, their Python
    bodies in eager mode, see ``_op``). Only tensors and constants cross it, so torch.compile traces
    it whole."""

    @staticmethod
    def forward(ctx, call: LossCall, *logits):
        anchor, target = list(logits[:call.num_anchor]), list(logits[call.num_anchor:])
        loss, per_layer, ga, gt, stats, layer_coef = sara_loss_fwd(
            anchor, target, call.anchor_mask, call.anchor_cu_seqlens, call.target_mask, call.target_cu_seqlens,
            call.anchor_probs, call.layer_weights, call.pair_weights, call.score, call.temperature, call.reduction,
            call.divergence,
        )
        # The tensors of ``call`` the backward reads are saved with the rest; the constants are kept.
        ctx.call = call._replace(anchor_mask=None, anchor_cu_seqlens=None, target_mask=None, target_cu_seqlens=None,
                                 anchor_probs=None, layer_weights=None, pair_weights=None)
        # The logits the backward reads are saved (not only referenced) so that autograd's version
        # check catches an in-place change before the backward recomputes the scores from them.
        # A detached anchor is never read again: saving it would only cost time per layer.
        read_back = logits if not call.detach_anchor else target
        ctx.save_for_backward(ga, gt, stats, layer_coef, call.anchor_mask, call.anchor_cu_seqlens, call.target_mask,
                              call.target_cu_seqlens, *read_back)
        ctx.mark_non_differentiable(per_layer)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for per_layer: one kernel less per step
        return loss, per_layer

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_layer):
        _no_double_backward()
        call = ctx.call
        num_anchor = call.num_anchor
        _, *logits_need_grad = ctx.needs_input_grad
        if grad_loss is None:  # only the non-differentiable per_layer was used
            return (None, *(None for _ in logits_need_grad))
        ga, gt, stats, layer_coef, a_mask, a_cu, t_mask, t_cu, *logits = ctx.saved_tensors
        saved_anchor = 0 if call.detach_anchor else num_anchor
        anchor, target = logits[:saved_anchor], logits[saved_anchor:]
        anchor_grad = saved_anchor > 0 and any(logits_need_grad[:num_anchor])
        grad_a, grad_t = sara_loss_bwd(
            grad_loss, anchor, target, a_mask, a_cu, t_mask, t_cu, ga, gt, stats, layer_coef, call.score,
            call.temperature, anchor_grad,
        )
        grads_a = _side_grads(grad_a, call.anchor_stacked) if anchor_grad else (None,) * num_anchor
        return (None, *grads_a, *_side_grads(grad_t, call.target_stacked))


def sara_loss(anchor: Optional[RoutingSide], target: RoutingSide, anchor_probs, layer_weights, pair_weights,
              score: str, temperature: float, detach_anchor: bool, reduction: str, divergence: str):
    """(loss, detached per-layer weighted mean divergence [L]) with autograd into the logits."""
    if anchor_probs is not None:
        anchor_probs = anchor_probs.detach()
    if layer_weights is not None:
        layer_weights = layer_weights.detach()
    if pair_weights is not None:
        pair_weights = pair_weights.detach()
    anchor_inputs = anchor.inputs if anchor is not None else ()
    a_mask, a_cu = (anchor.mask, anchor.cu_seqlens) if anchor is not None else (None, None)
    call = LossCall(a_mask, a_cu, target.mask, target.cu_seqlens, anchor_probs, layer_weights, pair_weights, score,
                    temperature, detach_anchor, reduction, divergence, len(anchor_inputs),
                    anchor is not None and anchor.stacked, target.stacked)
    return SARALossFunction.apply(call, *anchor_inputs, *target.inputs)


class DistributionCall(NamedTuple):
    """One ``RoutingDistributionFunction`` call but its logits (as ``LossCall``)."""

    mask: Optional[torch.Tensor]
    cu_seqlens: Optional[torch.Tensor]
    stacked: bool
    score: str
    temperature: float
    normalize: bool


class RoutingDistributionFunction(torch.autograd.Function):
    """(P [L, B, E] float32, n_b [B]) of one side, or the sums n_b·P without ``normalize``, with
    autograd into the logits; same structure as ``SARALossFunction``."""

    @staticmethod
    def forward(ctx, call: DistributionCall, *logits):
        probs, count = routing_distribution_fwd(list(logits), call.mask, call.cu_seqlens, call.score,
                                                call.temperature, call.normalize)
        ctx.call = call._replace(mask=None, cu_seqlens=None)
        ctx.save_for_backward(count, call.mask, call.cu_seqlens, *logits)  # logits: for the in-place version check
        ctx.mark_non_differentiable(count)
        ctx.set_materialize_grads(False)
        return probs, count

    @staticmethod
    def backward(ctx, grad_probs, _grad_count):
        _no_double_backward()
        call = ctx.call
        count, mask, cu_seqlens, *logits = ctx.saved_tensors
        if grad_probs is None:
            return (None,) * len(ctx.needs_input_grad)
        grad = routing_distribution_bwd(grad_probs, logits, mask, cu_seqlens, count, call.score,
                                        call.temperature, call.normalize)
        return (None, *_side_grads(grad, call.stacked))


def pooled_distribution(side: RoutingSide, score: str, temperature: float, normalize: bool = True):
    """(P [L, B, E], n_b [B]) with autograd into the logits; the sums n_b·P without ``normalize``
    (what context parallelism all-reduces, :mod:`sara_kernels.distributed`)."""
    call = DistributionCall(side.mask, side.cu_seqlens, side.stacked, score, temperature, normalize)
    return RoutingDistributionFunction.apply(call, *side.inputs)
