// pybind11 module pbrf_fast._C: OpenMP CPU kernels. Tensors cross as integer
// addresses (torch's data_ptr()), so this module never links libtorch; the
// Python wrappers in pbrf_fast/kernels/ check dtype, device, shape and
// contiguity before calling in.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "common/cpu_ops.h"

namespace py = pybind11;
using pbrf::cpu::Precision;

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
}
