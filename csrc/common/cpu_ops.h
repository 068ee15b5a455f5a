// Entry points of the OpenMP kernels (csrc/cpu/*_cpu.cpp). Pointers are raw
// addresses from torch's data_ptr(); the Python wrappers have already checked
// dtype, device, shape and contiguity.
#pragma once

#include <cstdint>

#include "common/precision.h"

namespace pbrf::cpu {

// vectors/out: (M, B, C) contiguous; logits: (B, C) contiguous.
void output_hessian_product(int loss_kind, Precision precision, uintptr_t logits,
                            uintptr_t vectors, uintptr_t out, int64_t batch,
                            int64_t classes, int64_t num_vectors, int num_threads);

// outputs/ref/grad: (B, C); values: (B,).
void bregman_divergence(int loss_kind, Precision precision, uintptr_t outputs,
                        uintptr_t ref_outputs, uintptr_t values, uintptr_t grad,
                        int64_t batch, int64_t classes, int num_threads);

// h/v/gh: (rows, cols) contiguous, h updated in place; norms_squared: (cols,)
// float64. Returns true if any new element of h is NaN or Inf.
bool lissa_update(Precision precision, uintptr_t h, uintptr_t v, uintptr_t gh,
                  double damping, double scale, int64_t rows, int64_t cols,
                  uintptr_t norms_squared, int num_threads);

}  // namespace pbrf::cpu
