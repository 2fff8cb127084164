r"""The Triton kernels of SARA routing alignment: score, masked pooling, divergence, reduction, backward.

The math (symbols as in :mod:`sara_kernels.reference`, which is the specification):

    s = softmax(z/τ)                 or  s = σ(z/τ) / Σ_e σ(z/τ)_e          (per token)
    P_{l,b} = (1/n_b) Σ_{n ∈ b, valid} s(z_{l,n})
    D_{l,b} by ``divergence`` (DIVERGENCE 0, 1, 2), with G_e := ∂D/∂P_e up to a constant per
    side (a constant drops out of the backward below: Σ_e s_e = 1), 0 where P_e = 0 and no
    derivative flows into a floored Q (then s_e = 0 on every token):
      js:          M = ½(P^a + P^t),  D = ½ Σ_e [P^a_e log(P^a_e/M_e) + P^t_e log(P^t_e/M_e)],
                   G^a = ½ log(P^a/M),  G^t = ½ log(P^t/M)
      kl:          D = KL(P^a ‖ P^t) = Σ_e P^a_e log(P^a_e/Q^t_e),  G^a = log(P^a/Q^t),  G^t = −P^a/Q^t
      reverse_kl:  the same with the sides swapped
    where Q = max(P, Q_MIN) with Q_MIN = 2^-126, the reference's zero rule.
    π_b: the pair's weight (``pair_weights``, else 1; 0 for an invalid pair), folded into D and G.
    loss = Σ_l w_l Σ_b π_b D_{l,b} / (Π Σ_l w_l)  ("mean", Π = Σ_b π_b; 0 when Π = 0)
         | Σ_l w_l Σ_b π_b D_{l,b}  ("sum")
    k_l := ∂loss/∂(π_b D_{l,b}) = w_l / (Π Σ w)  ("mean") | w_l  ("sum") | 1  ("none", times the upstream [L, B])

Backward for a token n of sequence b, with g = ∂L/∂loss · k_l and c = g / (τ n_b):

    ∂L/∂z_j = c · h_j · (G_j − Σ_e s_e G_e),   h = s (softmax),  h = s ⊙ σ(−z/τ) (sigmoid)

since ∂s_e/∂z_j = (1/τ) h_j (δ_ej − s_e) for both scores.

Launches (constant in L, B and N; no torch op runs between them):

1. ``pool_routing_fwd`` per side, grid (L, B, splits): each program sums s over one contiguous
   slice of one sequence's rows into ``partial[l, b, split, :]``. Splitting keeps all SMs busy
   when B is small; partials are reduced in a fixed order afterwards, so results are bitwise
   deterministic (no float atomics).
2. ``pair_js_fwd``, grid (L, B): reduces the partials of both sides, writes π·D and the
   coefficients π·G that the backward needs (O(L·B·E) memory).
3. ``reduce_pair_loss``, one program: the loss, the per-layer weighted mean and k_l, in a fixed order.
4. ``pool_routing_bwd`` per side that needs gradients, same grid as 1: recomputes s from the
   logits (no [L, N, E] intermediate is saved) and writes ∂L/∂z in the logits' dtype.

``routing_distribution`` is 1 + ``pooled_routing_fwd`` (P, or the raw sums that context
parallelism all-reduces first) and 4 with ∂L/∂P as the coefficients. Packed cu_seqlens on a
GPU are checked by ``check_segments``, a device assertion instead of a host sync.

The L layer tensors are read where they lie: one [L, N, E] tensor through its strides, a
tuple of [N, E] tensors through a small int64 table of data pointers and strides, so no
stack/cat copy of the logits is ever made.

The host side (plans, caches, launches) is :mod:`.host`, the ops and autograd :mod:`.autograd`.
"""

from __future__ import annotations

import inspect
import os

import triton
import triton.language as tl

# Read once: triton.jit decides at decoration time whether kernels run in the interpreter.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


LOG2E = tl.constexpr(1.4426950408889634)
TWO_POW_126 = tl.constexpr(2.0**126)  # bounds the sigmoid's t where it overflows: t·u is then 0, not ∞·0
Q_MIN = tl.constexpr(2.0**-126)  # reference.Q_MIN: the floor of a KL divergence's second distribution
DIVERGENCES = {"js": 0, "kl": 1, "reverse_kl": 2}


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
        t = tl.exp2(tl.fma(z, -scale, m[:, None]))
        u = _approx_rcp(tl.exp2(m)[:, None] + t)
        q = tl.minimum(t, TWO_POW_126) * u
    else:
        u = tl.exp2(tl.fma(z, scale, -(tl.max(z, axis=1) * scale)[:, None]))
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


