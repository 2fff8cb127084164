// CUDA kernels of the fused SARA op: the same launches and the same math as the Triton kernels of
// sara_kernels/ops/routing_js.py (whose docstring derives them):
//
//   s = softmax(z/τ) or σ(z/τ)/Σσ(z/τ)           h = s (softmax), s ⊙ σ(−z/τ) (sigmoid)
//   partial[l, b, split, :] = Σ_{valid rows of the slice} s        (pool_routing_fwd)
//   P = Σ_split partial / max(n_b, 1); D and G by divergence: JS (M = ½(P^a + P^t),
//   G = ½ log(P/M), 0 where P = 0, D = Σ_e P^a G^a + P^t G^t) or a KL (kl_parts); both times π_b
//                                                                  (pair_js_fwd)
//   loss, per-layer weighted mean and k_l = ∂loss/∂(π_b D_{l,b})    (reduce_pair_loss)
//   ∂L/∂z = c · h ⊙ (G − ⟨s, G⟩), c = g/(τ n_b)                     (pool_routing_bwd)
//
// Layout of the pooling kernels. A row of E experts is split over G consecutive lanes holding
// EPT = E_PAD/G contiguous experts each (E_PAD the next power of two >= max(E, 8)), so a lane
// reads 16 bytes or more with one vector load and a row's max/sum is a G-lane butterfly of
// shuffles: no shared memory and no barrier inside the loop. Each lane loads UNROLL rows before
// computing any (~32 values in flight per lane), which is what keeps enough bytes in flight to
// stream at memory bandwidth. Sums across rows stay in registers until the end of the slice,
// then one reduction per block (shuffles, then a fixed-order sum over the warps in shared
// memory): results are bitwise deterministic, with no atomics anywhere.

#undef NDEBUG  // check_segments relies on a live device assertion
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "routing_js.h"

namespace sara {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Blocks per SM a pooling kernel with up to 8 experts per lane is sized for. Device compilation
// sees the target architecture, so each cubin of a multi-architecture build gets its own launch
// bounds (nothing on the host reads them): 4 (64 registers) everywhere but sm_120 (at most 1536
// threads per SM), where ptxas 13.0 spills 8-56 bytes in 16-bit EPT = 8 tiles at 64 and none at 3.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 1200
constexpr int kBlocksPerSmSmallTiles = 3;
#else
constexpr int kBlocksPerSmSmallTiles = 4;
#endif
static_assert(sizeof(LayerTable) + sizeof(Segments) + sizeof(PoolShape) + sizeof(PoolGrad) <= 4096,
              "the pooling kernels' arguments fit CUDA's 4 kB parameter space");

// Element types as raw bits: conversions without type punning through unions.
struct F32 {
  using raw = uint32_t;
  static __device__ __forceinline__ float load(raw r) { return __uint_as_float(r); }
  static __device__ __forceinline__ raw store(float f) { return __float_as_uint(f); }
};
struct BF16 {
  using raw = uint16_t;
  static __device__ __forceinline__ float load(raw r) { return __uint_as_float(static_cast<uint32_t>(r) << 16); }
  static __device__ __forceinline__ raw store(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
};
struct F16 {
  using raw = uint16_t;
  static __device__ __forceinline__ float load(raw r) { return __half2float(__ushort_as_half(r)); }
  static __device__ __forceinline__ raw store(float f) { return __half_as_ushort(__float2half_rn(f)); }
};

template <int EPT, int G, class D>
struct PoolTile {
  static constexpr int kEpt = EPT;
  static constexpr int kLanesPerRow = G;
  static constexpr int kRawBytes = EPT * static_cast<int>(sizeof(typename D::raw));
  // Rows a lane loads before computing any: 64 bytes in flight per lane (16 warps per SM then
  // keep ~32 kB per SM in flight, about what an H100/H200 needs to stream at full bandwidth).
  static constexpr int kUnroll = kRawBytes >= 64 ? 1 : 64 / kRawBytes;
  static constexpr int kRowStep = kThreads / G;  // rows the block covers per unrolled step
  static constexpr int kRowsPerIteration = kRowStep * kUnroll;
  // Blocks per SM the register budget is sized for: kBlocksPerSmSmallTiles (4: ≤ 64 registers, 32
  // warps per SM) while a lane holds up to 8 experts; 16 experts per lane (E > 256) need more
  // registers to stay free of spills.
  static constexpr int kMinBlocks = EPT <= 8 ? kBlocksPerSmSmallTiles : 2;
  static_assert(kRawBytes % 16 == 0, "a lane's slice of a row is whole 16-byte vectors");
  static_assert(G >= 1 && G <= 32 && (32 % G) == 0, "a row's lanes sit in one warp");
};

template <int G>
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
  for (int off = G / 2; off >= 1; off /= 2) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

// Butterfly: every lane of the group ends with the same value (a + b == b + a in IEEE).
template <int G>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int off = G / 2; off >= 1; off /= 2) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

__device__ __forceinline__ float warp_sum(float v) { return group_sum<32>(v); }

// Sum over the block in a fixed order; every thread gets the same value. `red` holds kWarps floats.
__device__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  __syncthreads();  // red may still be read by a previous call
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += red[w];
  return total;
}

