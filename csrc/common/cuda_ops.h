// Entry points of the CUDA launchers (csrc/cuda/*_cuda.cu), callable from the
// g++-compiled bindings without any CUDA header. `stream` is a cudaStream_t
// passed as an integer (torch.cuda.current_stream().cuda_stream); `device` is
// the CUDA ordinal the tensors live on.
#pragma once

#include <cstdint>
#include <string>

namespace pbrf::cuda {

enum class Precision { kFloat32, kFloat64 };

int device_count();
std::string status();

void output_hessian_product(int loss_kind, Precision precision, uintptr_t logits,
                            uintptr_t vectors, uintptr_t out, int64_t batch,
                            int64_t classes, int64_t num_vectors, int device,
                            uintptr_t stream);

void bregman_divergence(int loss_kind, Precision precision, uintptr_t outputs,
                        uintptr_t ref_outputs, uintptr_t values, uintptr_t grad,
                        int64_t batch, int64_t classes, int device, uintptr_t stream);

// norms_squared: (cols,) float64, zeroed by the caller; nonfinite_flag: one
// int32, zeroed by the caller, set to 1 if any new element is NaN or Inf.
void lissa_update(Precision precision, uintptr_t h, uintptr_t v, uintptr_t gh,
                  double damping, double scale, int64_t rows, int64_t cols,
                  uintptr_t norms_squared, uintptr_t nonfinite_flag, int device,
                  uintptr_t stream);

}  // namespace pbrf::cuda
