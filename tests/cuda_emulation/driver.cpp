// Runs the CUDA kernels of csrc/routing_js_kernels.cu on the CPU (see emulator.h) through the same
// sequence of launches as the host op (csrc/routing_js_ops.cpp): pool both sides, pair JS, reduce,
// pool backward. A C API for ctypes; tests/ops/test_cuda_emulation.py builds inputs, calls it and
// compares with the float64 reference.
#include "../../csrc/routing_js_kernels.cu"

namespace {

struct EmuSide {
  const void* logits;  // layer l, row n, column e at logits + l*layer_stride + n*row_stride + e*col_stride
  int64_t num_tokens, layer_stride, row_stride, col_stride;
  const void* mask;    // [B, S] or nullptr
  int mask_bytes, mask_float;
  int64_t mask_sb, mask_ss;
  const void* cu;      // [B+1] or nullptr
  int cu_bytes;
  int splits;
  void* grad;          // [L, N, E] contiguous in the logits' dtype, or nullptr (no gradient)
};

struct EmuCase {
  int dtype, num_layers, num_experts, num_seqs, sigmoid, reduction, layers_per_launch;
  double temperature;
  const float* priors;  // [L, B, E] contiguous or nullptr
  const void* weights;  // [L] or nullptr
  int weights_f64;
  const float* grad_loss;  // upstream gradient: one value, or [L, B] for reduction "none"
  EmuSide anchor, target;
  float* loss;       // 1 value, or [L, B] for "none"
  float* per_layer;  // [L]
  float* stats;      // [3, B]
};

int element_size(int dtype) { return dtype == 0 ? 4 : 2; }

sara::Segments segments(const EmuSide& s, int num_seqs) {
  sara::Segments seg{};
  seg.num_tokens = s.num_tokens;
  seg.seq_len = s.num_tokens;
  seg.num_seqs = num_seqs;
  if (s.mask != nullptr) {
    seg.mask = s.mask;
    seg.mask_sb = s.mask_sb;
    seg.mask_ss = s.mask_ss;
    seg.mask_bytes = s.mask_bytes;
    const uint64_t all = s.mask_bytes == 8 ? ~uint64_t{0} : (uint64_t{1} << (8 * s.mask_bytes)) - 1;
    seg.mask_bits = s.mask_float ? all & ~(uint64_t{1} << (8 * s.mask_bytes - 1)) : all;
    seg.seq_len = s.num_tokens / num_seqs;
  } else if (s.cu != nullptr) {
    seg.cu = s.cu;
    seg.cu_stride = 1;
    seg.cu_bytes = s.cu_bytes;
  }
  return seg;
}

// Calls f(table, shape) per group of layers_per_launch layers, as for_layer_groups does.
template <class F>
int for_groups(const EmuCase& c, const EmuSide& s, F&& f) {
  sara::PoolShape shape{};
  shape.dtype = static_cast<sara::Dtype>(c.dtype);
  shape.num_experts = c.num_experts;
  shape.splits = s.splits;
  shape.sigmoid = c.sigmoid != 0;
  shape.logit_scale = sara::logit_scale(c.temperature);
  const int64_t elem = element_size(c.dtype);
  for (int l0 = 0; l0 < c.num_layers; l0 += c.layers_per_launch) {
    const int count = std::min(c.layers_per_launch, c.num_layers - l0);
    sara::LayerTable table{};
    bool vector_io = true;
    for (int i = 0; i < count; ++i) {
      const char* ptr = static_cast<const char*>(s.logits) + (l0 + i) * s.layer_stride * elem;
      table.ptr[i] = ptr;
      table.row_stride[i] = s.row_stride;
      table.col_stride[i] = s.col_stride;
      vector_io = vector_io && s.col_stride == 1 && reinterpret_cast<uintptr_t>(ptr) % 16 == 0 &&
                  (s.row_stride * elem) % 16 == 0;
    }
    shape.layer_offset = l0;
    shape.num_layers = count;
    shape.vector_io = vector_io;
    if (f(table, shape) != cudaSuccess) return 1;
  }
  return 0;
}

}  // namespace

extern "C" int sara_emu_rows_per_iteration(int dtype, int num_experts) {
  return sara::pool_rows_per_iteration(static_cast<sara::Dtype>(dtype), num_experts);
}

