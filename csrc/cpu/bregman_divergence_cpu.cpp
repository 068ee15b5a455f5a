// Bregman divergence of the loss in output space, value and gradient in one
// pass per row: D(y, y_ref) = L(y) - L(y_ref) - grad L(y_ref)^T (y - y_ref).
#include <omp.h>

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "common/cpu_vector_math.h"
#include "common/loss_math.h"
#include "cpu/cpu_ops.h"

namespace pbrf::cpu {
namespace {

template <typename T>
struct BregmanArgs {
  int loss_kind;
  const T* outputs;
  const T* ref_outputs;
  T* values;
  T* grad;
  int64_t batch, classes;
};

template <typename T>
PBRF_ALWAYS_INLINE T row_max(const T* row, int64_t classes) {
  T result = row[0];
#pragma omp simd reduction(max : result)
  for (int64_t c = 1; c < classes; ++c) result = max_of(result, row[c]);
  return result;
}

// exp(y - max) is computed once per element and parked in `grad` (for y) and
// `ref_exp` (for y_ref), so each element costs two exponentials in total.
template <typename T>
PBRF_ALWAYS_INLINE T cross_entropy_row(const T* y, const T* y_ref, T* grad, T* ref_exp,
                                       int64_t classes) {
  const T max_y = row_max(y, classes), max_ref = row_max(y_ref, classes);
  T sum_y = 0, sum_ref = 0, linear = 0;
#pragma omp simd reduction(+ : sum_y, sum_ref, linear)
  for (int64_t c = 0; c < classes; ++c) {
    grad[c] = exp_of(y[c] - max_y);
    ref_exp[c] = exp_of(y_ref[c] - max_ref);
    sum_y += grad[c];
    sum_ref += ref_exp[c];
    linear += cross_entropy_linear_term(ref_exp[c], y[c], y_ref[c]);  // unnormalised p_ref
  }
  const T inv_y = T(1) / sum_y, inv_ref = T(1) / sum_ref;
#pragma omp simd
  for (int64_t c = 0; c < classes; ++c) grad[c] = grad[c] * inv_y - ref_exp[c] * inv_ref;
  return log_sum_exp_from_stats(max_y, sum_y) - log_sum_exp_from_stats(max_ref, sum_ref) -
         linear * inv_ref;
}

template <typename T>
PBRF_ALWAYS_INLINE T elementwise_row(int loss_kind, const T* y, const T* y_ref, T* grad,
                                     int64_t classes) {
  T value = 0;
  if (loss_kind == kMse) {
#pragma omp simd reduction(+ : value)
    for (int64_t c = 0; c < classes; ++c) {
      value += mse_bregman_element(y[c], y_ref[c]);
      grad[c] = y[c] - y_ref[c];
    }
  } else {
    for (int64_t c = 0; c < classes; ++c) {  // log1p is a scalar libm call
      value += bce_bregman_element(y[c], y_ref[c]);
      grad[c] = bce_bregman_grad(y[c], y_ref[c]);
    }
  }
  return value;
}

template <typename T>
PBRF_ALWAYS_INLINE void bregman_rows(const BregmanArgs<T>& a, int64_t first, int64_t last,
                                     T* scratch) {
  for (int64_t b = first; b < last; ++b) {
    const int64_t offset = b * a.classes;
    const T* y = a.outputs + offset;
    const T* y_ref = a.ref_outputs + offset;
    a.values[b] = a.loss_kind == kCrossEntropy
                      ? cross_entropy_row(y, y_ref, a.grad + offset, scratch, a.classes)
                      : elementwise_row(a.loss_kind, y, y_ref, a.grad + offset, a.classes);
  }
}

PBRF_CPU_MULTIVERSION void bregman_rows_f32(const BregmanArgs<float>& a, int64_t first,
                                            int64_t last, float* scratch) {
  bregman_rows(a, first, last, scratch);
}

PBRF_CPU_MULTIVERSION void bregman_rows_f64(const BregmanArgs<double>& a, int64_t first,
                                            int64_t last, double* scratch) {
  bregman_rows(a, first, last, scratch);
}

template <typename T>
void bregman_typed(const BregmanArgs<T>& a, int num_threads) {
#pragma omp parallel num_threads(std::max(1, num_threads))
  {
    std::vector<T> scratch(a.classes);
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t first = a.batch * t / nt, last = a.batch * (t + 1) / nt;
    if constexpr (sizeof(T) == sizeof(float)) bregman_rows_f32(a, first, last, scratch.data());
    else bregman_rows_f64(a, first, last, scratch.data());
  }
}

}  // namespace

void bregman_divergence(const BregmanDivergenceArgs& args) {
  if (args.loss_kind != kMse && args.loss_kind != kCrossEntropy && args.loss_kind != kBce)
    throw std::invalid_argument("unknown loss kind code");
  if (args.batch == 0) return;
  if (args.classes == 0)
    throw std::invalid_argument("bregman_divergence needs at least one output per example");
  with_element_type(args.dtype, [&](auto zero) {
    using T = decltype(zero);
    bregman_typed(BregmanArgs<T>{args.loss_kind, reinterpret_cast<const T*>(args.outputs),
                                 reinterpret_cast<const T*>(args.ref_outputs),
                                 reinterpret_cast<T*>(args.values), reinterpret_cast<T*>(args.grad),
                                 args.batch, args.classes},
                  args.launch.threads);
  });
}

}  // namespace pbrf::cpu
