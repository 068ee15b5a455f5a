// Fused influence-score contraction on the CPU (see common/score_contraction_math.h).
//
// Each thread takes a block of examples, copies their a and delta rows into
// zero-padded buffers (so every tile is full and the inner loops vectorise),
// and for each (kRows x kCols) tile of the per-example gradient:
//   1. accumulates the tile over tokens in registers (a small GEMM, K = tokens);
//   2. multiplies it into every S_q tile, reusing each S_q tile for all the
//      examples of the block (what makes t = 1 Linear layers compute-bound).
// Per-query partial sums stay vectors until the end, so each (example, query)
// result is one deterministic reduction, independent of the thread count.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/cpu_ops.h"
#include "common/cpu_vector_math.h"
#include "common/score_contraction_math.h"

namespace pbrf::cpu {
namespace {

// The hot loops are FMA-bound: clone the per-block worker (not just the entry
// point, whose OpenMP region is outlined and would lose the target) for
// x86-64-v3 (AVX2 + FMA), with a portable default.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && defined(__linux__)
#define PBRF_SCORE_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PBRF_SCORE_MULTIVERSION
#endif

constexpr int64_t kRows = 4;  // output features per tile

template <typename T>
struct ScoreArgs {
  const T* a;      // (batch, tokens, in)
  const T* delta;  // (batch, tokens, out)
  const T* s;      // (queries, out, in)
  T* out;          // (batch, queries)
  int64_t batch, tokens, out_features, in_features, queries;
};

template <typename T>
struct Padded {
  int64_t rows, cols;  // padded out / in features
  std::vector<T> s;    // (queries, rows, cols)
};

template <typename T, int64_t kCols>
PBRF_ALWAYS_INLINE void gradient_tile(const T* a, const T* d, int64_t tokens, int64_t a_stride,
                                      int64_t d_stride, T* tile) {
  T acc[kRows][kCols] = {};
  for (int64_t t = 0; t < tokens; ++t) {
    const T* ar = a + t * a_stride;
    const T* dr = d + t * d_stride;
    for (int64_t r = 0; r < kRows; ++r) {
      const T dv = dr[r];
#pragma omp simd
      for (int64_t c = 0; c < kCols; ++c) acc[r][c] += dv * ar[c];
    }
  }
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t c = 0; c < kCols; ++c) tile[r * kCols + c] = acc[r][c];
}

template <typename T, int64_t kCols>
PBRF_ALWAYS_INLINE void contract_tile(const T* tiles, const T* s, int64_t s_stride, int64_t examples,
                                      T* partial) {
  for (int64_t e = 0; e < examples; ++e) {
    const T* g = tiles + e * kRows * kCols;
    T acc[kCols];
    for (int64_t c = 0; c < kCols; ++c) acc[c] = partial[e * kCols + c];
    for (int64_t r = 0; r < kRows; ++r) {
#pragma omp simd
      for (int64_t c = 0; c < kCols; ++c) acc[c] += g[r * kCols + c] * s[r * s_stride + c];
    }
    for (int64_t c = 0; c < kCols; ++c) partial[e * kCols + c] = acc[c];
  }
}

// Examples per block: enough to reuse each S tile many times when tokens are
// few, few enough that the packed rows of the block stay in cache.
int64_t examples_per_block(int64_t tokens) {
  return std::max<int64_t>(1, std::min<int64_t>(16, 64 / std::max<int64_t>(tokens, 1)));
}

template <typename T, int64_t kCols>
PBRF_ALWAYS_INLINE void run_block(const ScoreArgs<T>& a, const Padded<T>& p, int64_t e0, int64_t count, std::vector<T>& a_pad,
               std::vector<T>& d_pad, std::vector<T>& tiles, std::vector<T>& partial) {
  const int64_t tokens = a.tokens, q_count = a.queries;
  a_pad.assign(count * tokens * p.cols, T(0));
  d_pad.assign(count * tokens * p.rows, T(0));
  for (int64_t e = 0; e < count; ++e)
    for (int64_t t = 0; t < tokens; ++t) {
      const int64_t row = (e0 + e) * tokens + t;
      std::memcpy(&a_pad[(e * tokens + t) * p.cols], a.a + row * a.in_features, a.in_features * sizeof(T));
      std::memcpy(&d_pad[(e * tokens + t) * p.rows], a.delta + row * a.out_features,
                  a.out_features * sizeof(T));
    }
  tiles.resize(count * kRows * kCols);
  partial.assign(q_count * count * kCols, T(0));  // (query, example, kCols)
  for (int64_t o0 = 0; o0 < p.rows; o0 += kRows)
    for (int64_t i0 = 0; i0 < p.cols; i0 += kCols) {
      for (int64_t e = 0; e < count; ++e)
        gradient_tile<T, kCols>(&a_pad[e * tokens * p.cols + i0], &d_pad[e * tokens * p.rows + o0], tokens,
                                p.cols, p.rows, &tiles[e * kRows * kCols]);
      for (int64_t q = 0; q < q_count; ++q)
        contract_tile<T, kCols>(tiles.data(), &p.s[(q * p.rows + o0) * p.cols + i0], p.cols, count,
                                &partial[q * count * kCols]);
    }
  for (int64_t e = 0; e < count; ++e)
    for (int64_t q = 0; q < q_count; ++q) {
      T sum = T(0);
      for (int64_t c = 0; c < kCols; ++c) sum += partial[(q * count + e) * kCols + c];
      a.out[(e0 + e) * q_count + q] = sum;
    }
}

PBRF_SCORE_MULTIVERSION void run_block_f32(const ScoreArgs<float>& a, const Padded<float>& p, int64_t e0,
                                            int64_t count, std::vector<float>& a_pad, std::vector<float>& d_pad,
                                            std::vector<float>& tiles, std::vector<float>& partial) {
  run_block<float, 16>(a, p, e0, count, a_pad, d_pad, tiles, partial);
}

PBRF_SCORE_MULTIVERSION void run_block_f64(const ScoreArgs<double>& a, const Padded<double>& p, int64_t e0,
                                            int64_t count, std::vector<double>& a_pad, std::vector<double>& d_pad,
                                            std::vector<double>& tiles, std::vector<double>& partial) {
  run_block<double, 8>(a, p, e0, count, a_pad, d_pad, tiles, partial);
}

template <typename T, int64_t kCols>
void score_typed(const ScoreArgs<T>& a, int num_threads) {
  Padded<T> p;
  p.rows = (a.out_features + kRows - 1) / kRows * kRows;
  p.cols = (a.in_features + kCols - 1) / kCols * kCols;
  p.s.assign(a.queries * p.rows * p.cols, T(0));
  for (int64_t q = 0; q < a.queries; ++q)
    for (int64_t o = 0; o < a.out_features; ++o)
      std::memcpy(&p.s[(q * p.rows + o) * p.cols], a.s + (q * a.out_features + o) * a.in_features,
                  a.in_features * sizeof(T));
  const int64_t block = examples_per_block(a.tokens);
  const int64_t blocks = (a.batch + block - 1) / block;
#pragma omp parallel num_threads(std::max(1, num_threads))
  {
    std::vector<T> a_pad, d_pad, tiles, partial;
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = 0; k < blocks; ++k) {
      const int64_t e0 = k * block;
      const int64_t count = std::min(block, a.batch - e0);
      if constexpr (sizeof(T) == sizeof(float)) run_block_f32(a, p, e0, count, a_pad, d_pad, tiles, partial);
      else run_block_f64(a, p, e0, count, a_pad, d_pad, tiles, partial);
    }
  }
}

void score_f32(const ScoreArgs<float>& a, int num_threads) { score_typed<float, 16>(a, num_threads); }

void score_f64(const ScoreArgs<double>& a, int num_threads) { score_typed<double, 8>(a, num_threads); }

}  // namespace

void score_contraction(Precision precision, uintptr_t a, uintptr_t delta, uintptr_t s, uintptr_t out,
                       int64_t batch, int64_t tokens, int64_t out_features, int64_t in_features,
                       int64_t queries, int num_threads) {
  if (precision == Precision::kFloat32) {
    ScoreArgs<float> args{reinterpret_cast<const float*>(a), reinterpret_cast<const float*>(delta),
                          reinterpret_cast<const float*>(s), reinterpret_cast<float*>(out),
                          batch, tokens, out_features, in_features, queries};
    score_f32(args, num_threads);
    return;
  }
  ScoreArgs<double> args{reinterpret_cast<const double*>(a), reinterpret_cast<const double*>(delta),
                         reinterpret_cast<const double*>(s), reinterpret_cast<double*>(out),
                         batch, tokens, out_features, in_features, queries};
  score_f64(args, num_threads);
}

}  // namespace pbrf::cpu
