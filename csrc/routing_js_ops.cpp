// The fused SARA op as native torch ops: argument handling, launch planning and autograd in C++,
// so a fwd+bwd call costs microseconds of CPU instead of the Python path's milliseconds.
//
// Ops (namespace sara_kernels, beside the Triton backend's Python-defined ops):
//   cuda_sara_loss(...) -> (loss, per_layer)          differentiable (C++ autograd Function)
//   cuda_sara_loss_fwd / cuda_sara_loss_bwd           the two halves, which torch.compile traces
//   cuda_routing_distribution(...) -> (P or sums, n)  differentiable
//   cuda_routing_distribution_fwd / _bwd
// The autograd Functions call the halves through the dispatcher, so under torch.compile the
// graph holds the halves (their fake implementations are registered in Python,
// sara_kernels/ops/cuda.py) and the backward is traced like any other op.
//
// Arguments are validated by sara_kernels' Python API before they get here (with messages that
// name the user's argument), except the per-layer checks of a tuple, which run here; the checks
// raise ValueError / TypeError as the Python ones do (TORCH_CHECK_VALUE / _TYPE), and also guard
// direct calls of torch.ops.sara_kernels.*.

#include <Python.h>

#include <mutex>
#include <tuple>
#include <unordered_map>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "routing_js.h"

// tests/conftest.py builds this file with SARA_KERNELS_EMULATED against a CPU stand-in
// of CUDA (tests/cuda_emulation/), so that the ops' argument handling, launches and autograd run
// on CPU tensors on machines without a GPU: the ops are then registered for the CPU.
#ifdef SARA_KERNELS_EMULATED
#define SARA_KERNELS_DEVICE CPU
#else
#define SARA_KERNELS_DEVICE CUDA
#endif

namespace sara {
namespace {

using at::Tensor;
using at::TensorList;
using c10::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr c10::DeviceType kDeviceType = c10::DeviceType::SARA_KERNELS_DEVICE;

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "sara_kernels CUDA backend: ", what, " failed: ", cudaGetErrorString(err));
}

// One side's logits: L tensors [N, E], or one [L, N, E] tensor (a one-element list).
struct Side {
  TensorList inputs;
  bool stacked;
  int64_t L, N, E;
  Dtype dtype;
};

Dtype kernel_dtype(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kHalf: return Dtype::kFloat16;
    case at::kBFloat16: return Dtype::kBFloat16;
    default: TORCH_CHECK_TYPE(false, name, ": the CUDA backend takes float32, bfloat16 or float16 logits, got ", t);
  }
}

Side describe(TensorList logits, const char* name) {
  TORCH_CHECK_VALUE(!logits.empty(), name, ": expected at least one layer");
  const Tensor& first = logits[0];
  Side side{logits, logits.size() == 1 && first.dim() == 3, 0, 0, 0, kernel_dtype(first.scalar_type(), name)};
  if (side.stacked) {
    side.L = first.size(0);
    side.N = first.size(1);
    side.E = first.size(2);
  } else {
    // The Python API leaves these per-layer checks of a tuple to this loop (a Python loop costs
    // far more per layer; benchmarks/host_cost.py measures it), so the messages are those of
    // sara_kernels/_inputs.py's _check_layers.
    side.L = static_cast<int64_t>(logits.size());
    for (size_t i = 0; i < logits.size(); ++i) {
      const Tensor& t = logits[i];
      TORCH_CHECK_VALUE(t.dim() == 2, name, "[", i, "]: expected a [N, E] tensor, got shape ", t.sizes());
      TORCH_CHECK_VALUE(t.device() == first.device(), name, "[", i, "] is on ", t.device(), ", ", name, "[0] on ",
                        first.device(), ": all layers must share a device");
      TORCH_CHECK_TYPE(t.scalar_type() == first.scalar_type(), name, "[", i, "] has dtype ", t.scalar_type(), ", ",
                       name, "[0] ", first.scalar_type(), ": all layers must share a dtype");
      TORCH_CHECK_VALUE(t.size(1) == first.size(1), name, "[", i, "] has E = ", t.size(1), " experts, ", name,
                        "[0] has E = ", first.size(1), ": E must match across layers");
      TORCH_CHECK_VALUE(t.size(0) == first.size(0), name, "[", i, "] has N = ", t.size(0), " tokens, ", name,
                        "[0] has N = ", first.size(0), ": N must match across layers");
    }
    side.N = first.size(0);
    side.E = first.size(1);
  }
  TORCH_CHECK_VALUE(first.device().type() == kDeviceType, name, ": the CUDA backend needs ", kDeviceType,
                    " tensors, got ", first.device());
  TORCH_CHECK_VALUE(side.L >= 1, name, ": expected at least one layer");
  TORCH_CHECK_VALUE(side.E >= 1 && side.E <= kMaxExperts, name, ": the CUDA backend supports 1 to ", kMaxExperts,
                    " experts, got E = ", side.E);
  return side;
}

