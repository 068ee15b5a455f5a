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
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "common/host_device.h"
#include "common/loss_math.h"
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
                 const int64_t* idx, mlp::BatchState<T>& dst, T* dst_input, bool cached,
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

// h <- v + keep h - coef S over this thread's share; squared column norms
// into partial[0..m), returns whether any new value is non-finite.
template <typename T>
bool update_share(T* h, const T* v, const T* S, T keep, T coef, int64_t m, int64_t d,
                  int thread, int num_threads, double* partial) {
  int64_t begin, end;
  split_range(m * d, thread, num_threads, &begin, &end);
  bool nonfinite = false;
  for (int64_t k = 0; k < m; ++k) partial[k] = 0.0;
  for (int64_t k = begin / d; k < m && k * d < end; ++k) {
    const int64_t lo = std::max(begin, k * d), hi = std::min(end, (k + 1) * d);
    double sum = 0.0;
    bool bad = false;
#pragma omp simd reduction(+ : sum) reduction(| : bad)
    for (int64_t p = lo; p < hi; ++p) {
      const T value = v[p] + keep * h[p] - coef * S[p];
      h[p] = value;
      sum += double(value) * double(value);
      bad |= is_nonfinite(value);
    }
    partial[k] = sum;
    nonfinite |= bad;
  }
  return nonfinite;
}

template <typename T>
LissaOutcome run_engine(const Engine<T>& e, int num_threads) {
  const mlp::Spec& spec = e.spec;
  const int64_t d = spec.num_params, m = e.m;
  const int threads = mlp::useful_threads(spec, e.batch, e.m, num_threads);
  mlp::BatchStorage<T> full(spec, e.cache_forward ? e.n : 1, false);
  full.state.input = e.x;
  full.state.batch = e.n;
  mlp::BatchStorage<T> step_state(spec, e.batch, true);
  std::vector<T> h(m * d), S(m * d);
  std::vector<T> buffers(2 * e.batch * m * spec.max_width());
  T* buffer0 = buffers.data();
  T* buffer1 = buffer0 + e.batch * m * spec.max_width();
  std::vector<double> partial(threads * m), norms(m);
  std::vector<char> flags(threads);
  const T keep = T(1.0 - (e.damping + e.weight_decay) / e.scale);
  const T coef = T(1.0 / (double(e.batch) * e.scale));
  LissaOutcome outcome;
  bool stop = false;

#pragma omp parallel num_threads(threads)
  {
    mlp::ThreadScratch<T> scratch;
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t begin, end;
    split_range(m * d, t, nt, &begin, &end);
    std::fill(e.total + begin, e.total + end, T(0));
    if (e.cache_forward) mlp::forward_team(spec, e.theta, full.state, t, nt, scratch);
    for (int64_t r = 0; r < e.repeats && !stop; ++r) {
      std::copy(e.v + begin, e.v + end, h.data() + begin);
#pragma omp barrier
      for (int64_t step = 0; step < e.depth; ++step) {
        const int64_t* idx = e.schedule + (r * e.depth + step) * e.batch;
        gather_rows(spec, full.state, e.x, idx, step_state.state, step_state.input.data(),
                    e.cache_forward, t, nt);
#pragma omp barrier
        if (!e.cache_forward) mlp::forward_team(spec, e.theta, step_state.state, t, nt, scratch);
        mlp::gnh_team(spec, e.theta, step_state.state, h.data(), d, m, S.data(), d, buffer0,
                      buffer1, t, nt, scratch);
        flags[t] = update_share(h.data(), e.v, S.data(), keep, coef, m, d, t, nt,
                                partial.data() + t * m);
#pragma omp barrier
#pragma omp single
        {
          bool nonfinite = false;
          for (int i = 0; i < nt; ++i) nonfinite |= flags[i] != 0;
          if (nonfinite || (step + 1) % e.check_every == 0) {
            const double bound = std::min(double(step + 2), e.ceiling);
            bool bad = nonfinite;
            for (int64_t k = 0; k < m; ++k) {
              double sq = 0.0;
              for (int i = 0; i < nt; ++i) sq += partial[i * m + k];
              norms[k] = std::sqrt(sq);
              const double limit = e.limits[k] * bound + 1e-30;
              bad |= !std::isfinite(norms[k]) || norms[k] > limit;
            }
            if (bad) {
              stop = true;
              outcome = LissaOutcome{true, nonfinite, r, step};
              std::copy(norms.begin(), norms.end(), e.failure_norms);
            }
          }
        }  // implicit barrier: every thread sees `stop`
        if (stop) break;
      }
      if (!stop)
        for (int64_t p = begin; p < end; ++p) e.total[p] += h[p];
    }
  }
  return outcome;
}

}  // namespace

LissaOutcome mlp_lissa(bool double_precision, const std::vector<int64_t>& dims,
                       const std::vector<int>& activations, const std::vector<int>& has_bias,
                       int loss_kind, uintptr_t inputs, int64_t num_examples, uintptr_t theta,
                       uintptr_t v, int64_t num_vectors, uintptr_t schedule, int64_t repeats,
                       int64_t depth, int64_t batch, double weight_decay, double damping,
                       double scale, uintptr_t limits, double ceiling, int64_t check_every,
                       uintptr_t total, uintptr_t failure_norms, int64_t cache_budget_bytes,
                       int num_threads) {
  const mlp::Spec spec = mlp::make_spec(dims, activations, has_bias, loss_kind);
  if (num_examples < 1 || num_vectors < 1 || batch < 1 || repeats < 1 || depth < 1 || check_every < 1)
    throw std::invalid_argument("mlp_lissa: sizes and check_every must be positive");
  if (!(scale > 0) || !std::isfinite(scale)) throw std::invalid_argument("mlp_lissa: bad scale");
  const int64_t element = double_precision ? 8 : 4;
  const int64_t cache_bytes =
      num_examples * (2 * spec.hidden_width_sum() + spec.outputs()) * element;
  const bool cache = cache_bytes <= cache_budget_bytes;
  auto go = [&](auto zero) {
    using T = decltype(zero);
    Engine<T> e{spec, reinterpret_cast<const T*>(inputs), num_examples,
                reinterpret_cast<const T*>(theta), reinterpret_cast<const T*>(v), num_vectors,
                reinterpret_cast<const int64_t*>(schedule), repeats, depth, batch, weight_decay,
                damping, scale, reinterpret_cast<const double*>(limits), ceiling, check_every,
                reinterpret_cast<T*>(total), reinterpret_cast<double*>(failure_norms), cache};
    return run_engine(e, num_threads);
  };
  return double_precision ? go(0.0) : go(0.0f);
}

}  // namespace pbrf::cpu
