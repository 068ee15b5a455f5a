// Fused Gauss-Newton-vector product of an MLP: forward, tangent (R-op),
// output-Hessian and backward passes for m vectors at once, all matmuls on
// the blocked GEMM of gemm_cpu.cpp, one OpenMP team for the whole call.
//
// Layouts: tangents and back-propagated vectors are (batch, m, width) with
// row index b * m + k, so propagating all m vectors through a layer is one
// GEMM with batch * m rows; the per-vector weight terms are GEMMs batched over
// k, reading each vector's (out, in) weight block in place.
#include <omp.h>

#include <algorithm>
#include <mutex>
#include <stdexcept>
#include <string>

#include "common/cpu_vector_math.h"
#include "common/mlp_gnh.h"
#include "cpu/cpu_ops.h"
#include "cpu/mlp_cpu.h"

namespace pbrf::cpu::mlp {

int64_t Spec::max_width() const { return *std::max_element(dims.begin(), dims.end()); }

int64_t Spec::hidden_width_sum() const {
  int64_t sum = 0;
  for (int l = 1; l < layers(); ++l) sum += dims[l];
  return sum;
}

Spec make_spec(const MlpShape& shape, int loss_kind) {
  const std::vector<int64_t>& dims = shape.dims;
  const std::vector<int>& activations = shape.activations;
  const std::vector<int>& has_bias = shape.has_bias;
  if (dims.size() < 2) throw std::invalid_argument("mlp: need at least one layer");
  const int L = int(dims.size()) - 1;
  if (int(activations.size()) != L - 1 || int(has_bias.size()) != L)
    throw std::invalid_argument("mlp: need len(activations) == layers - 1 and len(has_bias) == layers");
  for (int64_t w : dims)
    if (w < 1) throw std::invalid_argument("mlp: layer widths must be positive");
  for (int a : activations)
    if (a < kIdentity || a > kSigmoid) throw std::invalid_argument("mlp: unknown activation code");
  if (loss_kind != kMse && loss_kind != kCrossEntropy && loss_kind != kBce)
    throw std::invalid_argument("mlp: unknown loss kind code");
  Spec s{dims, activations, has_bias, loss_kind, {}, {}, 0};
  int64_t offset = 0;
  for (int l = 0; l < L; ++l) {
    s.weight_offset.push_back(offset);
    offset += dims[l] * dims[l + 1];
    s.bias_offset.push_back(has_bias[l] ? offset : -1);
    if (has_bias[l]) offset += dims[l + 1];
  }
  s.num_params = offset;
  return s;
}

template <typename T>
BatchStorage<T>::BatchStorage(const Spec& spec, int64_t capacity, bool with_input) {
  if (with_input) input.resize(capacity * spec.dims[0]);
  values.resize(capacity * (2 * spec.hidden_width_sum() + spec.outputs()));
  state.batch = capacity;
  state.input = with_input ? input.data() : nullptr;
  T* p = values.data();
  for (int l = 1; l < spec.layers(); ++l) {
    state.act.push_back(p);
    p += capacity * spec.dims[l];
    state.slope.push_back(p);
    p += capacity * spec.dims[l];
  }
  state.output = p;
}

template struct BatchStorage<float>;
template struct BatchStorage<double>;

namespace {

template <typename T>
gemm::Gemm<T> make_gemm(int64_t M, int64_t N, int64_t K, int64_t batch, gemm::Operand<T> A,
                        gemm::Operand<T> B, T* C, int64_t rs_c, int64_t bs_c, bool accumulate) {
  return gemm::Gemm<T>{M, N, K, batch, A, B, C, rs_c, 1, bs_c, accumulate};
}

// Input of layer l (0-based): the data or the previous hidden activation.
template <typename T>
const T* layer_input(const BatchState<T>& s, int l) {
  return l == 0 ? s.input : s.act[l - 1];
}

template <typename T>
void barrier_after(int num_threads) {
  if (num_threads > 1) {
#pragma omp barrier
  }
}

// rows (batch, m, n) *= slope (batch, n), broadcast over the m vectors.
template <typename T>
void scale_by_slope(T* rows, const T* slope, int64_t batch, int64_t m, int64_t n, int thread,
                    int num_threads) {
  int64_t begin, end;
  split_range(batch, thread, num_threads, &begin, &end);
  for (int64_t b = begin; b < end; ++b)
    for (int64_t k = 0; k < m; ++k) {
      T* row = rows + (b * m + k) * n;
      const T* s = slope + b * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) row[i] *= s[i];
    }
}

// The activation kind is fixed per loop (not tested per element), so each
// loop is branch-free and vectorises.
template <int kKind, typename T>
PBRF_ALWAYS_INLINE void activate_row_kind(T* z, T* slope, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    T a, s;
    activation_and_slope(kKind, z[i], &a, &s);
    z[i] = a;
    slope[i] = s;
  }
}