// Rows of a side -> sequences. `keep` holds a converted cu_seqlens alive for the launches.
void check_device(const Tensor& t, const Tensor& logits, const char* name, const char* what) {
  TORCH_CHECK_VALUE(t.device() == logits.device(), name, what, " is on ", t.device(), " but the logits are on ",
                    logits.device());
}

Segments segments(const optional<Tensor>& mask, const optional<Tensor>& cu, const Tensor& logits, int64_t num_tokens,
                  const char* name, Tensor& keep) {
  Segments seg{};
  seg.num_tokens = num_tokens;
  seg.seq_len = num_tokens;
  seg.num_seqs = 1;
  TORCH_CHECK_VALUE(!(mask.has_value() && cu.has_value()), name, ": give a mask or cu_seqlens, not both");
  if (mask.has_value()) {
    const Tensor& m = *mask;
    check_device(m, logits, name, "_mask");
    TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) * m.size(1) == num_tokens && m.size(0) >= 1, name,
                      "_mask: expected [B, S] with B*S = N = ", num_tokens, ", got ", m.sizes());
    seg.mask = m.data_ptr();
    seg.mask_sb = m.stride(0);
    seg.mask_ss = m.stride(1);
    seg.mask_bytes = static_cast<int>(m.element_size());
    TORCH_CHECK_TYPE(seg.mask_bytes == 1 || seg.mask_bytes == 2 || seg.mask_bytes == 4 || seg.mask_bytes == 8, name,
                     "_mask: unsupported dtype ", m.scalar_type());
    const uint64_t all = seg.mask_bytes == 8 ? ~uint64_t{0} : (uint64_t{1} << (8 * seg.mask_bytes)) - 1;
    const uint64_t sign = uint64_t{1} << (8 * seg.mask_bytes - 1);
    // A float mask is valid where != 0, so -0.0 is not valid: ignore the sign bit.
    seg.mask_bits = m.is_floating_point() ? all & ~sign : all;
    seg.num_seqs = static_cast<int>(m.size(0));
    seg.seq_len = m.size(1);
  } else if (cu.has_value()) {
    keep = *cu;
    check_device(keep, logits, name, "_cu_seqlens");
    if (keep.scalar_type() != at::kInt && keep.scalar_type() != at::kLong) keep = keep.to(at::kLong);
    TORCH_CHECK_VALUE(keep.dim() == 1 && keep.numel() >= 2, name, "_cu_seqlens: expected [B+1] with B >= 1, got ",
                      keep.sizes());
    seg.cu = keep.data_ptr();
    seg.cu_stride = keep.stride(0);
    seg.cu_bytes = static_cast<int>(keep.element_size());
    seg.num_seqs = static_cast<int>(keep.numel() - 1);
  }
  TORCH_CHECK_VALUE(seg.num_seqs <= kMaxSeqs, name, ": the CUDA backend supports up to ", kMaxSeqs,
                    " sequences per call, got B = ", seg.num_seqs);
  return seg;
}

// Asked once per device. The autograd engine runs the backward in one thread per device, so the
// cache is shared between threads (a mutex, uncontended after the first call), and every device
// index has an entry of its own.
int sm_count(int device) {
  static std::mutex mutex;
  static std::unordered_map<int, int> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = cache.find(device);
  if (found != cache.end()) return found->second;
  int count = 0;
  check_cuda(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), "SM count");
  cache.emplace(device, count);
  return count;
}

int num_splits(const Side& side, const Segments& seg, int device) {
  return split_rule(side.N, seg.num_seqs, side.L, sm_count(device),
                    pool_rows_per_iteration(side.dtype, static_cast<int>(side.E)));
}

// Launches f(table, shape) once per group of kMaxLayersPerLaunch layers.
template <class F>
void for_layer_groups(const Side& side, int splits, bool sigmoid, double temperature, F&& f) {
  const Tensor& first = side.inputs[0];
  const int64_t elem = first.element_size();
  PoolShape shape{};
  shape.dtype = side.dtype;
  shape.num_experts = static_cast<int>(side.E);
  shape.splits = splits;
  shape.sigmoid = sigmoid;
  shape.logit_scale = logit_scale(temperature);
  for (int64_t l0 = 0; l0 < side.L; l0 += kMaxLayersPerLaunch) {
    const int count = static_cast<int>(std::min<int64_t>(kMaxLayersPerLaunch, side.L - l0));
    LayerTable table;
    bool vector_io = true;
    for (int i = 0; i < count; ++i) {
      const char* ptr;
      int64_t row_stride, col_stride;
      if (side.stacked) {
        ptr = static_cast<const char*>(first.data_ptr()) + (l0 + i) * first.stride(0) * elem;
        row_stride = first.stride(1);
        col_stride = first.stride(2);
      } else {
        const Tensor& t = side.inputs[l0 + i];
        ptr = static_cast<const char*>(t.data_ptr());
        row_stride = t.stride(0);
        col_stride = t.stride(1);
      }
      table.ptr[i] = ptr;
      table.row_stride[i] = row_stride;
      table.col_stride[i] = col_stride;
      vector_io = vector_io && col_stride == 1 && reinterpret_cast<uintptr_t>(ptr) % 16 == 0 &&
                  (row_stride * elem) % 16 == 0;
    }
    shape.layer_offset = static_cast<int>(l0);
    shape.num_layers = count;
    shape.vector_io = vector_io;
    f(table, shape);
  }
}

