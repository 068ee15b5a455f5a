// The fused MLP Gauss-Newton machinery shared by the product op
// (mlp_gnh_cpu.cpp) and the native LiSSA engine (lissa_engine_cpu.cpp); their
// entry points are declared in cpu/cpu_ops.h.
//
// An MLP is L Linear layers, widths dims[0..L], with an elementwise
// activation after every layer but the last; parameters are flattened like
// pbrf_fast.Problem: for each layer the weight (out, in) row-major, then the
// bias if present. Blocks of m vectors are stored transposed, (m, d) with a
// row stride, so each vector's weight block is a plain (out, in) matrix.
//
// All routines below are team-cooperative: every thread of an OpenMP team
// calls them with its id and they end with a barrier.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/kernel_args.h"
#include "cpu/gemm_cpu.h"

namespace pbrf::cpu::mlp {

struct Spec {
  std::vector<int64_t> dims;       // L + 1 widths
  std::vector<int> activations;    // L - 1 codes (common/mlp_gnh.h ActivationKind)
  std::vector<int> has_bias;       // L flags
  int loss_kind = 0;               // common/host_device.h LossKind
  std::vector<int64_t> weight_offset, bias_offset;  // into the flat parameters
  int64_t num_params = 0;

  int layers() const { return int(dims.size()) - 1; }
  int64_t outputs() const { return dims.back(); }
  int64_t max_width() const;
  int64_t hidden_width_sum() const;  // sum of dims[1..L-1]
};

// Validates and fills the offsets; throws std::invalid_argument.
Spec make_spec(const MlpShape& shape, int loss_kind);

// Forward state of a batch: post-activation values and activation slopes of
// every hidden layer (batch x dims[l+1]) and the network outputs (batch x C).
template <typename T>
struct BatchState {
  int64_t batch = 0;
  const T* input = nullptr;  // batch x dims[0]
  std::vector<T*> act, slope;
  T* output = nullptr;
};

// Owns the storage of a BatchState for up to `capacity` rows.
template <typename T>
struct BatchStorage {
  std::vector<T> input, values;
  BatchState<T> state;
  BatchStorage(const Spec& spec, int64_t capacity, bool with_input);
};

template <typename T>
struct ThreadScratch {
  gemm::Workspace<T> gemm;
  std::vector<T> small;
};

// state.act/slope/output <- forward pass of state.input through theta.
template <typename T>
void forward_team(const Spec& spec, const T* theta, const BatchState<T>& state, int thread,
                  int num_threads, ThreadScratch<T>& scratch);

// out[k] = sum over the batch of J_i^T H_i J_i vectors[k], k < m, with
// vectors/out of shape (m, d) and row strides ld_vectors / ld_out.
// buffers: two arrays of batch * m * spec.max_width() elements each.
template <typename T>
void gnh_team(const Spec& spec, const T* theta, const BatchState<T>& state, const T* vectors,
              int64_t ld_vectors, int64_t m, T* out, int64_t ld_out, T* buffer0, T* buffer1,
              int thread, int num_threads, ThreadScratch<T>& scratch);

// Threads worth using for one product of `batch` rows and m vectors: every
// parallel phase ends in a barrier, so small products run on one thread (a
// team on busy cores mostly waits) and each extra thread gets >= ~4 MFLOP.
inline int useful_threads(const Spec& spec, int64_t batch, int64_t m, int num_threads) {
  double flops = 0;
  for (int l = 0; l < spec.layers(); ++l)
    flops += 2.0 * double(batch) * double(spec.dims[l]) * double(spec.dims[l + 1]) * double(1 + 4 * m);
  const double per_thread = 4e6;
  return int(std::max(1.0, std::min(double(std::max(1, num_threads)), flops / per_thread)));
}

// Rows [begin, end) of a batch state (a view: the pointers move, nothing is copied).
template <typename T>
BatchState<T> rows_of(const Spec& spec, const BatchState<T>& s, int64_t begin, int64_t end) {
  BatchState<T> view = s;
  view.batch = end - begin;
  if (view.input) view.input += begin * spec.dims[0];
  for (int l = 1; l < spec.layers(); ++l) {
    view.act[l - 1] += begin * spec.dims[l];
    view.slope[l - 1] += begin * spec.dims[l];
  }
  view.output += begin * spec.outputs();
  return view;
}

// Threads for a *split batch*: each thread runs its own slice of the batch
// through the whole product into its own (m, d) result, and the results are
// summed. That needs two barriers per product instead of two per GEMM, which
// wins when the product is small (an 8-128-128-1 MLP at batch 128: per-GEMM
// barriers cost more than the GEMMs on a busy 2-core box). Returns 1 when the
// team should share every GEMM instead (big products, or too little memory for
// the extra per-thread results).
inline int batch_split_threads(const Spec& spec, int64_t batch, int64_t m, int num_threads,
                               int64_t element_bytes) {
  constexpr int64_t kMinSliceRows = 16;
  constexpr double kMaxFlopsPerThread = 64e6;
  constexpr int64_t kMaxExtraBytes = int64_t(256) << 20;
  const int threads = int(std::min<int64_t>(std::max(1, num_threads), batch / kMinSliceRows));
  if (threads < 2) return 1;
  double flops = 0;
  for (int l = 0; l < spec.layers(); ++l)
    flops += 2.0 * double(batch) * double(spec.dims[l]) * double(spec.dims[l + 1]) * 4.0 * double(m);
  if (flops / threads > kMaxFlopsPerThread) return 1;
  if (int64_t(threads - 1) * m * spec.num_params * element_bytes > kMaxExtraBytes) return 1;
  return threads;
}

// gnh_team's two work buffers per caller: one pair per batch slice when the
// batch is split among `slices` threads, else one pair for the whole batch
// (also what the team fallback uses when OpenMP grants fewer threads).
template <typename T>
struct WorkBuffers {
  int64_t slice_size, team_size;
  std::vector<T> data;
  WorkBuffers(const Spec& spec, int64_t batch, int64_t m, int slices)
      : slice_size((batch + slices - 1) / slices * m * spec.max_width()),
        team_size(batch * m * spec.max_width()),
        data(2 * std::max(int64_t(slices) * slice_size, team_size)) {}
  // First buffer of the pair; the second starts `size` elements later.
  T* slice(int s) { return data.data() + 2 * s * slice_size; }
  T* team() { return data.data(); }
};

// [begin, end) of `total` items for this thread.
inline void split_range(int64_t total, int thread, int num_threads, int64_t* begin, int64_t* end) {
  *begin = total * thread / num_threads;
  *end = total * (thread + 1) / num_threads;
}

}  // namespace pbrf::cpu::mlp