#ifndef __CUDA_ARCH__
// The CPU emulation's stand-in for .ftz: a subnormal operand or result becomes a signed zero.
inline float flush_subnormal(float x) { return std::fabs(x) < 0x1p-126f ? std::copysign(0.f, x) : x; }
#endif

// 2^x as one MUFU.EX2 (ex2.approx.ftz). exp2f and __expf add a range check and two multiplies
// per call to return results below 2^-126 as denormals; here such a value (a probability under
// 1.2e-38) is 0 instead, as with Triton's exp2. The CPU emulation takes exp2f and flushes.
__device__ __forceinline__ float fast_exp2(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return flush_subnormal(exp2f(x));
#endif
}

// 1/x as one MUFU.RCP (rcp.approx.ftz, ≤ 1 ulp); 1.f / x is IEEE division (a fix-up path per
// call) and __fdividef adds a multiply. The CPU emulation divides and flushes.
__device__ __forceinline__ float fast_rcp(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return flush_subnormal(1.f / flush_subnormal(x));
#endif
}

// i, with everything the compiler knows about how it was computed hidden behind an empty asm.
// Applied to the row loop's row index (and the column stride), it keeps nvcc's loop strength
// reduction from turning every address the loop derives from it (U rows × mask, logits, gradient
// and, on the strided path, EPT columns) into its own 64-bit induction variable live across the
// loop: from compute_100 on, cicc did, and the pooling kernels spilled 72-600 bytes on every
// Blackwell architecture. Recomputing an address is a multiply-add in a loop bound by memory.
__device__ __forceinline__ int64_t opaque(int64_t i) {
#ifdef __CUDA_ARCH__
  asm("" : "+l"(i));
#endif
  return i;
}

__device__ __forceinline__ int64_t load_index(const void* p, int64_t i, int bytes) {
  return bytes == 8 ? static_cast<const int64_t*>(p)[i] : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
}

struct Slice {
  int64_t start, lo, hi;  // sequence start; rows [lo, hi) of this program
};

// Same slicing as _sequence_slice in the Triton kernels: contiguous chunks of whole iterations.
__device__ __forceinline__ Slice sequence_slice(const Segments& seg, int b, int split, int splits, int rows_per_iter) {
  int64_t start, end;
  if (seg.cu != nullptr) {
    // Clamped so malformed cu_seqlens (caught by check_segments) never address out of bounds.
    start = load_index(seg.cu, b * seg.cu_stride, seg.cu_bytes);
    end = load_index(seg.cu, (b + 1) * seg.cu_stride, seg.cu_bytes);
    start = min(max(start, int64_t{0}), seg.num_tokens);
    end = min(max(end, start), seg.num_tokens);
  } else {
    start = static_cast<int64_t>(b) * seg.seq_len;
    end = start + seg.seq_len;
  }
  const int64_t per_split = (end - start + splits - 1) / splits;
  const int64_t chunk = (per_split + rows_per_iter - 1) / rows_per_iter * rows_per_iter;
  Slice s;
  s.start = start;
  s.lo = start + split * chunk;
  s.hi = min(s.lo + chunk, end);
  return s;
}

