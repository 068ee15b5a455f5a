// The stochastic LiSSA recursion (Eq. 52) for MLPs on the GPU, driven from one
// C++ loop: no Python per step. Same recursion and checks as
// csrc/cpu/lissa_engine_cpu.cpp (see pbrf_fast/kernels/lissa_engine.py):
//   S = sum over the batch schedule[r][t] of J_i^T H_i J_i h   (mlp::product)
//   h <- v + (1 - (damping + weight_decay)/scale) h - S / (batch * scale)
// with lissa_element from common/loss_math.h. Each step reads the per-vector
// norms and a non-finite flag back (m + 1 numbers) so divergence stops the
// recursion the step it happens, exactly like the CPU engine.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "common/cuda_utils.h"
#include "common/loss_math.h"
#include "cuda/cuda_ops.h"
#include "cuda/mlp_gnh_cuda.h"

namespace pbrf::cuda {
namespace {

constexpr int kThreads = 256;

// xb[b, :] = x[idx[b], :]
template <typename T>
__global__ void gather_rows_kernel(const T* __restrict__ x, const int64_t* __restrict__ idx,
                                   T* __restrict__ xb, int64_t batch, int64_t features) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < batch * features;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / features, f = i % features;
    xb[i] = x[idx[b] * features + f];
  }
}

// Rows k = blockIdx.y of the (m, d) arrays: h <- lissa_element(v, h, S), squared
// row norm into norms_squared[k] (float64), non-finite values raise *flag.
template <typename T>
__global__ void update_rows_kernel(T* __restrict__ h, const T* __restrict__ v, const T* __restrict__ S,
                                   T keep, T coef, int64_t d, double* __restrict__ norms_squared,
                                   int* __restrict__ flag) {
  __shared__ double warp_sums[kThreads / kWarpSize];
  const int64_t row = blockIdx.y;
  h += row * d;
  v += row * d;
  S += row * d;
  double sum = 0.0;
  bool nonfinite = false;
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < d; p += int64_t(gridDim.x) * blockDim.x) {
    const T value = lissa_element(v[p], h[p], S[p], keep, coef);
    h[p] = value;
    sum += double(value) * double(value);
    nonfinite |= is_nonfinite(value);
  }
  sum = warp_sum(sum);
  if (threadIdx.x % kWarpSize == 0) warp_sums[threadIdx.x / kWarpSize] = sum;
  if (__syncthreads_or(nonfinite) && threadIdx.x == 0) *flag = 1;
  if (threadIdx.x == 0) {
    double block = 0.0;
    for (int w = 0; w < kThreads / kWarpSize; ++w) block += warp_sums[w];
    atomicAdd(norms_squared + row, block);
  }
}

template <typename T>
__global__ void accumulate_kernel(T* __restrict__ total, const T* __restrict__ h, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    total[i] += h[i];
}

}  // namespace

