r"""Fused SARA routing alignment in Triton: score, masked pooling, Jensen-Shannon, reduction, backward.

The math (symbols as in :mod:`sara_kernels.reference`, which is the specification):

    s = softmax(z/τ)                 or  s = σ(z/τ) / Σ_e σ(z/τ)_e          (per token)
    P_{l,b} = (1/n_b) Σ_{n ∈ b, valid} s(z_{l,n})
    M = ½(P^a + P^t),  JS_{l,b} = ½ Σ_e [P^a_e log(P^a_e/M_e) + P^t_e log(P^t_e/M_e)]
    G_e := ∂JS/∂P_e = ½ log(P_e / M_e)   (taken as 0 where P_e = 0: then s_e = 0 on every token)
    loss = Σ_l w_l Σ_b JS_{l,b} / (V Σ_l w_l)  ("mean", V valid pairs) | Σ_l w_l Σ_b JS_{l,b}  ("sum")
    k_l := ∂loss/∂JS_{l,b} = w_l / (V Σ w)  ("mean") | w_l  ("sum") | 1  ("none", times the upstream [L, B])

Backward for a token n of sequence b, with g = ∂L/∂loss · k_l and c = g / (τ n_b):

    ∂L/∂z_j = c · h_j · (G_j − Σ_e s_e G_e),   h = s (softmax),  h = s ⊙ σ(−z/τ) (sigmoid)

since ∂s_e/∂z_j = (1/τ) h_j (δ_ej − s_e) for both scores.

Launches (constant in L, B and N; no torch op runs between them):

1. ``pool_routing_fwd`` per side, grid (L, B, splits): each program sums s over one contiguous
   slice of one sequence's rows into ``partial[l, b, split, :]``. Splitting keeps all SMs busy
   when B is small; partials are reduced in a fixed order afterwards, so results are bitwise
   deterministic (no float atomics).
2. ``pair_js_fwd``, grid (L, B): reduces the partials of both sides, writes JS and the
   coefficients G that the backward needs (O(L·B·E) memory).
3. ``reduce_pair_loss``, one program: the loss, the per-layer mean JS and k_l, in a fixed order.
4. ``pool_routing_bwd`` per side that needs gradients, same grid as 1: recomputes s from the
   logits (no [L, N, E] intermediate is saved) and writes ∂L/∂z in the logits' dtype.

``routing_distribution`` is 1 + ``pooled_routing_fwd`` (P, or the raw sums that context
parallelism all-reduces first) and 4 with ∂L/∂P as the coefficients. Packed cu_seqlens on a
GPU are checked by ``check_segments``, a device assertion instead of a host sync.

The L layer tensors are read where they lie: one [L, N, E] tensor through its strides, a
tuple of [N, E] tensors through a small int64 table of data pointers and strides, so no
stack/cat copy of the logits is ever made.

Host path. A training loop calls the op with the same shapes every step, so everything that
depends only on shapes (tile sizes, grid, splits, which Triton kernel binary) is planned once
and cached; a call then costs a few dictionary lookups and one launch per kernel through the
compiled kernel's own launcher (Triton's ``CompiledKernel[grid]``), not Triton's per-call
argument binding. That is safe because no runtime kernel argument is value- or alignment-
specialised: a compiled binary depends only on the constexprs, the argument dtypes and whether
each integer fits in 32 bits, which are exactly the key of ``launch``'s cache.
"""

from __future__ import annotations

import functools
import math
import operator
import os
from collections import OrderedDict
from typing import List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .._inputs import RoutingSide, host_to_device
from . import contract
from .contract import DTYPES, MAX_EXPERTS, MAX_SEQS  # noqa: F401  (what this backend takes: the contract's)

# Read once: triton.jit decides at decoration time whether kernels run in the interpreter.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


LOG2E = tl.constexpr(1.4426950408889634)
TWO_POW_126 = tl.constexpr(2.0**126)  # bounds the sigmoid's t where it overflows: t·u is then 0, not ∞·0


@triton.jit
def _logit_scale(inv_tau):
    """What the loaded logits are multiplied by, for both scores: log2(e)/τ, so that every
    exponential (softmax's, and the sigmoid's e^{±z/τ}) is one ex2 (exp would multiply by
    log2(e) again)."""
    return inv_tau * LOG2E


if INTERPRET:
    @triton.jit
    def _approx_rcp(x):
        return 1.0 / x
else:
    @triton.jit
    def _approx_rcp(x):
        """1/x as one MUFU.RCP (``rcp.approx.ftz``, ≤ 1 ulp). Triton's ``/`` on fp32 is div.full,
        which adds a range test, a select and two multiplies for denominators beyond 2^126; the
        interpreter (above), which runs no PTX, divides."""
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)


@triton.jit
def _score_parts(z, valid, scale, SIGMOID: tl.constexpr):
    """The routing score of one tile of logits z (scaled here by ``_logit_scale``) in factors:
    s = u ⊙ r (u per element, r per row) and its slope h = s ⊙ q (∂s_e/∂z_j = h_j (δ_ej − s_e) / τ),
    q = σ(−z/τ) for the sigmoid and 1 for softmax. Rows that are not valid
    tokens get r = 0, so s = h = 0 there. Kept apart because the backward folds r and its own
    per-row factors into one multiplier per row instead of scaling every element twice.

    Padded columns hold −inf and rows that are not valid tokens 0 (``_load_logits_tile``), so
    every row's exponentials are finite and validity costs one select per row, not per element:
    an invalid row's r is taken as 0. The row maximum is taken on the unscaled logits (scale > 0),
    so that scaling and subtracting it is one fused multiply-add per element.

    The sigmoid score is shifted like softmax, with z' = z·log2(e)/τ and m = min(max_e z', 0) per
    row: t = 2^{m − z'}, u = 1/(2^m + t) = σ(z/τ)·2^{−m} and q = σ(−z/τ) = t·u. The shift cancels
    in s, keeps u ≤ 1 with u ≥ ½ for the largest logit (so Σu ≥ ½: no 0/0 where every σ(z/τ)
    underflows, at z/τ ≲ −88, which unshifted gave NaN), and costs one exponential and one
    reciprocal per element where σ(z/τ) and σ(−z/τ) took two of each. Where t overflows (−∞
    logits, padding) u = 0 exactly and q is taken from min(t, 2^126), finite, so h = u·q = 0.
    """
    if SIGMOID:
        m = tl.minimum(tl.max(z, axis=1), 0.0) * scale
        t = tl.exp2(m[:, None] - z * scale)
        u = _approx_rcp(tl.exp2(m)[:, None] + t)
        q = tl.minimum(t, TWO_POW_126) * u
    else:
        u = tl.exp2(z * scale - (tl.max(z, axis=1) * scale)[:, None])
        q = 1.0
    r = tl.where(valid, 1.0 / tl.sum(u, axis=1), 0.0)
    return u, r, q