bool is_sigmoid(c10::string_view score) {
  TORCH_CHECK_VALUE(score == "softmax" || score == "sigmoid", "score: expected 'softmax' or 'sigmoid', got '", score,
                    "'");
  return score == "sigmoid";
}

int64_t reduction_code(c10::string_view reduction) {
  if (reduction == "mean") return kMean;
  if (reduction == "sum") return kSum;
  TORCH_CHECK_VALUE(reduction == "none", "reduction: expected 'mean', 'sum' or 'none', got '", reduction, "'");
  return kNone;
}

int divergence_code(c10::string_view divergence) {
  if (divergence == "js") return kJS;
  if (divergence == "kl") return kKL;
  TORCH_CHECK_VALUE(divergence == "reverse_kl", "divergence: expected 'js', 'kl' or 'reverse_kl', got '", divergence,
                    "'");
  return kReverseKL;
}

at::TensorOptions f32(const Tensor& like) { return like.options().dtype(at::kFloat); }

// Σ s over each slice: (partial [L, B, splits, E], count [B, splits]).
std::tuple<Tensor, Tensor> pool_fwd(const Side& side, const Segments& seg, bool sigmoid, double temperature,
                                    cudaStream_t stream) {
  const int device = side.inputs[0].get_device();
  const int splits = num_splits(side, seg, device);
  Tensor partial = at::empty({side.L, seg.num_seqs, splits, side.E}, f32(side.inputs[0]));
  Tensor count = at::empty({seg.num_seqs, splits}, f32(side.inputs[0]));
  if (seg.cu != nullptr) check_cuda(launch_check_segments(seg, stream), "check_segments");
  for_layer_groups(side, splits, sigmoid, temperature, [&](const LayerTable& table, const PoolShape& shape) {
    check_cuda(launch_pool_routing_fwd(table, seg, shape, partial.data_ptr<float>(), count.data_ptr<float>(), stream),
               "pool_routing_fwd");
  });
  return {partial, count};
}

// ∂L/∂z [L, N, E] in the logits' dtype for the coefficients in `grad` (grad.grad is filled in here).
Tensor pool_bwd(const Side& side, const Segments& seg, bool sigmoid, double temperature, PoolGrad grad,
                cudaStream_t stream) {
  const int device = side.inputs[0].get_device();
  Tensor out = at::empty({side.L, side.N, side.E}, side.inputs[0].options());
  grad.grad = out.data_ptr();
  grad.vector_store = (side.E * out.element_size()) % 16 == 0;
  grad.inv_tau = static_cast<float>(1.0 / temperature);
  const int splits = num_splits(side, seg, device);
  for_layer_groups(side, splits, sigmoid, temperature, [&](const LayerTable& table, const PoolShape& shape) {
    check_cuda(launch_pool_routing_bwd(table, seg, shape, grad, stream), "pool_routing_bwd");
  });
  return out;
}