# The kernels' runtime arguments (every argument that is not a constexpr), by name: the one place
# besides a kernel's signature that names them. The type is what ahead-of-time compilation
# (:mod:`sara_kernels.ops.aot`) declares; ``*{logits}`` and ``*{mask}`` vary per call. An
# argument name means the same thing, with the same type, in every kernel.
RUNTIME_ARG_TYPES = {
    # a side's layer addressing (see _layer_logits), segmentation and sizes
    "table_ptr": "*i64", "x0_ptr": "*{logits}", "stride_l": "i64", "stride_n": "i64", "stride_e": "i64",
    "mask_ptr": "*{mask}", "mask_sb": "i64", "mask_ss": "i64", "cu_ptr": "*i32", "cu_stride": "i64",
    "L": "i32", "B": "i32", "N": "i64", "S": "i64", "E": "i32", "E_DIV": "i32", "inv_tau": "fp32", "SPLITS": "i32",
    # pooled partial sums and token counts
    "partial_ptr": "*fp32", "count_ptr": "*fp32", "count_stride": "i64",
    "a_partial_ptr": "*fp32", "a_count_ptr": "*fp32", "t_partial_ptr": "*fp32", "t_count_ptr": "*fp32",
    "A_SPLITS": "i32", "T_SPLITS": "i32",
    # Jensen-Shannon, loss and backward coefficients
    "prior_ptr": "*fp32", "prior_sl": "i64", "prior_sb": "i64", "prior_se": "i64",
    "js_ptr": "*fp32", "ga_ptr": "*fp32", "gt_ptr": "*fp32", "stats_ptr": "*fp32", "weight_ptr": "*fp64",
    "pair_weight_ptr": "*fp32",
    "loss_ptr": "*fp32", "per_layer_ptr": "*fp32", "layer_coef_ptr": "*fp32",
    "coef_ptr": "*fp32", "coef_sl": "i64", "coef_sb": "i64", "coef_se": "i64",
    "scale_ptr": "*fp32", "scale_sl": "i64", "scale_sb": "i64",
    "grad_ptr": "*{logits}", "probs_ptr": "*fp32", "total_ptr": "*fp32",
}
# Each kernel's runtime arguments in signature order, by kernel name (filled by _runtime_kernel):
# what the host packs a launch's named values into (host.runtime_args).
RUNTIME_ARGS = {}


def _runtime_kernel(**jit_options):
    """``triton.jit`` with every runtime argument excluded from Triton's value and alignment
    specialisation: a training run whose batch shapes vary compiles each kernel once per plan, a
    compiled binary is valid for any value of these arguments (which is what lets the host launch
    it directly), and what is compiled ahead of time without a GPU (tests/ops/test_aot_compile.py)
    is what runs. Divisibility that matters for vector loads and stores is stated by hints
    instead (VEC, the launcher's own buffers, E = E_DIV · E_MULT with E_MULT = gcd(E, 8) a
    constexpr). The runtime arguments are read from the signature; each must have a type in
    ``RUNTIME_ARG_TYPES``."""

    def wrap(fn):
        names = tuple(name for name, param in inspect.signature(fn).parameters.items()
                      if "constexpr" not in str(param.annotation))
        untyped = [name for name in names if name not in RUNTIME_ARG_TYPES]
        if untyped:
            raise TypeError(f"{fn.__name__}: runtime arguments {untyped} have no type in RUNTIME_ARG_TYPES")
        RUNTIME_ARGS[fn.__name__] = names
        return triton.jit(do_not_specialize=names, do_not_specialize_on_alignment=names, **jit_options)(fn)

    return wrap


@_runtime_kernel()
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


@triton.jit
def _kl_parts(p, q):
    """(G^p, G^q, KL(p ‖ q)) with q floored at Q_MIN: G^p = log(p/q) (∂KL/∂p less its constant 1),
    G^q = −p/q (0 below the floor, whose derivative is 0); 0 where p = 0 (0·log 0 = 0)."""
    zero = p == 0.0
    floored = q < Q_MIN  # false for NaN, which propagates
    q = tl.where(floored, Q_MIN, q)
    log_ratio = tl.where(zero, 0.0, tl.log(tl.where(zero, 1.0, p) / q))
    return log_ratio, tl.where(floored, 0.0, -p / q), tl.sum(p * log_ratio, axis=0)