// The raw bits of a row's mask element, read from one byte address whatever the mask's width
// (one address per row to compute, not one per width); the token is valid iff bits & mask_bits.
__device__ __forceinline__ uint64_t mask_word(const Segments& seg, int b, int64_t row, int64_t start) {
  const char* p = static_cast<const char*>(seg.mask) +
                  (static_cast<int64_t>(b) * seg.mask_sb + (row - start) * seg.mask_ss) * seg.mask_bytes;
  switch (seg.mask_bytes) {
    case 1: return *reinterpret_cast<const uint8_t*>(p);
    case 2: return *reinterpret_cast<const uint16_t*>(p);
    case 4: return *reinterpret_cast<const uint32_t*>(p);
    default: return *reinterpret_cast<const uint64_t*>(p);
  }
}

// One lane's EPT raw values of a row, columns [c0, c0 + EPT).
template <class D, int EPT>
__device__ __forceinline__ void load_row(typename D::raw (&v)[EPT], const typename D::raw* row, int c0, int E,
                                         int64_t col_stride, bool vector_io) {
  if (vector_io && c0 + EPT <= E) {
    const uint4* src = reinterpret_cast<const uint4*>(row + c0);
#pragma unroll
    for (int k = 0; k < EPT * static_cast<int>(sizeof(typename D::raw)) / 16; ++k) {
      const uint4 chunk = __ldg(src + k);
      memcpy(reinterpret_cast<char*>(v) + 16 * k, &chunk, 16);
    }
  } else {
    const int64_t step = opaque(col_stride);
    const typename D::raw* p = row + c0 * step;
#pragma unroll
    for (int j = 0; j < EPT; ++j, p += step) {
      if (c0 + j < E) v[j] = __ldg(p);
    }
  }
}

// The U rows of one lane in one loop iteration, rows r, r + kRowStep, ...: every row's mask word,
// then every row's logits, whatever the mask says (score_row forces masked rows to −∞); a row past
// the slice re-reads its last row (r < sl.hi holds for the first), so no load is conditional and
// the mask words are tested only after the last load: no load waits on another.
template <class D, class Tile>
__device__ __forceinline__ void load_rows(bool (&valid)[Tile::kUnroll], typename D::raw (&v)[Tile::kUnroll][Tile::kEpt],
                                          const typename D::raw* x, int64_t row_stride, int64_t col_stride,
                                          const Segments& seg, const Slice& sl, int b, int64_t r, int c0, int E,
                                          bool vector_io) {
  uint64_t bits[Tile::kUnroll];
#pragma unroll
  for (int u = 0; u < Tile::kUnroll; ++u) {
    bits[u] = seg.mask != nullptr ? mask_word(seg, b, min(r + u * Tile::kRowStep, sl.hi - 1), sl.start) : 0;
  }
#pragma unroll
  for (int u = 0; u < Tile::kUnroll; ++u) {
    load_row<D, Tile::kEpt>(v[u], x + min(r + u * Tile::kRowStep, sl.hi - 1) * row_stride, c0, E, col_stride, vector_io);
  }
#pragma unroll
  for (int u = 0; u < Tile::kUnroll; ++u) {
    valid[u] = r + u * Tile::kRowStep < sl.hi && (seg.mask == nullptr || (bits[u] & seg.mask_bits) != 0);
  }
}