cudaStream_t current_stream(const Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.get_device()).stream(); }

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> sara_loss_fwd(
    TensorList anchor, TensorList target, const optional<Tensor>& anchor_mask,
    const optional<Tensor>& anchor_cu_seqlens, const optional<Tensor>& target_mask,
    const optional<Tensor>& target_cu_seqlens, const optional<Tensor>& anchor_probs,
    const optional<Tensor>& layer_weights, const optional<Tensor>& pair_weights, c10::string_view score,
    double temperature, c10::string_view reduction_name, c10::string_view divergence) {
  TORCH_CHECK_VALUE(temperature > 0, "temperature: expected > 0, got ", temperature);
  const bool sigmoid = is_sigmoid(score);
  const int64_t reduction = reduction_code(reduction_name);
  const int divergence_id = divergence_code(divergence);
  const Side t = describe(target, "target_logits");
  const c10::cuda::CUDAGuard guard(target[0].device());
  const cudaStream_t stream = current_stream(target[0]);
  Tensor t_cu, a_cu;
  const Segments t_seg = segments(target_mask, target_cu_seqlens, target[0], t.N, "target", t_cu);
  const int64_t L = t.L, B = t_seg.num_seqs, E = t.E;
  auto [t_partial, t_count] = pool_fwd(t, t_seg, sigmoid, temperature, stream);

  PairArgs pair{};
  pair.t_partial = t_partial.data_ptr<float>();
  pair.t_count = t_count.data_ptr<float>();
  pair.t_splits = static_cast<int>(t_partial.size(2));
  Tensor a_partial, a_count, priors;
  if (anchor_probs.has_value()) {
    priors = *anchor_probs;
    check_device(priors, target[0], "anchor_probs", "");
    TORCH_CHECK_VALUE(priors.dim() == 3 && priors.size(0) == L && priors.size(1) == B && priors.size(2) == E,
                      "anchor_probs: expected [L, B, E] = [", L, ", ", B, ", ", E, "], got ", priors.sizes());
    if (priors.scalar_type() != at::kFloat) priors = priors.to(at::kFloat);
    pair.priors = priors.data_ptr<float>();
    pair.prior_sl = priors.stride(0);
    pair.prior_sb = priors.stride(1);
    pair.prior_se = priors.stride(2);
  } else {
    const Side a = describe(anchor, "anchor_logits");
    check_device(anchor[0], target[0], "anchor_logits", "");
    const Segments a_seg = segments(anchor_mask, anchor_cu_seqlens, anchor[0], a.N, "anchor", a_cu);
    TORCH_CHECK_VALUE(a.L == L && a.E == E && a_seg.num_seqs == B,
                      "anchor and target sides must have the same L, E and number of sequences B");
    std::tie(a_partial, a_count) = pool_fwd(a, a_seg, sigmoid, temperature, stream);
    pair.a_partial = a_partial.data_ptr<float>();
    pair.a_count = a_count.data_ptr<float>();
    pair.a_splits = static_cast<int>(a_partial.size(2));
  }
  Tensor pair_w;
  if (pair_weights.has_value()) {
    // Values (finite, >= 0) are checked by the caller without a host sync (sara_kernels._inputs).
    pair_w = *pair_weights;
    check_device(pair_w, target[0], "pair_weights", "");
    TORCH_CHECK_VALUE(pair_w.dim() == 1 && pair_w.size(0) == B, "pair_weights: expected [B] = [", B, "], got ",
                      pair_w.sizes());
    pair_w = pair_w.to(at::kFloat).contiguous();
    pair.pair_weights = pair_w.data_ptr<float>();
  }
  pair.divergence = divergence_id;
  const auto opts = f32(target[0]);
  Tensor js = at::empty({L, B}, opts), ga = at::empty({L, B, E}, opts), gt = at::empty({L, B, E}, opts);
  Tensor stats = at::empty({3, B}, opts);
  pair.js = js.data_ptr<float>();
  pair.ga = ga.data_ptr<float>();
  pair.gt = gt.data_ptr<float>();
  pair.stats = stats.data_ptr<float>();
  pair.num_layers = static_cast<int>(L);
  pair.num_seqs = static_cast<int>(B);
  pair.num_experts = static_cast<int>(E);
  check_cuda(launch_pair_js_fwd(pair, stream), "pair_js_fwd");

  Tensor per_layer = at::empty({L}, opts), layer_coef = at::empty({L}, opts);
  Tensor loss = reduction == kNone ? js : at::empty({}, opts);
  Tensor weights;
  ReduceArgs red{};
  if (layer_weights.has_value()) {
    weights = *layer_weights;
    check_device(weights, target[0], "layer_weights", "");
    TORCH_CHECK_VALUE(weights.dim() == 1 && weights.size(0) == L, "layer_weights: expected [L] = [", L, "], got ",
                      weights.sizes());
    if (weights.scalar_type() != at::kFloat && weights.scalar_type() != at::kDouble) weights = weights.to(at::kFloat);
    red.weights = weights.data_ptr();
    red.weights_f64 = weights.scalar_type() == at::kDouble;
    red.weight_stride = weights.stride(0);
  }
  red.js = js.data_ptr<float>();
  red.stats = stats.data_ptr<float>();
  red.loss = loss.data_ptr<float>();
  red.per_layer = per_layer.data_ptr<float>();
  red.layer_coef = layer_coef.data_ptr<float>();
  red.num_layers = static_cast<int>(L);
  red.num_seqs = static_cast<int>(B);
  red.reduction = static_cast<int>(reduction);
  check_cuda(launch_reduce_pair_loss(red, stream), "reduce_pair_loss");
  return {loss, per_layer, ga, gt, stats, layer_coef};
}

// The backward's coefficients ∂L/∂P = coef [L, B, E] (float32, any strides) and n_b at
// count[b * count_stride]; without a scale (set by the pair backward) g = 1.
PoolGrad pool_grad(const Tensor& coef, const float* count, int64_t count_stride, bool normalize) {
  PoolGrad g{};
  g.coef = coef.data_ptr<float>();
  g.coef_sl = coef.stride(0);
  g.coef_sb = coef.stride(1);
  g.coef_se = coef.stride(2);
  g.count = count;
  g.count_stride = count_stride;
  g.normalize = normalize;
  return g;
}