@_runtime_kernel()
def pair_js_fwd(
    a_partial_ptr, a_count_ptr, t_partial_ptr, t_count_ptr,
    prior_ptr, prior_sl, prior_sb, prior_se, pair_weight_ptr,
    js_ptr, ga_ptr, gt_ptr, stats_ptr,
    B, E, A_SPLITS, T_SPLITS,
    PRIORS: tl.constexpr, PAIR_WEIGHTS: tl.constexpr, DIVERGENCE: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """π_b·D_{l,b} and π_b·G^a, π_b·G^t for one (l, b); invalid pairs get 0.
    stats [3, B] = (n^a, n^t, π), written by the l = 0 programs."""
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
    if DIVERGENCE == 0:
        total = pa + pt
        ga = _half_log_ratio(pa, total)
        gt = _half_log_ratio(pt, total)
        # Σ_e ½ P_e log(P_e/M_e) = Σ_e P_e G_e; P = 0 gives 0 (0·log 0 = 0), NaN in P stays NaN.
        d = tl.sum(pa * ga + pt * gt, axis=0)
    elif DIVERGENCE == 1:
        ga, gt, d = _kl_parts(pa, pt)
    else:
        gt, ga, d = _kl_parts(pt, pa)
    weight = valid.to(tl.float32)
    if PAIR_WEIGHTS:
        weight = tl.where(valid, tl.load(pair_weight_ptr + b), 0.0)
    offs = (l * B + b).to(tl.int64) * E + cols
    tl.store(js_ptr + l * B + b, tl.where(valid, d, 0.0) * weight)
    tl.store(ga_ptr + offs, tl.where(valid, ga * weight, 0.0), mask=col_ok)
    tl.store(gt_ptr + offs, tl.where(valid, gt * weight, 0.0), mask=col_ok)
    if l == 0:
        tl.store(stats_ptr + b, n_a)
        tl.store(stats_ptr + B + b, n_t)
        tl.store(stats_ptr + 2 * B + b, weight)


REDUCTIONS = {"mean": 0, "sum": 1, "none": 2}



@_runtime_kernel()
def reduce_pair_loss(
    js_ptr, stats_ptr, weight_ptr, loss_ptr, per_layer_ptr, layer_coef_ptr,
    L, B,
    HAS_WEIGHTS: tl.constexpr, REDUCTION: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """One program: loss (mean/sum), per-layer weighted mean [L] and k_l = ∂loss/∂(π_b D_{l,b}) [L]
    from π·D [L, B] and π = stats[2], summed in a fixed order (deterministic)."""
    bs = tl.arange(0, BLOCK_B)
    ls = tl.arange(0, BLOCK_L)
    pair_weight = tl.zeros([BLOCK_B], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        pair_weight += tl.load(stats_ptr + 2 * B + b0 + bs, mask=b0 + bs < B, other=0.0)
    total_weight = tl.sum(pair_weight, axis=0)
    # No weight left: every π·D is 0, and so are the loss and (k_l = 0) the gradients.
    inv_valid = tl.where(total_weight > 0.0, 1.0 / total_weight, 0.0)
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



@_runtime_kernel()
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
        # c·h ⊙ (G − ⟨s, G⟩) = u ⊙ q ⊙ (w·k − d) with w = G − m, k = c·r and d = k·r·⟨u, w⟩ per
        # row (r = 0 on rows that are not valid tokens). G − ⟨s, G⟩ cancels where the row's mass
        # sits on experts of nearly equal G, and m = ⟨s, G⟩ rounded to fp32 is off by eps·|m|, far
        # more than that difference: w is exact there (Sterbenz) and ⟨s, w⟩ carries m's rounding,
        # so the error follows the row's own |G − ⟨s, G⟩| (its cost: docs/kernels.md, Numerics).
        k = c * r
        m = r * tl.sum(u * coef[None, :], axis=1)
        w = coef[None, :] - m[:, None]
        d = k * r * tl.sum(u * w, axis=1)
        dz = u * (w * k[:, None] - d[:, None])
        if SIGMOID:
            dz = dz * q
        tl.store(g_ptr + rows[:, None] * E + cols[None, :], dz.to(g_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])



@_runtime_kernel()
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


@_runtime_kernel(debug=True)
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
