// Influence-score contraction shared by the CPU and CUDA kernels:
//
//   scores[b, q] = sum_t delta[b, t, :]^T S[q] a[b, t, :]
//                = sum_{o, i} G_b[o, i] S[q, o, i],   G_b = sum_t delta[b, t, o] a[b, t, i]
//
// The CUDA kernel walks G_b one (o, i) tile at a time and contracts each tile
// with every S_q straight away, so a per-example gradient exists only as one
// tile in shared memory; the CPU kernel forms G for a cache-sized chunk of
// examples with its blocked GEMM. Either way this costs 2 b t o i + 2 b o i m
// flops; the CPU kernel switches to the projection order, (delta S_q) a or
// (S_q a) delta at 2 b t m (o i + min(o, i)) flops, where that is cheaper (t = 1).
#pragma once

#include "common/host_device.h"

namespace pbrf {

PBRF_HOST_DEVICE double score_contraction_flops(int64_t batch, int64_t tokens, int64_t out_features,
                                                int64_t in_features, int64_t queries) {
  const double tile = double(out_features) * double(in_features);
  return 2.0 * double(batch) * tile * (double(tokens) + double(queries));
}

// One element of G_b: sum over tokens of delta[t, o] * a[t, i] (strided rows).
template <typename T>
PBRF_HOST_DEVICE T gradient_element(const T* delta, const T* a, int64_t tokens, int64_t out_features,
                                    int64_t in_features, int64_t o, int64_t i) {
  T acc = T(0);
  for (int64_t t = 0; t < tokens; ++t) acc += delta[t * out_features + o] * a[t * in_features + i];
  return acc;
}

}  // namespace pbrf