// grad of one side of the pair: scale = ∂L/∂loss broadcast to [L, B], coefficients G, n_b in `count`.
Tensor pair_side_bwd(const Side& side, const Segments& seg, const Tensor& coef, const Tensor& scale,
                     const Tensor& layer_coef, const float* count, bool sigmoid, double temperature,
                     cudaStream_t stream) {
  PoolGrad g = pool_grad(coef, count, 1, true);
  g.scale = scale.data_ptr<float>();
  g.scale_sl = scale.stride(0);
  g.scale_sb = scale.stride(1);
  g.layer_coef = layer_coef.data_ptr<float>();
  return pool_bwd(side, seg, sigmoid, temperature, g, stream);
}

std::tuple<Tensor, Tensor> sara_loss_bwd(const Tensor& grad_loss, TensorList anchor, TensorList target,
                                         const optional<Tensor>& anchor_mask,
                                         const optional<Tensor>& anchor_cu_seqlens,
                                         const optional<Tensor>& target_mask,
                                         const optional<Tensor>& target_cu_seqlens, const Tensor& ga,
                                         const Tensor& gt, const Tensor& stats, const Tensor& layer_coef,
                                         c10::string_view score, double temperature, bool anchor_grad) {
  const bool sigmoid = is_sigmoid(score);
  const Side t = describe(target, "target_logits");
  const c10::cuda::CUDAGuard guard(target[0].device());
  const cudaStream_t stream = current_stream(target[0]);
  Tensor t_cu, a_cu;
  const Segments t_seg = segments(target_mask, target_cu_seqlens, target[0], t.N, "target", t_cu);
  const int64_t B = t_seg.num_seqs;
  for (const Tensor* x : {&grad_loss, &ga, &gt, &stats, &layer_coef}) {
    check_device(*x, target[0], "sara_loss_bwd", " input");
  }
  // A scalar upstream gradient becomes a [L, B] view with zero strides: no copy.
  Tensor scale = grad_loss.scalar_type() == at::kFloat ? grad_loss : grad_loss.to(at::kFloat);
  scale = scale.expand({t.L, B});
  const float* counts = stats.data_ptr<float>();
  Tensor grad_t = pair_side_bwd(t, t_seg, gt, scale, layer_coef, counts + B, sigmoid, temperature, stream);
  if (!anchor_grad) return {at::empty({0}, grad_loss.options()), grad_t};  // as the fake implementation
  const Side a = describe(anchor, "anchor_logits");
  check_device(anchor[0], target[0], "anchor_logits", "");
  const Segments a_seg = segments(anchor_mask, anchor_cu_seqlens, anchor[0], a.N, "anchor", a_cu);
  Tensor grad_a = pair_side_bwd(a, a_seg, ga, scale, layer_coef, counts, sigmoid, temperature, stream);
  return {grad_a, grad_t};
}

std::tuple<Tensor, Tensor> routing_distribution_fwd(TensorList logits, const optional<Tensor>& mask,
                                                    const optional<Tensor>& cu_seqlens, c10::string_view score,
                                                    double temperature, bool normalize) {
  TORCH_CHECK_VALUE(temperature > 0, "temperature: expected > 0, got ", temperature);
  const bool sigmoid = is_sigmoid(score);
  const Side side = describe(logits, "logits");
  const c10::cuda::CUDAGuard guard(logits[0].device());
  const cudaStream_t stream = current_stream(logits[0]);
  Tensor cu;
  const Segments seg = segments(mask, cu_seqlens, logits[0], side.N, "routing", cu);
  auto [partial, count] = pool_fwd(side, seg, sigmoid, temperature, stream);
  const auto opts = f32(logits[0]);
  Tensor probs = at::empty({side.L, seg.num_seqs, side.E}, opts);
  Tensor total = at::empty({seg.num_seqs}, opts);
  check_cuda(launch_pooled_routing_fwd(partial.data_ptr<float>(), count.data_ptr<float>(), probs.data_ptr<float>(),
                                       total.data_ptr<float>(), static_cast<int>(side.L), seg.num_seqs,
                                       static_cast<int>(side.E), static_cast<int>(partial.size(2)), normalize,
                                       stream),
             "pooled_routing_fwd");
  return {probs, total};
}

