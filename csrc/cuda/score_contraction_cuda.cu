// Fused influence-score contraction on the GPU (see common/score_contraction_math.h).
//
// One block per example. The block walks the per-example gradient G_b in
// 16 x 16 tiles: the tokens are staged through shared memory 16 at a time and
// each thread accumulates one tile element (a small GEMM with K = tokens).
// The finished tile sits in shared memory; each warp then takes queries
// q = warp, warp + 8, ... and reduces tile * S_q with a warp shuffle, adding
// into out[b, q]. The block owns row b of out, so no atomics are needed and
// the summation order is fixed (deterministic).
#include <cuda_runtime.h>

#include "common/cuda_utils.h"
#include "common/score_contraction_math.h"
#include "cuda/cuda_ops.h"

namespace pbrf::cuda {
namespace {

constexpr int kTile = 16;
constexpr int kThreads = kTile * kTile;  // 256: 8 warps
constexpr int kWarps = kThreads / kWarpSize;

struct ScoreShape {
  int64_t tokens, out_features, in_features, queries;
};

template <typename T>
__global__ void score_contraction_kernel(const T* __restrict__ a, const T* __restrict__ delta,
                                         const T* __restrict__ s, T* __restrict__ out, ScoreShape shape) {
  __shared__ T a_stage[kTile][kTile];  // [token][in]
  __shared__ T d_stage[kTile][kTile];  // [token][out]
  __shared__ T tile[kTile * kTile];    // [out][in]
  const int64_t b = blockIdx.x;
  const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const T* a_b = a + b * shape.tokens * shape.in_features;
  const T* d_b = delta + b * shape.tokens * shape.out_features;
  T* out_b = out + b * shape.queries;
  for (int64_t q = threadIdx.x; q < shape.queries; q += kThreads) out_b[q] = T(0);
  __syncthreads();

  for (int64_t o0 = 0; o0 < shape.out_features; o0 += kTile)
    for (int64_t i0 = 0; i0 < shape.in_features; i0 += kTile) {
      T acc = T(0);
      for (int64_t t0 = 0; t0 < shape.tokens; t0 += kTile) {
        const int64_t t = t0 + ty;
        const bool row_ok = t < shape.tokens;
        a_stage[ty][tx] = row_ok && i0 + tx < shape.in_features ? a_b[t * shape.in_features + i0 + tx] : T(0);
        d_stage[ty][tx] = row_ok && o0 + tx < shape.out_features ? d_b[t * shape.out_features + o0 + tx] : T(0);
        __syncthreads();
#pragma unroll
        for (int k = 0; k < kTile; ++k) acc += d_stage[k][ty] * a_stage[k][tx];
        __syncthreads();
      }
      tile[ty * kTile + tx] = acc;  // element (o0 + ty, i0 + tx)
      __syncthreads();
      for (int64_t q = warp; q < shape.queries; q += kWarps) {
        const T* s_q = s + q * shape.out_features * shape.in_features;
        T partial = T(0);
        for (int k = lane; k < kTile * kTile; k += kWarpSize) {
          const int64_t o = o0 + k / kTile, i = i0 + k % kTile;
          if (o < shape.out_features && i < shape.in_features)
            partial += tile[k] * s_q[o * shape.in_features + i];
        }
        partial = warp_sum(partial);
        if (lane == 0) out_b[q] += partial;
      }
      __syncthreads();
    }
}

template <typename T>
void launch(uintptr_t a, uintptr_t delta, uintptr_t s, uintptr_t out, int64_t batch, ScoreShape shape,
            cudaStream_t stream) {
  score_contraction_kernel<T><<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(
      reinterpret_cast<const T*>(a), reinterpret_cast<const T*>(delta), reinterpret_cast<const T*>(s),
      reinterpret_cast<T*>(out), shape);
  throw_if_failed(cudaGetLastError(), "score_contraction launch");
}

}  // namespace

void score_contraction(const ScoreContractionArgs& args) {
  if (args.batch == 0 || args.queries == 0) return;
  use_device(args.launch.device);
  const ScoreShape shape{args.tokens, args.out_features, args.in_features, args.queries};
  with_element_type(args.dtype, [&](auto zero) {
    launch<decltype(zero)>(args.a, args.delta, args.s, args.out, args.batch, shape,
                           as_stream(args.launch.stream));
  });
}

}  // namespace pbrf::cuda
