// One LiSSA step over all columns in a single pass over memory: update h in
// place, accumulate each column's squared norm in float64, flag non-finite
// values. Each thread owns a contiguous row range and its own partial sums, so
// results are deterministic for a given thread count.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "common/cpu_vector_math.h"
#include "common/loss_math.h"
#include "cpu/cpu_ops.h"

namespace pbrf::cpu {
namespace {

template <typename T>
struct LissaArgs {
  T* h;
  const T* v;
  const T* gh;
  T keep;
  T inv_scale;
  int64_t cols;
};

// kCols > 0 fixes the column count at compile time so the inner loop unrolls
// and vectorises; kCols == 0 handles any count.
template <typename T, int kCols>
PBRF_ALWAYS_INLINE bool lissa_row_range(const LissaArgs<T>& a, int64_t begin, int64_t end, double* sums) {
  constexpr bool kFixed = kCols > 0;
  const int64_t cols = kFixed ? kCols : a.cols;
  // A local array (not the heap) lets the compiler keep fixed-size sums in registers.
  double fixed_acc[kFixed ? kCols : 1] = {};
  std::vector<double> runtime_acc(kFixed ? 0 : cols, 0.0);
  double* acc = kFixed ? fixed_acc : runtime_acc.data();
  bool nonfinite = false;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t row = i * cols;
    for (int64_t j = 0; j < cols; ++j) {
      const T x = lissa_element(a.v[row + j], a.h[row + j], a.gh[row + j], a.keep, a.inv_scale);
      a.h[row + j] = x;
      acc[j] += double(x) * double(x);
      nonfinite |= is_nonfinite(x);
    }
  }
  for (int64_t j = 0; j < cols; ++j) sums[j] = acc[j];
  return nonfinite;
}

template <typename T>
PBRF_ALWAYS_INLINE bool lissa_range_dispatch(const LissaArgs<T>& a, int64_t begin, int64_t end, double* sums) {
  switch (a.cols) {
    case 1: return lissa_row_range<T, 1>(a, begin, end, sums);
    case 2: return lissa_row_range<T, 2>(a, begin, end, sums);
    case 4: return lissa_row_range<T, 4>(a, begin, end, sums);
    case 8: return lissa_row_range<T, 8>(a, begin, end, sums);
    default: return lissa_row_range<T, 0>(a, begin, end, sums);
  }
}

PBRF_CPU_MULTIVERSION bool lissa_range_f32(const LissaArgs<float>& a, int64_t begin, int64_t end,
                                           double* sums) {
  return lissa_range_dispatch(a, begin, end, sums);
}

PBRF_CPU_MULTIVERSION bool lissa_range_f64(const LissaArgs<double>& a, int64_t begin, int64_t end,
                                           double* sums) {
  return lissa_range_dispatch(a, begin, end, sums);
}

template <typename T>
bool lissa_typed(const LissaArgs<T>& a, int64_t rows, double* norms_squared, int num_threads) {
  const int threads = std::max(1, num_threads);
  std::vector<double> partial(static_cast<size_t>(threads) * a.cols, 0.0);
  std::vector<char> flags(threads, 0);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    const int nt = omp_get_num_threads();
    const int64_t begin = rows * t / nt;
    const int64_t end = rows * (t + 1) / nt;
    double* sums = partial.data() + t * a.cols;
    if constexpr (sizeof(T) == sizeof(float)) flags[t] = lissa_range_f32(a, begin, end, sums);
    else flags[t] = lissa_range_f64(a, begin, end, sums);
  }
  bool nonfinite = false;
  for (int64_t j = 0; j < a.cols; ++j) norms_squared[j] = 0.0;
  for (int t = 0; t < threads; ++t) {
    nonfinite |= flags[t] != 0;
    for (int64_t j = 0; j < a.cols; ++j) norms_squared[j] += partial[t * a.cols + j];
  }
  return nonfinite;
}

}  // namespace

bool lissa_update(const LissaUpdateArgs& args) {
  double* sums = reinterpret_cast<double*>(args.norms_squared);
  const double keep = 1.0 - args.damping / args.scale;
  const double inv_scale = 1.0 / args.scale;
  return with_element_type(args.dtype, [&](auto zero) {
    using T = decltype(zero);
    LissaArgs<T> a{reinterpret_cast<T*>(args.h), reinterpret_cast<const T*>(args.v),
                   reinterpret_cast<const T*>(args.gh), T(keep), T(inv_scale), args.cols};
    return lissa_typed(a, args.rows, sums, args.launch.threads);
  });
}

}  // namespace pbrf::cpu