Tensor routing_distribution_bwd(const Tensor& grad_probs, TensorList logits, const optional<Tensor>& mask,
                                const optional<Tensor>& cu_seqlens, const Tensor& count, c10::string_view score,
                                double temperature, bool normalize) {
  const bool sigmoid = is_sigmoid(score);
  const Side side = describe(logits, "logits");
  const c10::cuda::CUDAGuard guard(logits[0].device());
  const cudaStream_t stream = current_stream(logits[0]);
  Tensor cu;
  const Segments seg = segments(mask, cu_seqlens, logits[0], side.N, "routing", cu);
  const Tensor coef = grad_probs.scalar_type() == at::kFloat ? grad_probs : grad_probs.to(at::kFloat);
  TORCH_CHECK_VALUE(coef.dim() == 3 && coef.size(0) == side.L && coef.size(1) == seg.num_seqs && coef.size(2) == side.E,
                    "grad_probs: expected [L, B, E], got ", coef.sizes());
  check_device(coef, logits[0], "grad_probs", "");
  check_device(count, logits[0], "count", "");
  const Tensor n = count.scalar_type() == at::kFloat ? count : count.to(at::kFloat);
  const PoolGrad grad = pool_grad(coef, n.data_ptr<float>(), n.stride(0), normalize);
  return pool_bwd(side, seg, sigmoid, temperature, grad, stream);
}

// ---------------------------------------------------------------------------------------------
// Autograd: one Function per op, calling the halves through the dispatcher.
// ---------------------------------------------------------------------------------------------

c10::OperatorHandle op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

// The gradient in the form the side was given: the [L, N, E] buffer, or its per-layer views.
void append_side_grads(variable_list& out, const Tensor& grad, int64_t count, bool stacked, bool wanted) {
  if (!wanted) {
    out.insert(out.end(), count, Tensor());
  } else if (stacked) {
    out.push_back(grad);
  } else {
    for (Tensor& g : grad.unbind(0)) out.push_back(std::move(g));
  }
}

void refuse_double_backward() {
  // The backward launches kernels autograd cannot see through: a second derivative would come
  // out as zero, so it fails instead (torch.compile traces backward with grad mode off).
  TORCH_CHECK(!at::GradMode::is_enabled(),
              "sara_kernels: the CUDA backend does not support double backward (create_graph=True); "
              "use backend='reference'");
}

class SaraLossFunction : public torch::autograd::Function<SaraLossFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, TensorList anchor, TensorList target,
                               const optional<Tensor>& anchor_mask, const optional<Tensor>& anchor_cu_seqlens,
                               const optional<Tensor>& target_mask, const optional<Tensor>& target_cu_seqlens,
                               const optional<Tensor>& anchor_probs, const optional<Tensor>& layer_weights,
                               const optional<Tensor>& pair_weights, c10::string_view score, double temperature,
                               bool detach_anchor, c10::string_view reduction, c10::string_view divergence) {
    static const auto fwd =
        op_handle("sara_kernels::cuda_sara_loss_fwd")
            .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
                TensorList, TensorList, const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&,
                const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&,
                c10::string_view, double, c10::string_view, c10::string_view)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, per_layer, ga, gt, stats, layer_coef] =
        fwd.call(anchor, target, anchor_mask, anchor_cu_seqlens, target_mask, target_cu_seqlens, anchor_probs,
                 layer_weights, pair_weights, score, temperature, reduction, divergence);
    bool anchor_grad = false;
    if (!detach_anchor) {
      for (const Tensor& t : anchor) anchor_grad = anchor_grad || t.requires_grad();
    }
    ctx->saved_data["num_anchor"] = static_cast<int64_t>(anchor.size());
    ctx->saved_data["anchor_grad"] = anchor_grad;
    ctx->saved_data["anchor_stacked"] = anchor.size() == 1 && anchor[0].dim() == 3;
    ctx->saved_data["target_stacked"] = target.size() == 1 && target[0].dim() == 3;
    ctx->saved_data["score"] = std::string(score);
    ctx->saved_data["temperature"] = temperature;
    // The logits the backward reads are saved (not only referenced) so that autograd's version
    // check catches an in-place change before the backward recomputes the scores from them.
    variable_list saved{ga, gt, stats, layer_coef, anchor_mask.value_or(Tensor()), anchor_cu_seqlens.value_or(Tensor()),
                        target_mask.value_or(Tensor()), target_cu_seqlens.value_or(Tensor())};
    if (anchor_grad) saved.insert(saved.end(), anchor.begin(), anchor.end());
    saved.insert(saved.end(), target.begin(), target.end());
    ctx->save_for_backward(std::move(saved));
    ctx->mark_non_differentiable({per_layer});
    ctx->set_materialize_grads(false);
    return {loss, per_layer};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const int64_t num_anchor = ctx->saved_data["num_anchor"].toInt();
    const bool anchor_grad = ctx->saved_data["anchor_grad"].toBool();
    variable_list saved = ctx->get_saved_variables();
    const int64_t num_target = static_cast<int64_t>(saved.size()) - 8 - (anchor_grad ? num_anchor : 0);
    variable_list out;
    const Tensor& grad_loss = grads[0];
    if (!grad_loss.defined()) {  // only the non-differentiable per_layer was used
      out.resize(num_anchor + num_target + 12);
      return out;
    }
    refuse_double_backward();
    static const auto bwd =
        op_handle("sara_kernels::cuda_sara_loss_bwd")
            .typed<std::tuple<Tensor, Tensor>(const Tensor&, TensorList, TensorList, const optional<Tensor>&,
                                              const optional<Tensor>&, const optional<Tensor>&,
                                              const optional<Tensor>&, const Tensor&, const Tensor&, const Tensor&,
                                              const Tensor&, c10::string_view, double, bool)>();
    auto opt = [](const Tensor& t) { return t.defined() ? optional<Tensor>(t) : optional<Tensor>(); };
    const std::vector<Tensor> anchor(saved.begin() + 8, saved.begin() + 8 + (anchor_grad ? num_anchor : 0));
    const std::vector<Tensor> target(saved.end() - num_target, saved.end());
    auto [grad_a, grad_t] = bwd.call(grad_loss, anchor, target, opt(saved[4]), opt(saved[5]), opt(saved[6]),
                                     opt(saved[7]), saved[0], saved[1], saved[2], saved[3],
                                     ctx->saved_data["score"].toStringRef(),
                                     ctx->saved_data["temperature"].toDouble(), anchor_grad);
    append_side_grads(out, grad_a, num_anchor, ctx->saved_data["anchor_stacked"].toBool(), anchor_grad);
    append_side_grads(out, grad_t, num_target, ctx->saved_data["target_stacked"].toBool(), true);
    out.resize(out.size() + 12);  // masks, cu_seqlens, priors, both weights and the five options
    return out;
  }
};

