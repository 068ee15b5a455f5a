// Bregman divergence of the loss in output space on the GPU: one warp per
// row computes the value (warp-reduced) and writes the gradient in one pass.
#include <cuda_runtime.h>

#include <stdexcept>

#include "common/cuda_utils.h"
#include "common/loss_math.h"
#include "cuda/cuda_ops.h"

namespace pbrf::cuda {
namespace {

constexpr int kWarpsPerBlock = 4;

template <typename T>
struct WarpSoftmaxStats {
  T row_max, sum_exp;
};

template <typename T>
__device__ WarpSoftmaxStats<T> warp_softmax_stats(const T* row, int64_t classes, int lane) {
  T local_max = row[0];
  for (int64_t c = lane; c < classes; c += kWarpSize) local_max = max_of(local_max, row[c]);
  const T row_max = warp_max(local_max);
  T local_sum = 0;
  for (int64_t c = lane; c < classes; c += kWarpSize) local_sum += exp_of(row[c] - row_max);
  return {row_max, warp_sum(local_sum)};
}

template <typename T>
__device__ T cross_entropy_row(const T* y, const T* y_ref, T* grad, int64_t classes, int lane) {
  const WarpSoftmaxStats<T> s = warp_softmax_stats(y, classes, lane);
  const WarpSoftmaxStats<T> s_ref = warp_softmax_stats(y_ref, classes, lane);
  const T inv = T(1) / s.sum_exp, inv_ref = T(1) / s_ref.sum_exp;
  T linear = 0;
  for (int64_t c = lane; c < classes; c += kWarpSize) {
    const T p = softmax_probability(y[c], s.row_max, inv);
    const T p_ref = softmax_probability(y_ref[c], s_ref.row_max, inv_ref);
    linear += cross_entropy_linear_term(p_ref, y[c], y_ref[c]);
    grad[c] = p - p_ref;
  }
  return log_sum_exp_from_stats(s.row_max, s.sum_exp) -
         log_sum_exp_from_stats(s_ref.row_max, s_ref.sum_exp) - warp_sum(linear);
}

template <typename T>
__device__ T elementwise_row(int loss_kind, const T* y, const T* y_ref, T* grad, int64_t classes,
                             int lane) {
  T value = 0;
  for (int64_t c = lane; c < classes; c += kWarpSize) {
    if (loss_kind == kMse) {
      value += mse_bregman_element(y[c], y_ref[c]);
      grad[c] = y[c] - y_ref[c];
    } else {
      value += bce_bregman_element(y[c], y_ref[c]);
      grad[c] = bce_bregman_grad(y[c], y_ref[c]);
    }
  }
  return warp_sum(value);
}

template <typename T>
__global__ void bregman_kernel(int loss_kind, const T* __restrict__ outputs,
                               const T* __restrict__ ref_outputs, T* __restrict__ values,
                               T* __restrict__ grad, int64_t batch, int64_t classes) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t b = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / kWarpSize;
  if (b >= batch) return;  // uniform per warp
  const int64_t offset = b * classes;
  const T value = loss_kind == kCrossEntropy
                      ? cross_entropy_row(outputs + offset, ref_outputs + offset, grad + offset,
                                          classes, lane)
                      : elementwise_row(loss_kind, outputs + offset, ref_outputs + offset,
                                        grad + offset, classes, lane);
  if (lane == 0) values[b] = value;
}

template <typename T>
void launch_bregman(int loss_kind, uintptr_t outputs, uintptr_t ref_outputs, uintptr_t values,
                    uintptr_t grad, int64_t batch, int64_t classes, cudaStream_t stream) {
  const int64_t blocks = (batch + kWarpsPerBlock - 1) / kWarpsPerBlock;
  bregman_kernel<T><<<blocks, kWarpsPerBlock * kWarpSize, 0, stream>>>(
      loss_kind, reinterpret_cast<const T*>(outputs), reinterpret_cast<const T*>(ref_outputs),
      reinterpret_cast<T*>(values), reinterpret_cast<T*>(grad), batch, classes);
  throw_if_failed(cudaGetLastError(), "bregman_divergence launch");
}

}  // namespace

void bregman_divergence(const BregmanDivergenceArgs& args) {
  if (args.loss_kind != kMse && args.loss_kind != kCrossEntropy && args.loss_kind != kBce)
    throw std::invalid_argument("unknown loss kind code");
  if (args.batch == 0) return;
  if (args.classes == 0)
    throw std::invalid_argument("bregman_divergence needs at least one output per example");
  use_device(args.launch.device);
  with_element_type(args.dtype, [&](auto zero) {
    launch_bregman<decltype(zero)>(args.loss_kind, args.outputs, args.ref_outputs, args.values,
                                   args.grad, args.batch, args.classes,
                                   as_stream(args.launch.stream));
  });
}

}  // namespace pbrf::cuda
