// Entry points of the CUDA launchers (csrc/cuda/*_cuda.cu), callable from the
// g++-compiled bindings without any CUDA header. `stream` is a cudaStream_t
// passed as an integer (torch.cuda.current_stream().cuda_stream); `device` is
// the CUDA ordinal the tensors live on.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/precision.h"

namespace pbrf::cuda {

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

// Fused MLP Gauss-Newton product (mlp_gnh_cuda.cu): vectors/out (d, m); transposed: 2 m d
// scratch elements when m > 1; workspace: mlp_gnh_workspace_elements(dims, batch, m).
int64_t mlp_gnh_workspace_elements(const std::vector<int64_t>& dims, int64_t batch,
                                   int64_t num_vectors);
void mlp_gnh_product(Precision precision, const std::vector<int64_t>& dims,
                     const std::vector<int>& activations, const std::vector<int>& has_bias,
                     int loss_kind, uintptr_t inputs, uintptr_t theta, uintptr_t vectors,
                     uintptr_t out, uintptr_t transposed, int64_t batch, int64_t num_vectors,
                     uintptr_t workspace, int64_t workspace_elements, int device, uintptr_t stream);

// Native LiSSA engine (lissa_engine_cuda.cu): limits and failure_norms are host float64
// arrays; returns (diverged, nonfinite, repeat, step).
std::vector<int64_t> mlp_lissa(Precision precision, const std::vector<int64_t>& dims,
                               const std::vector<int>& activations, const std::vector<int>& has_bias,
                               int loss_kind, uintptr_t inputs, int64_t num_examples, uintptr_t theta,
                               uintptr_t v, int64_t num_vectors, uintptr_t schedule, int64_t repeats,
                               int64_t depth, int64_t batch, double weight_decay, double damping,
                               double scale, const double* limits, double ceiling, int64_t check_every,
                               uintptr_t total, double* failure_norms, uintptr_t workspace,
                               int64_t workspace_elements, uintptr_t norms, uintptr_t flag, int device,
                               uintptr_t stream);

}  // namespace pbrf::cuda
