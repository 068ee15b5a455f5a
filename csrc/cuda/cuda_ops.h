// Every entry point of the CUDA backend, pbrf_fast._C_cuda (csrc/cuda/bindings.cpp
// binds them in this order, as csrc/cpu/cpu_ops.h lists the CPU ones). Plain
// C++: the g++-compiled bindings include it without any CUDA header.
// Arguments: the shared structs of common/kernel_args.h with a CudaLaunch,
// plus the device scratch the launchers need (allocated by the Python side,
// registry.cuda_scratch, since this module does not link libtorch).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/kernel_args.h"

namespace pbrf::cuda {

using OutputHessianArgs = pbrf::OutputHessianArgs<CudaLaunch>;
using BregmanDivergenceArgs = pbrf::BregmanDivergenceArgs<CudaLaunch>;
using ScoreContractionArgs = pbrf::ScoreContractionArgs<CudaLaunch>;

struct LissaUpdateArgs : pbrf::LissaUpdateArgs<CudaLaunch> {
  // One int32, set to 1 if any new element of h is NaN or Inf. The caller
  // zeroes it, and norms_squared too: the kernel's blocks add into both.
  uintptr_t nonfinite_flag;
};

struct MlpGnhProductArgs : pbrf::MlpGnhProductArgs<CudaLaunch> {
  // 2 num_vectors d elements when num_vectors > 1: the (m, d) copies of
  // vectors and out the product runs on.
  uintptr_t transposed;
  // At least mlp_gnh_workspace_elements(dims, batch, num_vectors) elements.
  uintptr_t workspace;
  int64_t workspace_elements;
};

struct MlpLissaArgs : pbrf::MlpLissaArgs<CudaLaunch> {
  // At least 2 num_vectors d + batch dims[0] +
  // mlp_gnh_workspace_elements(dims, batch, num_vectors) elements.
  uintptr_t workspace;
  int64_t workspace_elements;
  // Per-step device scratch: num_vectors float64 column norms, one int flag.
  uintptr_t norms, flag;
};

void output_hessian_product(const OutputHessianArgs& args);
void bregman_divergence(const BregmanDivergenceArgs& args);
void lissa_update(const LissaUpdateArgs& args);
void score_contraction(const ScoreContractionArgs& args);
void mlp_gnh_product(const MlpGnhProductArgs& args);
LissaOutcome mlp_lissa(const MlpLissaArgs& args);

// Device scratch (elements) of one fused product of `batch` rows and
// num_vectors vectors: the forward state and two propagation buffers.
int64_t mlp_gnh_workspace_elements(const std::vector<int64_t>& dims, int64_t batch,
                                   int64_t num_vectors);
// Number of CUDA devices visible to this module's runtime (0 without driver or GPU).
int device_count();
// Human-readable device status; never throws.
std::string status();

}  // namespace pbrf::cuda
