// A small cache-blocked SGEMM/DGEMM for the fused MLP kernels (no BLAS is
// linked: the extension must not depend on libtorch or MKL).
//
//   C_b = A_b B_b  (or C_b += A_b B_b),  b = 0 .. batch-1,
//
// every operand given by a base pointer, a row stride, a column stride and a
// batch stride, so transposed and interleaved views need no copies (packing
// reads them directly). The call is *team-cooperative*: each thread of an
// OpenMP team calls gemm_team with its own id and computes a fixed share of
// the output tiles; the caller places a barrier before anything reads C.
// Every output element is reduced over K in one fixed order by one thread, so
// results do not depend on the thread count.
#pragma once

#include <cstdint>
#include <vector>

namespace pbrf::cpu::gemm {

template <typename T>
struct Operand {
  const T* data;
  int64_t row_stride, col_stride, batch_stride;
};

template <typename T>
struct Gemm {
  int64_t M, N, K, batch;
  Operand<T> A, B;
  T* C;
  int64_t c_row_stride, c_col_stride, c_batch_stride;
  bool accumulate;  // C += AB instead of C = AB
};

// Per-thread packing buffers, sized on first use and reused across calls.
template <typename T>
struct Workspace {
  std::vector<T> packed_a, packed_b, edge_tile;
};

void gemm_team(const Gemm<float>& g, int thread, int num_threads, Workspace<float>& ws);
void gemm_team(const Gemm<double>& g, int thread, int num_threads, Workspace<double>& ws);

}  // namespace pbrf::cpu::gemm
