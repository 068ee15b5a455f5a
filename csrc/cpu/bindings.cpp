// pybind11 module pbrf_fast._C: OpenMP CPU kernels. Tensors cross as integer
// addresses (torch's data_ptr()), so this module never links libtorch; the
// Python wrappers in pbrf_fast/kernels/ check dtype, device, shape and
// contiguity before calling in.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "common/cpu_ops.h"
#include "cpu/mlp_cpu.h"
#include <pybind11/stl.h>
#include "common/score_contraction_ops.h"

namespace py = pybind11;
using pbrf::Precision;

namespace {

Precision precision_from_name(const std::string& dtype) {
  if (dtype == "float32") return Precision::kFloat32;
  if (dtype == "float64") return Precision::kFloat64;
  throw std::invalid_argument("pbrf_fast._C supports float32 and float64, got " + dtype);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pbrf_fast OpenMP CPU kernels (tensors passed as data_ptr integers)";

  m.def(
      "output_hessian_product",
      [](int loss_kind, const std::string& dtype, uintptr_t logits, uintptr_t vectors,
         uintptr_t out, int64_t batch, int64_t classes, int64_t num_vectors, int num_threads) {
        const Precision precision = precision_from_name(dtype);
        py::gil_scoped_release release;
        pbrf::cpu::output_hessian_product(loss_kind, precision, logits, vectors, out, batch,
                                          classes, num_vectors, num_threads);
      },
      py::arg("loss_kind"), py::arg("dtype"), py::arg("logits"), py::arg("vectors"),
      py::arg("out"), py::arg("batch"), py::arg("classes"), py::arg("num_vectors"),
      py::arg("num_threads"));

  m.def(
      "bregman_divergence",
      [](int loss_kind, const std::string& dtype, uintptr_t outputs, uintptr_t ref_outputs,
         uintptr_t values, uintptr_t grad, int64_t batch, int64_t classes, int num_threads) {
        const Precision precision = precision_from_name(dtype);
        py::gil_scoped_release release;
        pbrf::cpu::bregman_divergence(loss_kind, precision, outputs, ref_outputs, values, grad,
                                      batch, classes, num_threads);
      },
      py::arg("loss_kind"), py::arg("dtype"), py::arg("outputs"), py::arg("ref_outputs"),
      py::arg("values"), py::arg("grad"), py::arg("batch"), py::arg("classes"),
      py::arg("num_threads"));

  m.def(
      "lissa_update",
      [](const std::string& dtype, uintptr_t h, uintptr_t v, uintptr_t gh, double damping,
         double scale, int64_t rows, int64_t cols, uintptr_t norms_squared, int num_threads) {
        const Precision precision = precision_from_name(dtype);
        py::gil_scoped_release release;
        return pbrf::cpu::lissa_update(precision, h, v, gh, damping, scale, rows, cols,
                                       norms_squared, num_threads);
      },
      py::arg("dtype"), py::arg("h"), py::arg("v"), py::arg("gh"), py::arg("damping"),
      py::arg("scale"), py::arg("rows"), py::arg("cols"), py::arg("norms_squared"),
      py::arg("num_threads"),
      "Returns True if any updated element is NaN or Inf.");
  m.def(
      "score_contraction",
      [](const std::string& dtype, uintptr_t a, uintptr_t delta, uintptr_t s, uintptr_t out,
         int64_t batch, int64_t tokens, int64_t out_features, int64_t in_features, int64_t queries,
         int num_threads) {
        const Precision precision = precision_from_name(dtype);
        py::gil_scoped_release release;
        pbrf::cpu::score_contraction(precision, a, delta, s, out, batch, tokens, out_features,
                                     in_features, queries, num_threads);
      },
      py::arg("dtype"), py::arg("a"), py::arg("delta"), py::arg("s"), py::arg("out"),
      py::arg("batch"), py::arg("tokens"), py::arg("out_features"), py::arg("in_features"),
      py::arg("queries"), py::arg("num_threads"));

  // ---- fused MLP Gauss-Newton product and native LiSSA (mlp_gnh_cpu.cpp, lissa_engine_cpu.cpp)
  m.def("gemm_isa", &pbrf::cpu::gemm::gemm_isa, "Micro-kernel instruction set in use.");
  m.def(
      "gemm",
      [](const std::string& dtype, int64_t M, int64_t N, int64_t K, int64_t batch, uintptr_t a,
         int64_t a_row, int64_t a_col, int64_t a_batch, uintptr_t b, int64_t b_row, int64_t b_col,
         int64_t b_batch, uintptr_t c, int64_t c_row, int64_t c_col, int64_t c_batch,
         bool accumulate, int num_threads) {
        const Precision precision = precision_from_name(dtype);
        py::gil_scoped_release release;
        pbrf::cpu::gemm::gemm_strided(precision, M, N, K, batch, a, a_row, a_col, a_batch, b, b_row,
                                      b_col, b_batch, c, c_row, c_col, c_batch, accumulate,
                                      num_threads);
      },
      "C_b (+)= A_b B_b with element strides: the fused kernels' GEMM, exposed for its tests.");
  m.def(
      "mlp_gnh_product",
      [](const std::string& dtype, const std::vector<int64_t>& dims,
         const std::vector<int>& activations, const std::vector<int>& has_bias, int loss_kind,
         uintptr_t inputs, uintptr_t theta, uintptr_t vectors, uintptr_t out, int64_t batch,
         int64_t num_vectors, int num_threads) {
        const Precision precision = precision_from_name(dtype);
        py::gil_scoped_release release;
        pbrf::cpu::mlp_gnh_product(precision, dims, activations, has_bias, loss_kind, inputs, theta,
                                   vectors, out, batch, num_vectors, num_threads);
      },
      py::arg("dtype"), py::arg("dims"), py::arg("activations"), py::arg("has_bias"),
      py::arg("loss_kind"), py::arg("inputs"), py::arg("theta"), py::arg("vectors"),
      py::arg("out"), py::arg("batch"), py::arg("num_vectors"), py::arg("num_threads"));
  m.def(
      "mlp_lissa",
      [](const std::string& dtype, const std::vector<int64_t>& dims,
         const std::vector<int>& activations, const std::vector<int>& has_bias, int loss_kind,
         uintptr_t inputs, int64_t num_examples, uintptr_t theta, uintptr_t v,
         int64_t num_vectors, uintptr_t schedule, int64_t repeats, int64_t depth, int64_t batch,
         double weight_decay, double damping, double scale, uintptr_t limits, double ceiling,
         int64_t check_every, uintptr_t total, uintptr_t failure_norms,
         int64_t cache_budget_bytes, int num_threads) {
        const Precision precision = precision_from_name(dtype);
        pbrf::cpu::LissaOutcome o;
        {
          py::gil_scoped_release release;
          o = pbrf::cpu::mlp_lissa(precision, dims, activations, has_bias, loss_kind, inputs,
                                   num_examples, theta, v, num_vectors, schedule, repeats, depth,
                                   batch, weight_decay, damping, scale, limits, ceiling,
                                   check_every, total, failure_norms, cache_budget_bytes,
                                   num_threads);
        }
        return py::make_tuple(o.diverged, o.nonfinite, o.repeat, o.step);
      },
      "Returns (diverged, nonfinite, repeat, step).");
}
