// Fused MLP Gauss-Newton-vector product on the GPU: the same passes as
// csrc/cpu/mlp_gnh_cpu.cpp (forward, tangent, output Hessian, backward for m
// vectors, summed over the batch), as a sequence of launches on the caller's
// stream: a batched, strided, shared-memory tiled GEMM plus small elementwise
// kernels whose arithmetic comes from common/mlp_gnh.h and common/loss_math.h.
// Scratch memory comes from the caller (torch's allocator).
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "common/cuda_utils.h"
#include "common/mlp_gnh.h"
#include "cuda/cuda_ops.h"
#include "cuda/mlp_gnh_cuda.h"

namespace pbrf::cuda {
namespace {

constexpr int kTile = 64, kDepth = 16, kThreadsPerDim = 16;  // each thread: 4 x 4 outputs

struct GemmShape {
  int64_t M, N, K;
  int64_t a_rs, a_cs, a_bs, b_rs, b_cs, b_bs, c_rs, c_bs;
  bool accumulate;
};

// C_z = (or +=) A_z B_z for z = blockIdx.z; every operand strided.
template <typename T>
__global__ void gemm_kernel(const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ C,
                            GemmShape s) {
  __shared__ T a_tile[kDepth][kTile + 1];
  __shared__ T b_tile[kDepth][kTile + 1];
  const int64_t z = blockIdx.z;
  A += z * s.a_bs;
  B += z * s.b_bs;
  C += z * s.c_bs;
  const int64_t row0 = int64_t(blockIdx.y) * kTile, col0 = int64_t(blockIdx.x) * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kThreadsPerDim + tx;
  T acc[4][4] = {};
  for (int64_t k0 = 0; k0 < s.K; k0 += kDepth) {
    for (int i = tid; i < kTile * kDepth; i += kThreadsPerDim * kThreadsPerDim) {
      const int r = i % kTile, k = i / kTile;
      const int64_t gr = row0 + r, gk = k0 + k, gc = col0 + r;
      a_tile[k][r] = (gr < s.M && gk < s.K) ? A[gr * s.a_rs + gk * s.a_cs] : T(0);
      b_tile[k][r] = (gc < s.N && gk < s.K) ? B[gk * s.b_rs + gc * s.b_cs] : T(0);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kDepth; ++k) {
      T a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = a_tile[k][ty + i * kThreadsPerDim];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = b_tile[k][tx + j * kThreadsPerDim];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t r = row0 + ty + i * kThreadsPerDim, c = col0 + tx + j * kThreadsPerDim;
      if (r < s.M && c < s.N) {
        T* out = C + r * s.c_rs + c;
        *out = s.accumulate ? *out + acc[i][j] : acc[i][j];
      }
    }
}

template <typename T>
void gemm(const T* A, const T* B, T* C, GemmShape s, int64_t batch, cudaStream_t stream) {
  if (s.M == 0 || s.N == 0 || batch == 0) return;
  const dim3 grid(unsigned((s.N + kTile - 1) / kTile), unsigned((s.M + kTile - 1) / kTile),
                  unsigned(batch));
  gemm_kernel<T><<<grid, dim3(kThreadsPerDim, kThreadsPerDim), 0, stream>>>(A, B, C, s);
  throw_if_failed(cudaGetLastError(), "mlp_gnh gemm launch");
}

}  // namespace

unsigned mlp::blocks_for(int64_t n) { return unsigned(std::min<int64_t>((n + 255) / 256, 65535)); }
using mlp::blocks_for;

namespace {

// z (rows, n) += bias; if act >= 0: z = act(z), slope = act'(z).
template <typename T>
__global__ void bias_activation_kernel(T* z, T* slope, const T* bias, int64_t rows, int64_t n,
                                       int act) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < rows * n;
       i += int64_t(gridDim.x) * blockDim.x) {
    T v = z[i] + (bias ? bias[i % n] : T(0));
    if (act >= 0) {
      T a, s;
      activation_and_slope(act, v, &a, &s);
      v = a;
      slope[i] = s;
    }
    z[i] = v;
  }
}

// rows (batch, m, n) *= slope (batch, n)
template <typename T>
__global__ void scale_by_slope_kernel(T* rows, const T* slope, int64_t batch, int64_t m, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < batch * m * n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / (m * n), c = i % n;
    rows[i] *= slope[b * n + c];
  }
}

// rows (batch, m, n) += V[k * ld + offset + c]
template <typename T>
__global__ void add_bias_tangent_kernel(T* rows, const T* V, int64_t ld, int64_t offset,
                                        int64_t batch, int64_t m, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < batch * m * n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = (i / n) % m, c = i % n;
    rows[i] += V[k * ld + offset + c];
  }
}

