// Kernels with one deliberate fault each (and two correct controls), built only
// into pbrf_fast._C_cuda_emu: tests/test_cuda_emulation.py checks that the
// emulator reports every fault, so a green emulated run of the real kernels
// means something. Written as CUDA and translated like csrc/cuda/*.cu.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "common/cuda_utils.h"
#include "emulator_selftest.h"

namespace pbrf_emu {
namespace {

using pbrf::cuda::kFullMask;
using pbrf::cuda::kWarpSize;

// Correct: every thread's value summed by warp shuffles, then across warps in
// shared memory; and a __syncthreads_or over "is my value negative".
__global__ void block_sum_kernel(const float* values, float* out) {
  __shared__ float warp_sums[32];
  const float v = values[threadIdx.x];
  const float s = pbrf::cuda::warp_sum(v);
  if (threadIdx.x % kWarpSize == 0) warp_sums[threadIdx.x / kWarpSize] = s;
  const int any_negative = __syncthreads_or(v < 0.0f);
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (unsigned w = 0; w < (blockDim.x + kWarpSize - 1) / kWarpSize; ++w) total += warp_sums[w];
    out[0] = total;
    out[1] = float(any_negative);
  }
}

// Fault: threads 16.. exit without reaching the barrier the others wait on.
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
    out[threadIdx.x] = 1.0f;
  }
}

// Fault: one element past the end of a __shared__ array.
__global__ void shared_overflow_kernel(float* out) {
  __shared__ float s[32];
  s[threadIdx.x % 32] = 1.0f;
  if (threadIdx.x == 0) s[32] = 2.0f;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x % 32];
}

// Fault: odd threads read shared memory nobody wrote (NaN in the emulator).
__global__ void uninitialized_shared_kernel(float* out) {
  __shared__ float s[64];
  if (threadIdx.x % 2 == 0) s[threadIdx.x] = float(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

// Fault: thread 0 writes what the others read, with no barrier in between; the
// answer depends on the order the threads run in.
__global__ void missing_barrier_kernel(float* out) {
  __shared__ float s[1];
  if (threadIdx.x == 0) s[0] = 42.0f;
  out[threadIdx.x] = s[0];
}

// Fault: every block writes the same element without an atomic; which block's
// value survives depends on the order the blocks run in.
__global__ void block_race_kernel(float* out) {
  if (threadIdx.x == 0) out[0] = float(blockIdx.x);
}

// Fault: a full-mask shuffle after half the warp has returned.
__global__ void shuffle_after_exit_kernel(float* out) {
  if (threadIdx.x % kWarpSize >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(kFullMask, float(threadIdx.x), 1);
}

}  // namespace

SelftestResult run_selftest(const std::string& name) {
  cudaGetLastError();  // start clean
  const unsigned threads = 64;
  std::vector<float> out(threads, -1.0f), values(threads);
  for (unsigned i = 0; i < threads; ++i) values[i] = float(i) - (i == 37 ? 100.0f : 0.0f);
  if (name == "block_sum") block_sum_kernel<<<1, threads>>>(values.data(), out.data());
  else if (name == "divergent_barrier") divergent_barrier_kernel<<<1, threads>>>(out.data());
  else if (name == "shared_overflow") shared_overflow_kernel<<<1, threads>>>(out.data());
  else if (name == "uninitialized_shared") uninitialized_shared_kernel<<<1, threads>>>(out.data());
  else if (name == "missing_barrier") missing_barrier_kernel<<<1, threads>>>(out.data());
  else if (name == "block_race") block_race_kernel<<<4, 32>>>(out.data());
  else if (name == "shuffle_after_exit") shuffle_after_exit_kernel<<<1, threads>>>(out.data());
  else if (name == "too_many_threads") divergent_barrier_kernel<<<1, 2048>>>(out.data());
  else if (name == "too_much_shared") divergent_barrier_kernel<<<1, threads, 64 * 1024>>>(out.data());
  else throw std::invalid_argument("unknown emulator self-test " + name);
  const cudaError_t err = cudaGetLastError();
  SelftestResult result;
  result.error = err == cudaSuccess ? "" : std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  result.values = out;
  return result;
}

}  // namespace pbrf_emu
