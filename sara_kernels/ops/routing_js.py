r"""Fused SARA routing alignment in Triton: score, masked pooling, Jensen-Shannon, backward.

The math (symbols as in :mod:`sara_kernels.reference`, which is the specification):

    s = softmax(z/τ)                 or  s = σ(z/τ) / Σ_e σ(z/τ)_e          (per token)
    P_{l,b} = (1/n_b) Σ_{n ∈ b, valid} s(z_{l,n})
    M = ½(P^a + P^t),  JS_{l,b} = ½ Σ_e [P^a_e log(P^a_e/M_e) + P^t_e log(P^t_e/M_e)]
    G_e := ∂JS/∂P_e = ½ log(P_e / M_e)   (taken as 0 where P_e = 0: then s_e = 0 on every token)

Backward for a token n of sequence b, with g = ∂loss/∂JS_{l,b} and c = g / (τ n_b):

    ∂loss/∂z_j = c · h_j · (G_j − Σ_e s_e G_e),   h = s (softmax),  h = s ⊙ σ(−z/τ) (sigmoid)

since ∂s_e/∂z_j = (1/τ) h_j (δ_ej − s_e) for both scores.

Launch structure (constant in L, B and N):

1. ``pool_routing_fwd`` per side, grid (L, B, splits): each program sums s over one
   contiguous slice of one sequence's rows into ``partial[l, b, split, :]``. Splitting a
   sequence keeps all SMs busy when B is small; the partials are reduced in a fixed order
   afterwards, so results are bitwise deterministic (no float atomics).
2. ``pair_js_fwd``, grid (L, B): reduces the partials of both sides, writes JS and the
   coefficients G that the backward needs (O(L·B·E) memory).
3. ``pool_routing_bwd`` per side that needs gradients, same grid as 1: recomputes s from
   the logits (no [L, N, E] intermediate is saved) and writes ∂loss/∂z in the logits' dtype.

The L layer tensors are read where they lie: a small int64 table holds each layer's data
pointer and strides, so no stack/cat copy of the logits is ever made.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .._inputs import RoutingSide, host_to_device, routing_side

# Read once: triton.jit decides at decoration time whether kernels run in the interpreter.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _score_and_slope(z, SIGMOID: tl.constexpr):
    """Routing score s and slope h (∂s_e/∂z_j = h_j (δ_ej − s_e) / τ) of logits z / τ.

    Padded lanes hold −inf and come out as s = h = 0.
    """
    if SIGMOID:
        sig = tl.sigmoid(z)
        s = sig * (1.0 / tl.sum(sig, axis=1))[:, None]  # one reciprocal per row, not per element
        h = s * tl.sigmoid(-z)
    else:
        e = tl.exp(z - tl.max(z, axis=1)[:, None])
        s = e * (1.0 / tl.sum(e, axis=1))[:, None]
        h = s
    return s, h


@triton.jit
def _sequence_slice(b, split, cu_ptr, cu_stride, N, S, SPLITS, USE_CU: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows [lo, hi) of sequence b that program ``split`` handles, and the sequence start."""
    if USE_CU:
        start = tl.load(cu_ptr + b * cu_stride).to(tl.int64)
        end = tl.load(cu_ptr + (b + 1) * cu_stride).to(tl.int64)
        # Clamped so malformed device-side cu_seqlens (caught by an async assert) never address out of bounds.
        start = tl.minimum(tl.maximum(start, 0), N)
        end = tl.minimum(tl.maximum(end, start), N)
    else:
        start = b.to(tl.int64) * S
        end = start + S
    chunk = tl.cdiv(tl.cdiv(end - start, SPLITS), BLOCK_N) * BLOCK_N
    lo = start + split * chunk
    hi = tl.minimum(lo + chunk, end)
    return start, lo, hi