// Score s and slope h of one row (see _score_parts in the Triton kernels): invalid rows and
// padded columns come out as s = h = 0. The logits are scaled by log2(e)/τ (logit_scale), so
// e^{z/τ} = 2^z' for the scaled z'. Both scores subtract the row maximum; the sigmoid's shift
// m = min(max z', 0) gives t = 2^{m−z'}, u = 1/(2^m + t) = σ(z/τ)·2^{−m} ≤ 1 (≥ ½ for the largest
// logit, so no 0/0 where every σ(z/τ) underflows) and σ(−z/τ) = t·u: one exponential and one
// reciprocal per element. Where t overflows (−∞ logits, padding) u = 0 and σ(−z/τ) is taken from
// min(t, 2^126), finite, so h = 0.
template <class D, int EPT, int G>
__device__ __forceinline__ void score_row(const typename D::raw (&v)[EPT], int c0, int E, bool valid, float scale,
                                          bool sigmoid, float (&s)[EPT], float (&h)[EPT]) {
  float z[EPT];
#pragma unroll
  for (int j = 0; j < EPT; ++j) z[j] = (valid && c0 + j < E) ? D::load(v[j]) * scale : -INFINITY;
  float m = -INFINITY;
#pragma unroll
  for (int j = 0; j < EPT; ++j) m = fmaxf(m, z[j]);
  // An invalid row is all −∞: its max is taken as 0 so exp2 gives 0, not NaN.
  const float row_max = group_max<G>(m);
  m = valid ? row_max : 0.f;
  float sum = 0.f;
  if (sigmoid) {
    m = fminf(m, 0.f);
    const float shift = fast_exp2(m);
#pragma unroll
    for (int j = 0; j < EPT; ++j) {
      const float t = fast_exp2(m - z[j]);
      s[j] = fast_rcp(shift + t);
      h[j] = fminf(t, 0x1p126f) * s[j];  // h holds h/s = σ(−z/τ) until s is normalised
      sum += s[j];
    }
  } else {
#pragma unroll
    for (int j = 0; j < EPT; ++j) {
      s[j] = fast_exp2(z[j] - m);
      h[j] = 1.f;  // h/s = 1 (written this way, ptxas keeps the backward free of spills at 64 registers)
      sum += s[j];
    }
  }
  const float total = group_sum<G>(sum);
  const float inv = valid ? fast_rcp(total) : 0.f;
#pragma unroll
  for (int j = 0; j < EPT; ++j) {
    s[j] *= inv;
    h[j] *= s[j];
  }
}

template <class D, class Tile>
__global__ void __launch_bounds__(kThreads, Tile::kMinBlocks) pool_routing_fwd(LayerTable table, Segments seg,
                                                             PoolShape shape, float* __restrict__ partial,
                                                             float* __restrict__ count) {
  constexpr int EPT = Tile::kEpt, G = Tile::kLanesPerRow, U = Tile::kUnroll;
  using raw = typename D::raw;
  __shared__ float red[kWarps][EPT * G];
  __shared__ float red_count[kWarps];
  const int li = blockIdx.x, b = blockIdx.y, split = blockIdx.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row_in = threadIdx.x / G;
  const int c0 = (threadIdx.x % G) * EPT;
  const int E = shape.num_experts;
  const Slice sl = sequence_slice(seg, b, split, shape.splits, Tile::kRowsPerIteration);
  const raw* x = static_cast<const raw*>(table.ptr[li]);
  const int64_t row_stride = table.row_stride[li], col_stride = table.col_stride[li];

  float acc[EPT];
#pragma unroll
  for (int j = 0; j < EPT; ++j) acc[j] = 0.f;
  float n_valid = 0.f;
#pragma unroll 1  // the unrolled rows already fill the registers; more would only cut occupancy
  for (int64_t r0 = sl.lo; r0 < sl.hi; r0 += Tile::kRowsPerIteration) {
    bool valid[U];
    raw v[U][EPT];
    load_rows<D, Tile>(valid, v, x, row_stride, col_stride, seg, sl, b, opaque(r0 + row_in), c0, E, shape.vector_io);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float s[EPT], h[EPT];
      score_row<D, EPT, G>(v[u], c0, E, valid[u], shape.logit_scale, shape.sigmoid, s, h);
#pragma unroll
      for (int j = 0; j < EPT; ++j) acc[j] += s[j];
      n_valid += (valid[u] && c0 == 0) ? 1.f : 0.f;
    }
  }

  // Lanes with the same columns (lane ≡ lane' mod G) first, then the warps in a fixed order.
#pragma unroll
  for (int j = 0; j < EPT; ++j) {
#pragma unroll
    for (int off = G; off < 32; off *= 2) acc[j] += __shfl_xor_sync(kFullMask, acc[j], off);
  }
  n_valid = warp_sum(n_valid);
  if (lane < G) {
#pragma unroll
    for (int j = 0; j < EPT; ++j) red[warp][c0 + j] = acc[j];
  }
  if (lane == 0) red_count[warp] = n_valid;
  __syncthreads();
  const int l = shape.layer_offset + li;
  const int B = seg.num_seqs;
  float* out = partial + ((static_cast<int64_t>(l) * B + b) * shape.splits + split) * E;
  for (int c = threadIdx.x; c < E; c += kThreads) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += red[w][c];
    out[c] = total;
  }
  if (l == 0 && threadIdx.x == 0) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += red_count[w];
    count[static_cast<int64_t>(b) * shape.splits + split] = total;
  }
}