@triton.jit
def _sequence_slice(b, split, cu_ptr, cu_stride, N, S, SPLITS, USE_CU: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows [lo, hi) of sequence b that program ``split`` handles, and the sequence start."""
    if USE_CU:
        start = tl.load(cu_ptr + b * cu_stride).to(tl.int64)
        end = tl.load(cu_ptr + (b + 1) * cu_stride).to(tl.int64)
        # Clamped so malformed device-side cu_seqlens (caught by check_segments) never address out of bounds.
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
def _layer_logits(table_ptr, x0_ptr, stride_l, stride_n, stride_e, l, L, TABLE: tl.constexpr, VEC: tl.constexpr):
    """Layer l's logits pointer and its (row, column) strides.

    TABLE: a tuple of tensors, addressed through the int64 table [3, L] (pointer, row stride,
    column stride); x0_ptr only lends its element type. Otherwise x0_ptr is one [L, N, E] tensor.
    A pointer read from memory carries no alignment facts, and no argument is alignment-
    specialised, so the compiler would issue one scalar load per element. With VEC > 0 the host
    has checked that every layer is 16-byte aligned, has unit column stride and row (and layer)
    strides divisible by VEC elements; the hints below then allow 16-byte vector loads.
    """
    if TABLE:
        x_ptr = tl.load(table_ptr + l).to(tl.pointer_type(x0_ptr.dtype.element_ty))
        row_stride = tl.load(table_ptr + L + l)
        col_stride = tl.load(table_ptr + 2 * L + l)
        if VEC > 0:
            x_ptr = tl.multiple_of(x_ptr, 16)
            row_stride = tl.multiple_of(row_stride, VEC)
    else:
        # A hint on a kernel argument itself is dropped (it has no defining op to carry it), so
        # with VEC > 0 the host passes the strides divided by VEC and the product states the
        # divisibility, and the hint goes on the pointer arithmetic's result.
        layer_stride = stride_l.to(tl.int64)
        row_stride = stride_n.to(tl.int64)
        if VEC > 0:
            layer_stride = layer_stride * VEC
            row_stride = row_stride * VEC
            x_ptr = tl.multiple_of(x0_ptr + l.to(tl.int64) * layer_stride, 16)
        else:
            x_ptr = x0_ptr + l.to(tl.int64) * layer_stride
        col_stride = stride_e.to(tl.int64)
    return x_ptr, row_stride, col_stride


@triton.jit
def _expert_columns(E, BLOCK_E: tl.constexpr, EVEN_E: tl.constexpr):
    """Column indices of a tile and which of them are experts. With EVEN_E (E = BLOCK_E) all are,
    as a compile-time constant: loads and stores then carry a per-row mask only."""
    cols = tl.arange(0, BLOCK_E)
    if EVEN_E:
        return cols, tl.full([BLOCK_E], 1, tl.int1)
    return cols, cols < E


@triton.jit
def _load_logits_tile(x_ptr, stride_n, stride_e, rows, cols, col_ok, valid, VEC: tl.constexpr,
                      EVEN_E: tl.constexpr):
    """[BLOCK_N, BLOCK_E] fp32 tile of logits: 0 in rows that are not valid tokens (what a
    masked asynchronous copy fills in, so no per-element select), −inf in padded columns."""
    if VEC > 0:
        offs = rows[:, None] * stride_n + cols[None, :]
    else:
        offs = rows[:, None] * stride_n + cols[None, :].to(tl.int64) * stride_e
    z = tl.load(x_ptr + offs, mask=valid[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    if not EVEN_E:
        z = tl.where(col_ok[None, :], z, float("-inf"))
    return z


@triton.jit
def _token_validity(b, rows, row_ok, start, mask_ptr, mask_sb, mask_ss, HAS_MASK: tl.constexpr):
    if HAS_MASK:
        m = tl.load(mask_ptr + b.to(tl.int64) * mask_sb + (rows - start) * mask_ss, mask=row_ok, other=0)
        return row_ok & (m != 0)
    return row_ok


# Every runtime argument is excluded from Triton's value and alignment specialisation: a
# training run whose batch shapes vary compiles each kernel once per plan, a compiled binary is
# valid for any value of these arguments (which is what lets the host launch it directly), and
# what is compiled ahead of time without a GPU (tests/ops/test_aot_compile.py) is what runs.
# Divisibility that matters for vector loads and stores is stated by hints instead (VEC, the
# launcher's own buffers, E = E_DIV · E_MULT with E_MULT = gcd(E, 8) a constexpr).
_POOL_RUNTIME_ARGS = ["table_ptr", "x0_ptr", "stride_l", "stride_n", "stride_e", "mask_ptr", "mask_sb", "mask_ss",
                      "cu_ptr", "cu_stride", "partial_ptr", "count_ptr", "L", "B", "N", "S", "E_DIV", "SPLITS"]


@triton.jit(do_not_specialize=_POOL_RUNTIME_ARGS, do_not_specialize_on_alignment=_POOL_RUNTIME_ARGS)
def pool_routing_fwd(
    table_ptr, x0_ptr, stride_l, stride_n, stride_e, mask_ptr, mask_sb, mask_ss, cu_ptr, cu_stride,
    partial_ptr, count_ptr,
    L, B, N, S, E_DIV, inv_tau, SPLITS,
    E_MULT: tl.constexpr, EVEN_E: tl.constexpr, HAS_MASK: tl.constexpr, USE_CU: tl.constexpr,
    SIGMOID: tl.constexpr, TABLE: tl.constexpr, VEC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, STAGES: tl.constexpr,
):
    """partial[l, b, split, :] = Σ s over the valid rows of slice ``split`` of sequence b;
    count[b, split] = their number (written by the l = 0 programs only).

    The sum runs in a [BLOCK_N, BLOCK_E] register accumulator and is reduced across rows once,
    after the loop: a reduction across the tile's rows crosses warps (shared memory and a
    barrier), which inside the loop would stall every iteration's loads.
    """
    l = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)
    E = E_DIV * E_MULT  # E_MULT = gcd(E, 8): lets the compiler prove vector alignment of rows
    start, lo, hi = _sequence_slice(b, split, cu_ptr, cu_stride, N, S, SPLITS, USE_CU, BLOCK_N)
    cols, col_ok = _expert_columns(E, BLOCK_E, EVEN_E)
    x_ptr, row_stride, col_stride = _layer_logits(table_ptr, x0_ptr, stride_l, stride_n, stride_e, l, L, TABLE, VEC)
    zscale = _logit_scale(inv_tau)
    acc = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    count = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in tl.range(lo, hi, BLOCK_N, num_stages=STAGES):
        rows = r0 + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok = rows < hi
        valid = _token_validity(b, rows, row_ok, start, mask_ptr, mask_sb, mask_ss, HAS_MASK)
        z = _load_logits_tile(x_ptr, row_stride, col_stride, rows, cols, col_ok, valid, VEC, EVEN_E)
        u, r, _ = _score_parts(z, valid, zscale, SIGMOID)
        acc += u * r[:, None]
        count += valid.to(tl.float32)
    slot = (l * B + b) * SPLITS + split
    tl.store(partial_ptr + slot.to(tl.int64) * E + cols, tl.sum(acc, axis=0), mask=col_ok)
    if l == 0:
        tl.store(count_ptr + b * SPLITS + split, tl.sum(count, axis=0))


@triton.jit
def _pooled_sum(partial_ptr, count_ptr, l, b, B, E, SPLITS, cols, col_ok):
    """(Σ_{valid n ∈ b} s [BLOCK_E], n_b) from the split partials, summed in a fixed order."""
    acc = tl.zeros(cols.shape, dtype=tl.float32)
    n = 0.0
    for split in range(0, SPLITS):
        slot = (l * B + b) * SPLITS + split
        acc += tl.load(partial_ptr + slot.to(tl.int64) * E + cols, mask=col_ok, other=0.0)
        n += tl.load(count_ptr + b * SPLITS + split)
    return acc, n


@triton.jit
def _pooled(partial_ptr, count_ptr, l, b, B, E, SPLITS, cols, col_ok):
    """(P_{l,b} [BLOCK_E], n_b) from the split partials."""
    acc, n = _pooled_sum(partial_ptr, count_ptr, l, b, B, E, SPLITS, cols, col_ok)
    return acc / tl.maximum(n, 1.0), n


@triton.jit
def _half_log_ratio(p, total):
    """G = ½ log(p/M) with M = total/2, 0 where p = 0 (its s is 0 on every token, so G never matters
    there). p/M is taken as 2p/total: where both sides' P sit at the smallest subnormals, ½·total
    rounds to 0 and p/M would be ∞ (an infinite divergence from valid input)."""
    zero = p == 0.0
    return tl.where(zero, 0.0, 0.5 * tl.log(tl.where(zero, 1.0, p + p) / tl.where(zero, 1.0, total)))


_PAIR_RUNTIME_ARGS = ["a_partial_ptr", "a_count_ptr", "t_partial_ptr", "t_count_ptr", "prior_ptr", "prior_sl",
                      "prior_sb", "prior_se", "js_ptr", "ga_ptr", "gt_ptr", "stats_ptr", "B", "E", "A_SPLITS",
                      "T_SPLITS"]


@triton.jit(do_not_specialize=_PAIR_RUNTIME_ARGS, do_not_specialize_on_alignment=_PAIR_RUNTIME_ARGS)
def pair_js_fwd(
    a_partial_ptr, a_count_ptr, t_partial_ptr, t_count_ptr,
    prior_ptr, prior_sl, prior_sb, prior_se,
    js_ptr, ga_ptr, gt_ptr, stats_ptr,
    B, E, A_SPLITS, T_SPLITS,
    PRIORS: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """JS_{l,b} and G^a, G^t for one (l, b); invalid pairs get JS = G = 0.
    stats [3, B] = (n^a, n^t, pair validity), written by the l = 0 programs."""
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
    total = pa + pt
    ga = tl.where(valid, _half_log_ratio(pa, total), 0.0)
    gt = tl.where(valid, _half_log_ratio(pt, total), 0.0)
    # Σ_e ½ P_e log(P_e/M_e) = Σ_e P_e G_e; P = 0 gives 0 (0·log 0 = 0), NaN in P stays NaN.
    js = tl.sum(pa * ga + pt * gt, axis=0)
    offs = (l * B + b).to(tl.int64) * E + cols
    tl.store(js_ptr + l * B + b, js)
    tl.store(ga_ptr + offs, ga, mask=col_ok)
    tl.store(gt_ptr + offs, gt, mask=col_ok)
    if l == 0:
        tl.store(stats_ptr + b, n_a)
        tl.store(stats_ptr + B + b, n_t)
        tl.store(stats_ptr + 2 * B + b, valid.to(tl.float32))


REDUCTIONS = {"mean": 0, "sum": 1, "none": 2}


_REDUCE_RUNTIME_ARGS = ["js_ptr", "stats_ptr", "weight_ptr", "loss_ptr", "per_layer_ptr", "layer_coef_ptr", "L", "B"]


@triton.jit(do_not_specialize=_REDUCE_RUNTIME_ARGS, do_not_specialize_on_alignment=_REDUCE_RUNTIME_ARGS)
def reduce_pair_loss(
    js_ptr, stats_ptr, weight_ptr, loss_ptr, per_layer_ptr, layer_coef_ptr,
    L, B,
    HAS_WEIGHTS: tl.constexpr, REDUCTION: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """One program: loss (mean/sum), per-layer mean JS [L] and k_l = ∂loss/∂JS_{l,b} [L], summed
    in a fixed order (deterministic)."""
    bs = tl.arange(0, BLOCK_B)
    ls = tl.arange(0, BLOCK_L)
    num_valid = tl.zeros([BLOCK_B], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        num_valid += tl.load(stats_ptr + 2 * B + b0 + bs, mask=b0 + bs < B, other=0.0)
    inv_valid = 1.0 / tl.maximum(tl.sum(num_valid, axis=0), 1.0)
    weight_sum = tl.zeros([BLOCK_L], dtype=tl.float32)
    if HAS_WEIGHTS:
        for l0 in range(0, L, BLOCK_L):
            weight_sum += tl.load(weight_ptr + l0 + ls, mask=l0 + ls < L, other=0.0).to(tl.float32)
    total = tl.zeros([BLOCK_L], dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        layer = l0 + ls
        layer_ok = layer < L
        row = tl.zeros([BLOCK_L, BLOCK_B], dtype=tl.float32)
        for b0 in range(0, B, BLOCK_B):
            offs = layer[:, None] * B + (b0 + bs)[None, :]
            row += tl.load(js_ptr + offs, mask=layer_ok[:, None] & (b0 + bs < B)[None, :], other=0.0)
        js_sum = tl.sum(row, axis=1)
        tl.store(per_layer_ptr + layer, js_sum * inv_valid, mask=layer_ok)
        if HAS_WEIGHTS:
            w = tl.load(weight_ptr + layer, mask=layer_ok, other=0.0).to(tl.float32)
        else:
            w = tl.where(layer_ok, 1.0, 0.0)
        if REDUCTION == 0:
            total += w * (js_sum * inv_valid)
        else:
            total += w * js_sum
        if REDUCTION == 2:
            coef = tl.where(layer_ok, 1.0, 0.0)
        else:
            coef = w
        tl.store(layer_coef_ptr + layer, coef, mask=layer_ok)
    if REDUCTION == 0:
        if HAS_WEIGHTS:
            inv_weight = 1.0 / tl.sum(weight_sum, axis=0)
        else:
            inv_weight = 1.0 / L
        tl.store(loss_ptr, tl.sum(total, axis=0) * inv_weight)
        # k_l = w_l / (V Σw): rescaled in place by the same program, so no other program races.
        for l0 in range(0, L, BLOCK_L):
            layer = l0 + ls
            k = tl.load(layer_coef_ptr + layer, mask=layer < L, other=0.0)
            tl.store(layer_coef_ptr + layer, k * (inv_weight * inv_valid), mask=layer < L)
    elif REDUCTION == 1:
        tl.store(loss_ptr, tl.sum(total, axis=0))


_BWD_RUNTIME_ARGS = [*(a for a in _POOL_RUNTIME_ARGS if a != "partial_ptr"), "coef_ptr", "coef_sl", "coef_sb", "coef_se", "scale_ptr", "scale_sl",
                     "scale_sb", "layer_coef_ptr", "count_stride", "grad_ptr"]


@triton.jit(do_not_specialize=_BWD_RUNTIME_ARGS, do_not_specialize_on_alignment=_BWD_RUNTIME_ARGS)
def pool_routing_bwd(
    table_ptr, x0_ptr, stride_l, stride_n, stride_e, mask_ptr, mask_sb, mask_ss, cu_ptr, cu_stride,
    coef_ptr, coef_sl, coef_sb, coef_se, scale_ptr, scale_sl, scale_sb, layer_coef_ptr, count_ptr, count_stride,
    grad_ptr,
    L, B, N, S, E_DIV, inv_tau, SPLITS,
    E_MULT: tl.constexpr, EVEN_E: tl.constexpr, HAS_MASK: tl.constexpr, USE_CU: tl.constexpr,
    SIGMOID: tl.constexpr, TABLE: tl.constexpr, VEC: tl.constexpr, PAIR: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, STAGES: tl.constexpr,
):
    """grad[l, n, :] = c · h ⊙ (G − ⟨s, G⟩) for the rows of one slice, G = coef[l, b, :],
    c = g / (τ n_b) with g = scale[l, b] · k_l (PAIR) or 1 (``routing_distribution``); rows that
    are not valid tokens get 0. Every row of the side is written by exactly one program."""
    l = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)
    E = E_DIV * E_MULT  # E_MULT = gcd(E, 8): lets the compiler prove vector alignment of rows
    start, lo, hi = _sequence_slice(b, split, cu_ptr, cu_stride, N, S, SPLITS, USE_CU, BLOCK_N)
    cols, col_ok = _expert_columns(E, BLOCK_E, EVEN_E)
    coef_offs = l.to(tl.int64) * coef_sl + b.to(tl.int64) * coef_sb + cols.to(tl.int64) * coef_se
    coef = tl.load(coef_ptr + coef_offs, mask=col_ok, other=0.0).to(tl.float32)
    n = tl.load(count_ptr + b * count_stride)
    c = inv_tau / tl.maximum(n, 1.0)
    if PAIR:
        g = tl.load(scale_ptr + l.to(tl.int64) * scale_sl + b.to(tl.int64) * scale_sb).to(tl.float32)
        c = c * g * tl.load(layer_coef_ptr + l)
    x_ptr, row_stride, col_stride = _layer_logits(table_ptr, x0_ptr, stride_l, stride_n, stride_e, l, L, TABLE, VEC)
    zscale = _logit_scale(inv_tau)
    # grad is allocated by the launcher (16-byte aligned); saying so lets its rows be stored as vectors.
    g_ptr = tl.multiple_of(grad_ptr + l.to(tl.int64) * N * E, 16)
    for r0 in tl.range(lo, hi, BLOCK_N, num_stages=STAGES):
        rows = r0 + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok = rows < hi
        valid = _token_validity(b, rows, row_ok, start, mask_ptr, mask_sb, mask_ss, HAS_MASK)
        z = _load_logits_tile(x_ptr, row_stride, col_stride, rows, cols, col_ok, valid, VEC, EVEN_E)
        u, r, q = _score_parts(z, valid, zscale, SIGMOID)
        # c·h ⊙ (G − ⟨s, G⟩) = u ⊙ q ⊙ (G·k − d) with k = c·r and d = k·r·⟨u, G⟩ per row: one
        # fused multiply-add and one multiply per element (r = 0 on rows that are not valid tokens).
        k = c * r
        d = k * r * tl.sum(u * coef[None, :], axis=1)
        dz = u * (coef[None, :] * k[:, None] - d[:, None])
        if SIGMOID:
            dz = dz * q
        tl.store(g_ptr + rows[:, None] * E + cols[None, :], dz.to(g_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


_POOLED_RUNTIME_ARGS = ["partial_ptr", "count_ptr", "probs_ptr", "total_ptr", "B", "E", "SPLITS"]


@triton.jit(do_not_specialize=_POOLED_RUNTIME_ARGS, do_not_specialize_on_alignment=_POOLED_RUNTIME_ARGS)
def pooled_routing_fwd(partial_ptr, count_ptr, probs_ptr, total_ptr, B, E, SPLITS,
                       NORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr):
    """P_{l,b} = Σ partials / max(n_b, 1) for ``routing_distribution`` (the sums themselves without
    NORMALIZE, to be reduced over a process group first); total[b] = n_b."""
    l = tl.program_id(0)
    b = tl.program_id(1)
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    if NORMALIZE:
        probs, n = _pooled(partial_ptr, count_ptr, l, b, B, E, SPLITS, cols, col_ok)
    else:
        probs, n = _pooled_sum(partial_ptr, count_ptr, l, b, B, E, SPLITS, cols, col_ok)
    tl.store(probs_ptr + (l * B + b).to(tl.int64) * E + cols, probs, mask=col_ok)
    if l == 0:
        tl.store(total_ptr + b, n)


@triton.jit(do_not_specialize=["cu_ptr", "cu_stride", "B", "N"], do_not_specialize_on_alignment=["cu_ptr"],
            debug=True)
def check_segments(cu_ptr, cu_stride, B, N, BLOCK: tl.constexpr):
    """Device-side check of cu_seqlens [B+1]: starts at 0, non-decreasing, ends at N. Compiled
    with debug=True so the assertion is live; reading the values on the host would sync."""
    first = tl.load(cu_ptr).to(tl.int64)
    last = tl.load(cu_ptr + B * cu_stride).to(tl.int64)
    tl.device_assert((first == 0) & (last == N), "cu_seqlens must start at 0 and end at the token count N")
    idx = tl.arange(0, BLOCK)
    for i0 in range(0, B, BLOCK):
        i = i0 + idx
        ok = i < B
        lo = tl.load(cu_ptr + i * cu_stride, mask=ok, other=0)
        hi = tl.load(cu_ptr + (i + 1) * cu_stride, mask=ok, other=0)
        tl.device_assert(hi >= lo, "cu_seqlens must be non-decreasing")


# ----------------------------------------------------------------------------------------
# Host side: tile table, plans and launches
# ----------------------------------------------------------------------------------------

def available() -> bool:
    return True


def require() -> None:
    """Nothing to check: Triton is a dependency of the package."""


def runs_on(device: torch.device) -> bool:
    """Whether the kernels take tensors on ``device``: CUDA, or any device under the interpreter."""
    return device.type == "cuda" or INTERPRET


def tile_config(num_experts: int) -> dict:
    """BLOCK_N, BLOCK_E and num_warps of the pooling kernels: the one table that sizes every tile.

    Up to 64 experts: 4 warps and a 4096-value tile (32 fp32 values per thread), enough
    independent loads in flight. From 128 experts: 8 warps and 16 values per thread (a
    4096-value tile), which benchmarks/tune_tiles.py measured as the fastest candidate or within
    2 % of it for both pooling kernels at E = 128, 256 and 512 on an H200 (results in
    benchmarks/results/2026-11-27-H200-tiles/); the forward's register accumulator then also
    stays small. FP fusion is named explicitly so every Triton version compiles the same
    arithmetic (3.9 warns when it is left to its default).

    STAGES software-pipelines the row loop (``tl.range(num_stages=STAGES)``): the tiles are
    copied to shared memory asynchronously (``cp.async``), and with 3 stages the next tile is in
    flight while the current one is computed. The H200 profile showed both pooling kernels
    latency-bound (the same logits per second whatever they write), each warp alternating a load
    and the compute that waits on it. 2 stages gives no overlap (the loop waits for every copy at
    its top). Left to itself, ptxas gives the 3-stage loop 80–115 registers per thread (16–24
    warps per SM instead of 32), so ``maxnreg`` holds it to 64, where 8-warp programs still fit
    4 per SM: no spills up to E = 256, and at E = 512 up to 20 bytes, one or two local loads
    per iteration (5–8, L1 hits, in the sigmoid backward; the data in flight sits in shared
    memory, not in registers). At E ≤ 64 (4 warps, larger tiles) the loop would need 110–170
    registers, so it stays unpipelined there. Chosen
    from ptxas and the SASS without a GPU (benchmarks/results/kernel_resources_sm90_bf16.txt);
    ``tune_tiles.py`` measures the unpipelined loop against 3 stages with and without the cap.
    """
    # ≥ 16: fewer variants to compile, no tiny layouts. The next power of two by bit_length: this
    # runs on every call (pair_config), and triton.next_power_of_2 costs ~1.4 µs in Triton 3.9.
    block_e = max(16, 1 << (num_experts - 1).bit_length())
    num_warps = 8 if block_e >= 128 else 4
    block_n = max(1, min(256, 4096 // block_e))
    if block_e >= 128:
        pipelining = dict(STAGES=3, maxnreg=64)
    else:
        pipelining = dict(STAGES=1)
    return dict(BLOCK_N=block_n, BLOCK_E=block_e, **pipelining, num_warps=num_warps, enable_fp_fusion=True)


def expert_constexprs(num_experts: int) -> dict:
    """The pooling kernels' constexprs that follow from E alone: the tile table's, E_MULT =
    gcd(E, 8) (rows provably vector-aligned) and EVEN_E (E fills the tile: no column mask)."""
    meta = tile_config(num_experts)
    meta.update(E_MULT=math.gcd(num_experts, 8), EVEN_E=num_experts == meta["BLOCK_E"])
    return meta


def pair_config(num_experts: int) -> dict:
    """Launch options of ``pair_js_fwd``: one row of E values per program."""
    return dict(BLOCK_E=tile_config(num_experts)["BLOCK_E"], num_warps=4, enable_fp_fusion=True)


REDUCE_CONFIG = dict(BLOCK_L=16, BLOCK_B=64, num_warps=4, enable_fp_fusion=True)
CHECK_CONFIG = dict(BLOCK=256, num_warps=4)

_SM_COUNT = {}


def num_splits(num_tokens: int, num_seqs: int, num_layers: int, device: torch.device, block_n: int) -> int:
    """Slices per sequence (:func:`contract.num_splits`, a tile of ``block_n`` rows per iteration);
    one off CUDA, where the interpreter runs the programs one after another."""
    if device.type != "cuda":
        return 1
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return contract.num_splits(num_tokens, num_seqs, num_layers, _SM_COUNT[device], block_n)


# Compiled kernels by (kernel, device, constexprs, argument types): see the module docstring.
_COMPILED = {}
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def launch(kernel, grid, args: tuple, meta: dict, device: torch.device):
    """``kernel[grid](*args, **meta)``, through the compiled kernel's launcher once it exists.

    ``args`` are the runtime arguments in signature order, ``meta`` the constexprs and launch
    options. The key holds everything Triton specialises these kernels on (see the module
    docstring): the constexprs, the options, each tensor argument's dtype and whether each
    integer argument fits in 32 bits.
    """
    if INTERPRET:
        kernel[grid](*args, **meta)
        return
    # Triton types an int argument i32 when it fits, i64 otherwise: that choice is in the key too.
    # Runtime arguments are tensors, ints and floats only (a list comprehension over type() is
    # the cheapest form: this runs on every launch).
    key = (kernel, device, tuple(meta.items()),
           tuple([_INT32_MIN <= a <= _INT32_MAX if type(a) is int else a.dtype for a in args if type(a) is not float]))
    hit = _COMPILED.get(key)
    if hit is None:
        compiled = kernel[grid](*args, **meta)
        _COMPILED[key] = (compiled, tuple(meta[p.name] for p in kernel.params if p.is_constexpr))
        return
    compiled, constexprs = hit
    compiled[(*grid, 1, 1)[:3]](*args, *constexprs)  # the compiled launcher reads all three grid axes


_PLACEHOLDERS = {}


def _placeholder(device: torch.device) -> torch.Tensor:
    """A small int64 buffer passed for absent optional tensors (never read: its constexpr is off)."""
    t = _PLACEHOLDERS.get(device)
    if t is None:
        t = _PLACEHOLDERS[device] = torch.zeros(16, dtype=torch.int64, device=device)
    return t


_TABLES: "OrderedDict[tuple, tuple]" = OrderedDict()
_TABLE_CACHE_SIZE = 64
_data_ptr = torch.Tensor.data_ptr
_stride = torch.Tensor.stride


def layer_table(ptrs: tuple, strides: tuple, device: torch.device) -> torch.Tensor:
    """int64 [3, L] on ``device``: data pointers, row strides, column strides (elements).

    On CUDA the table travels through pinned memory with a non-blocking copy (no host sync,
    capturable in a CUDA graph) and is cached by its contents, so a steady-state training loop
    whose allocator hands back the same addresses builds it once, and a CUDA-graph capture after
    a warm-up finds it ready instead of copying inside the capture. PyTorch's pinned-memory
    allocator keeps the source block until the copy has completed. A hit from another stream
    than the copy's waits for the copy's event first (outside a capture, where the warm-up has
    already ordered it), since the copy may not have landed yet.
    """
    key = (device, ptrs, strides)
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        table, stream, copied = hit
        if stream is not None:
            current = torch.cuda.current_stream(device)
            if current != stream and not torch.cuda.is_current_stream_capturing():
                current.wait_event(copied)
        return table
    row_strides, col_strides = zip(*strides)
    host = torch.tensor([*ptrs, *row_strides, *col_strides], dtype=torch.int64).view(3, len(ptrs))
    table = host_to_device(host, device)
    stream = copied = None
    if device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
        stream = torch.cuda.current_stream(device)
        copied = stream.record_event()
    _TABLES[key] = (table, stream, copied)
    if len(_TABLES) > _TABLE_CACHE_SIZE:
        _TABLES.popitem(last=False)
    return table


def vector_width(element_size: int, pointers, strides) -> int:
    """Elements per 16-byte load when every layer allows aligned vector loads, else 0 (the kernels'
    ``VEC``): 16-byte aligned bases, unit column stride, row stride (and layer stride, for one
    [L, N, E] tensor) a multiple of the vector. ``strides``: each layer's (…, row, column) strides."""
    vec = 16 // element_size
    if functools.reduce(operator.or_, pointers) % 16:
        return 0
    return vec if all(st[-1] == 1 and all(x % vec == 0 for x in st[:-1]) for st in strides) else 0


