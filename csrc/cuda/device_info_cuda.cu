// Device discovery that never throws: the module must import and answer on
// machines with no GPU or no driver.
#include <cuda_runtime.h>

#include <string>

#include "cuda/cuda_ops.h"

namespace pbrf::cuda {

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return count;
}

std::string status() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return std::string("no CUDA device (") + cudaGetErrorName(err) + ": " +
           cudaGetErrorString(err) + ")";
  }
  if (count == 0) return "no CUDA device";
  std::string text = std::to_string(count) + " CUDA device(s):";
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) == cudaSuccess)
      text += " [" + std::to_string(i) + "] " + prop.name + " (sm_" +
              std::to_string(prop.major) + std::to_string(prop.minor) + ")";
  }
  return text;
}

}  // namespace pbrf::cuda
