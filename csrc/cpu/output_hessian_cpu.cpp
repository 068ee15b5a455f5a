// H_y u for a batch of examples and M vectors per example, fused: the
// per-example curvature (softmax p or sigmoid weight) is computed once per row
// tile and applied to every vector.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "common/cpu_vector_math.h"
#include "common/loss_math.h"
#include "cpu/cpu_ops.h"

namespace pbrf::cpu {
namespace {

template <typename T>
struct HessianArgs {
  int loss_kind;
  const T* logits;
  const T* vectors;
  T* out;
  int64_t batch, classes, num_vectors;
};

// Rows per tile: enough that each vector's slice is a long contiguous stream,
// small enough that the tile's curvature stays in L1/L2.
int64_t rows_per_tile(int64_t classes) {
  return std::max<int64_t>(1, 4096 / std::max<int64_t>(classes, 1));
}

template <typename T>
PBRF_ALWAYS_INLINE void softmax_row(const T* logits, T* p, int64_t classes) {
  T row_max = logits[0];
#pragma omp simd reduction(max : row_max)
  for (int64_t c = 1; c < classes; ++c) row_max = max_of(row_max, logits[c]);
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < classes; ++c) {
    p[c] = exp_of(logits[c] - row_max);
    sum += p[c];
  }
  const T inv_sum = T(1) / sum;
#pragma omp simd
  for (int64_t c = 0; c < classes; ++c) p[c] *= inv_sum;  // = softmax_probability
}

// kClasses > 0 fixes the row length at compile time: rows of a few classes
// (MNIST, CIFAR-10) then unroll fully instead of running tiny loops.
template <int kClasses, typename T>
PBRF_ALWAYS_INLINE void cross_entropy_tile_fixed(const T* p, const T* u, T* out, int64_t rows,
                                                 int64_t runtime_classes) {
  const int64_t classes = kClasses > 0 ? kClasses : runtime_classes;
  for (int64_t r = 0; r < rows; ++r) {
    const T* p_row = p + r * classes;
    const T* u_row = u + r * classes;
    T* out_row = out + r * classes;
    T p_dot_u = 0;
#pragma omp simd reduction(+ : p_dot_u)
    for (int64_t c = 0; c < classes; ++c) p_dot_u += p_row[c] * u_row[c];
#pragma omp simd
    for (int64_t c = 0; c < classes; ++c)
      out_row[c] = softmax_hessian_element(p_row[c], u_row[c], p_dot_u);
  }
}

template <typename T>
PBRF_ALWAYS_INLINE void cross_entropy_tile(const T* p, const T* u, T* out, int64_t rows,
                                           int64_t classes) {
  switch (classes) {
    case 2: return cross_entropy_tile_fixed<2>(p, u, out, rows, classes);
    case 10: return cross_entropy_tile_fixed<10>(p, u, out, rows, classes);
    case 100: return cross_entropy_tile_fixed<100>(p, u, out, rows, classes);
    default: return cross_entropy_tile_fixed<0>(p, u, out, rows, classes);
  }
}

template <typename T>
PBRF_ALWAYS_INLINE void tile_curvature(const HessianArgs<T>& a, int64_t offset, int64_t rows,
                                       T* curvature) {
  if (a.loss_kind == kCrossEntropy) {
    for (int64_t r = 0; r < rows; ++r)
      softmax_row(a.logits + offset + r * a.classes, curvature + r * a.classes, a.classes);
  } else if (a.loss_kind == kBce) {
    const int64_t count = rows * a.classes;
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) curvature[i] = sigmoid_curvature(a.logits[offset + i]);
  }
}

template <typename T>
PBRF_ALWAYS_INLINE void hessian_tiles(const HessianArgs<T>& a, int64_t first, int64_t last,
                                      T* curvature) {
  const int64_t tile_rows = rows_per_tile(a.classes);
  const int64_t vector_stride = a.batch * a.classes;
  for (int64_t tile = first; tile < last; ++tile) {
    const int64_t rows = std::min(tile_rows, a.batch - tile * tile_rows);
    const int64_t offset = tile * tile_rows * a.classes;
    const int64_t count = rows * a.classes;
    tile_curvature(a, offset, rows, curvature);
    for (int64_t m = 0; m < a.num_vectors; ++m) {
      const T* u = a.vectors + m * vector_stride + offset;
      T* o = a.out + m * vector_stride + offset;
      if (a.loss_kind == kCrossEntropy) {
        cross_entropy_tile(curvature, u, o, rows, a.classes);
      } else if (a.loss_kind == kBce) {
#pragma omp simd
        for (int64_t i = 0; i < count; ++i) o[i] = curvature[i] * u[i];
      } else {
        std::memcpy(o, u, count * sizeof(T));  // MSE: H_y = I
      }
    }
  }
}

PBRF_CPU_MULTIVERSION void hessian_tiles_f32(const HessianArgs<float>& a, int64_t first,
                                             int64_t last, float* curvature) {
  hessian_tiles(a, first, last, curvature);
}

PBRF_CPU_MULTIVERSION void hessian_tiles_f64(const HessianArgs<double>& a, int64_t first,
                                             int64_t last, double* curvature) {
  hessian_tiles(a, first, last, curvature);
}

template <typename T>
void output_hessian_typed(const HessianArgs<T>& a, int num_threads) {
  const int64_t tile_rows = rows_per_tile(a.classes);
  const int64_t num_tiles = (a.batch + tile_rows - 1) / tile_rows;
#pragma omp parallel num_threads(std::max(1, num_threads))
  {
    std::vector<T> curvature(tile_rows * a.classes);
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t first = num_tiles * t / nt, last = num_tiles * (t + 1) / nt;
    if constexpr (sizeof(T) == sizeof(float)) hessian_tiles_f32(a, first, last, curvature.data());
    else hessian_tiles_f64(a, first, last, curvature.data());
  }
}

}  // namespace

void output_hessian_product(const OutputHessianArgs& args) {
  if (args.loss_kind != kMse && args.loss_kind != kCrossEntropy && args.loss_kind != kBce)
    throw std::invalid_argument("unknown loss kind code");
  if (args.batch == 0 || args.classes == 0 || args.num_vectors == 0) return;
  with_element_type(args.dtype, [&](auto zero) {
    using T = decltype(zero);
    output_hessian_typed(HessianArgs<T>{args.loss_kind, reinterpret_cast<const T*>(args.logits),
                                        reinterpret_cast<const T*>(args.vectors),
                                        reinterpret_cast<T*>(args.out), args.batch, args.classes,
                                        args.num_vectors},
                         args.launch.threads);
  });
}

}  // namespace pbrf::cpu
