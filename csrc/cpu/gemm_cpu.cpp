// Cache-blocked GEMM (BLIS-style packing + register-tile micro-kernel), built
// three times: AVX-512, AVX2+FMA and baseline, picked once at run time. The
// micro-kernels use GCC vector extensions, so one source serves every width.
#include "cpu/gemm_cpu.h"

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace pbrf::cpu::gemm {
namespace {

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }
int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

template <typename T>
void ensure_size(std::vector<T>& v, int64_t n) {
  if (int64_t(v.size()) < n) v.resize(n);
}

struct Tiling {
  int64_t mc, nc, tiles_m, tiles_n;
};

// Output tiles of mc x nc per task. Big problems keep cache-sized tiles;
// small ones are cut (in whole micro-tiles) until every thread has a few
// tasks, so a 128 x 128 product still uses the whole team.
Tiling choose_tiling(int64_t M, int64_t N, int64_t batch, int MR, int NR, int64_t mc_max,
                     int64_t nc_max, int num_threads) {
  int64_t mc = std::min(mc_max, round_up(std::max<int64_t>(M, 1), MR));
  int64_t nc = std::min(nc_max, round_up(std::max<int64_t>(N, 1), NR));
  const int64_t wanted = num_threads > 1 ? 4 * int64_t(num_threads) : 1;
  auto tasks = [&] { return batch * ceil_div(M, mc) * ceil_div(N, nc); };
  while (tasks() < wanted && (mc > MR || nc > NR)) {
    if (nc > NR && (nc / NR >= mc / MR || mc <= MR)) nc = round_up(nc / 2, NR);
    else mc = round_up(mc / 2, MR);
  }
  return {mc, nc, ceil_div(M, mc), ceil_div(N, nc)};
}

}  // namespace

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PBRF_GEMM_X86 1

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx2,fma")
#define PBRF_GEMM_NAMESPACE isa_avx512
#define PBRF_GEMM_VEC_BYTES 64
#define PBRF_GEMM_ROWS 12
#include "cpu/gemm_kernel.inc"
#undef PBRF_GEMM_NAMESPACE
#undef PBRF_GEMM_VEC_BYTES
#undef PBRF_GEMM_ROWS
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define PBRF_GEMM_NAMESPACE isa_avx2
#define PBRF_GEMM_VEC_BYTES 32
#define PBRF_GEMM_ROWS 6
#include "cpu/gemm_kernel.inc"
#undef PBRF_GEMM_NAMESPACE
#undef PBRF_GEMM_VEC_BYTES
#undef PBRF_GEMM_ROWS
#pragma GCC pop_options
#endif

#define PBRF_GEMM_NAMESPACE isa_generic
#define PBRF_GEMM_VEC_BYTES 16
#define PBRF_GEMM_ROWS 4
#include "cpu/gemm_kernel.inc"
#undef PBRF_GEMM_NAMESPACE
#undef PBRF_GEMM_VEC_BYTES
#undef PBRF_GEMM_ROWS

namespace {

enum class Isa { kAvx512, kAvx2, kGeneric };

Isa detect_isa() {
#ifdef PBRF_GEMM_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kGeneric;
}

const Isa kIsa = detect_isa();

template <typename T>
void dispatch(const Gemm<T>& g, int thread, int num_threads, Workspace<T>& ws) {
  if (g.M <= 0 || g.N <= 0 || g.batch <= 0) return;
#ifdef PBRF_GEMM_X86
  if (kIsa == Isa::kAvx512) return isa_avx512::run_thread(g, thread, num_threads, ws);
  if (kIsa == Isa::kAvx2) return isa_avx2::run_thread(g, thread, num_threads, ws);
#endif
  isa_generic::run_thread(g, thread, num_threads, ws);
}

}  // namespace

void gemm_team(const Gemm<float>& g, int thread, int num_threads, Workspace<float>& ws) {
  dispatch(g, thread, num_threads, ws);
}

void gemm_team(const Gemm<double>& g, int thread, int num_threads, Workspace<double>& ws) {
  dispatch(g, thread, num_threads, ws);
}

namespace {

template <typename T>
void strided_team(int64_t M, int64_t N, int64_t K, int64_t batch, Operand<T> A, Operand<T> B,
                  T* C, int64_t c_row, int64_t c_col, int64_t c_batch, bool accumulate,
                  int num_threads) {
  const Gemm<T> g{M, N, K, batch, A, B, C, c_row, c_col, c_batch, accumulate};
#pragma omp parallel num_threads(std::max(1, num_threads))
  {
    Workspace<T> ws;
    dispatch(g, omp_get_thread_num(), omp_get_num_threads(), ws);
  }
}

}  // namespace

void gemm_strided(Precision precision, int64_t M, int64_t N, int64_t K, int64_t batch,
                  uintptr_t a, int64_t a_row, int64_t a_col, int64_t a_batch, uintptr_t b,
                  int64_t b_row, int64_t b_col, int64_t b_batch, uintptr_t c, int64_t c_row,
                  int64_t c_col, int64_t c_batch, bool accumulate, int num_threads) {
  auto go = [&](auto zero) {
    using T = decltype(zero);
    strided_team<T>(M, N, K, batch, {reinterpret_cast<const T*>(a), a_row, a_col, a_batch},
                    {reinterpret_cast<const T*>(b), b_row, b_col, b_batch},
                    reinterpret_cast<T*>(c), c_row, c_col, c_batch, accumulate, num_threads);
  };
  precision == Precision::kFloat64 ? go(0.0) : go(0.0f);
}

const char* gemm_isa() {
  switch (kIsa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

}  // namespace pbrf::cpu::gemm