// out[k * ld + offset + c] = sum_b g[(b, k, c)]
template <typename T>
__global__ void bias_gradient_kernel(const T* g, T* out, int64_t ld, int64_t offset, int64_t batch,
                                     int64_t m, int64_t n) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < m * n;
       j += int64_t(gridDim.x) * blockDim.x) {
    T sum = 0;
    for (int64_t b = 0; b < batch; ++b) sum += g[b * m * n + j];
    out[(j / n) * ld + offset + j % n] = sum;
  }
}

// One warp per (example, vector) row: H_y u in place.
template <typename T>
__global__ void output_hessian_rows_kernel(int loss_kind, const T* y, T* rows, int64_t batch,
                                           int64_t m, int64_t C) {
  const int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (warp >= batch * m) return;
  const int64_t b = warp / m;
  const T* logits = y + b * C;
  T* u = rows + warp * C;
  if (loss_kind == kBce) {
    for (int64_t c = lane; c < C; c += kWarpSize) u[c] *= sigmoid_curvature(logits[c]);
    return;
  }
  T row_max = -INFINITY;
  for (int64_t c = lane; c < C; c += kWarpSize) row_max = max_of(row_max, logits[c]);
  row_max = warp_max(row_max);
  T sum = 0, dot = 0;
  for (int64_t c = lane; c < C; c += kWarpSize) {
    const T e = exp_of(logits[c] - row_max);
    sum += e;
    dot += e * u[c];
  }
  sum = warp_sum(sum);
  dot = warp_sum(dot);
  const T inv = T(1) / sum;
  for (int64_t c = lane; c < C; c += kWarpSize)
    u[c] = softmax_hessian_element(exp_of(logits[c] - row_max) * inv, u[c], dot * inv);
}

}  // namespace

// The product, shared with the LiSSA engine (lissa_engine_cuda.cu) through mlp_gnh_cuda.h.
namespace mlp {

Layout make_layout(const MlpShape& shape) {
  const std::vector<int64_t>& dims = shape.dims;
  const std::vector<int>& activations = shape.activations;
  const std::vector<int>& has_bias = shape.has_bias;
  Layout s;
  s.L = int(dims.size()) - 1;
  if (s.L < 1 || int(activations.size()) != s.L - 1 || int(has_bias.size()) != s.L)
    throw std::invalid_argument("mlp_gnh_product: inconsistent layer description");
  s.dims = dims;
  s.activations = activations;
  for (int l = 0; l < s.L; ++l) {
    if (dims[l] < 1 || dims[l + 1] < 1) throw std::invalid_argument("mlp_gnh_product: bad width");
    s.weight_offset.push_back(s.num_params);
    s.num_params += dims[l] * dims[l + 1];
    s.bias_offset.push_back(has_bias[l] ? s.num_params : -1);
    if (has_bias[l]) s.num_params += dims[l + 1];
    if (l + 1 < s.L) s.hidden += dims[l + 1];
  }
  s.max_width = *std::max_element(dims.begin(), dims.end());
  return s;
}

template <typename T>
void product(const Layout& s, int loss_kind, const T* x, const T* theta, const T* V, T* out,
             int64_t B, int64_t m, T* ws, cudaStream_t stream) {
  const int L = s.L;
  const int64_t d = s.num_params;
  // Workspace: per hidden layer act and slope (B x n), outputs (B x C), two (B, m, max) buffers.
  std::vector<T*> act(L), slope(L);
  T* p = ws;
  for (int l = 0; l + 1 < L; ++l) {
    act[l] = p;
    p += B * s.dims[l + 1];
    slope[l] = p;
    p += B * s.dims[l + 1];
  }
  T* y = p;
  p += B * s.dims[L];
  T* cur = p;
  T* other = p + B * m * s.max_width;
  auto input = [&](int l) -> const T* { return l == 0 ? x : act[l - 1]; };
  for (int l = 0; l < L; ++l) {  // forward
    const int64_t n_in = s.dims[l], n_out = s.dims[l + 1];
    T* z = l + 1 < L ? act[l] : y;
    gemm<T>(input(l), theta + s.weight_offset[l], z,
            GemmShape{B, n_out, n_in, n_in, 1, 0, 1, n_in, 0, n_out, 0, false}, 1, stream);
    const T* bias = s.bias_offset[l] >= 0 ? theta + s.bias_offset[l] : nullptr;
    bias_activation_kernel<T><<<blocks_for(B * n_out), 256, 0, stream>>>(
        z, l + 1 < L ? slope[l] : nullptr, bias, B, n_out, l + 1 < L ? s.activations[l] : -1);
  }
  for (int l = 0; l < L; ++l) {  // tangent
    const int64_t n_in = s.dims[l], n_out = s.dims[l + 1];
    if (l > 0) {
      scale_by_slope_kernel<T><<<blocks_for(B * m * n_in), 256, 0, stream>>>(other, slope[l - 1], B, m, n_in);
      gemm<T>(other, theta + s.weight_offset[l], cur,
              GemmShape{B * m, n_out, n_in, n_in, 1, 0, 1, n_in, 0, n_out, 0, false}, 1, stream);
    }
    gemm<T>(input(l), V + s.weight_offset[l], cur,
            GemmShape{B, n_out, n_in, n_in, 1, 0, 1, n_in, d, m * n_out, n_out, l > 0}, m, stream);
    if (s.bias_offset[l] >= 0)
      add_bias_tangent_kernel<T><<<blocks_for(B * m * n_out), 256, 0, stream>>>(
          cur, V, d, s.bias_offset[l], B, m, n_out);
    std::swap(cur, other);
  }
  T* g = other;
  T* next = cur;
  if (loss_kind != kMse) {
    const int64_t threads = B * m * kWarpSize;
    output_hessian_rows_kernel<T><<<unsigned((threads + 255) / 256), 256, 0, stream>>>(
        loss_kind, y, g, B, m, s.dims[L]);
  }
  for (int l = L - 1; l >= 0; --l) {  // backward
    const int64_t n_in = s.dims[l], n_out = s.dims[l + 1];
    gemm<T>(g, input(l), out + s.weight_offset[l],
            GemmShape{n_out, n_in, B, 1, m * n_out, n_out, n_in, 1, 0, n_in, d, false}, m, stream);
    if (s.bias_offset[l] >= 0)
      bias_gradient_kernel<T><<<blocks_for(m * n_out), 256, 0, stream>>>(g, out, d, s.bias_offset[l],
                                                                         B, m, n_out);
    if (l > 0) {
      gemm<T>(g, theta + s.weight_offset[l], next,
              GemmShape{B * m, n_in, n_out, n_out, 1, 0, n_in, 1, 0, n_in, 0, false}, 1, stream);
      scale_by_slope_kernel<T><<<blocks_for(B * m * n_in), 256, 0, stream>>>(next, slope[l - 1], B, m, n_in);
      std::swap(g, next);
    }
  }
  throw_if_failed(cudaGetLastError(), "mlp_gnh_product launch");
}

template void product<float>(const Layout&, int, const float*, const float*, const float*, float*,
                             int64_t, int64_t, float*, cudaStream_t);
template void product<double>(const Layout&, int, const double*, const double*, const double*, double*,
                              int64_t, int64_t, double*, cudaStream_t);

}  // namespace mlp

