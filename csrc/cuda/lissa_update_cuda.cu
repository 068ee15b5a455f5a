// One LiSSA step on the GPU in a single pass: each thread walks the flat
// (rows x cols) array with a stride that is a multiple of cols, so it always
// sees the same column and can keep that column's squared norm in a register.
// Block partials are combined in shared memory, then added to the global
// float64 sums with one atomic per column per block.
#include <cuda_runtime.h>

#include <algorithm>

#include "common/cuda_utils.h"
#include "common/loss_math.h"
#include "cuda/cuda_ops.h"

namespace pbrf::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxSharedColumns = 2048;  // 16 KiB of float64 partial sums

struct LissaShape {
  int64_t total, cols;
};

template <typename T>
__global__ void lissa_kernel(T* __restrict__ h, const T* __restrict__ v, const T* __restrict__ gh,
                             T keep, T inv_scale, LissaShape shape, double* __restrict__ norms_squared,
                             int* __restrict__ nonfinite_flag) {
  extern __shared__ double block_sums[];
  const bool use_shared = shape.cols <= kMaxSharedColumns;
  if (use_shared)
    for (int64_t j = threadIdx.x; j < shape.cols; j += blockDim.x) block_sums[j] = 0.0;
  __syncthreads();

  const int64_t threads = int64_t(gridDim.x) * blockDim.x;
  const int64_t stride = (threads / shape.cols) * shape.cols;  // launcher ensures >= cols
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  double sum = 0.0;
  bool nonfinite = false;
  if (tid < stride) {
    for (int64_t i = tid; i < shape.total; i += stride) {
      const T x = lissa_element(v[i], h[i], gh[i], keep, inv_scale);
      h[i] = x;
      sum += double(x) * double(x);
      nonfinite |= is_nonfinite(x);
    }
    if (use_shared) atomicAdd(&block_sums[tid % shape.cols], sum);
    else atomicAdd(&norms_squared[tid % shape.cols], sum);
  }
  if (__syncthreads_or(nonfinite) && threadIdx.x == 0) *nonfinite_flag = 1;
  if (use_shared)
    for (int64_t j = threadIdx.x; j < shape.cols; j += blockDim.x)
      atomicAdd(&norms_squared[j], block_sums[j]);
}

template <typename T>
void launch_lissa(uintptr_t h, uintptr_t v, uintptr_t gh, double damping, double scale,
                  LissaShape shape, uintptr_t norms_squared, uintptr_t flag, int device,
                  cudaStream_t stream) {
  // Enough blocks to fill the GPU a few times over; at least enough threads to
  // cover every column once.
  const int64_t wanted = (shape.total + kThreads - 1) / kThreads;
  const int64_t cap = int64_t(multiprocessor_count(device)) * 8;
  const int64_t min_blocks = (shape.cols + kThreads - 1) / kThreads;
  const int64_t blocks = std::max(min_blocks, std::min(wanted, cap));
  const size_t shared = shape.cols <= kMaxSharedColumns ? shape.cols * sizeof(double) : 0;
  lissa_kernel<T><<<blocks, kThreads, shared, stream>>>(
      reinterpret_cast<T*>(h), reinterpret_cast<const T*>(v), reinterpret_cast<const T*>(gh),
      T(1.0 - damping / scale), T(1.0 / scale), shape, reinterpret_cast<double*>(norms_squared),
      reinterpret_cast<int*>(flag));
  throw_if_failed(cudaGetLastError(), "lissa_update launch");
}

}  // namespace

void lissa_update(const LissaUpdateArgs& args) {
  const LissaShape shape{args.rows * args.cols, args.cols};
  if (shape.total == 0) return;
  use_device(args.launch.device);
  with_element_type(args.dtype, [&](auto zero) {
    launch_lissa<decltype(zero)>(args.h, args.v, args.gh, args.damping, args.scale, shape,
                                 args.norms_squared, args.nonfinite_flag, args.launch.device,
                                 as_stream(args.launch.stream));
  });
}

}  // namespace pbrf::cuda