def layer_addressing(logits, device: torch.device):
    """((table, x0, stride_l, stride_n, stride_e) of the kernels' layer addressing, VEC)."""
    if isinstance(logits, torch.Tensor):
        sl, sn, se = logits.stride()
        vec = vector_width(logits.element_size(), (logits.data_ptr(),), ((sl, sn, se),))
        if vec:  # the kernels multiply them back (see _layer_logits)
            sl, sn = sl // vec, sn // vec
        return (_placeholder(device), logits, sl, sn, se), vec
    ptrs = tuple(map(_data_ptr, logits))
    strides = tuple(map(_stride, logits))
    vec = vector_width(logits[0].element_size(), ptrs, set(strides))
    return (layer_table(ptrs, strides, device), logits[0], 0, 0, 0), vec


class SidePlan(NamedTuple):
    """What the pooling launches of one side need beyond the per-call tensors: planned once per shape."""

    grid: tuple  # (L, B, splits)
    sizes: tuple  # (L, B, N, S, E / E_MULT, 1/τ, splits)
    meta: dict  # constexprs and launch options of pool_routing_fwd (bwd adds PAIR)
    mask_strides: tuple  # (stride_b, stride_s), zeros without a mask
    cu_stride: int
    num_experts: int


# Bounded like _TABLES: a run whose batch shapes vary without end would otherwise grow it forever.
_PLANS: "OrderedDict[tuple, SidePlan]" = OrderedDict()
_PLAN_CACHE_SIZE = 256