template <class D, class Tile>
__global__ void __launch_bounds__(kThreads, Tile::kMinBlocks) pool_routing_bwd(LayerTable table, Segments seg,
                                                             PoolShape shape, PoolGrad grad) {
  constexpr int EPT = Tile::kEpt, G = Tile::kLanesPerRow, U = Tile::kUnroll;
  using raw = typename D::raw;
  const int li = blockIdx.x, b = blockIdx.y, split = blockIdx.z;
  const int l = shape.layer_offset + li;
  const int row_in = threadIdx.x / G;
  const int c0 = (threadIdx.x % G) * EPT;
  const int E = shape.num_experts;
  const Slice sl = sequence_slice(seg, b, split, shape.splits, Tile::kRowsPerIteration);
  const raw* x = static_cast<const raw*>(table.ptr[li]);
  const int64_t row_stride = table.row_stride[li], col_stride = table.col_stride[li];

  float coef[EPT];
  const float* coef_lb = grad.coef + static_cast<int64_t>(l) * grad.coef_sl + static_cast<int64_t>(b) * grad.coef_sb;
#pragma unroll
  for (int j = 0; j < EPT; ++j) coef[j] = c0 + j < E ? coef_lb[static_cast<int64_t>(c0 + j) * grad.coef_se] : 0.f;
  float c = grad.inv_tau;
  if (grad.normalize) c /= fmaxf(grad.count[static_cast<int64_t>(b) * grad.count_stride], 1.f);
  if (grad.scale != nullptr) {
    c *= grad.scale[static_cast<int64_t>(l) * grad.scale_sl + static_cast<int64_t>(b) * grad.scale_sb] *
         grad.layer_coef[l];
  }
  raw* out = static_cast<raw*>(grad.grad) + static_cast<int64_t>(l) * seg.num_tokens * E;

#pragma unroll 1  // the unrolled rows already fill the registers; more would only cut occupancy
  for (int64_t r0 = sl.lo; r0 < sl.hi; r0 += Tile::kRowsPerIteration) {
    bool valid[U];
    raw v[U][EPT];
    const int64_t r = opaque(r0 + row_in);
    load_rows<D, Tile>(valid, v, x, row_stride, col_stride, seg, sl, b, r, c0, E, shape.vector_io);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t row = r + u * Tile::kRowStep;
      float s[EPT], h[EPT];
      score_row<D, EPT, G>(v[u], c0, E, valid[u], shape.logit_scale, shape.sigmoid, s, h);
      // coef − ⟨s, coef⟩ cancels where the row's mass sits on experts of nearly equal coef, and
      // dot rounded to fp32 is off by eps·|dot|, far more than that difference: coef − dot is
      // exact there (Sterbenz) and ⟨s, coef − dot⟩ carries dot's rounding (as in the Triton backward).
      float dot = 0.f;
#pragma unroll
      for (int j = 0; j < EPT; ++j) dot += s[j] * coef[j];
      dot = group_sum<G>(dot);
      float residual = 0.f;
#pragma unroll
      for (int j = 0; j < EPT; ++j) residual += s[j] * (coef[j] - dot);
      residual = group_sum<G>(residual);
      raw dz[EPT];
#pragma unroll
      for (int j = 0; j < EPT; ++j) dz[j] = D::store(valid[u] ? c * h[j] * ((coef[j] - dot) - residual) : 0.f);
      if (row < sl.hi) {  // every row of the slice is written, invalid tokens with 0
        raw* dst = out + row * E + c0;
        if (grad.vector_store && c0 + EPT <= E) {
#pragma unroll
          for (int k = 0; k < Tile::kRawBytes / 16; ++k) {
            uint4 chunk;
            memcpy(&chunk, reinterpret_cast<const char*>(dz) + 16 * k, 16);
            reinterpret_cast<uint4*>(dst)[k] = chunk;
          }
        } else {
#pragma unroll
          for (int j = 0; j < EPT; ++j) {
            if (c0 + j < E) dst[j] = dz[j];
          }
        }
      }
    }
  }
}

