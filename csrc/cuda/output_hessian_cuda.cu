// H_y u on the GPU: one warp per example. The warp computes the example's
// curvature (softmax p or sigmoid weight) once, caches it in shared memory
// when it fits, and applies it to all M vectors of that example.
#include <cuda_runtime.h>

#include <stdexcept>

#include "common/cuda_utils.h"
#include "common/loss_math.h"
#include "cuda/cuda_ops.h"

namespace pbrf::cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr size_t kMaxCacheBytes = 48 * 1024;

struct HessianShape {
  int64_t batch, classes, num_vectors;
};

template <typename T>
__device__ T curvature_element(int loss_kind, T logit, T row_max, T inv_sum) {
  return loss_kind == kCrossEntropy ? softmax_probability(logit, row_max, inv_sum)
                                    : sigmoid_curvature(logit);
}

template <typename T>
__global__ void output_hessian_kernel(int loss_kind, const T* __restrict__ logits,
                                      const T* __restrict__ vectors, T* __restrict__ out,
                                      HessianShape shape, bool cache_in_shared) {
  extern __shared__ unsigned char shared_bytes[];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t b = blockIdx.x * int64_t(kWarpsPerBlock) + warp;
  if (b >= shape.batch) return;  // uniform per warp, so shuffles stay full-mask
  const int64_t C = shape.classes;
  const T* row = logits + b * C;
  T* cache = reinterpret_cast<T*>(shared_bytes) + warp * C;

  T row_max = 0, inv_sum = 1;
  if (loss_kind == kCrossEntropy) {
    T local_max = row[0];
    for (int64_t c = lane; c < C; c += kWarpSize) local_max = max_of(local_max, row[c]);
    row_max = warp_max(local_max);
    T local_sum = 0;
    for (int64_t c = lane; c < C; c += kWarpSize) local_sum += exp_of(row[c] - row_max);
    inv_sum = T(1) / warp_sum(local_sum);
  }
  if (cache_in_shared)
    for (int64_t c = lane; c < C; c += kWarpSize)
      cache[c] = curvature_element(loss_kind, row[c], row_max, inv_sum);
  __syncwarp();

  for (int64_t m = 0; m < shape.num_vectors; ++m) {
    const int64_t offset = (m * shape.batch + b) * C;
    const T* u = vectors + offset;
    T* o = out + offset;
    T p_dot_u = 0;
    if (loss_kind == kCrossEntropy) {
      T local = 0;
      for (int64_t c = lane; c < C; c += kWarpSize) {
        const T p = cache_in_shared ? cache[c] : curvature_element(loss_kind, row[c], row_max, inv_sum);
        local += p * u[c];
      }
      p_dot_u = warp_sum(local);
    }
    for (int64_t c = lane; c < C; c += kWarpSize) {
      const T w = cache_in_shared ? cache[c] : curvature_element(loss_kind, row[c], row_max, inv_sum);
      o[c] = loss_kind == kCrossEntropy ? softmax_hessian_element(w, u[c], p_dot_u) : w * u[c];
    }
  }
}

template <typename T>
void launch_output_hessian(int loss_kind, uintptr_t logits, uintptr_t vectors, uintptr_t out,
                           HessianShape shape, cudaStream_t stream) {
  const size_t cache_bytes = size_t(kWarpsPerBlock) * shape.classes * sizeof(T);
  const bool cache_in_shared = cache_bytes <= kMaxCacheBytes;
  const int64_t blocks = (shape.batch + kWarpsPerBlock - 1) / kWarpsPerBlock;
  output_hessian_kernel<T><<<blocks, kWarpsPerBlock * kWarpSize,
                             cache_in_shared ? cache_bytes : 0, stream>>>(
      loss_kind, reinterpret_cast<const T*>(logits), reinterpret_cast<const T*>(vectors),
      reinterpret_cast<T*>(out), shape, cache_in_shared);
  throw_if_failed(cudaGetLastError(), "output_hessian_product launch");
}

}  // namespace

void output_hessian_product(const OutputHessianArgs& args) {
  if (args.loss_kind != kMse && args.loss_kind != kCrossEntropy && args.loss_kind != kBce)
    throw std::invalid_argument("unknown loss kind code");
  const int64_t count = args.batch * args.classes * args.num_vectors;
  if (count == 0) return;
  use_device(args.launch.device);
  const cudaStream_t stream = as_stream(args.launch.stream);
  if (args.loss_kind == kMse) {  // H_y = I: the product is a copy
    throw_if_failed(cudaMemcpyAsync(reinterpret_cast<void*>(args.out),
                                    reinterpret_cast<void*>(args.vectors),
                                    count * element_bytes(args.dtype), cudaMemcpyDeviceToDevice,
                                    stream),
                    "cudaMemcpyAsync");
    return;
  }
  const HessianShape shape{args.batch, args.classes, args.num_vectors};
  with_element_type(args.dtype, [&](auto zero) {
    launch_output_hessian<decltype(zero)>(args.loss_kind, args.logits, args.vectors, args.out,
                                          shape, stream);
  });
}

}  // namespace pbrf::cuda