def side_plan(logits, mask, cu, score: str, temperature: float, vec: int, device: torch.device) -> SidePlan:
    stacked = isinstance(logits, torch.Tensor)
    first = logits if stacked else logits[0]
    L = first.shape[0] if stacked else len(logits)
    N, E = first.shape[-2:]
    B = contract.num_seqs(mask, cu)
    S = mask.shape[1] if mask is not None else N
    mask_strides = mask.stride() if mask is not None else (0, 0)
    cu_stride = cu.stride(0) if cu is not None else 0
    key = (stacked, L, N, E, B, S, vec, mask is not None, cu is not None, mask_strides, cu_stride, score,
           temperature, device)
    plan = _PLANS.get(key)
    if plan is None:
        meta = expert_constexprs(E)
        splits = num_splits(N, B, L, device, meta["BLOCK_N"])
        meta.update(HAS_MASK=mask is not None, USE_CU=cu is not None, SIGMOID=score == "sigmoid", TABLE=not stacked,
                    VEC=vec)
        plan = _PLANS[key] = SidePlan((L, B, splits), (L, B, N, S, E // meta["E_MULT"], 1.0 / temperature, splits),
                                      meta, mask_strides, cu_stride, E)
        if len(_PLANS) > _PLAN_CACHE_SIZE:
            _PLANS.popitem(last=False)
    return plan


def clear_plans():
    """Forget the cached launch plans (after changing ``tile_config`` or ``num_splits``)."""
    _PLANS.clear()


def _segments(plan: SidePlan, mask, cu, device) -> tuple:
    """(mask, mask_sb, mask_ss, cu, cu_stride) arguments, placeholders for absent tensors."""
    placeholder = _placeholder(device)
    return (mask if mask is not None else placeholder, *plan.mask_strides,
            cu if cu is not None else placeholder, plan.cu_stride)


def _check_segments(cu, num_tokens: int, device: torch.device):
    if cu is not None and device.type == "cuda":
        launch(check_segments, (1,), (cu, cu.stride(0), cu.shape[0] - 1, num_tokens), CHECK_CONFIG, device)


def pool_fwd(logits, mask, cu, score: str, temperature: float, device: torch.device):
    """Launch ``pool_routing_fwd`` over all layers and sequences of one side.

    Returns (partial fp32 [L, B, splits, E], count fp32 [B, splits]).
    """
    addressing, vec = layer_addressing(logits, device)
    plan = side_plan(logits, mask, cu, score, temperature, vec, device)
    L, B, splits = plan.grid
    partial = torch.empty((L, B, splits, plan.num_experts), dtype=torch.float32, device=device)
    count = torch.empty((B, splits), dtype=torch.float32, device=device)
    _check_segments(cu, plan.sizes[2], device)
    args = (*addressing, *_segments(plan, mask, cu, device), partial, count, *plan.sizes)
    launch(pool_routing_fwd, plan.grid, args, plan.meta, device)
    return partial, count


def pool_bwd(logits, mask, cu, coef, scale, layer_coef, count, score: str, temperature: float, device):
    """∂L/∂z as one [L, N, E] buffer in the logits' dtype, for ∂L/∂P_{l,b} = g · coef[l, b, :] with
    g = scale[l, b] · layer_coef[l] (pair mode: ``scale`` broadcastable to [L, B]) or g = 1
    (``scale`` None), and n_b = count[b]."""
    addressing, vec = layer_addressing(logits, device)
    plan = side_plan(logits, mask, cu, score, temperature, vec, device)
    L, B, N = plan.sizes[:3]
    grad = torch.empty((L, N, plan.num_experts), dtype=addressing[1].dtype, device=device)
    pair = scale is not None
    if pair:
        scale = scale.expand(L, B)  # a view: a scalar upstream gradient gets zero strides
        scale_strides = scale.stride()
    else:
        scale = layer_coef = _placeholder(device)
        scale_strides = (0, 0)
    args = (
        *addressing, *_segments(plan, mask, cu, device),
        coef, *coef.stride(), scale, *scale_strides, layer_coef, count, count.stride(0),
        grad, *plan.sizes,
    )
    launch(pool_routing_bwd, plan.grid, args, {**plan.meta, "PAIR": pair}, device)
    return grad


def _unpack(logits: List[torch.Tensor]):
    """The kernels' view of a side's logits: the [L, N, E] tensor itself when given as one."""
    return logits[0] if len(logits) == 1 and logits[0].dim() == 3 else logits


# ----------------------------------------------------------------------------------------
# The op: torch.library custom ops for torch.compile, called directly in eager mode
# ----------------------------------------------------------------------------------------


def _op(name: str):
    """Register ``fn`` as the custom op ``sara_kernels::name`` with the contract's schema and fake
    implementation (opaque to torch.compile) and return a function that calls the op while
    compiling and ``fn`` itself otherwise: a dispatcher round trip costs tens of microseconds per
    eager call. Why custom ops and not triton_op + wrap_triton: the launchers read data pointers
    to build the layer table, which the FakeTensors of a trace do not have."""

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
    anchor_probs: Optional[torch.Tensor], layer_weights: Optional[torch.Tensor],
    score: str, temperature: float, reduction: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, per-layer mean JS [L], G^a, G^t [L, B, E], stats [3, B] = (n^a, n^t, valid), k [L]).

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
    launch(pair_js_fwd, (L, B),
           (a_partial, a_count, t_partial, t_count, priors, *prior_strides, js, ga, gt, stats,
            B, E, a_partial.shape[2], t_partial.shape[2]),
           {"PRIORS": anchor_probs is not None, **pair_config(E)}, device)
    per_layer, layer_coef = new(L), new(L)
    loss = js if reduction == "none" else new(())
    launch(reduce_pair_loss, (1,),
           (js, stats, layer_weights if layer_weights is not None else _placeholder(device), loss, per_layer,
            layer_coef, L, B),
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
    launch(pooled_routing_fwd, (L, B), (partial, count, probs, total, B, E, splits),
           {"NORMALIZE": normalize, **pair_config(E)}, device)
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


class LossOptions(NamedTuple):
    """The constants of one ``SARALossFunction`` call (a NamedTuple: built on every call)."""

    num_anchor: int  # tensors of the anchor side in ``logits`` (0 with priors)
    anchor_stacked: bool
    target_stacked: bool
    score: str
    temperature: float
    detach_anchor: bool
    reduction: str


class SARALossFunction(torch.autograd.Function):
    """The one autograd definition of the fused loss, eager and compiled alike: forward and
    backward call the custom ops above (the ops themselves in eager mode, see ``_op``). Only
    tensors and constants cross it, so torch.compile traces it whole."""

    @staticmethod
    def forward(ctx, options: LossOptions, anchor_probs, layer_weights, a_mask, a_cu, t_mask, t_cu, *logits):
        num_anchor = options.num_anchor
        anchor, target = list(logits[:num_anchor]), list(logits[num_anchor:])
        loss, per_layer, ga, gt, stats, layer_coef = sara_loss_fwd(
            anchor, target, a_mask, a_cu, t_mask, t_cu, anchor_probs, layer_weights, options.score,
            options.temperature, options.reduction,
        )
        ctx.options = options
        # The logits the backward reads are saved (not only referenced) so that autograd's version
        # check catches an in-place change before the backward recomputes the scores from them.
        # A detached anchor is never read again: saving it would only cost time per layer.
        read_back = logits if not options.detach_anchor else target
        ctx.save_for_backward(ga, gt, stats, layer_coef, a_mask, a_cu, t_mask, t_cu, *read_back)
        ctx.mark_non_differentiable(per_layer)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for per_layer: one kernel less per step
        return loss, per_layer

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_layer):
        _no_double_backward()
        options = ctx.options
        num_anchor = options.num_anchor
        if grad_loss is None:  # only the non-differentiable per_layer was used
            return (None,) * len(ctx.needs_input_grad)
        ga, gt, stats, layer_coef, a_mask, a_cu, t_mask, t_cu, *logits = ctx.saved_tensors
        saved_anchor = 0 if options.detach_anchor else num_anchor
        anchor, target = logits[:saved_anchor], logits[saved_anchor:]
        anchor_grad = saved_anchor > 0 and any(ctx.needs_input_grad[7 : 7 + num_anchor])
        grad_a, grad_t = sara_loss_bwd(
            grad_loss, anchor, target, a_mask, a_cu, t_mask, t_cu, ga, gt, stats, layer_coef, options.score,
            options.temperature, anchor_grad,
        )
        grads_a = _side_grads(grad_a, options.anchor_stacked) if anchor_grad else (None,) * num_anchor
        return (None,) * 7 + (*grads_a, *_side_grads(grad_t, options.target_stacked))


