// pybind11 module pbrf_fast._C: OpenMP CPU kernels. Tensors cross as integer
// addresses (torch's data_ptr()), so this module never links libtorch; the
// Python wrappers in pbrf_fast/kernels/ check dtype, device, shape and
// contiguity before calling in. Mirrors csrc/cuda/bindings.cpp: the same
// entry points in the same order, each taking its argument struct.
#include <pybind11/pybind11.h>

#include "common/kernel_args_bindings.h"
#include "cpu/cpu_ops.h"

namespace bind = pbrf::bindings;
namespace cpu = pbrf::cpu;

namespace {

constexpr const char* kModule = "pbrf_fast._C";

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pbrf_fast OpenMP CPU kernels (tensors passed as data_ptr integers)";

  // ---- argument structs (common/kernel_args.h, cpu/cpu_ops.h)
  bind::bind_lissa_outcome(m);
  bind::bind_output_hessian_args<cpu::OutputHessianArgs>(m, kModule);
  bind::bind_bregman_divergence_args<cpu::BregmanDivergenceArgs>(m, kModule);
  bind::bind_lissa_update_args<cpu::LissaUpdateArgs>(m, kModule);
  bind::bind_score_contraction_args<cpu::ScoreContractionArgs>(m, kModule);
  bind::bind_mlp_gnh_product_args<cpu::MlpGnhProductArgs>(m, kModule);
  bind::bind_mlp_lissa_args<cpu::MlpLissaArgs>(m, kModule)
      .field("cache_budget_bytes", &cpu::MlpLissaArgs::cache_budget_bytes);

  // ---- entry points (cpu/cpu_ops.h)
  bind::def_entry_point(m, "output_hessian_product", &cpu::output_hessian_product);
  bind::def_entry_point(m, "bregman_divergence", &cpu::bregman_divergence);
  bind::def_entry_point(m, "lissa_update", &cpu::lissa_update,
                        "Returns True if any updated element is NaN or Inf.");
  bind::def_entry_point(m, "score_contraction", &cpu::score_contraction);
  bind::def_entry_point(m, "mlp_gnh_product", &cpu::mlp_gnh_product);
  bind::def_entry_point(m, "mlp_lissa", &cpu::mlp_lissa,
                        "The whole LiSSA recursion; returns a LissaOutcome.");

  // ---- CPU only: the fused kernels' GEMM, exposed for its tests
  using cpu::GemmArgs, cpu::StridedOperand;
  bind::ArgsClass<StridedOperand>(m, "StridedOperand")
      .field("data", &StridedOperand::data)
      .field("row_stride", &StridedOperand::row_stride)
      .field("col_stride", &StridedOperand::col_stride)
      .field("batch_stride", &StridedOperand::batch_stride);
  bind::entry_args_class<GemmArgs>(m, "GemmArgs", kModule)
      .field("M", &GemmArgs::M).field("N", &GemmArgs::N).field("K", &GemmArgs::K)
      .field("batch", &GemmArgs::batch).field("a", &GemmArgs::a).field("b", &GemmArgs::b)
      .field("c", &GemmArgs::c).field("accumulate", &GemmArgs::accumulate);
  bind::def_entry_point(m, "gemm", &cpu::gemm_strided,
                        "C_b (+)= A_b B_b with element strides: the fused kernels' GEMM.");
  m.def("gemm_isa", &cpu::gemm_isa, "Micro-kernel instruction set in use.");
}
