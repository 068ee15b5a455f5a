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

#include "common/cuda_ops.h"
#include "common/cuda_utils.h"
#include "common/loss_math.h"
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

// Returns (diverged, nonfinite, repeat, step); on divergence failure_norms (host,
// float64, m) holds the norms of the failing step. v, total: (m, d) device arrays;
// schedule: (repeats, depth, batch) int64 on the device; limits: host float64 (m);
// workspace: 2 m d + batch dims[0] + mlp_gnh_workspace_elements(dims, batch, m)
// elements; norms: m float64 and flag: one int, both device scratch.
std::vector<int64_t> mlp_lissa(Precision precision, const std::vector<int64_t>& dims,
                               const std::vector<int>& activations, const std::vector<int>& has_bias,
                               int loss_kind, uintptr_t inputs, int64_t num_examples, uintptr_t theta,
                               uintptr_t v, int64_t num_vectors, uintptr_t schedule, int64_t repeats,
                               int64_t depth, int64_t batch, double weight_decay, double damping,
                               double scale, const double* limits, double ceiling, int64_t check_every,
                               uintptr_t total, double* failure_norms, uintptr_t workspace,
                               int64_t workspace_elements, uintptr_t norms, uintptr_t flag, int device,
                               uintptr_t stream) {
  const mlp::Layout s = mlp::make_layout(dims, activations, has_bias);
  if (loss_kind != kMse && loss_kind != kCrossEntropy && loss_kind != kBce)
    throw std::invalid_argument("mlp_lissa: unknown loss kind code");
  if (num_examples < 1 || num_vectors < 1 || batch < 1 || repeats < 1 || depth < 1 || check_every < 1)
    throw std::invalid_argument("mlp_lissa: sizes and check_every must be positive");
  if (!(scale > 0) || !std::isfinite(scale)) throw std::invalid_argument("mlp_lissa: bad scale");
  // Scratch: h and S (m d each), the gathered batch (batch x dims[0]), the product's workspace.
  if (workspace_elements < 2 * num_vectors * s.num_params + batch * dims[0] +
                               mlp_gnh_workspace_elements(dims, batch, num_vectors))
    throw std::invalid_argument("mlp_lissa: workspace too small");
  use_device(device);
  const cudaStream_t st = as_stream(stream);
  const int64_t d = s.num_params, m = num_vectors, features = dims[0];
  double* norms_dev = reinterpret_cast<double*>(norms);
  int* flag_dev = reinterpret_cast<int*>(flag);
  std::vector<double> norms_host(m);
  int flag_host = 0;
  std::vector<int64_t> outcome{0, 0, -1, -1};

  auto run = [&](auto zero) {
    using T = decltype(zero);
    T* h = reinterpret_cast<T*>(workspace);
    T* S = h + m * d;
    T* xb = S + m * d;
    T* ws = xb + batch * features;
    const T* V = reinterpret_cast<const T*>(v);
    T* out = reinterpret_cast<T*>(total);
    const T keep = T(1.0 - (damping + weight_decay) / scale);
    const T coef = T(1.0 / (double(batch) * scale));
    const dim3 update_grid(unsigned(std::min<int64_t>((d + kThreads - 1) / kThreads, 1024)), unsigned(m));
    throw_if_failed(cudaMemsetAsync(out, 0, sizeof(T) * m * d, st), "mlp_lissa memset");
    for (int64_t r = 0; r < repeats; ++r) {
      throw_if_failed(cudaMemcpyAsync(h, V, sizeof(T) * m * d, cudaMemcpyDeviceToDevice, st), "mlp_lissa copy");
      for (int64_t step = 0; step < depth; ++step) {
        const int64_t* idx = reinterpret_cast<const int64_t*>(schedule) + (r * depth + step) * batch;
        gather_rows_kernel<T><<<mlp::blocks_for(batch * features), kThreads, 0, st>>>(
            reinterpret_cast<const T*>(inputs), idx, xb, batch, features);
        mlp::product<T>(s, loss_kind, xb, reinterpret_cast<const T*>(theta), h, S, batch, m, ws, st);
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
            outcome = {1, flag_host != 0, r, step};
            return;
          }
        }
      }
      accumulate_kernel<T><<<mlp::blocks_for(m * d), kThreads, 0, st>>>(out, h, m * d);
      throw_if_failed(cudaGetLastError(), "mlp_lissa accumulate launch");
    }
    throw_if_failed(cudaStreamSynchronize(st), "mlp_lissa synchronize");
  };
  if (precision == Precision::kFloat32) run(0.0f);
  else run(0.0);
  return outcome;
}

}  // namespace pbrf::cuda