extern "C" int sara_emu_run(const EmuCase* cp) {
  const EmuCase& c = *cp;
  const int L = c.num_layers, B = c.num_seqs, E = c.num_experts;
  const sara::Segments t_seg = segments(c.target, B), a_seg = segments(c.anchor, B);
  if (c.target.cu != nullptr && sara::launch_check_segments(t_seg, nullptr) != cudaSuccess) return 1;

  std::vector<float> t_partial(size_t(L) * B * c.target.splits * E), t_count(size_t(B) * c.target.splits);
  if (for_groups(c, c.target, [&](const sara::LayerTable& t, const sara::PoolShape& s) {
        return sara::launch_pool_routing_fwd(t, t_seg, s, t_partial.data(), t_count.data(), nullptr);
      }))
    return 2;
  sara::PairArgs pair{};
  pair.t_partial = t_partial.data();
  pair.t_count = t_count.data();
  pair.t_splits = c.target.splits;
  std::vector<float> a_partial, a_count;
  if (c.priors != nullptr) {
    pair.priors = c.priors;
    pair.prior_sl = int64_t(B) * E;
    pair.prior_sb = E;
    pair.prior_se = 1;
  } else {
    a_partial.resize(size_t(L) * B * c.anchor.splits * E);
    a_count.resize(size_t(B) * c.anchor.splits);
    if (for_groups(c, c.anchor, [&](const sara::LayerTable& t, const sara::PoolShape& s) {
          return sara::launch_pool_routing_fwd(t, a_seg, s, a_partial.data(), a_count.data(), nullptr);
        }))
      return 3;
    pair.a_partial = a_partial.data();
    pair.a_count = a_count.data();
    pair.a_splits = c.anchor.splits;
  }
  std::vector<float> js(size_t(L) * B), ga(size_t(L) * B * E), gt(size_t(L) * B * E);
  pair.js = js.data();
  pair.ga = ga.data();
  pair.gt = gt.data();
  pair.stats = c.stats;
  pair.num_layers = L;
  pair.num_seqs = B;
  pair.num_experts = E;
  if (sara::launch_pair_js_fwd(pair, nullptr) != cudaSuccess) return 4;

  std::vector<float> layer_coef(L);
  sara::ReduceArgs red{};
  red.js = js.data();
  red.stats = c.stats;
  red.weights = c.weights;
  red.weights_f64 = c.weights_f64 != 0;
  red.weight_stride = 1;
  red.loss = c.reduction == sara::kNone ? js.data() : c.loss;
  red.per_layer = c.per_layer;
  red.layer_coef = layer_coef.data();
  red.num_layers = L;
  red.num_seqs = B;
  red.reduction = c.reduction;
  if (sara::launch_reduce_pair_loss(red, nullptr) != cudaSuccess) return 5;
  if (c.reduction == sara::kNone) std::copy(js.begin(), js.end(), c.loss);

  auto backward = [&](const EmuSide& side, const sara::Segments& seg, const std::vector<float>& coef,
                      const float* count) {
    sara::PoolGrad g{};
    g.coef = coef.data();
    g.coef_sl = int64_t(B) * E;
    g.coef_sb = E;
    g.coef_se = 1;
    g.scale = c.grad_loss;
    g.scale_sl = c.reduction == sara::kNone ? B : 0;
    g.scale_sb = c.reduction == sara::kNone ? 1 : 0;
    g.layer_coef = layer_coef.data();
    g.count = count;
    g.count_stride = 1;
    g.normalize = true;
    g.grad = side.grad;
    g.vector_store = (int64_t(E) * element_size(c.dtype)) % 16 == 0;
    g.inv_tau = static_cast<float>(1.0 / c.temperature);
    return for_groups(c, side, [&](const sara::LayerTable& t, const sara::PoolShape& s) {
      return sara::launch_pool_routing_bwd(t, seg, s, g, nullptr);
    });
  };
  if (c.target.grad != nullptr && backward(c.target, t_seg, gt, c.stats + B)) return 6;
  if (c.anchor.grad != nullptr && backward(c.anchor, a_seg, ga, c.stats)) return 7;
  return 0;
}

// The status of a successful launch made while an earlier, unrelated call's error is pending: the
// launch wrapper must report its own launch, not that error.
extern "C" int sara_emu_launch_status_after_a_pending_error() {
  emulator_last_error = cudaErrorLaunchFailure;
  float partial[1] = {0.5f}, count[1] = {1.f}, probs[1], total[1];
  return static_cast<int>(sara::launch_pooled_routing_fwd(partial, count, probs, total, 1, 1, 1, 1, true, nullptr));
}
