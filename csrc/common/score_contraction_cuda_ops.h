// CUDA entry point of the score contraction (see score_contraction_ops.h for shapes).
#pragma once

#include <cstdint>

#include "common/cuda_ops.h"

namespace pbrf::cuda {
void score_contraction(Precision precision, uintptr_t a, uintptr_t delta, uintptr_t s, uintptr_t out,
                       int64_t batch, int64_t tokens, int64_t out_features, int64_t in_features,
                       int64_t queries, int device, uintptr_t stream);
}  // namespace pbrf::cuda
