// Helpers for the .cu launchers only (needs cuda_runtime.h): error checks that
// turn CUDA failures into C++ exceptions (pybind11 maps them to RuntimeError),
// and warp reductions.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace pbrf::cuda {

inline void throw_if_failed(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("pbrf_fast._C_cuda: ") + what + ": " +
                             cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

// Our static cudart keeps its own notion of the current device; align it with
// the tensors' device before launching.
inline void use_device(int device) {
  int current = -1;
  throw_if_failed(cudaGetDevice(&current), "cudaGetDevice");
  if (current != device) throw_if_failed(cudaSetDevice(device), "cudaSetDevice");
}

inline cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

inline int multiprocessor_count(int device) {
  int count = 0;
  throw_if_failed(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device),
                  "cudaDeviceGetAttribute");
  return count;
}

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

template <typename T>
__device__ __forceinline__ T warp_max(T x) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const T other = __shfl_xor_sync(kFullMask, x, offset);
    x = other > x ? other : x;
  }
  return x;
}

}  // namespace pbrf::cuda
