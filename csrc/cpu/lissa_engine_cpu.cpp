// The stochastic LiSSA recursion (Eq. 52) for MLPs, entirely in C++: one
// OpenMP team runs every repeat and step, with the fused GNH product of
// mlp_gnh_cpu.cpp, so no Python runs per step.
//
// Per step t of repeat r, with S = sum over the batch schedule[r][t] of
// J_i^T H_i J_i h (the network's forward state is cached for all n training
// inputs when it fits the budget, else recomputed for the batch):
//   h <- v + (1 - (damping + weight_decay)/scale) h - S / (batch * scale)
// which is solvers.lissa's  gh = S/batch + weight_decay h;
//                           h <- v + (1 - damping/scale) h - gh/scale.
// The per-column norms are checked like solvers._check_lissa_step.
//
// Two ways to share a step among the threads (mlp::batch_split_threads):
// - split batch (small networks): each thread takes a fixed slice of the
//   batch through the whole product alone, into its own S; the slices' S are
//   summed in the update. Two barriers per step instead of two per GEMM.
// - team (big layers, or too little memory for a per-thread S): the whole
//   team cooperates on every GEMM of the product.
// Either way a run is deterministic for a given thread count.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "common/cpu_vector_math.h"
#include "common/host_device.h"
#include "common/loss_math.h"
#include "cpu/cpu_ops.h"
#include "cpu/mlp_cpu.h"

namespace pbrf::cpu {
namespace {

using mlp::split_range;

template <typename T>
struct Engine {
  const mlp::Spec& spec;
  const T* x;
  int64_t n;
  const T* theta;
  const T* v;
  int64_t m;
  const int64_t* schedule;
  int64_t repeats, depth, batch;
  double weight_decay, damping, scale;
  const double* limits;
  double ceiling;
  int64_t check_every;
  T* total;
  double* failure_norms;
  bool cache_forward;
};

// Copy rows `idx` of the inputs (and of the cached full-data state) into the batch state.
template <typename T>
void gather_rows(const mlp::Spec& spec, const mlp::BatchState<T>& full, const T* x,
                 const int64_t* idx, const mlp::BatchState<T>& dst, T* dst_input, bool cached,
                 int thread, int num_threads) {
  int64_t begin, end;
  split_range(dst.batch, thread, num_threads, &begin, &end);
  const int L = spec.layers();
  for (int64_t b = begin; b < end; ++b) {
    const int64_t i = idx[b];
    std::copy_n(x + i * spec.dims[0], spec.dims[0], dst_input + b * spec.dims[0]);
    if (!cached) continue;
    for (int l = 1; l < L; ++l) {
      std::copy_n(full.act[l - 1] + i * spec.dims[l], spec.dims[l], dst.act[l - 1] + b * spec.dims[l]);
      std::copy_n(full.slope[l - 1] + i * spec.dims[l], spec.dims[l], dst.slope[l - 1] + b * spec.dims[l]);
    }
    std::copy_n(full.output + i * spec.outputs(), spec.outputs(), dst.output + b * spec.outputs());
  }
}

// h[lo, hi) <- v + keep h - coef S; returns the sum of squares of the new
// values (non-finite exactly when some new value is: a float squared cannot
// overflow a double).
template <typename T>
PBRF_CPU_MULTIVERSION double update_range(T* __restrict h, const T* __restrict v,
                                          const T* __restrict S, T keep, T coef, int64_t lo,
                                          int64_t hi) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t p = lo; p < hi; ++p) {
    const T value = v[p] + keep * h[p] - coef * S[p];
    h[p] = value;
    sum += double(value) * double(value);
  }
  return sum;
}

// h <- v + keep (sum of the `parts` S blocks, stride part_stride) ... over
// this thread's share of the m * d entries; squared column norms into
// partial[0..m), returns whether any new value is non-finite.
template <typename T>
bool update_share(T* h, const T* v, T* S, int parts, int64_t part_stride, T keep, T coef,
                  int64_t m, int64_t d, int thread, int num_threads, double* partial) {
  int64_t begin, end;
  split_range(m * d, thread, num_threads, &begin, &end);
  // Fold the other parts into part 0 (fixed order, so the sum is reproducible).
  for (int part = 1; part < parts; ++part) {
    const T* other = S + part * part_stride;
#pragma omp simd
    for (int64_t p = begin; p < end; ++p) S[p] += other[p];
  }
  bool nonfinite = false;
  for (int64_t k = 0; k < m; ++k) partial[k] = 0.0;
  for (int64_t k = begin / d; k < m && k * d < end; ++k) {
    const int64_t lo = std::max(begin, k * d), hi = std::min(end, (k + 1) * d);
    partial[k] = update_range(h, v, S, keep, coef, lo, hi);
    nonfinite |= !std::isfinite(partial[k]);
  }
  return nonfinite;
}

