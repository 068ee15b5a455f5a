// Arguments of the entry points that the CPU (csrc/cpu/cpu_ops.h) and CUDA
// (csrc/cuda/cuda_ops.h) backends share, one plain struct per entry point.
// Each is a template over the backend's Launch (CpuLaunch or CudaLaunch, its
// last field); a backend that needs more (scratch, a tuning knob) derives its
// own struct from it, in its ops header.
//
// Tensors are data_ptr() addresses: the Python wrappers in pbrf_fast/kernels/
// have checked dtype, device, shape and contiguity. No field has a default
// that could stand in for a forgotten argument: Python builds each struct with
// every field as a keyword, and its bound constructor
// (common/kernel_args_bindings.h) refuses a missing or an unknown one.
#pragma once

#include <cstdint>
#include <vector>

#include "common/precision.h"

namespace pbrf {

// An OpenMP kernel runs on one team of up to `threads` threads.
struct CpuLaunch {
  int threads;
};

// A CUDA launcher runs on device ordinal `device`, on the cudaStream_t
// `stream` passed as an integer (torch.cuda.current_stream().cuda_stream).
struct CudaLaunch {
  int device;
  uintptr_t stream;
};

// An MLP of L Linear layers, widths dims[0..L], an activation after every
// layer but the last; parameters flattened like pbrf_fast.Problem (per layer
// the (out, in) row-major weight, then the bias if present).
struct MlpShape {
  std::vector<int64_t> dims;     // L + 1 widths
  std::vector<int> activations;  // L - 1 codes (common/mlp_gnh.h ActivationKind)
  std::vector<int> has_bias;     // L flags
};

// out = H_y vectors per example: logits (batch, classes); vectors and out
// (num_vectors, batch, classes).
template <typename Launch>
struct OutputHessianArgs {
  int loss_kind;  // common/host_device.h LossKind
  Precision dtype;
  uintptr_t logits, vectors, out;
  int64_t batch, classes, num_vectors;
  Launch launch;
};

// values (batch,) and grad (batch, classes) of the Bregman divergence between
// outputs and ref_outputs, both (batch, classes).
template <typename Launch>
struct BregmanDivergenceArgs {
  int loss_kind;  // common/host_device.h LossKind
  Precision dtype;
  uintptr_t outputs, ref_outputs, values, grad;
  int64_t batch, classes;
  Launch launch;
};

// One LiSSA step in place, h <- v + (1 - damping/scale) h - gh/scale, with h,
// v, gh (rows, cols); norms_squared (cols,) float64 receives the column sums
// of the new h squared.
template <typename Launch>
struct LissaUpdateArgs {
  Precision dtype;
  uintptr_t h, v, gh;
  double damping, scale;
  int64_t rows, cols;
  uintptr_t norms_squared;
  Launch launch;
};

// scores out (batch, queries) = sum_t delta[b, t]^T S[q] a[b, t], with a
// (batch, tokens, in_features), delta (batch, tokens, out_features), s
// (queries, out_features, in_features); out is fully overwritten.
template <typename Launch>
struct ScoreContractionArgs {
  Precision dtype;
  uintptr_t a, delta, s, out;
  int64_t batch, tokens, out_features, in_features, queries;
  Launch launch;
};

// out (d, m) = sum over the batch of J_i^T H_i J_i vectors (d, m), both
// row-major, with inputs (batch, dims[0]) and theta (d,).
template <typename Launch>
struct MlpGnhProductArgs {
  Precision dtype;
  MlpShape mlp;
  int loss_kind;  // common/host_device.h LossKind
  uintptr_t inputs, theta, vectors, out;
  int64_t batch, num_vectors;
  Launch launch;
};

// The whole stochastic LiSSA recursion (pbrf_fast/kernels/lissa_engine.py).
// inputs (num_examples, dims[0]); v, total (num_vectors, d); schedule
// (repeats, depth, batch) int64 indices into the inputs; limits (num_vectors,)
// float64, each column's ||v|| * slack; failure_norms (num_vectors,) float64
// receives the column norms at the failing step. limits and failure_norms are
// host memory for both backends.
template <typename Launch>
struct MlpLissaArgs {
  Precision dtype;
  MlpShape mlp;
  int loss_kind;  // common/host_device.h LossKind
  uintptr_t inputs;
  int64_t num_examples;
  uintptr_t theta, v;
  int64_t num_vectors;
  uintptr_t schedule;
  int64_t repeats, depth, batch;
  double weight_decay, damping, scale;
  uintptr_t limits;
  double ceiling;
  int64_t check_every;
  uintptr_t total, failure_norms;
  Launch launch;
};

// How an mlp_lissa run ended: diverged at (repeat, step), or ran to the end
// (then repeat = step = -1).
struct LissaOutcome {
  bool diverged = false;
  bool nonfinite = false;
  int64_t repeat = -1, step = -1;
};

}  // namespace pbrf