// v, total and schedule are device arrays; limits and failure_norms host ones
// (see MlpLissaArgs in common/kernel_args.h and cuda/cuda_ops.h).
LissaOutcome mlp_lissa(const MlpLissaArgs& args) {
  const mlp::Layout s = mlp::make_layout(args.mlp);
  const std::vector<int64_t>& dims = args.mlp.dims;
  const int loss_kind = args.loss_kind;
  const int64_t repeats = args.repeats, depth = args.depth, batch = args.batch;
  const double scale = args.scale, ceiling = args.ceiling;
  const int64_t check_every = args.check_every;
  if (loss_kind != kMse && loss_kind != kCrossEntropy && loss_kind != kBce)
    throw std::invalid_argument("mlp_lissa: unknown loss kind code");
  if (args.num_examples < 1 || args.num_vectors < 1 || batch < 1 || repeats < 1 || depth < 1 ||
      check_every < 1)
    throw std::invalid_argument("mlp_lissa: sizes and check_every must be positive");
  if (!(scale > 0) || !std::isfinite(scale)) throw std::invalid_argument("mlp_lissa: bad scale");
  // Scratch: h and S (m d each), the gathered batch (batch x dims[0]), the product's workspace.
  if (args.workspace_elements < 2 * args.num_vectors * s.num_params + batch * dims[0] +
                                    mlp_gnh_workspace_elements(dims, batch, args.num_vectors))
    throw std::invalid_argument("mlp_lissa: workspace too small");
  use_device(args.launch.device);
  const cudaStream_t st = as_stream(args.launch.stream);
  const int64_t d = s.num_params, m = args.num_vectors, features = dims[0];
  const double* limits = reinterpret_cast<const double*>(args.limits);  // host memory
  double* failure_norms = reinterpret_cast<double*>(args.failure_norms);  // host memory
  double* norms_dev = reinterpret_cast<double*>(args.norms);
  int* flag_dev = reinterpret_cast<int*>(args.flag);
  std::vector<double> norms_host(m);
  int flag_host = 0;
  LissaOutcome outcome;

  with_element_type(args.dtype, [&](auto zero) {
    using T = decltype(zero);
    T* h = reinterpret_cast<T*>(args.workspace);
    T* S = h + m * d;
    T* xb = S + m * d;
    T* ws = xb + batch * features;
    const T* V = reinterpret_cast<const T*>(args.v);
    T* out = reinterpret_cast<T*>(args.total);
    const T keep = T(1.0 - (args.damping + args.weight_decay) / scale);
    const T coef = T(1.0 / (double(batch) * scale));
    const dim3 update_grid(unsigned(std::min<int64_t>((d + kThreads - 1) / kThreads, 1024)), unsigned(m));
    throw_if_failed(cudaMemsetAsync(out, 0, sizeof(T) * m * d, st), "mlp_lissa memset");
    for (int64_t r = 0; r < repeats; ++r) {
      throw_if_failed(cudaMemcpyAsync(h, V, sizeof(T) * m * d, cudaMemcpyDeviceToDevice, st), "mlp_lissa copy");
      for (int64_t step = 0; step < depth; ++step) {
        const int64_t* idx = reinterpret_cast<const int64_t*>(args.schedule) + (r * depth + step) * batch;
        gather_rows_kernel<T><<<mlp::blocks_for(batch * features), kThreads, 0, st>>>(
            reinterpret_cast<const T*>(args.inputs), idx, xb, batch, features);
        mlp::product<T>(s, loss_kind, xb, reinterpret_cast<const T*>(args.theta), h, S, batch, m, ws, st);
        throw_if_failed(cudaMemsetAsync(norms_dev, 0, sizeof(double) * m, st), "mlp_lissa memset");
        throw_if_failed(cudaMemsetAsync(flag_dev, 0, sizeof(int), st), "mlp_lissa memset");
        update_rows_kernel<T><<<update_grid, kThreads, 0, st>>>(h, V, S, keep, coef, d, norms_dev, flag_dev);
        throw_if_failed(cudaGetLastError(), "mlp_lissa launch");
        throw_if_failed(cudaMemcpyAsync(&flag_host, flag_dev, sizeof(int), cudaMemcpyDeviceToHost, st),
                        "mlp_lissa readback");
        throw_if_failed(cudaMemcpyAsync(norms_host.data(), norms_dev, sizeof(double) * m,
                                        cudaMemcpyDeviceToHost, st), "mlp_lissa readback");
        throw_if_failed(cudaStreamSynchronize(st), "mlp_lissa synchronize");
        if (flag_host || (step + 1) % check_every == 0) {
          const double bound = std::min(double(step + 2), ceiling);
          bool bad = flag_host != 0;
          for (int64_t k = 0; k < m; ++k) {
            const double norm = std::sqrt(norms_host[k]);
            failure_norms[k] = norm;
            bad |= !std::isfinite(norm) || norm > limits[k] * bound + 1e-30;
          }
          if (bad) {
            outcome = LissaOutcome{true, flag_host != 0, r, step};
            return;
          }
        }
      }
      accumulate_kernel<T><<<mlp::blocks_for(m * d), kThreads, 0, st>>>(out, h, m * d);
      throw_if_failed(cudaGetLastError(), "mlp_lissa accumulate launch");
    }
    throw_if_failed(cudaStreamSynchronize(st), "mlp_lissa synchronize");
  });
  return outcome;
}

}  // namespace pbrf::cuda
