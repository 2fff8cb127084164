// A CPU stand-in for the parts of CUDA that csrc/routing_js_kernels.cu uses, so those kernels run
// (slowly, at small shapes) on a machine without a GPU. Every thread of a block is a host thread;
// blocks run one after another, so `__shared__` can be a function-local static.
//
// What it checks beyond the arithmetic: __syncthreads and warp shuffles are barriers, so a lane
// that skips a shuffle its warp executes (divergent control flow, undefined behaviour on a GPU)
// or a thread that skips a __syncthreads makes the others wait; after a timeout the launch
// fails with cudaErrorLaunchFailure and says where. Reads and writes are plain host memory, so
// the tests run the kernels on buffers sized exactly, where an out-of-bounds access is caught by
// the bounds the tests check around them (guard values).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __device_builtin__

using std::max;
using std::min;

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint4 {
  unsigned x, y, z, w;
};

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };
typedef struct CUstream_st* cudaStream_t;
inline thread_local cudaError_t emulator_last_error = cudaSuccess;
inline cudaError_t cudaGetLastError() {
  cudaError_t e = emulator_last_error;
  emulator_last_error = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated launch failure"; }

template <class T>
inline T __ldg(const T* p) {
  return *p;
}
inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __expf(float x) { return std::exp(x); }

struct __half {
  uint16_t bits;
};
inline __half __ushort_as_half(uint16_t b) { return __half{b}; }
inline uint16_t __half_as_ushort(__half h) { return h.bits; }
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float x) {
  const _Float16 f = static_cast<_Float16>(x);
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
struct __nv_bfloat16 {
  uint16_t bits;
};
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t u = __float_as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}
inline uint16_t __bfloat16_as_ushort(__nv_bfloat16 b) { return b.bits; }

namespace emulator {

struct Poisoned : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A barrier whose waits time out: a thread that never arrives fails the launch instead of hanging
// it. Each barrier has its own lock, so a warp's shuffle wakes only that warp's threads.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void arrive_and_wait(const char* what, std::atomic<bool>& poisoned) {
    std::unique_lock<std::mutex> lock(m_);
    if (poisoned) throw Poisoned(what);
    const long generation = generation_;
    if (++count_ == n_) {
      count_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    // Short slices: a launch poisoned at another barrier is noticed here too.
    for (int slice = 0; slice < 200; ++slice) {
      if (cv_.wait_for(lock, std::chrono::milliseconds(50), [&] { return generation_ != generation || poisoned; })) {
        if (generation_ != generation) return;
        throw Poisoned(what);
      }
    }
    if (!poisoned.exchange(true)) std::fprintf(stderr, "emulator: %s: not every thread arrived (divergent control flow?)\n", what);
    throw Poisoned(what);
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_;
  int count_ = 0;
  long generation_ = 0;
};

struct Block {
  explicit Block(int threads) : block(threads), shuffle(threads) {
    for (int w = 0; w < (threads + 31) / 32; ++w) warps.emplace_back(std::make_unique<Barrier>(std::min(32, threads - 32 * w)));
  }
  std::atomic<bool> poisoned{false};
  Barrier block;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<float> shuffle;
};

inline Block* current = nullptr;

}  // namespace emulator

inline void __syncthreads() {
  auto* b = emulator::current;
  b->block.arrive_and_wait("__syncthreads", b->poisoned);
}

inline float __shfl_xor_sync(unsigned mask, float v, int offset) {
  if (mask != 0xffffffffu) throw std::logic_error("emulator: only full-warp shuffles are emulated");
  auto* b = emulator::current;
  const int t = static_cast<int>(threadIdx.x), warp = t / 32, lane = t % 32;
  auto& bar = *b->warps[warp];
  b->shuffle[t] = v;
  bar.arrive_and_wait("__shfl_xor_sync", b->poisoned);
  const float other = b->shuffle[warp * 32 + (lane ^ offset)];
  bar.arrive_and_wait("__shfl_xor_sync", b->poisoned);
  return other;
}

struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  void* attrs;
  unsigned numAttrs;
};

// Runs the blocks of the grid one after another on one host thread per CUDA thread (the same
// threads for every block: creating them per block would dominate the run time). A barrier at the
// end of each block keeps the next block from starting while the current one still runs.
template <class... Params, class... Args>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(Params...), Args&&... args) {
  gridDim = config->gridDim;
  blockDim = config->blockDim;
  const dim3 grid = gridDim;
  const int threads = static_cast<int>(blockDim.x * blockDim.y * blockDim.z);
  emulator::Block block(threads);
  emulator::current = &block;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      threadIdx = dim3(static_cast<unsigned>(t));
      try {
        for (unsigned z = 0; z < grid.z; ++z) {
          for (unsigned y = 0; y < grid.y; ++y) {
            for (unsigned x = 0; x < grid.x; ++x) {
              blockIdx = dim3(x, y, z);
              kernel(args...);
              block.block.arrive_and_wait("end of block", block.poisoned);
            }
          }
        }
      } catch (const emulator::Poisoned&) {
      }
    });
  }
  for (auto& th : pool) th.join();
  emulator::current = nullptr;
  if (block.poisoned) {
    emulator_last_error = cudaErrorLaunchFailure;
    return cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}
