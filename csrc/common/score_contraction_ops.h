// Entry points of the score-contraction kernels (csrc/cpu/score_contraction_cpu.cpp,
// csrc/cuda/score_contraction_cuda.cu). Kept out of cpu_ops.h / cuda_ops.h so
// ops added in parallel do not collide. All tensors contiguous:
// a (batch, tokens, in), delta (batch, tokens, out), s (queries, out, in),
// out (batch, queries), fully overwritten.
#pragma once

#include <cstdint>

#include "common/cpu_ops.h"

namespace pbrf::cpu {
void score_contraction(Precision precision, uintptr_t a, uintptr_t delta, uintptr_t s, uintptr_t out,
                       int64_t batch, int64_t tokens, int64_t out_features, int64_t in_features,
                       int64_t queries, int num_threads);
}  // namespace pbrf::cpu
