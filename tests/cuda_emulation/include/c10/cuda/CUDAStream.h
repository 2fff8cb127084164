// Stand-in for torch's header of this name in the emulated build of the host op (see
// ../../../emulator.h): launches run synchronously on the host, so every stream is the null one.
#pragma once
#include <cuda_runtime.h>

namespace c10::cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(int) { return {}; }
}  // namespace c10::cuda