template <typename T>
PBRF_CPU_MULTIVERSION void activate_row(int kind, T* z, T* slope, int64_t n) {
  switch (kind) {
    case kRelu: return activate_row_kind<kRelu>(z, slope, n);
    case kTanh: return activate_row_kind<kTanh>(z, slope, n);
    case kSigmoid: return activate_row_kind<kSigmoid>(z, slope, n);
    default: return activate_row_kind<kIdentity>(z, slope, n);
  }
}

template <typename T>
void output_hessian_rows(const Spec& spec, const BatchState<T>& s, T* rows, int64_t m, int thread,
                         int num_threads, ThreadScratch<T>& scratch) {
  if (spec.loss_kind == kMse) return;  // H = I
  const int64_t C = spec.outputs();
  if (int64_t(scratch.small.size()) < C) scratch.small.resize(C);
  T* w = scratch.small.data();
  int64_t begin, end;
  split_range(s.batch, thread, num_threads, &begin, &end);
  for (int64_t b = begin; b < end; ++b) {
    const T* y = s.output + b * C;
    if (spec.loss_kind == kCrossEntropy) {
      T row_max = y[0];
      for (int64_t c = 1; c < C; ++c) row_max = max_of(row_max, y[c]);
      T sum = 0;
      for (int64_t c = 0; c < C; ++c) {
        w[c] = exp_of(y[c] - row_max);
        sum += w[c];
      }
      const T inv = T(1) / sum;
      for (int64_t c = 0; c < C; ++c) w[c] *= inv;
      for (int64_t k = 0; k < m; ++k) {
        T* u = rows + (b * m + k) * C;
        T p_dot_u = 0;
        for (int64_t c = 0; c < C; ++c) p_dot_u += w[c] * u[c];
        for (int64_t c = 0; c < C; ++c) u[c] = softmax_hessian_element(w[c], u[c], p_dot_u);
      }
    } else {
      for (int64_t c = 0; c < C; ++c) w[c] = sigmoid_curvature(y[c]);
      for (int64_t k = 0; k < m; ++k) {
        T* u = rows + (b * m + k) * C;
        for (int64_t c = 0; c < C; ++c) u[c] *= w[c];
      }
    }
  }
}

}  // namespace

template <typename T>
void forward_team(const Spec& spec, const T* theta, const BatchState<T>& s, int thread,
                  int num_threads, ThreadScratch<T>& scratch) {
  const int L = spec.layers();
  for (int l = 0; l < L; ++l) {
    const int64_t n_in = spec.dims[l], n_out = spec.dims[l + 1];
    T* z = l + 1 < L ? s.act[l] : s.output;
    // z = input W^T: W (out, in) row-major read as its transpose.
    gemm::gemm_team(make_gemm<T>(s.batch, n_out, n_in, 1, {layer_input(s, l), n_in, 1, 0},
                                 {theta + spec.weight_offset[l], 1, n_in, 0}, z, n_out, 0, false),
                    thread, num_threads, scratch.gemm);
    barrier_after<T>(num_threads);
    const T* bias = spec.has_bias[l] ? theta + spec.bias_offset[l] : nullptr;
    int64_t begin, end;
    split_range(s.batch, thread, num_threads, &begin, &end);
    for (int64_t b = begin; b < end; ++b) {
      T* row = z + b * n_out;
      if (bias) {
#pragma omp simd
        for (int64_t i = 0; i < n_out; ++i) row[i] += bias[i];
      }
      if (l + 1 < L) activate_row(spec.activations[l], row, s.slope[l] + b * n_out, n_out);
    }
    barrier_after<T>(num_threads);
  }
}