// G = ½ log(p/M) with M = total/2, 0 where p = 0 (then s = 0 on every token, so G never matters
// there); p/M as 2p/total, since ½·total rounds to 0 where both P sit at the smallest subnormals.
__device__ __forceinline__ float half_log_ratio(float p, float total) {
  return p == 0.f ? 0.f : 0.5f * logf((p + p) / total);
}

// KL(p ‖ q) term with q floored at kQMin: gp = log(p/q) (∂KL/∂p less its constant 1, which the
// backward's centring removes), gq = −p/q (0 below the floor, whose derivative is 0), 0 where p = 0.
__device__ __forceinline__ void kl_parts(float p, float q, float& gp, float& gq, float& term) {
  const bool floored = q < kQMin;  // false for NaN, which propagates
  const float qf = floored ? kQMin : q;
  gp = p == 0.f ? 0.f : logf(p / qf);
  gq = floored ? 0.f : -p / qf;
  term = p * gp;
}

// One warp per (l, b).
__global__ void __launch_bounds__(32) pair_js_fwd(PairArgs a) {
  const int l = blockIdx.x, b = blockIdx.y, lane = threadIdx.x;
  const int B = a.num_seqs, E = a.num_experts;
  float n_t = 0.f, n_a = 1.f;
  for (int s = 0; s < a.t_splits; ++s) n_t += a.t_count[static_cast<int64_t>(b) * a.t_splits + s];
  if (a.priors == nullptr) {
    n_a = 0.f;
    for (int s = 0; s < a.a_splits; ++s) n_a += a.a_count[static_cast<int64_t>(b) * a.a_splits + s];
  }
  const bool valid = n_a > 0.f && n_t > 0.f;
  const float weight = !valid ? 0.f : a.pair_weights != nullptr ? a.pair_weights[b] : 1.f;
  const int64_t lb = static_cast<int64_t>(l) * B + b;
  float d = 0.f;
  for (int c = lane; c < E; c += 32) {
    float pt = 0.f;
    for (int s = 0; s < a.t_splits; ++s) pt += a.t_partial[(lb * a.t_splits + s) * E + c];
    pt /= fmaxf(n_t, 1.f);
    float pa;
    if (a.priors != nullptr) {
      pa = a.priors[l * a.prior_sl + b * a.prior_sb + c * a.prior_se];
    } else {
      pa = 0.f;
      for (int s = 0; s < a.a_splits; ++s) pa += a.a_partial[(lb * a.a_splits + s) * E + c];
      pa /= fmaxf(n_a, 1.f);
    }
    float ga, gt, term;
    if (a.divergence == kJS) {
      const float total = pa + pt;
      ga = half_log_ratio(pa, total);
      gt = half_log_ratio(pt, total);
      term = pa * ga + pt * gt;  // Σ_e ½ P log(P/M) = Σ_e P G; NaN in P stays NaN
    } else if (a.divergence == kKL) {
      kl_parts(pa, pt, ga, gt, term);
    } else {
      kl_parts(pt, pa, gt, ga, term);
    }
    d += term;
    a.ga[lb * E + c] = valid ? ga * weight : 0.f;
    a.gt[lb * E + c] = valid ? gt * weight : 0.f;
  }
  d = warp_sum(d);
  if (lane == 0) {
    a.js[lb] = valid ? d * weight : 0.f;
    if (l == 0) {
      a.stats[b] = n_a;
      a.stats[B + b] = n_t;
      a.stats[2 * B + b] = weight;
    }
  }
}

__device__ __forceinline__ float layer_weight(const ReduceArgs& a, int l) {
  if (a.weights == nullptr) return 1.f;
  const int64_t i = static_cast<int64_t>(l) * a.weight_stride;
  return a.weights_f64 ? static_cast<float>(static_cast<const double*>(a.weights)[i])
                       : static_cast<const float*>(a.weights)[i];
}