def sara_loss(anchor: Optional[RoutingSide], target: RoutingSide, anchor_probs, layer_weights,
              score: str, temperature: float, detach_anchor: bool, reduction: str):
    """(loss, detached per-layer mean JS [L]) with autograd into the logits."""
    if anchor_probs is not None:
        anchor_probs = anchor_probs.detach()
    if layer_weights is not None:
        layer_weights = layer_weights.detach()
    anchor_inputs = anchor.inputs if anchor is not None else ()
    options = LossOptions(len(anchor_inputs), anchor is not None and anchor.stacked, target.stacked,
                          score, temperature, detach_anchor, reduction)
    a_mask, a_cu = (anchor.mask, anchor.cu_seqlens) if anchor is not None else (None, None)
    return SARALossFunction.apply(options, anchor_probs, layer_weights, a_mask, a_cu, target.mask,
                                  target.cu_seqlens, *anchor_inputs, *target.inputs)


class DistributionOptions(NamedTuple):
    """The constants of one ``RoutingDistributionFunction`` call."""

    stacked: bool
    score: str
    temperature: float
    normalize: bool


class RoutingDistributionFunction(torch.autograd.Function):
    """(P [L, B, E] float32, n_b [B]) of one side, or the sums n_b·P without ``normalize``, with
    autograd into the logits; same structure as ``SARALossFunction``."""

    @staticmethod
    def forward(ctx, options: DistributionOptions, mask, cu_seqlens, *logits):
        probs, count = routing_distribution_fwd(list(logits), mask, cu_seqlens, options.score, options.temperature,
                                                options.normalize)
        ctx.options = options
        ctx.save_for_backward(count, mask, cu_seqlens, *logits)  # logits: for the in-place version check
        ctx.mark_non_differentiable(count)
        ctx.set_materialize_grads(False)
        return probs, count

    @staticmethod
    def backward(ctx, grad_probs, _grad_count):
        _no_double_backward()
        options = ctx.options
        count, mask, cu_seqlens, *logits = ctx.saved_tensors
        if grad_probs is None:
            return (None,) * len(ctx.needs_input_grad)
        grad = routing_distribution_bwd(grad_probs, logits, mask, cu_seqlens, count, options.score,
                                        options.temperature, options.normalize)
        return (None, None, None, *_side_grads(grad, options.stacked))


def pooled_distribution(side: RoutingSide, score: str, temperature: float, normalize: bool = True):
    """(P [L, B, E], n_b [B]) with autograd into the logits; the sums n_b·P without ``normalize``
    (what context parallelism all-reduces, :mod:`sara_kernels.distributed`)."""
    options = DistributionOptions(side.stacked, score, temperature, normalize)
    return RoutingDistributionFunction.apply(options, side.mask, side.cu_seqlens, *side.inputs)