template <typename T>
void gnh_team(const Spec& spec, const T* theta, const BatchState<T>& s, const T* V, int64_t ldv,
              int64_t m, T* out, int64_t ldo, T* buffer0, T* buffer1, int thread,
              int num_threads, ThreadScratch<T>& scratch) {
  const int L = spec.layers();
  const int64_t B = s.batch;
  T* cur = buffer0;
  T* other = buffer1;
  int64_t begin, end;
  // ---- tangent pass: t_l = (slope_{l-1} * t_{l-1}) W_l^T + a_{l-1} dW_l^T + db_l
  for (int l = 0; l < L; ++l) {
    const int64_t n_in = spec.dims[l], n_out = spec.dims[l + 1];
    const T* W = theta + spec.weight_offset[l];
    if (l > 0) {
      scale_by_slope(other, s.slope[l - 1], B, m, n_in, thread, num_threads);
      barrier_after<T>(num_threads);
      gemm::gemm_team(make_gemm<T>(B * m, n_out, n_in, 1, {other, n_in, 1, 0}, {W, 1, n_in, 0},
                                   cur, n_out, 0, false),
                      thread, num_threads, scratch.gemm);
      barrier_after<T>(num_threads);
    }
    // One GEMM per vector k, writing rows b * m + k of cur.
    gemm::gemm_team(make_gemm<T>(B, n_out, n_in, m, {layer_input(s, l), n_in, 1, 0},
                                 {V + spec.weight_offset[l], 1, n_in, ldv}, cur, m * n_out, n_out,
                                 l > 0),
                    thread, num_threads, scratch.gemm);
    barrier_after<T>(num_threads);
    if (spec.has_bias[l]) {
      split_range(B, thread, num_threads, &begin, &end);
      for (int64_t b = begin; b < end; ++b)
        for (int64_t k = 0; k < m; ++k) {
          T* row = cur + (b * m + k) * n_out;
          const T* db = V + k * ldv + spec.bias_offset[l];
#pragma omp simd
          for (int64_t i = 0; i < n_out; ++i) row[i] += db[i];
        }
      barrier_after<T>(num_threads);
    }
    std::swap(cur, other);
  }
  // ---- output Hessian, in place on the output tangents (now in `other`)
  T* g = other;
  output_hessian_rows(spec, s, g, m, thread, num_threads, scratch);
  barrier_after<T>(num_threads);
  // ---- backward pass: dW_l = g_l^T a_{l-1}, db_l = sum_b g_l, g_{l-1} = (g_l W_l) * slope
  T* next = cur;
  for (int l = L - 1; l >= 0; --l) {
    const int64_t n_in = spec.dims[l], n_out = spec.dims[l + 1];
    const T* W = theta + spec.weight_offset[l];
    // g viewed per vector k: rows i < n_out, columns (batch) with stride m * n_out.
    gemm::gemm_team(make_gemm<T>(n_out, n_in, B, m, {g, 1, m * n_out, n_out},
                                 {layer_input(s, l), n_in, 1, 0}, out + spec.weight_offset[l],
                                 n_in, ldo, false),
                    thread, num_threads, scratch.gemm);
    if (spec.has_bias[l]) {
      split_range(m * n_out, thread, num_threads, &begin, &end);
      if (int64_t(scratch.small.size()) < end - begin) scratch.small.resize(end - begin);
      T* acc = scratch.small.data();
      std::fill(acc, acc + (end - begin), T(0));
      for (int64_t b = 0; b < B; ++b) {
        const T* row = g + b * m * n_out;
#pragma omp simd
        for (int64_t j = begin; j < end; ++j) acc[j - begin] += row[j];
      }
      for (int64_t j = begin; j < end; ++j)
        out[(j / n_out) * ldo + spec.bias_offset[l] + j % n_out] = acc[j - begin];
    }
    if (l > 0) {
      gemm::gemm_team(make_gemm<T>(B * m, n_in, n_out, 1, {g, n_out, 1, 0}, {W, n_in, 1, 0}, next,
                                   n_in, 0, false),
                      thread, num_threads, scratch.gemm);
      barrier_after<T>(num_threads);
      scale_by_slope(next, s.slope[l - 1], B, m, n_in, thread, num_threads);
      std::swap(g, next);
    }
    barrier_after<T>(num_threads);
  }
}

template void forward_team(const Spec&, const float*, const BatchState<float>&, int, int,
                           ThreadScratch<float>&);
template void forward_team(const Spec&, const double*, const BatchState<double>&, int, int,
                           ThreadScratch<double>&);
template void gnh_team(const Spec&, const float*, const BatchState<float>&, const float*, int64_t,
                       int64_t, float*, int64_t, float*, float*, int, int, ThreadScratch<float>&);
template void gnh_team(const Spec&, const double*, const BatchState<double>&, const double*,
                       int64_t, int64_t, double*, int64_t, double*, double*, int, int,
                       ThreadScratch<double>&);

namespace {

// dst (cols x rows) = src (rows x cols)^T, this thread's share: 2-D tiles
// (both sides stay in L1), split along the longer side.
template <typename T>
void transpose_share(const T* src, T* dst, int64_t rows, int64_t cols, int thread, int num_threads) {
  constexpr int64_t kTile = 32;
  const int64_t row_tiles = (rows + kTile - 1) / kTile, col_tiles = (cols + kTile - 1) / kTile;
  int64_t begin, end;
  split_range(row_tiles * col_tiles, thread, num_threads, &begin, &end);
  for (int64_t tile = begin; tile < end; ++tile) {
    // Row-tile-major when rows dominate, so each thread reads a contiguous band.
    const int64_t rt = rows >= cols ? tile / col_tiles : tile % row_tiles;
    const int64_t ct = rows >= cols ? tile % col_tiles : tile / row_tiles;
    const int64_t r0 = rt * kTile, r1 = std::min(rows, r0 + kTile);
    const int64_t c0 = ct * kTile, c1 = std::min(cols, c0 + kTile);
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t r = r0; r < r1; ++r) dst[c * rows + r] = src[r * cols + c];
  }
}