@triton.jit
def _layer_logits(table_ptr, x0_ptr, l, L, VEC: tl.constexpr):
    """Layer l's logits pointer (typed like x0, layer 0's tensor) and its strides, from the table.

    A pointer read from memory carries no alignment facts, so the compiler would issue one
    scalar load per element. With VEC > 0 the host has checked that every layer is 16-byte
    aligned, has unit column stride and a row stride divisible by VEC elements; the hints below
    then allow 16-byte vector loads.
    """
    x_ptr = tl.load(table_ptr + l).to(tl.pointer_type(x0_ptr.dtype.element_ty))
    stride_n = tl.load(table_ptr + L + l)
    if VEC > 0:
        x_ptr = tl.multiple_of(x_ptr, 16)
        stride_n = tl.multiple_of(stride_n, VEC)
    return x_ptr, stride_n, tl.load(table_ptr + 2 * L + l)


@triton.jit
def _load_logits_tile(x_ptr, stride_n, stride_e, rows, cols, col_ok, valid, inv_tau, VEC: tl.constexpr):
    """[BLOCK_N, BLOCK_E] fp32 tile of z/τ; invalid rows and padded columns are −inf."""
    if VEC > 0:
        offs = rows[:, None] * stride_n + cols[None, :]
    else:
        offs = rows[:, None] * stride_n + cols[None, :].to(tl.int64) * stride_e
    z = tl.load(x_ptr + offs, mask=valid[:, None] & col_ok[None, :], other=float("-inf"))
    return z.to(tl.float32) * inv_tau


@triton.jit
def _token_validity(b, rows, row_ok, start, mask_ptr, mask_sb, mask_ss, HAS_MASK: tl.constexpr):
    if HAS_MASK:
        m = tl.load(mask_ptr + b.to(tl.int64) * mask_sb + (rows - start) * mask_ss, mask=row_ok, other=0)
        return row_ok & (m != 0)
    return row_ok


# Shape and stride arguments that gain nothing from Triton's value specialisation (== 1,
# divisible by 16) are excluded from it, so a training run whose batch shapes vary compiles
# each kernel once per tile configuration instead of once per shape class. E and the gradient's
# layer stride stay specialised: their divisibility is what lets stores vectorise.
_UNSPECIALISED_POOL_ARGS = ["mask_sb", "mask_ss", "cu_stride", "L", "B", "N", "S", "SPLITS"]


@triton.jit(do_not_specialize=_UNSPECIALISED_POOL_ARGS)
def pool_routing_fwd(
    table_ptr, x0_ptr, mask_ptr, mask_sb, mask_ss, cu_ptr, cu_stride,
    partial_ptr, count_ptr,
    L, B, N, E, S, inv_tau, SPLITS,
    HAS_MASK: tl.constexpr, USE_CU: tl.constexpr, SIGMOID: tl.constexpr, VEC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """partial[l, b, split, :] = Σ s over the valid rows of slice ``split`` of sequence b;
    count[b, split] = their number (written by the l = 0 programs only)."""
    l = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)
    start, lo, hi = _sequence_slice(b, split, cu_ptr, cu_stride, N, S, SPLITS, USE_CU, BLOCK_N)
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    x_ptr, stride_n, stride_e = _layer_logits(table_ptr, x0_ptr, l, L, VEC)
    acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    count = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok = rows < hi
        valid = _token_validity(b, rows, row_ok, start, mask_ptr, mask_sb, mask_ss, HAS_MASK)
        z = _load_logits_tile(x_ptr, stride_n, stride_e, rows, cols, col_ok, valid, inv_tau, VEC)
        s, _ = _score_and_slope(z, SIGMOID)
        acc += tl.sum(tl.where(valid[:, None], s, 0.0), axis=0)
        count += valid.to(tl.float32)
    slot = (l * B + b) * SPLITS + split
    tl.store(partial_ptr + slot.to(tl.int64) * E + cols, acc, mask=col_ok)
    if l == 0:
        tl.store(count_ptr + b * SPLITS + split, tl.sum(count, axis=0))


