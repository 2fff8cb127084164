// Interface between the host code (routing_js_ops.cpp, which knows torch) and the CUDA kernels
// (routing_js_kernels.cu, which does not): plain structs and launchers, so the kernels compile
// quickly and without torch's headers. The math is the one of sara_kernels/reference.py, with
// the symbols of sara_kernels/ops/routing_js.py (s, P, n_b, M, G, k_l).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace sara {

// Layers per launch of the pooling kernels: their addresses travel as a kernel argument (3 kB,
// below CUDA's 4 kB limit), so a tuple of layers needs no device-side pointer table, no
// host-to-device copy and nothing that breaks CUDA-graph capture. More layers: one launch per
// group of 128.
constexpr int kMaxLayersPerLaunch = 128;
constexpr int kMaxExperts = 512;
constexpr int kMaxSeqs = 65535;  // B is gridDim.y

enum class Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Layer i of a launch: logits at ptr[i] + row * row_stride[i] + col * col_stride[i] (elements).
struct LayerTable {
  const void* ptr[kMaxLayersPerLaunch];
  int64_t row_stride[kMaxLayersPerLaunch];
  int64_t col_stride[kMaxLayersPerLaunch];
};

// Which rows belong to which sequence (the RoutingSide of sara_kernels/_inputs.py): sequence b
// is rows [b*S, (b+1)*S) with mask[b, i] != 0 marking valid tokens, or rows
// [cu[b], cu[b+1]) all valid, or (neither) all N rows with B = 1.
struct Segments {
  const void* mask;      // [B, S] of any dtype, or nullptr
  int64_t mask_sb, mask_ss;
  int mask_bytes;        // element size of the mask
  uint64_t mask_bits;    // valid iff (raw bits & mask_bits) != 0: all bits for integers, all but the sign for floats
  const void* cu;        // [B+1] int32 or int64, or nullptr
  int64_t cu_stride;
  int cu_bytes;
  int64_t num_tokens;    // N
  int64_t seq_len;       // S (N when cu or neither)
  int num_seqs;          // B
};

struct PoolShape {
  Dtype dtype;
  int layer_offset;      // global index of the launch's first layer
  int num_layers;        // layers in this launch (<= kMaxLayersPerLaunch)
  int num_experts;
  int splits;            // slices per sequence (gridDim.z)
  float logit_scale;     // log2(e)/τ: see logit_scale()
  bool sigmoid;
  bool vector_io;        // every layer 16-byte aligned, unit column stride, row stride a multiple of 16 bytes
};

// What the pooling kernels multiply the logits by, for both scores: log2(e)/τ, so that every
// exponential they take (softmax's, and the sigmoid's e^{±z/τ}) is a single ex2.
inline float logit_scale(double temperature) { return static_cast<float>(1.4426950408889634 / temperature); }

// Backward of the pooling: ∂L/∂z = c · h ⊙ (G − ⟨s, G⟩), G = coef[l, b, :],
// c = g / (τ n_b) (normalize) or g / τ, g = scale[l, b] · layer_coef[l] (scale given) or 1.
struct PoolGrad {
  const float* coef;
  int64_t coef_sl, coef_sb, coef_se;
  const float* scale;       // nullptr: g = 1
  int64_t scale_sl, scale_sb;
  const float* layer_coef;  // read only when scale is given
  const float* count;       // n_b at count[b * count_stride]
  int64_t count_stride;
  bool normalize;
  void* grad;               // [L, N, E] contiguous, in the logits' dtype
  bool vector_store;        // E * element size is a multiple of 16 bytes
  float inv_tau;
};

enum Divergence : int { kJS = 0, kKL = 1, kReverseKL = 2 };

// The floor of a KL divergence's second distribution (reference.Q_MIN, the smallest normal float).
constexpr float kQMin = 1.17549435e-38f;

struct PairArgs {
  const float* a_partial;  // [L, B, a_splits, E], unused with priors
  const float* a_count;    // [B, a_splits]
  int a_splits;
  const float* t_partial;
  const float* t_count;
  int t_splits;
  const float* priors;     // [L, B, E] float32 with strides, or nullptr
  int64_t prior_sl, prior_sb, prior_se;
  const float* pair_weights;  // [B] float32 contiguous, or nullptr (every pair weighs 1)
  int divergence;          // Divergence
  float* js;               // [L, B]: π_b D_{l,b}
  float* ga;               // [L, B, E]: π_b G^a
  float* gt;
  float* stats;            // [3, B]: n^a, n^t, π (0 for an invalid pair)
  int num_layers, num_seqs, num_experts;
};

enum Reduction : int { kMean = 0, kSum = 1, kNone = 2 };

struct ReduceArgs {
  const float* js;
  const float* stats;
  const void* weights;     // [L] float32 or float64 with a stride, or nullptr
  bool weights_f64;
  int64_t weight_stride;
  float* loss;             // scalar (mean, sum); unused for none
  float* per_layer;        // [L]
  float* layer_coef;       // [L]: k_l
  int num_layers, num_seqs;
  int reduction;
};

// Rows one block covers per loop iteration (the slice granularity the host plans splits with).
int pool_rows_per_iteration(Dtype dtype, int num_experts);

// Slices per sequence: enough blocks for ~4 waves on sm_count SMs, never slices shorter than 4
// iterations of rows_per_iteration rows. The rule of sara_kernels/ops/contract.py num_splits
// (tests/ops/test_contract.py compares the two on a grid).
inline int split_rule(int64_t num_tokens, int64_t num_seqs, int64_t num_layers, int64_t sm_count,
                      int64_t rows_per_iteration) {
  const int64_t programs = num_layers * num_seqs;
  const int64_t wanted = (4 * sm_count + programs - 1) / programs;
  const int64_t rows_per_seq = (num_tokens + num_seqs - 1) / num_seqs;
  const int64_t useful = (rows_per_seq + 4 * rows_per_iteration - 1) / (4 * rows_per_iteration);
  int64_t splits = wanted < useful ? wanted : useful;
  splits = splits < 1024 ? splits : 1024;
  return static_cast<int>(splits > 1 ? splits : 1);
}

cudaError_t launch_pool_routing_fwd(const LayerTable& table, const Segments& seg, const PoolShape& shape,
                                    float* partial, float* count, cudaStream_t stream);
cudaError_t launch_pool_routing_bwd(const LayerTable& table, const Segments& seg, const PoolShape& shape,
                                    const PoolGrad& grad, cudaStream_t stream);
cudaError_t launch_pair_js_fwd(const PairArgs& args, cudaStream_t stream);
cudaError_t launch_reduce_pair_loss(const ReduceArgs& args, cudaStream_t stream);
cudaError_t launch_pooled_routing_fwd(const float* partial, const float* count, float* probs, float* total,
                                      int num_layers, int num_seqs, int num_experts, int splits, bool normalize,
                                      cudaStream_t stream);
cudaError_t launch_check_segments(const Segments& seg, cudaStream_t stream);

}  // namespace sara