namespace {

// (cols x rows) = (rows x cols)^T
template <typename T>
__global__ void transpose_kernel(const T* src, T* dst, int64_t rows, int64_t cols) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < rows * cols;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    dst[c * rows + r] = src[i];
  }
}

}  // namespace

int64_t mlp_gnh_workspace_elements(const std::vector<int64_t>& dims, int64_t batch,
                                   int64_t num_vectors) {
  int64_t hidden = 0;
  for (size_t l = 1; l + 1 < dims.size(); ++l) hidden += dims[l];
  const int64_t max_width = *std::max_element(dims.begin(), dims.end());
  return batch * (2 * hidden + dims.back()) + 2 * batch * num_vectors * max_width;
}

void mlp_gnh_product(const MlpGnhProductArgs& args) {
  const mlp::Layout s = mlp::make_layout(args.mlp);
  if (args.loss_kind != kMse && args.loss_kind != kCrossEntropy && args.loss_kind != kBce)
    throw std::invalid_argument("mlp_gnh_product: unknown loss kind code");
  if (args.batch < 1 || args.num_vectors < 1)
    throw std::invalid_argument("mlp_gnh_product: empty batch");
  if (args.workspace_elements < mlp_gnh_workspace_elements(args.mlp.dims, args.batch, args.num_vectors))
    throw std::invalid_argument("mlp_gnh_product: workspace too small");
  use_device(args.launch.device);
  const cudaStream_t st = as_stream(args.launch.stream);
  const int64_t d = s.num_params, m = args.num_vectors;
  with_element_type(args.dtype, [&](auto zero) {
    using T = decltype(zero);
    const T* V = reinterpret_cast<const T*>(args.vectors);
    T* O = reinterpret_cast<T*>(args.out);
    T* Vt = reinterpret_cast<T*>(args.transposed);  // (m, d) twice, only used for m > 1
    T* Ot = Vt + m * d;
    if (m > 1) transpose_kernel<T><<<blocks_for(d * m), 256, 0, st>>>(V, Vt, d, m);
    mlp::product<T>(s, args.loss_kind, reinterpret_cast<const T*>(args.inputs),
                    reinterpret_cast<const T*>(args.theta), m > 1 ? Vt : V, m > 1 ? Ot : O,
                    args.batch, m, reinterpret_cast<T*>(args.workspace), st);
    if (m > 1) transpose_kernel<T><<<blocks_for(d * m), 256, 0, st>>>(Ot, O, m, d);
    throw_if_failed(cudaGetLastError(), "mlp_gnh_product transpose launch");
  });
}

}  // namespace pbrf::cuda
