// Influence-score contraction on the CPU (see common/score_contraction_math.h),
// on the blocked GEMM of gemm_cpu.cpp, in the cheaper of the two orders:
//
// - gradient order (many tokens: conv patches, sequences): per-example
//   gradients G_b = delta_b^T a_b for a chunk of examples (one GEMM batched
//   over the chunk; the chunk's G stays cache-sized), then
//   scores[chunk, :] = G_chunk . S (a second GEMM, K = o * i). Costs
//   2 b t o i + 2 b o i m flops.
// - projection order (one token: Linear layers): P = rows . S_q for every q,
//   a chunk of rows at a time, then each row's P reduced against its other
//   side. Costs 2 b t m o i + 2 b t m min(o, i).
//
// Each output element of every GEMM is reduced by one thread in a fixed
// order, and the reductions here run over fixed ranges, so results do not
// depend on the thread count.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "common/score_contraction_math.h"
#include "cpu/cpu_ops.h"
#include "cpu/gemm_cpu.h"

namespace pbrf::cpu {
namespace {

using gemm::Gemm;
using gemm::Operand;

// Elements of the transient per-chunk buffers (G or P): 1 MiB of floats keeps
// G in L2 between the two GEMMs; P chunks are larger because each P element
// costs 2 min(o, i) flops and is read once.
constexpr int64_t kGradientChunkElements = int64_t(1) << 18;
constexpr int64_t kProjectionChunkElements = int64_t(1) << 21;

template <typename T>
struct ScoreArgs {
  const T* a;      // (batch, tokens, in)
  const T* delta;  // (batch, tokens, out)
  const T* s;      // (queries, out, in)
  T* out;          // (batch, queries)
  int64_t batch, tokens, out_features, in_features, queries;
};

void barrier_if_team(int num_threads) {
  if (num_threads > 1) {
#pragma omp barrier
  }
}

// Examples per chunk and elements per example of each order's transient buffer.
template <typename T>
int64_t gradient_elements(const ScoreArgs<T>& g) { return g.out_features * g.in_features; }

template <typename T>
int64_t projection_elements(const ScoreArgs<T>& g) {
  return g.tokens * g.queries * std::min(g.out_features, g.in_features);
}

inline int64_t chunk_examples(int64_t batch, int64_t budget, int64_t per_example) {
  return std::max<int64_t>(1, std::min(batch, budget / std::max<int64_t>(per_example, 1)));
}

template <typename T>
void gradient_order(const ScoreArgs<T>& g, int thread, int num_threads, std::vector<T>& G,
                    gemm::Workspace<T>& ws) {
  const int64_t t = g.tokens, o = g.out_features, i = g.in_features, m = g.queries;
  const int64_t oi = gradient_elements(g);
  const int64_t chunk = chunk_examples(g.batch, kGradientChunkElements, oi);
  for (int64_t b0 = 0; b0 < g.batch; b0 += chunk) {
    const int64_t n = std::min(chunk, g.batch - b0);
    // G_b (o x i) = delta_b^T (o x t, read transposed in place) a_b (t x i)
    gemm::gemm_team(Gemm<T>{o, i, t, n, Operand<T>{g.delta + b0 * t * o, 1, o, t * o},
                            Operand<T>{g.a + b0 * t * i, i, 1, t * i}, G.data(), i, 1, oi, false},
                    thread, num_threads, ws);
    barrier_if_team(num_threads);
    // scores (n x m) = G (n x o i) . S^T (o i x m, S read transposed in place)
    gemm::gemm_team(Gemm<T>{n, m, oi, 1, Operand<T>{G.data(), oi, 1, 0}, Operand<T>{g.s, 1, oi, 0},
                            g.out + b0 * m, m, 1, 0, false},
                    thread, num_threads, ws);
    barrier_if_team(num_threads);  // G is refilled by the next chunk
  }
}

template <typename T>
void projection_order(const ScoreArgs<T>& g, int thread, int num_threads, std::vector<T>& P,
                      gemm::Workspace<T>& ws) {
  const int64_t t = g.tokens, o = g.out_features, i = g.in_features, m = g.queries;
  // Project the narrower side's partner: (delta S_q) . a when i <= o, else (S_q a) . delta.
  const bool through_delta = i <= o;
  const int64_t w = through_delta ? i : o;  // width of each query's projection
  const T* dots = through_delta ? g.a : g.delta;
  const int64_t row_width = m * w;
  const int64_t chunk = chunk_examples(g.batch, kProjectionChunkElements, projection_elements(g));
  for (int64_t b0 = 0; b0 < g.batch; b0 += chunk) {
    const int64_t n = std::min(chunk, g.batch - b0);
    const int64_t rows = n * t;
    if (through_delta) {
      // P[r, q i + j] = sum_k delta[r, k] S[q, k, j]: one GEMM per query, batched.
      gemm::gemm_team(Gemm<T>{rows, i, o, m, Operand<T>{g.delta + b0 * t * o, o, 1, 0},
                              Operand<T>{g.s, i, 1, o * i}, P.data(), row_width, 1, i, false},
                      thread, num_threads, ws);
    } else {
      // P[r, q o + k] = sum_j a[r, j] S[q, k, j]: S as one (i x m o) matrix read transposed.
      gemm::gemm_team(Gemm<T>{rows, m * o, i, 1, Operand<T>{g.a + b0 * t * i, i, 1, 0},
                              Operand<T>{g.s, 1, i, 0}, P.data(), row_width, 1, 0, false},
                      thread, num_threads, ws);
    }
    barrier_if_team(num_threads);
    // scores[b, q] = sum_t sum_j P[b t + t', q w + j] dots[b t + t', j]
    const int64_t first = n * thread / num_threads, last = n * (thread + 1) / num_threads;
    for (int64_t e = first; e < last; ++e)
      for (int64_t q = 0; q < m; ++q) {
        T sum = T(0);
        for (int64_t tok = 0; tok < t; ++tok) {
          const T* p = P.data() + (e * t + tok) * row_width + q * w;
          const T* d = dots + ((b0 + e) * t + tok) * w;
          T part = T(0);
#pragma omp simd reduction(+ : part)
          for (int64_t j = 0; j < w; ++j) part += p[j] * d[j];
          sum += part;
        }
        g.out[(b0 + e) * m + q] = sum;
      }
    barrier_if_team(num_threads);  // P is refilled by the next chunk
  }
}

template <typename T>
void score_typed(const ScoreArgs<T>& g, int num_threads) {
  const double b = double(g.batch), t = double(g.tokens), o = double(g.out_features),
               i = double(g.in_features), m = double(g.queries);
  if (g.batch == 0 || g.queries == 0) return;
  if (g.tokens == 0 || g.out_features == 0 || g.in_features == 0) {
    std::fill(g.out, g.out + g.batch * g.queries, T(0));
    return;
  }
  const double gradient_flops = score_contraction_flops(g.batch, g.tokens, g.out_features,
                                                        g.in_features, g.queries);
  const double projection_flops = 2.0 * b * t * m * (o * i + std::min(o, i));
  const bool projection = projection_flops < gradient_flops;
  // Threads worth a team: each should get a few MFLOP, or barriers dominate.
  const double flops = std::min(gradient_flops, projection_flops);
  const int threads = int(std::max(1.0, std::min(double(std::max(1, num_threads)), flops / 2e6)));
  const int64_t per_example = projection ? projection_elements(g) : gradient_elements(g);
  const int64_t budget = projection ? kProjectionChunkElements : kGradientChunkElements;
  std::vector<T> scratch(chunk_examples(g.batch, budget, per_example) * per_example);
#pragma omp parallel num_threads(threads)
  {
    gemm::Workspace<T> ws;
    const int thread = omp_get_thread_num(), nt = omp_get_num_threads();
    if (projection) projection_order(g, thread, nt, scratch, ws);
    else gradient_order(g, thread, nt, scratch, ws);
  }
}

}  // namespace

void score_contraction(const ScoreContractionArgs& args) {
  with_element_type(args.dtype, [&](auto zero) {
    using T = decltype(zero);
    const ScoreArgs<T> g{reinterpret_cast<const T*>(args.a), reinterpret_cast<const T*>(args.delta),
                         reinterpret_cast<const T*>(args.s), reinterpret_cast<T*>(args.out),
                         args.batch, args.tokens, args.out_features, args.in_features, args.queries};
    score_typed(g, args.launch.threads);
  });
}

}  // namespace pbrf::cpu