class RoutingDistributionFunction : public torch::autograd::Function<RoutingDistributionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, TensorList logits, const optional<Tensor>& mask,
                               const optional<Tensor>& cu_seqlens, c10::string_view score, double temperature,
                               bool normalize) {
    static const auto fwd =
        op_handle("sara_kernels::cuda_routing_distribution_fwd")
            .typed<std::tuple<Tensor, Tensor>(TensorList, const optional<Tensor>&, const optional<Tensor>&,
                                              c10::string_view, double, bool)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [probs, count] = fwd.call(logits, mask, cu_seqlens, score, temperature, normalize);
    ctx->saved_data["stacked"] = logits.size() == 1 && logits[0].dim() == 3;
    ctx->saved_data["score"] = std::string(score);
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["normalize"] = normalize;
    variable_list saved{count, mask.value_or(Tensor()), cu_seqlens.value_or(Tensor())};
    saved.insert(saved.end(), logits.begin(), logits.end());
    ctx->save_for_backward(std::move(saved));
    ctx->mark_non_differentiable({count});
    ctx->set_materialize_grads(false);
    return {probs, count};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list saved = ctx->get_saved_variables();
    const int64_t num_layers = static_cast<int64_t>(saved.size()) - 3;
    variable_list out;
    if (!grads[0].defined()) {
      out.resize(num_layers + 5);
      return out;
    }
    refuse_double_backward();
    static const auto bwd =
        op_handle("sara_kernels::cuda_routing_distribution_bwd")
            .typed<Tensor(const Tensor&, TensorList, const optional<Tensor>&, const optional<Tensor>&,
                          const Tensor&, c10::string_view, double, bool)>();
    auto opt = [](const Tensor& t) { return t.defined() ? optional<Tensor>(t) : optional<Tensor>(); };
    const std::vector<Tensor> logits(saved.begin() + 3, saved.end());
    Tensor grad = bwd.call(grads[0], logits, opt(saved[1]), opt(saved[2]), saved[0],
                           ctx->saved_data["score"].toStringRef(), ctx->saved_data["temperature"].toDouble(),
                           ctx->saved_data["normalize"].toBool());
    append_side_grads(out, grad, num_layers, ctx->saved_data["stacked"].toBool(), true);
    out.resize(out.size() + 5);  // mask, cu_seqlens and the three options
    return out;
  }
};

std::tuple<Tensor, Tensor> sara_loss(TensorList anchor, TensorList target, const optional<Tensor>& anchor_mask,
                                     const optional<Tensor>& anchor_cu_seqlens, const optional<Tensor>& target_mask,
                                     const optional<Tensor>& target_cu_seqlens, const optional<Tensor>& anchor_probs,
                                     const optional<Tensor>& layer_weights, const optional<Tensor>& pair_weights,
                                     c10::string_view score, double temperature, bool detach_anchor,
                                     c10::string_view reduction, c10::string_view divergence) {
  auto out = SaraLossFunction::apply(anchor, target, anchor_mask, anchor_cu_seqlens, target_mask, target_cu_seqlens,
                                     anchor_probs, layer_weights, pair_weights, score, temperature, detach_anchor,
                                     reduction, divergence);
  return {out[0], out[1]};
}