// One block: the loss, the per-layer weighted mean and k_l, in a fixed order (deterministic).
__global__ void __launch_bounds__(kThreads) reduce_pair_loss(ReduceArgs a) {
  __shared__ float red[kWarps];
  __shared__ float coef_scale;
  const int L = a.num_layers, B = a.num_seqs;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float v = 0.f;
  for (int b = threadIdx.x; b < B; b += kThreads) v += a.stats[2 * B + b];
  const float total_weight = block_sum(v, red);
  // No weight left: every π·D is 0, and so are the loss and (k_l = 0) the gradients.
  const float inv_valid = total_weight > 0.f ? 1.f / total_weight : 0.f;
  float w = 0.f;
  for (int l = threadIdx.x; l < L; l += kThreads) w += layer_weight(a, l);
  const float weight_sum = block_sum(w, red);
  // Σ_b π_b D_{l,b}, one warp per layer; kept in layer_coef until the loss is known.
  for (int l = warp; l < L; l += kWarps) {
    float t = 0.f;
    for (int b = lane; b < B; b += 32) t += a.js[static_cast<int64_t>(l) * B + b];
    t = warp_sum(t);
    if (lane == 0) {
      a.per_layer[l] = t * inv_valid;
      a.layer_coef[l] = t;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int l = 0; l < L; ++l) {
      const float js_sum = a.layer_coef[l];
      total += layer_weight(a, l) * (a.reduction == kMean ? js_sum * inv_valid : js_sum);
    }
    if (a.reduction == kMean) {
      const float inv_weight = a.weights != nullptr ? 1.f / weight_sum : 1.f / L;
      a.loss[0] = total * inv_weight;
      coef_scale = inv_weight * inv_valid;
    } else {
      if (a.reduction == kSum) a.loss[0] = total;
      coef_scale = 1.f;
    }
  }
  __syncthreads();
  for (int l = threadIdx.x; l < L; l += kThreads) {
    a.layer_coef[l] = a.reduction == kNone ? 1.f : layer_weight(a, l) * coef_scale;
  }
}

__global__ void __launch_bounds__(32) pooled_routing_fwd(const float* __restrict__ partial,
                                                         const float* __restrict__ count, float* __restrict__ probs,
                                                         float* __restrict__ total, int B, int E, int splits,
                                                         bool normalize) {
  const int l = blockIdx.x, b = blockIdx.y;
  const int64_t lb = static_cast<int64_t>(l) * B + b;
  float n = 0.f;
  for (int s = 0; s < splits; ++s) n += count[static_cast<int64_t>(b) * splits + s];
  for (int c = threadIdx.x; c < E; c += 32) {
    float sum = 0.f;
    for (int s = 0; s < splits; ++s) sum += partial[(lb * splits + s) * E + c];
    probs[lb * E + c] = normalize ? sum / fmaxf(n, 1.f) : sum;
  }
  if (l == 0 && threadIdx.x == 0) total[b] = n;
}

// Device-side check of cu_seqlens [B+1]: starts at 0, non-decreasing, ends at N. Reading the
// values on the host would be a sync on every step and illegal in a CUDA-graph capture.
__global__ void __launch_bounds__(kThreads) check_segments(Segments seg) {
  const int B = seg.num_seqs;
  if (threadIdx.x == 0) {
    const int64_t first = load_index(seg.cu, 0, seg.cu_bytes);
    const int64_t last = load_index(seg.cu, B * seg.cu_stride, seg.cu_bytes);
    assert(first == 0 && last == seg.num_tokens && "cu_seqlens must start at 0 and end at the token count N");
  }
  for (int i = threadIdx.x; i < B; i += kThreads) {
    const int64_t lo = load_index(seg.cu, i * seg.cu_stride, seg.cu_bytes);
    const int64_t hi = load_index(seg.cu, (i + 1) * seg.cu_stride, seg.cu_bytes);
    assert(hi >= lo && "cu_seqlens must be non-decreasing");
  }
}

// ---------------------------------------------------------------------------------------------
// Dispatch: element type × E_PAD, the one table of tile shapes.
// ---------------------------------------------------------------------------------------------

int padded_experts(int num_experts) {
  int e = 8;
  while (e < num_experts) e *= 2;
  return e;
}

