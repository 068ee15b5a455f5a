// Cache-blocked GEMM (BLIS-style packing + register-tile micro-kernel), built
// three times: AVX-512, AVX2+FMA and baseline, picked once at run time. The
// micro-kernels use GCC vector extensions, so one source serves every width.
#include "cpu/gemm_cpu.h"

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/cpu_ops.h"

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

}  // namespace pbrf::cpu::gemm

namespace pbrf::cpu {

void gemm_strided(const GemmArgs& args) {
  with_element_type(args.dtype, [&](auto zero) {
    using T = decltype(zero);
    auto operand = [](const StridedOperand& o) {
      return gemm::Operand<T>{reinterpret_cast<const T*>(o.data), o.row_stride, o.col_stride,
                              o.batch_stride};
    };
    const gemm::Gemm<T> g{args.M, args.N, args.K, args.batch, operand(args.a), operand(args.b),
                          reinterpret_cast<T*>(args.c.data), args.c.row_stride, args.c.col_stride,
                          args.c.batch_stride, args.accumulate};
#pragma omp parallel num_threads(std::max(1, args.launch.threads))
    {
      gemm::Workspace<T> ws;
      gemm::dispatch(g, omp_get_thread_num(), omp_get_num_threads(), ws);
    }
  });
}

const char* gemm_isa() {
  switch (gemm::kIsa) {
    case gemm::Isa::kAvx512: return "avx512";
    case gemm::Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

}  // namespace pbrf::cpu