// Without autograd (no_grad, inference mode): the forward half alone.
std::tuple<Tensor, Tensor> sara_loss_no_grad(TensorList anchor, TensorList target,
                                             const optional<Tensor>& anchor_mask,
                                             const optional<Tensor>& anchor_cu_seqlens,
                                             const optional<Tensor>& target_mask,
                                             const optional<Tensor>& target_cu_seqlens,
                                             const optional<Tensor>& anchor_probs,
                                             const optional<Tensor>& layer_weights,
                                             const optional<Tensor>& pair_weights, c10::string_view score,
                                             double temperature, bool /*detach_anchor*/, c10::string_view reduction,
                                             c10::string_view divergence) {
  auto out = sara_loss_fwd(anchor, target, anchor_mask, anchor_cu_seqlens, target_mask, target_cu_seqlens,
                           anchor_probs, layer_weights, pair_weights, score, temperature, reduction, divergence);
  return {std::get<0>(out), std::get<1>(out)};
}

std::tuple<Tensor, Tensor> routing_distribution(TensorList logits, const optional<Tensor>& mask,
                                                const optional<Tensor>& cu_seqlens, c10::string_view score,
                                                double temperature, bool normalize) {
  auto out = RoutingDistributionFunction::apply(logits, mask, cu_seqlens, score, temperature, normalize);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace sara

TORCH_LIBRARY_FRAGMENT(sara_kernels, m) {
  m.def(
      "cuda_sara_loss(Tensor[] anchor, Tensor[] target, Tensor? anchor_mask, Tensor? anchor_cu_seqlens, "
      "Tensor? target_mask, Tensor? target_cu_seqlens, Tensor? anchor_probs, Tensor? layer_weights, "
      "Tensor? pair_weights, str score, float temperature, bool detach_anchor, str reduction, str divergence) "
      "-> (Tensor, Tensor)");
  m.def(
      "cuda_sara_loss_fwd(Tensor[] anchor, Tensor[] target, Tensor? anchor_mask, Tensor? anchor_cu_seqlens, "
      "Tensor? target_mask, Tensor? target_cu_seqlens, Tensor? anchor_probs, Tensor? layer_weights, "
      "Tensor? pair_weights, str score, float temperature, str reduction, str divergence) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cuda_sara_loss_bwd(Tensor grad_loss, Tensor[] anchor, Tensor[] target, Tensor? anchor_mask, "
      "Tensor? anchor_cu_seqlens, Tensor? target_mask, Tensor? target_cu_seqlens, Tensor ga, Tensor gt, "
      "Tensor stats, Tensor layer_coef, str score, float temperature, bool anchor_grad) -> (Tensor, Tensor)");
  m.def(
      "cuda_routing_distribution(Tensor[] logits, Tensor? mask, Tensor? cu_seqlens, str score, "
      "float temperature, bool normalize) -> (Tensor, Tensor)");
  m.def(
      "cuda_routing_distribution_fwd(Tensor[] logits, Tensor? mask, Tensor? cu_seqlens, str score, "
      "float temperature, bool normalize) -> (Tensor, Tensor)");
  m.def(
      "cuda_routing_distribution_bwd(Tensor grad_probs, Tensor[] logits, Tensor? mask, Tensor? cu_seqlens, "
      "Tensor count, str score, float temperature, bool normalize) -> Tensor");
}

TORCH_LIBRARY_IMPL(sara_kernels, SARA_KERNELS_DEVICE, m) {
  m.impl("cuda_sara_loss", &sara::sara_loss_no_grad);
  m.impl("cuda_sara_loss_fwd", &sara::sara_loss_fwd);
  m.impl("cuda_sara_loss_bwd", &sara::sara_loss_bwd);
  m.impl("cuda_routing_distribution_fwd", &sara::routing_distribution_fwd);
  m.impl("cuda_routing_distribution_bwd", &sara::routing_distribution_bwd);
  m.impl("cuda_routing_distribution", &sara::routing_distribution_fwd);
}

TORCH_LIBRARY_IMPL(sara_kernels, Autograd, m) {
  m.impl("cuda_sara_loss", &sara::sara_loss);
  m.impl("cuda_routing_distribution", &sara::routing_distribution);
}

// Importing sara_kernels._C registers the ops above (static initialisers); the module holds only
// DEVICE_TYPE, the torch device type the ops take ("cuda", or "cpu" in the emulated build).
static struct PyModuleDef sara_kernels_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&sara_kernels_c_module);
  const std::string device = c10::DeviceTypeName(sara::kDeviceType, /*lower_case=*/true);
  if (module != nullptr && PyModule_AddStringConstant(module, "DEVICE_TYPE", device.c_str()) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