template <typename T>
LissaOutcome run_engine(const Engine<T>& e, int num_threads) {
  const mlp::Spec& spec = e.spec;
  const int64_t d = spec.num_params, m = e.m;
  const int split_threads = mlp::batch_split_threads(spec, e.batch, m, num_threads, sizeof(T));
  const bool split = split_threads > 1;
  const int threads = split ? split_threads : mlp::useful_threads(spec, e.batch, e.m, num_threads);
  const int parts = split ? threads : 1;
  mlp::BatchStorage<T> full(spec, e.cache_forward ? e.n : 1, false);
  full.state.input = e.x;
  full.state.batch = e.n;
  mlp::BatchStorage<T> step_state(spec, e.batch, true);
  std::vector<T> h(m * d), S(parts * m * d);
  mlp::WorkBuffers<T> buffers(spec, e.batch, m, parts);
  std::vector<double> partial(threads * m);
  std::vector<char> flags(threads);
  const T keep = T(1.0 - (e.damping + e.weight_decay) / e.scale);
  const T coef = T(1.0 / (double(e.batch) * e.scale));
  LissaOutcome outcome;

#pragma omp parallel num_threads(threads)
  {
    mlp::ThreadScratch<T> scratch;
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    // A team of fewer threads than asked for still covers the whole batch.
    const bool split_here = split && nt == threads;
    const int part = split_here ? t : 0;
    int64_t row0 = 0, row1 = e.batch;
    if (split_here) mlp::split_range(e.batch, t, nt, &row0, &row1);
    const mlp::BatchState<T> rows = mlp::rows_of(spec, step_state.state, row0, row1);
    // Product calls below run on this thread alone (split) or on the team.
    const int pt = split_here ? 0 : t, pnt = split_here ? 1 : nt;
    T* my_S = S.data() + part * m * d;
    T* buffer0 = split_here ? buffers.slice(part) : buffers.team();
    T* buffer1 = buffer0 + (split_here ? buffers.slice_size : buffers.team_size);
    int64_t begin, end;
    split_range(m * d, t, nt, &begin, &end);
    std::fill(e.total + begin, e.total + end, T(0));
    if (e.cache_forward) mlp::forward_team(spec, e.theta, full.state, t, nt, scratch);
    bool stop = false;
    for (int64_t r = 0; r < e.repeats && !stop; ++r) {
      std::copy(e.v + begin, e.v + end, h.data() + begin);
#pragma omp barrier
      for (int64_t step = 0; step < e.depth; ++step) {
        const int64_t* idx = e.schedule + (r * e.depth + step) * e.batch + row0;
        gather_rows(spec, full.state, e.x, idx, rows, const_cast<T*>(rows.input), e.cache_forward,
                    pt, pnt);
        if (!split_here) {
#pragma omp barrier
        }
        if (!e.cache_forward) mlp::forward_team(spec, e.theta, rows, pt, pnt, scratch);
        mlp::gnh_team(spec, e.theta, rows, h.data(), d, m, my_S, d, buffer0, buffer1, pt, pnt,
                      scratch);
        if (split_here) {
#pragma omp barrier
        }
        flags[t] = update_share(h.data(), e.v, S.data(), split_here ? nt : 1, m * d, keep, coef, m,
                                d, t, nt, partial.data() + t * m);
#pragma omp barrier
        // Every thread evaluates the check (a few numbers), so all agree on
        // stopping without another barrier; thread 0 records the outcome.
        bool nonfinite = false;
        for (int i = 0; i < nt; ++i) nonfinite |= flags[i] != 0;
        if (nonfinite || (step + 1) % e.check_every == 0) {
          const double bound = std::min(double(step + 2), e.ceiling);
          bool bad = nonfinite;
          for (int64_t k = 0; k < m && !bad; ++k) {
            double sq = 0.0;
            for (int i = 0; i < nt; ++i) sq += partial[i * m + k];
            const double norm = std::sqrt(sq);
            bad |= !std::isfinite(norm) || norm > e.limits[k] * bound + 1e-30;
          }
          if (bad) {
            stop = true;
            if (t == 0) {
              outcome = LissaOutcome{true, nonfinite, r, step};
              for (int64_t k = 0; k < m; ++k) {
                double sq = 0.0;
                for (int i = 0; i < nt; ++i) sq += partial[i * m + k];
                e.failure_norms[k] = std::sqrt(sq);
              }
            }
          }
        }
        if (stop) break;
      }
      if (!stop)
        for (int64_t p = begin; p < end; ++p) e.total[p] += h[p];
    }
  }
  return outcome;
}

}  // namespace

LissaOutcome mlp_lissa(const MlpLissaArgs& args) {
  const mlp::Spec spec = mlp::make_spec(args.mlp, args.loss_kind);
  if (args.num_examples < 1 || args.num_vectors < 1 || args.batch < 1 || args.repeats < 1 ||
      args.depth < 1 || args.check_every < 1)
    throw std::invalid_argument("mlp_lissa: sizes and check_every must be positive");
  if (!(args.scale > 0) || !std::isfinite(args.scale))
    throw std::invalid_argument("mlp_lissa: bad scale");
  const int64_t element = int64_t(element_bytes(args.dtype));
  const int64_t cache_bytes =
      args.num_examples * (2 * spec.hidden_width_sum() + spec.outputs()) * element;
  const bool cache = cache_bytes <= args.cache_budget_bytes;
  return with_element_type(args.dtype, [&](auto zero) {
    using T = decltype(zero);
    Engine<T> e{spec, reinterpret_cast<const T*>(args.inputs), args.num_examples,
                reinterpret_cast<const T*>(args.theta), reinterpret_cast<const T*>(args.v),
                args.num_vectors, reinterpret_cast<const int64_t*>(args.schedule), args.repeats,
                args.depth, args.batch, args.weight_decay, args.damping, args.scale,
                reinterpret_cast<const double*>(args.limits), args.ceiling, args.check_every,
                reinterpret_cast<T*>(args.total), reinterpret_cast<double*>(args.failure_norms),
                cache};
    return run_engine(e, args.launch.threads);
  });
}

}  // namespace pbrf::cpu
