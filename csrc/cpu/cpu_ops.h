// Every entry point of the OpenMP CPU backend, pbrf_fast._C (csrc/cpu/bindings.cpp
// binds them in this order, as csrc/cuda/cuda_ops.h lists the CUDA ones).
// Arguments: the shared structs of common/kernel_args.h with a CpuLaunch, plus
// the CPU's own below.
#pragma once

#include <cstdint>

#include "common/kernel_args.h"

namespace pbrf::cpu {

using OutputHessianArgs = pbrf::OutputHessianArgs<CpuLaunch>;
using BregmanDivergenceArgs = pbrf::BregmanDivergenceArgs<CpuLaunch>;
using LissaUpdateArgs = pbrf::LissaUpdateArgs<CpuLaunch>;
using ScoreContractionArgs = pbrf::ScoreContractionArgs<CpuLaunch>;
using MlpGnhProductArgs = pbrf::MlpGnhProductArgs<CpuLaunch>;

struct MlpLissaArgs : pbrf::MlpLissaArgs<CpuLaunch> {
  // The forward state of all num_examples inputs is computed once and reused
  // by every step when it takes at most this many bytes, else recomputed for
  // each step's batch.
  int64_t cache_budget_bytes;
};

// A (batch, rows, cols) operand of gemm_strided, its strides in elements.
struct StridedOperand {
  uintptr_t data;
  int64_t row_stride, col_stride, batch_stride;
};

// C_b (+)= A_b B_b for b < batch: A_b (M, K), B_b (K, N), C_b (M, N).
struct GemmArgs {
  Precision dtype;
  int64_t M, N, K, batch;
  StridedOperand a, b, c;
  bool accumulate;  // C += AB instead of C = AB
  CpuLaunch launch;
};

void output_hessian_product(const OutputHessianArgs& args);
void bregman_divergence(const BregmanDivergenceArgs& args);
// Returns true if any new element of h is NaN or Inf.
bool lissa_update(const LissaUpdateArgs& args);
void score_contraction(const ScoreContractionArgs& args);
void mlp_gnh_product(const MlpGnhProductArgs& args);
LissaOutcome mlp_lissa(const MlpLissaArgs& args);

// The fused kernels' blocked GEMM (cpu/gemm_cpu.h) as one call on its own
// team: the entry point of its parity tests.
void gemm_strided(const GemmArgs& args);
// Which micro-kernel the running CPU gets ("avx512", "avx2" or "generic").
const char* gemm_isa();

}  // namespace pbrf::cpu
