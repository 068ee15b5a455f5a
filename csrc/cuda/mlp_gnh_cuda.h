// The fused MLP Gauss-Newton product on the GPU as a building block
// (mlp_gnh_cuda.cu), shared by the product's own launcher and the native LiSSA
// engine (lissa_engine_cuda.cu). Only .cu files include this.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "common/kernel_args.h"

namespace pbrf::cuda::mlp {

struct Layout {
  std::vector<int64_t> dims, weight_offset, bias_offset;
  std::vector<int> activations;
  int64_t num_params = 0, hidden = 0, max_width = 0;
  int L = 0;
};

Layout make_layout(const MlpShape& shape);

// out (m, d) = sum over the B rows of x of J^T H J V, V (m, d): one vector per row.
// ws: mlp_gnh_workspace_elements(dims, B, m) elements of scratch.
template <typename T>
void product(const Layout& s, int loss_kind, const T* x, const T* theta, const T* V, T* out,
             int64_t B, int64_t m, T* ws, cudaStream_t stream);

// Grid size for a grid-stride elementwise kernel over n elements (256 threads a block).
unsigned blocks_for(int64_t n);

}  // namespace pbrf::cuda::mlp