@triton.jit
def _pooled(partial_ptr, count_ptr, l, b, B, E, SPLITS, cols, col_ok):
    """(P_{l,b} [BLOCK_E], n_b) from the split partials, summed in a fixed order."""
    acc = tl.zeros(cols.shape, dtype=tl.float32)
    n = 0.0
    for split in range(0, SPLITS):
        slot = (l * B + b) * SPLITS + split
        acc += tl.load(partial_ptr + slot.to(tl.int64) * E + cols, mask=col_ok, other=0.0)
        n += tl.load(count_ptr + b * SPLITS + split)
    return acc / tl.maximum(n, 1.0), n


@triton.jit
def _half_log_ratio(p, m):
    """G = ½ log(p/m), 0 where p = 0 (its s is 0 on every token, so G never matters there)."""
    zero = p == 0.0
    return tl.where(zero, 0.0, 0.5 * tl.log(tl.where(zero, 1.0, p) / tl.where(zero, 1.0, m)))


@triton.jit(do_not_specialize=["prior_sl", "prior_sb", "prior_se", "B", "A_SPLITS", "T_SPLITS"])
def pair_js_fwd(
    a_partial_ptr, a_count_ptr, t_partial_ptr, t_count_ptr,
    prior_ptr, prior_sl, prior_sb, prior_se,
    js_ptr, ga_ptr, gt_ptr, a_total_ptr, t_total_ptr, valid_ptr,
    B, E, A_SPLITS, T_SPLITS,
    PRIORS: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """JS_{l,b} and G^a, G^t for one (l, b); invalid pairs get JS = G = 0."""
    l = tl.program_id(0)
    b = tl.program_id(1)
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    pt, n_t = _pooled(t_partial_ptr, t_count_ptr, l, b, B, E, T_SPLITS, cols, col_ok)
    if PRIORS:
        prior_offs = l.to(tl.int64) * prior_sl + b.to(tl.int64) * prior_sb + cols.to(tl.int64) * prior_se
        pa = tl.load(prior_ptr + prior_offs, mask=col_ok, other=0.0).to(tl.float32)
        n_a = 1.0
    else:
        pa, n_a = _pooled(a_partial_ptr, a_count_ptr, l, b, B, E, A_SPLITS, cols, col_ok)
    valid = (n_a > 0.0) & (n_t > 0.0)
    m = 0.5 * (pa + pt)
    ga = tl.where(valid, _half_log_ratio(pa, m), 0.0)
    gt = tl.where(valid, _half_log_ratio(pt, m), 0.0)
    # Σ_e ½ P_e log(P_e/M_e) = Σ_e P_e G_e; P = 0 gives 0 (0·log 0 = 0), NaN in P stays NaN.
    js = tl.sum(pa * ga + pt * gt, axis=0)
    offs = (l * B + b).to(tl.int64) * E + cols
    tl.store(js_ptr + l * B + b, js)
    tl.store(ga_ptr + offs, ga, mask=col_ok)
    tl.store(gt_ptr + offs, gt, mask=col_ok)
    if l == 0:
        tl.store(a_total_ptr + b, n_a)
        tl.store(t_total_ptr + b, n_t)
        tl.store(valid_ptr + b, valid.to(tl.float32))


@triton.jit(do_not_specialize=[*_UNSPECIALISED_POOL_ARGS, "scale_sl", "scale_sb"])
def pool_routing_bwd(
    table_ptr, x0_ptr, mask_ptr, mask_sb, mask_ss, cu_ptr, cu_stride,
    coef_ptr, scale_ptr, scale_sl, scale_sb, count_ptr, grad_ptr, grad_sl,
    L, B, N, E, S, inv_tau, SPLITS,
    HAS_MASK: tl.constexpr, USE_CU: tl.constexpr, SIGMOID: tl.constexpr, VEC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """grad[l, n, :] = c · h ⊙ (G − ⟨s, G⟩) for the rows of one slice, c = scale[l, b] / (τ n_b);
    rows that are not valid tokens get 0. Every row of the side is written by exactly one program."""
    l = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)
    start, lo, hi = _sequence_slice(b, split, cu_ptr, cu_stride, N, S, SPLITS, USE_CU, BLOCK_N)
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    coef = tl.load(coef_ptr + (l * B + b).to(tl.int64) * E + cols, mask=col_ok, other=0.0)
    n = tl.load(count_ptr + b)
    c = tl.load(scale_ptr + l.to(tl.int64) * scale_sl + b.to(tl.int64) * scale_sb).to(tl.float32)
    c = c * inv_tau / tl.maximum(n, 1.0)
    x_ptr, stride_n, stride_e = _layer_logits(table_ptr, x0_ptr, l, L, VEC)
    g_ptr = grad_ptr + l.to(tl.int64) * grad_sl
    for r0 in range(lo, hi, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok = rows < hi
        valid = _token_validity(b, rows, row_ok, start, mask_ptr, mask_sb, mask_ss, HAS_MASK)
        z = _load_logits_tile(x_ptr, stride_n, stride_e, rows, cols, col_ok, valid, inv_tau, VEC)
        s, h = _score_and_slope(z, SIGMOID)
        centred = coef[None, :] - tl.sum(s * coef[None, :], axis=1)[:, None]
        dz = tl.where(valid[:, None], c * h * centred, 0.0)
        tl.store(g_ptr + rows[:, None] * E + cols[None, :], dz.to(g_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------

MAX_EXPERTS = 512  # one row of experts is one tile
MAX_SEQS = 65535  # B is the second grid axis, which CUDA limits to 65535


def tile_config(num_experts: int) -> dict:
    """BLOCK_N, BLOCK_E and num_warps of the pooling kernels: the one table that sizes every tile.

    A tile of BLOCK_N rows × BLOCK_E experts holds 4096 fp32 values (8192 with 8 warps), i.e.
    32 per thread: enough independent loads in flight to stream at copy bandwidth without
    spilling the softmax intermediates. FP fusion is named explicitly so every Triton version
    compiles the same arithmetic (3.9 warns when it is left to its default).
    """
    block_e = max(16, triton.next_power_of_2(num_experts))  # ≥ 16: fewer variants to compile, no tiny layouts
    num_warps = 8 if block_e >= 256 else 4
    block_n = max(1, min(256, (1024 * num_warps) // block_e))
    return dict(BLOCK_N=block_n, BLOCK_E=block_e, num_warps=num_warps, enable_fp_fusion=True)


def pair_config(num_experts: int) -> dict:
    """Launch options of ``pair_js_fwd``: one row of E values per program."""
    return dict(BLOCK_E=tile_config(num_experts)["BLOCK_E"], num_warps=4, enable_fp_fusion=True)


_SM_COUNT = {}


def num_splits(num_tokens: int, num_seqs: int, num_layers: int, device: torch.device, block_n: int) -> int:
    """How many slices each sequence is cut into: enough programs for ~4 waves on the device,
    but never slices shorter than 4 tiles (the partials would cost more than they save)."""
    if device.type != "cuda":
        return 1
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = triton.cdiv(4 * _SM_COUNT[device], num_layers * num_seqs)
    rows_per_seq = triton.cdiv(num_tokens, num_seqs)
    return max(1, min(wanted, triton.cdiv(rows_per_seq, 4 * block_n), 1024))


_TABLES: "OrderedDict[tuple, tuple]" = OrderedDict()
_TABLE_CACHE_SIZE = 64


def layer_table(layers) -> torch.Tensor:
    """int64 [3, L] on the layers' device: data pointers, row strides, column strides (elements).

    On CUDA the table travels through pinned memory with a non-blocking copy (no host sync,
    capturable in a CUDA graph) and is cached by its contents, so a steady-state training loop
    whose allocator hands back the same addresses builds it once, and a CUDA-graph capture after
    a warm-up finds it ready instead of copying inside the capture. PyTorch's pinned-memory
    allocator keeps the source block until the copy has completed. A hit from another stream
    than the copy's waits for the copy's event first (outside a capture, where the warm-up has
    already ordered it), since the copy may not have landed yet.
    """
    device = layers[0].device
    values = [t.data_ptr() for t in layers] + [t.stride(0) for t in layers] + [t.stride(1) for t in layers]
    key = (device, tuple(values))
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        table, stream, copied = hit
        if stream is not None:
            current = torch.cuda.current_stream(device)
            if current != stream and not torch.cuda.is_current_stream_capturing():
                current.wait_event(copied)
        return table
    host = torch.tensor(values, dtype=torch.int64).view(3, len(layers))
    table = host_to_device(host, device)
    stream = copied = None
    if device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
        stream = torch.cuda.current_stream(device)
        copied = stream.record_event()
    _TABLES[key] = (table, stream, copied)
    if len(_TABLES) > _TABLE_CACHE_SIZE:
        _TABLES.popitem(last=False)
    return table


def vector_width(layers) -> int:
    """Elements per 16-byte load when every layer allows aligned vector loads, else 0 (the kernels'
    ``VEC``): 16-byte aligned base, unit column stride, row stride a multiple of the vector."""
    vec = 16 // layers[0].element_size()
    ok = all(t.data_ptr() % 16 == 0 and t.stride(1) == 1 and t.stride(0) % vec == 0 for t in layers)
    return vec if ok else 0


def _pool_launch(side: RoutingSide, score: str, temperature: float):
    """What the forward and backward pooling launches share: (grid, leading arguments, size
    arguments, constexprs). Both come from here, so the backward's programs revisit exactly the
    rows that the forward's pooled."""
    L, B, N, E = side.num_layers, side.num_seqs, side.num_tokens, side.num_experts
    meta = tile_config(E)
    splits = num_splits(N, B, L, side.device, meta["BLOCK_N"])
    table = layer_table(side.layers)
    # Absent segmentation tensors are replaced by the table: never read (HAS_MASK / USE_CU off).
    mask = side.mask if side.mask is not None else table
    mask_strides = (mask.stride(0), mask.stride(1)) if side.mask is not None else (0, 0)
    cu = side.cu_seqlens if side.cu_seqlens is not None else table
    cu_stride = cu.stride(0) if side.cu_seqlens is not None else 0
    head = (table, side.layers[0], mask, *mask_strides, cu, cu_stride)
    sizes = (L, B, N, E, side.seq_len, 1.0 / temperature, splits)
    meta.update(HAS_MASK=side.mask is not None, USE_CU=side.cu_seqlens is not None, SIGMOID=score == "sigmoid",
                VEC=vector_width(side.layers))
    return (L, B, splits), head, sizes, meta


def pool_side_fwd(side: RoutingSide, score: str, temperature: float):
    """Launch ``pool_routing_fwd`` over all layers and sequences of one side.

    Returns (partial fp32 [L, B, splits, E], count fp32 [B, splits]).
    """
    grid, head, sizes, meta = _pool_launch(side, score, temperature)
    L, B, splits = grid
    partial = torch.empty((L, B, splits, side.num_experts), dtype=torch.float32, device=side.device)
    count = torch.empty((B, splits), dtype=torch.float32, device=side.device)
    pool_routing_fwd[grid](*head, partial, count, *sizes, **meta)
    return partial, count


def pool_side_grad(side: RoutingSide, coef, scale, count, score: str, temperature: float) -> torch.Tensor:
    """∂loss/∂z as one [L, N, E] buffer in the logits' dtype (layer l's gradient is its view [l]),
    for ∂loss/∂P_{l,b} = scale[l, b] · coef[l, b, :] and n_b = count[b]."""
    grid, head, sizes, meta = _pool_launch(side, score, temperature)
    L, N, E = side.num_layers, side.num_tokens, side.num_experts
    grad = torch.empty((L, N, E), dtype=side.dtype, device=side.device)
    pool_routing_bwd[grid](*head, coef, scale, scale.stride(0), scale.stride(1), count, grad, N * E, *sizes, **meta)
    return grad


def pair_js_forward(anchor: Optional[RoutingSide], target: RoutingSide, anchor_probs, score: str, temperature: float):
    """Forward launches: (JS [L, B], pair validity [B], G^a, G^t [L, B, E], n^a, n^t [B]), fp32."""
    t_partial, t_count = pool_side_fwd(target, score, temperature)
    a_partial, a_count = (t_partial, t_count) if anchor is None else pool_side_fwd(anchor, score, temperature)
    L, B, E, dev = target.num_layers, target.num_seqs, target.num_experts, target.device
    js = torch.empty((L, B), dtype=torch.float32, device=dev)
    ga, gt = (torch.empty((L, B, E), dtype=torch.float32, device=dev) for _ in range(2))
    a_total, t_total, valid = (torch.empty(B, dtype=torch.float32, device=dev) for _ in range(3))
    priors = anchor_probs if anchor_probs is not None else js
    prior_strides = anchor_probs.stride() if anchor_probs is not None else (0, 0, 0)
    pair_js_fwd[(L, B)](
        a_partial, a_count, t_partial, t_count,
        priors, *prior_strides,
        js, ga, gt, a_total, t_total, valid,
        B, E, a_partial.shape[2], t_partial.shape[2],
        PRIORS=anchor_probs is not None, **pair_config(E),
    )
    return js, valid, ga, gt, a_total, t_total


def side_grads(side: RoutingSide, grad: torch.Tensor):
    """The gradient in the form the side was given: the [L, N, E] buffer or its per-layer views."""
    return (grad,) if side.stacked is not None else tuple(grad.unbind(0))


@dataclass
class PairPlan:
    """Non-tensor configuration of one fused call; tensors travel as Function inputs."""

    anchor: Optional[RoutingSide]
    target: RoutingSide
    score: str
    temperature: float
    detach_anchor: bool


class PairJSFunction(torch.autograd.Function):
    """JS [L, B] (0 for invalid pairs) and pair validity [B] from anchor logits or priors and target logits."""

    @staticmethod
    def forward(ctx, plan: PairPlan, anchor_probs, *logits):
        js, valid, ga, gt, a_total, t_total = pair_js_forward(
            plan.anchor, plan.target, anchor_probs, plan.score, plan.temperature
        )
        ctx.plan = plan
        # The logits are saved too (the plan already refers to them) so that autograd's version
        # check catches an in-place change before the backward recomputes the scores from them.
        ctx.save_for_backward(ga, gt, a_total, t_total, *logits)
        ctx.mark_non_differentiable(valid)
        return js, valid

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_js, _grad_valid):
        plan = ctx.plan
        ga, gt, a_total, t_total, *_ = ctx.saved_tensors
        grads = [None, None]  # plan, anchor_probs (fixed priors never receive gradient)
        if plan.anchor is not None:
            n = len(plan.anchor.inputs)
            if not plan.detach_anchor and any(ctx.needs_input_grad[2 : 2 + n]):
                grad = pool_side_grad(plan.anchor, ga, grad_js, a_total, plan.score, plan.temperature)
                grads += side_grads(plan.anchor, grad)
            else:
                grads += [None] * n
        if any(ctx.needs_input_grad[len(grads) :]):
            grads += side_grads(plan.target, pool_side_grad(plan.target, gt, grad_js, t_total, plan.score, plan.temperature))
        else:
            grads += [None] * len(plan.target.inputs)
        return tuple(grads)


def pair_js(plan: PairPlan, anchor_probs: Optional[torch.Tensor]):
    """(JS [L, B], pair validity [B] as 0/1 float) with autograd into the logits."""
    anchor_inputs = plan.anchor.inputs if plan.anchor is not None else ()
    if anchor_probs is not None:
        anchor_probs = anchor_probs.detach()
    return PairJSFunction.apply(plan, anchor_probs, *anchor_inputs, *plan.target.inputs)


class RoutingDistributionFunction(torch.autograd.Function):
    """P [L, B, E] (float32) of one side, with autograd into the logits."""

    @staticmethod
    def forward(ctx, side: RoutingSide, score: str, temperature: float, *logits):
        partial, count = pool_side_fwd(side, score, temperature)
        count = count.sum(dim=1)
        probs = partial.sum(dim=2) / count.clamp(min=1.0)[None, :, None]
        ctx.side, ctx.score, ctx.temperature = side, score, temperature
        ctx.save_for_backward(count, *logits)  # logits: for autograd's in-place version check
        return probs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_probs):
        count, *_ = ctx.saved_tensors
        side = ctx.side
        ones = torch.ones((), dtype=torch.float32, device=side.device).expand(side.num_layers, side.num_seqs)
        coef = grad_probs.to(torch.float32).contiguous()
        grad = pool_side_grad(side, coef, ones, count, ctx.score, ctx.temperature)
        return (None, None, None, *side_grads(side, grad))


def routing_distribution(side: RoutingSide, score: str, temperature: float):
    return RoutingDistributionFunction.apply(side, score, temperature, *side.inputs)


# ----------------------------------------------------------------------------------------
# torch.compile: the same launches registered as torch.library custom ops
# ----------------------------------------------------------------------------------------
# Why custom_op and not triton_op + wrap_triton: the launchers build the layer table from data
# pointers, which the FakeTensors of a trace do not have. An opaque custom op with a fake
# (shape-only) implementation and registered autograd keeps a compiled graph whole. Eager calls
# bypass it (``PairJSFunction``): a dispatcher round trip costs tens of microseconds per call.


def _side_or_none(layers, mask, cu_seqlens, name: str) -> Optional[RoutingSide]:
    return routing_side(list(layers), mask, cu_seqlens, name) if len(layers) else None


def _num_seqs(mask, cu_seqlens) -> int:
    if mask is not None:
        return mask.shape[0]
    return cu_seqlens.shape[0] - 1 if cu_seqlens is not None else 1


@torch.library.custom_op("sara_kernels::pair_js_fwd", mutates_args=())
def pair_js_fwd_op(
    anchor: List[torch.Tensor], target: List[torch.Tensor],
    anchor_mask: Optional[torch.Tensor], anchor_cu_seqlens: Optional[torch.Tensor],
    target_mask: Optional[torch.Tensor], target_cu_seqlens: Optional[torch.Tensor],
    anchor_probs: Optional[torch.Tensor], score: str, temperature: float, detach_anchor: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(JS, valid, G^a, G^t, n^a, n^t) as in ``pair_js_forward``; ``anchor`` is empty in priors mode."""
    anchor_side = _side_or_none(anchor, anchor_mask, anchor_cu_seqlens, "anchor")
    target_side = routing_side(list(target), target_mask, target_cu_seqlens, "target")
    return pair_js_forward(anchor_side, target_side, anchor_probs, score, temperature)


@pair_js_fwd_op.register_fake
def _pair_js_fwd_fake(anchor, target, anchor_mask, anchor_cu_seqlens, target_mask, target_cu_seqlens,
                      anchor_probs, score, temperature, detach_anchor):
    L, E, B = len(target), target[0].shape[1], _num_seqs(target_mask, target_cu_seqlens)
    new = lambda *shape: target[0].new_empty(shape, dtype=torch.float32)  # noqa: E731
    return new(L, B), new(B), new(L, B, E), new(L, B, E), new(B), new(B)


@torch.library.custom_op("sara_kernels::pair_js_bwd", mutates_args=())
def pair_js_bwd_op(
    grad_js: torch.Tensor, anchor: List[torch.Tensor], target: List[torch.Tensor],
    anchor_mask: Optional[torch.Tensor], anchor_cu_seqlens: Optional[torch.Tensor],
    target_mask: Optional[torch.Tensor], target_cu_seqlens: Optional[torch.Tensor],
    ga: torch.Tensor, gt: torch.Tensor, a_total: torch.Tensor, t_total: torch.Tensor,
    score: str, temperature: float, anchor_grad: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(∂/∂anchor [L, N_a, E] or an empty tensor, ∂/∂target [L, N_t, E])."""
    target_side = routing_side(list(target), target_mask, target_cu_seqlens, "target")
    grad_t = pool_side_grad(target_side, gt, grad_js, t_total, score, temperature)
    if not anchor_grad:
        return grad_js.new_empty(0), grad_t
    anchor_side = routing_side(list(anchor), anchor_mask, anchor_cu_seqlens, "anchor")
    return pool_side_grad(anchor_side, ga, grad_js, a_total, score, temperature), grad_t


@pair_js_bwd_op.register_fake
def _pair_js_bwd_fake(grad_js, anchor, target, anchor_mask, anchor_cu_seqlens, target_mask, target_cu_seqlens,
                      ga, gt, a_total, t_total, score, temperature, anchor_grad):
    grad_t = target[0].new_empty((len(target), *target[0].shape))
    grad_a = anchor[0].new_empty((len(anchor), *anchor[0].shape)) if anchor_grad else grad_js.new_empty(0)
    return grad_a, grad_t


def _pair_js_setup_context(ctx, inputs, output):
    anchor, target, anchor_mask, anchor_cu, target_mask, target_cu, _, score, temperature, detach_anchor = inputs
    _, _, ga, gt, a_total, t_total = output
    ctx.num_anchor = len(anchor)
    ctx.options = (score, temperature, not detach_anchor and len(anchor) > 0)
    ctx.save_for_backward(anchor_mask, anchor_cu, target_mask, target_cu, ga, gt, a_total, t_total, *anchor, *target)


def _pair_js_backward(ctx, grad_js, *_unused):
    anchor_mask, anchor_cu, target_mask, target_cu, ga, gt, a_total, t_total, *layers = ctx.saved_tensors
    anchor, target = layers[: ctx.num_anchor], layers[ctx.num_anchor :]
    score, temperature, anchor_grad = ctx.options
    wanted = ctx.needs_input_grad[0]  # one flag per tensor of a list input
    anchor_grad = anchor_grad and (any(wanted) if isinstance(wanted, (list, tuple)) else bool(wanted))
    grad_a, grad_t = pair_js_bwd_op(
        grad_js, anchor, target, anchor_mask, anchor_cu, target_mask, target_cu, ga, gt, a_total, t_total,
        score, temperature, anchor_grad,
    )
    return (list(grad_a.unbind(0)) if anchor_grad else None, list(grad_t.unbind(0))) + (None,) * 8


torch.library.register_autograd("sara_kernels::pair_js_fwd", _pair_js_backward, setup_context=_pair_js_setup_context)


def pair_js_compiled(plan: PairPlan, anchor_probs: Optional[torch.Tensor]):
    """``pair_js`` through the registered custom ops, for use while torch.compile traces."""
    anchor = plan.anchor
    outputs = pair_js_fwd_op(
        list(anchor.layers) if anchor is not None else [],
        list(plan.target.layers),
        anchor.mask if anchor is not None else None,
        anchor.cu_seqlens if anchor is not None else None,
        plan.target.mask, plan.target.cu_seqlens,
        anchor_probs.detach() if anchor_probs is not None else None,
        plan.score, plan.temperature, plan.detach_anchor,
    )
    return outputs[0], outputs[1]
