// Stand-in for torch's header of this name in the emulated build of the host op (see
// ../../../emulator.h): the emulated device is the CPU, so there is no device to switch to.
#pragma once
#include <c10/core/Device.h>

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
