// A CPU stand-in for the parts of CUDA that csrc/routing_js_kernels.cu uses, so those kernels run
// (at small shapes) on a machine without a GPU. Every thread of a block is a fiber (ucontext) on
// the calling host thread, switched cooperatively at barriers: far cheaper than an OS thread per
// CUDA thread, and deterministic. Blocks run one after another, so `__shared__` can be a
// function-local static.
//
// What it checks beyond the arithmetic: __syncthreads and warp shuffles are barriers, so a lane
// that skips a shuffle its warp executes (divergent control flow, undefined behaviour on a GPU)
// or a thread that skips a __syncthreads leaves the others waiting forever: the scheduler sees
// that no thread can move, fails the launch with cudaErrorLaunchFailure and says where. Reads and writes are plain host memory, so
// the tests run the kernels on buffers sized exactly, where an out-of-bounds access is caught by
// the bounds the tests check around them (guard values).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <vector>

#include <ucontext.h>

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

inline dim3 threadIdx, blockIdx;  // set by the scheduler each time it resumes a thread
inline dim3 blockDim, gridDim;

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };
typedef struct CUstream_st* cudaStream_t;
inline cudaError_t emulator_last_error = cudaSuccess;
inline cudaError_t cudaGetLastError() {
  cudaError_t e = emulator_last_error;
  emulator_last_error = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated launch failure"; }

// The host op asks for the SM count to size its grids: an emulated device has a few.
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
inline constexpr int kEmulatedSMs = 3;
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = kEmulatedSMs;
  return cudaSuccess;
}

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
// The device's __fdividef returns 0 for 2^126 < |y| < 2^128; here that range divides exactly,
// which differs from 0 by less than 2^-126 |x|.
inline float __fdividef(float x, float y) { return x / y; }

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

// Threads wait for a barrier's generation to move; the last to arrive moves it.
struct Barrier {
  int expected = 0, arrived = 0;
  long generation = 0;
};

struct Thread {
  ucontext_t context;
  char* stack = nullptr;
  bool done = false;
  const Barrier* waits_for = nullptr;  // resumable once waits_for->generation != seen
  long seen = 0;
  const char* where = nullptr;
};

struct Block {
  explicit Block(int n) : threads(n), shuffle(n) {
    block.expected = n;
    for (int w = 0; w < (n + 31) / 32; ++w) warps.push_back(Barrier{std::min(32, n - 32 * w)});
    // Stacks are kept from launch to launch: allocating them per launch costs more than a small kernel.
    static std::vector<std::unique_ptr<char[]>> stacks;
    while (stacks.size() < threads.size()) stacks.emplace_back(new char[kStackBytes]);
    for (size_t i = 0; i < threads.size(); ++i) threads[i].stack = stacks[i].get();
  }
  static constexpr size_t kStackBytes = 128 * 1024;
  std::vector<Thread> threads;
  Barrier block;
  std::vector<Barrier> warps;
  std::vector<float> shuffle;
  ucontext_t scheduler;
  Thread* running = nullptr;
  void (*body)(void*) = nullptr;  // runs the kernel for threadIdx/blockIdx
  void* body_arg = nullptr;
};

inline Block* current = nullptr;

inline void arrive(Barrier& b, const char* where) {
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  Thread* self = current->running;
  self->waits_for = &b;
  self->seen = b.generation;
  self->where = where;
  swapcontext(&self->context, &current->scheduler);
}

inline void thread_entry() {
  current->body(current->body_arg);
  current->running->done = true;  // returning resumes the scheduler (uc_link)
}

// Runs one block to completion; false if its threads deadlock (a barrier some never reach).
inline bool run_block(Block& b) {
  for (auto& t : b.threads) {
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = t.stack;
    t.context.uc_stack.ss_size = Block::kStackBytes;
    t.context.uc_link = &b.scheduler;
    makecontext(&t.context, thread_entry, 0);
    t.done = false;
    t.waits_for = nullptr;
  }
  for (;;) {
    bool all_done = true, moved = false;
    for (size_t i = 0; i < b.threads.size(); ++i) {
      Thread& t = b.threads[i];
      if (t.done) continue;
      all_done = false;
      if (t.waits_for != nullptr && t.waits_for->generation == t.seen) continue;
      t.waits_for = nullptr;
      threadIdx = dim3(static_cast<unsigned>(i));
      b.running = &t;
      swapcontext(&b.scheduler, &t.context);
      moved = true;
    }
    if (all_done) return true;
    if (!moved) {
      int waiting = 0, done = 0;
      const char* where = "";
      for (const auto& t : b.threads) {
        if (t.done) ++done;
        else { ++waiting; where = t.where; }
      }
      std::fprintf(stderr, "emulator: block (%u, %u, %u): %d threads wait at %s, %d have finished: "
                   "not every thread arrived (divergent control flow?)\n",
                   blockIdx.x, blockIdx.y, blockIdx.z, waiting, where, done);
      return false;
    }
  }
}

}  // namespace emulator

inline void __syncthreads() { emulator::arrive(emulator::current->block, "__syncthreads"); }

inline float __shfl_xor_sync(unsigned mask, float v, int offset) {
  if (mask != 0xffffffffu) throw std::logic_error("emulator: only full-warp shuffles are emulated");
  auto* b = emulator::current;
  const int t = static_cast<int>(threadIdx.x), warp = t / 32, lane = t % 32;
  b->shuffle[t] = v;
  emulator::arrive(b->warps[warp], "__shfl_xor_sync");
  const float other = b->shuffle[warp * 32 + (lane ^ offset)];
  emulator::arrive(b->warps[warp], "__shfl_xor_sync");  // nobody overwrites a value before it is read
  return other;
}

struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  void* attrs;
  unsigned numAttrs;
};

// Runs the blocks of the grid one after another, each thread of a block a fiber.
template <class... Params, class... Args>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(Params...), Args&&... args) {
#ifdef SARA_EMULATOR_SKIP_KERNELS  // timing the host path alone (benchmarks/host_cost.py)
  return config != nullptr && kernel != nullptr ? cudaSuccess : cudaErrorInvalidValue;
#endif
  gridDim = config->gridDim;
  blockDim = config->blockDim;
  const int threads = static_cast<int>(blockDim.x * blockDim.y * blockDim.z);
  emulator::Block block(threads);
  auto call = [&] { kernel(args...); };
  block.body = [](void* f) { (*static_cast<decltype(call)*>(f))(); };
  block.body_arg = &call;
  emulator::current = &block;
  bool ok = true;
  for (unsigned z = 0; ok && z < gridDim.z; ++z) {
    for (unsigned y = 0; ok && y < gridDim.y; ++y) {
      for (unsigned x = 0; ok && x < gridDim.x; ++x) {
        blockIdx = dim3(x, y, z);
        ok = emulator::run_block(block);
      }
    }
  }
  emulator::current = nullptr;
  if (!ok) {
    emulator_last_error = cudaErrorLaunchFailure;
    return cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}