// V and out are (d, m) row-major like the Python block; for m > 1 the kernel
// works on (m, d) copies (each vector's weight blocks then are plain
// matrices) and transposes in and out here, tile-wise and in parallel.
// Small products split the batch among the threads (batch_split_threads):
// thread 0 writes into `out`, the others into their own blocks, summed at the end.
template <typename T>
void product_typed(const Spec& spec, const T* x, const T* theta, const T* V_dm, T* out_dm,
                   int64_t batch, int64_t m, int num_threads) {
  const int64_t d = spec.num_params;
  const int split = batch_split_threads(spec, batch, m, num_threads, sizeof(T));
  const int threads = split > 1 ? split : useful_threads(spec, batch, m, num_threads);
  // The transposed copies and per-thread results are large ((2 + split - 1) m d);
  // reusing one buffer across calls spares the page faults of fresh
  // allocations. Concurrent calls take turns.
  static std::mutex pool_mutex;
  static std::vector<T> pool;
  std::unique_lock<std::mutex> pool_lock(pool_mutex, std::defer_lock);
  const int64_t transposed_size = m > 1 ? 2 * m * d : 0;
  const int64_t pool_size = transposed_size + (split - 1) * m * d;
  if (pool_size > 0) {
    pool_lock.lock();
    if (int64_t(pool.size()) < pool_size) {
      pool.clear();
      pool.shrink_to_fit();
      pool.resize(pool_size);
    }
  }
  const T* V = m > 1 ? pool.data() : V_dm;
  T* out = m > 1 ? pool.data() + m * d : out_dm;
  T* extra = pool.data() + transposed_size;  // (split - 1) blocks of (m, d)
  BatchStorage<T> storage(spec, batch, false);
  storage.state.input = x;
  WorkBuffers<T> buffers(spec, batch, m, split);
#pragma omp parallel num_threads(threads)
  {
    ThreadScratch<T> scratch;
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    if (m > 1) transpose_share(V_dm, const_cast<T*>(V), d, m, t, nt);
    if (split > 1 && nt == split) {
      if (m > 1) {
#pragma omp barrier
      }
      int64_t row0, row1;
      split_range(batch, t, nt, &row0, &row1);
      const BatchState<T> rows = rows_of(spec, storage.state, row0, row1);
      T* mine = t == 0 ? out : extra + (t - 1) * m * d;
      T* buffer0 = buffers.slice(t);
      forward_team(spec, theta, rows, 0, 1, scratch);
      gnh_team(spec, theta, rows, V, d, m, mine, d, buffer0, buffer0 + buffers.slice_size, 0, 1,
               scratch);
#pragma omp barrier
      int64_t begin, end;
      split_range(m * d, t, nt, &begin, &end);
      for (int part = 1; part < nt; ++part) {
        const T* other = extra + (part - 1) * m * d;
#pragma omp simd
        for (int64_t p = begin; p < end; ++p) out[p] += other[p];
      }
#pragma omp barrier
    } else {
      T* buffer0 = buffers.team();
      forward_team(spec, theta, storage.state, t, nt, scratch);  // ends with a barrier
      gnh_team(spec, theta, storage.state, V, d, m, out, d, buffer0, buffer0 + buffers.team_size,
               t, nt, scratch);
    }
    if (m > 1) transpose_share(out, out_dm, m, d, t, nt);
  }
}

}  // namespace
}  // namespace pbrf::cpu::mlp

namespace pbrf::cpu {

void mlp_gnh_product(const MlpGnhProductArgs& args) {
  const mlp::Spec spec = mlp::make_spec(args.mlp, args.loss_kind);
  if (args.batch < 1 || args.num_vectors < 1)
    throw std::invalid_argument("mlp_gnh_product: empty batch or block");
  with_element_type(args.dtype, [&](auto zero) {
    using T = decltype(zero);
    mlp::product_typed(spec, reinterpret_cast<const T*>(args.inputs),
                       reinterpret_cast<const T*>(args.theta), reinterpret_cast<const T*>(args.vectors),
                       reinterpret_cast<T*>(args.out), args.batch, args.num_vectors,
                       args.launch.threads);
  });
}

}  // namespace pbrf::cpu