// Calls f(D{}, Tile{}) for the dtype and E_PAD: G = E_PAD / (16 bytes of elements), at most 32.
template <class F>
cudaError_t with_tile(Dtype dtype, int num_experts, F&& f) {
  const int e_pad = padded_experts(num_experts);
  auto by_size = [&](auto d) -> cudaError_t {
    using D = decltype(d);
    constexpr int kVec = 16 / static_cast<int>(sizeof(typename D::raw));
    switch (e_pad) {
#define SARA_TILE(E_PAD)                                                                              \
  case E_PAD: {                                                                                       \
    constexpr int kG = (E_PAD / kVec) < 1 ? 1 : ((E_PAD / kVec) > 32 ? 32 : (E_PAD / kVec));          \
    return f(D{}, PoolTile<E_PAD / kG, kG, D>{});                                                     \
  }
      SARA_TILE(8)
      SARA_TILE(16)
      SARA_TILE(32)
      SARA_TILE(64)
      SARA_TILE(128)
      SARA_TILE(256)
      SARA_TILE(512)
#undef SARA_TILE
      default:
        return cudaErrorInvalidValue;
    }
  };
  switch (dtype) {
    case Dtype::kFloat32: return by_size(F32{});
    case Dtype::kFloat16: return by_size(F16{});
    case Dtype::kBFloat16: return by_size(BF16{});
  }
  return cudaErrorInvalidValue;
}

dim3 pool_grid(const Segments& seg, const PoolShape& shape) {
  return dim3(shape.num_layers, seg.num_seqs, shape.splits);
}

// cudaLaunchKernelEx, the typed launch API, rather than <<<...>>>: plain C++, which lets the
// kernels also be compiled and run by tests/cuda_emulation on a machine without a GPU.
template <class... Params, class... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, int threads, cudaStream_t stream, Args... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(threads);
  config.stream = stream;
  // The launch's own status: cudaGetLastError would also return (and clear) an error that an
  // earlier, unrelated call left behind, and blame it on this kernel.
  return cudaLaunchKernelEx(&config, kernel, args...);
}

}  // namespace

int pool_rows_per_iteration(Dtype dtype, int num_experts) {
  int rows = 0;
  with_tile(dtype, num_experts, [&](auto, auto tile) {
    rows = decltype(tile)::kRowsPerIteration;
    return cudaSuccess;
  });
  return rows;
}

cudaError_t launch_pool_routing_fwd(const LayerTable& table, const Segments& seg, const PoolShape& shape,
                                    float* partial, float* count, cudaStream_t stream) {
  return with_tile(shape.dtype, shape.num_experts, [&](auto d, auto tile) {
    return launch(pool_routing_fwd<decltype(d), decltype(tile)>, pool_grid(seg, shape), kThreads, stream, table, seg,
                  shape, partial, count);
  });
}

cudaError_t launch_pool_routing_bwd(const LayerTable& table, const Segments& seg, const PoolShape& shape,
                                    const PoolGrad& grad, cudaStream_t stream) {
  return with_tile(shape.dtype, shape.num_experts, [&](auto d, auto tile) {
    return launch(pool_routing_bwd<decltype(d), decltype(tile)>, pool_grid(seg, shape), kThreads, stream, table, seg,
                  shape, grad);
  });
}

cudaError_t launch_pair_js_fwd(const PairArgs& args, cudaStream_t stream) {
  return launch(pair_js_fwd, dim3(args.num_layers, args.num_seqs), 32, stream, args);
}

cudaError_t launch_reduce_pair_loss(const ReduceArgs& args, cudaStream_t stream) {
  return launch(reduce_pair_loss, dim3(1), kThreads, stream, args);
}

cudaError_t launch_pooled_routing_fwd(const float* partial, const float* count, float* probs, float* total,
                                      int num_layers, int num_seqs, int num_experts, int splits, bool normalize,
                                      cudaStream_t stream) {
  return launch(pooled_routing_fwd, dim3(num_layers, num_seqs), 32, stream, partial, count, probs, total, num_seqs,
                num_experts, splits, normalize);
}

cudaError_t launch_check_segments(const Segments& seg, cudaStream_t stream) {
  return launch(check_segments, dim3(1), kThreads, stream, seg);
}

}  // namespace sara
