// pybind11 module pbrf_fast._C_cuda: CUDA launchers. Compiled by the host C++
// compiler (no CUDA headers here); tensors cross as data_ptr() integers and
// the current stream as an integer, so no libtorch is linked. Importing never
// touches a GPU: device_count()/status() report what is there.
//
// The same file also builds pbrf_fast._C_cuda_emu: the same launchers compiled
// by g++ against the CPU emulator of csrc/emulation (PBRF_CUDA_EMULATION), with
// a few extra functions to steer and inspect the emulator.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "common/cuda_ops.h"
#include "common/score_contraction_cuda_ops.h"
#ifdef PBRF_CUDA_EMULATION
#include "emulator_control.h"
#include "emulator_selftest.h"
#define PBRF_CUDA_MODULE _C_cuda_emu
#else
#define PBRF_CUDA_MODULE _C_cuda
#endif


namespace py = pybind11;
using pbrf::Precision;

namespace {

Precision precision_from_name(const std::string& dtype) {
  if (dtype == "float32") return Precision::kFloat32;
  if (dtype == "float64") return Precision::kFloat64;
  throw std::invalid_argument("pbrf_fast._C_cuda supports float32 and float64, got " + dtype);
}

}  // namespace

PYBIND11_MODULE(PBRF_CUDA_MODULE, m) {
  m.doc() = "pbrf_fast CUDA kernels (tensors passed as data_ptr integers, stream as integer)";
#ifdef PBRF_CUDA_EMULATION
  m.attr("emulated") = true;
  m.def(
      "set_thread_order",
      [](const std::string& order, uint64_t seed) {
        using pbrf_emu::ThreadOrder;
        if (order == "forward") pbrf_emu::set_thread_order(ThreadOrder::kForward, seed);
        else if (order == "reverse") pbrf_emu::set_thread_order(ThreadOrder::kReverse, seed);
        else if (order == "shuffled") pbrf_emu::set_thread_order(ThreadOrder::kShuffled, seed);
        else throw std::invalid_argument("thread order must be forward, reverse or shuffled, got " + order);
      },
      py::arg("order"), py::arg("seed") = 0,
      "Order in which each block's threads run between barriers (a race shows up as a change).");
  m.def("counters", [] {
    const pbrf_emu::Counters c = pbrf_emu::read_counters();
    py::dict d;
    d["launches"] = c.launches;
    d["blocks"] = c.blocks;
    d["threads"] = c.threads;
    d["barriers"] = c.barriers;
    d["shuffles"] = c.shuffles;
    return d;
  }, "Emulated launches, blocks, threads, released __syncthreads barriers and shuffles so far.");
  m.def("reset", &pbrf_emu::reset, "Zero the counters and clear a pending launch error.");
  m.def(
      "selftest",
      [](const std::string& name) {
        const pbrf_emu::SelftestResult r = pbrf_emu::run_selftest(name);
        return py::make_tuple(r.error, r.values);
      },
      py::arg("name"),
      "Launch one of the emulator's self-test kernels; returns (error message or '', 64 outputs).");
#else
  m.attr("emulated") = false;
#endif
  m.def("device_count", &pbrf::cuda::device_count,
        "Number of CUDA devices visible to this module's runtime (0 without driver or GPU).");
  m.def("status", &pbrf::cuda::status, "Human-readable device status; never raises.");

  m.def(
      "output_hessian_product",
      [](int loss_kind, const std::string& dtype, uintptr_t logits, uintptr_t vectors,
         uintptr_t out, int64_t batch, int64_t classes, int64_t num_vectors, int device,
         uintptr_t stream) {
        const Precision precision = precision_from_name(dtype);
        py::gil_scoped_release release;
        pbrf::cuda::output_hessian_product(loss_kind, precision, logits, vectors, out, batch,
                                           classes, num_vectors, device, stream);
      },
      py::arg("loss_kind"), py::arg("dtype"), py::arg("logits"), py::arg("vectors"),
      py::arg("out"), py::arg("batch"), py::arg("classes"), py::arg("num_vectors"),
      py::arg("device"), py::arg("stream"));

  m.def(
      "bregman_divergence",
      [](int loss_kind, const std::string& dtype, uintptr_t outputs, uintptr_t ref_outputs,
         uintptr_t values, uintptr_t grad, int64_t batch, int64_t classes, int device,
         uintptr_t stream) {
        const Precision precision = precision_from_name(dtype);
        py::gil_scoped_release release;
        pbrf::cuda::bregman_divergence(loss_kind, precision, outputs, ref_outputs, values, grad,
                                       batch, classes, device, stream);
      },
      py::arg("loss_kind"), py::arg("dtype"), py::arg("outputs"), py::arg("ref_outputs"),
      py::arg("values"), py::arg("grad"), py::arg("batch"), py::arg("classes"),
      py::arg("device"), py::arg("stream"));

  m.def(
      "lissa_update",
      [](const std::string& dtype, uintptr_t h, uintptr_t v, uintptr_t gh, double damping,
         double scale, int64_t rows, int64_t cols, uintptr_t norms_squared,
         uintptr_t nonfinite_flag, int device, uintptr_t stream) {
        const Precision precision = precision_from_name(dtype);
        py::gil_scoped_release release;
        pbrf::cuda::lissa_update(precision, h, v, gh, damping, scale, rows, cols, norms_squared,
                                 nonfinite_flag, device, stream);
      },
      py::arg("dtype"), py::arg("h"), py::arg("v"), py::arg("gh"), py::arg("damping"),
      py::arg("scale"), py::arg("rows"), py::arg("cols"), py::arg("norms_squared"),
      py::arg("nonfinite_flag"), py::arg("device"), py::arg("stream"),
      "norms_squared (float64, cols) and nonfinite_flag (int32, 1) must be zeroed by the caller.");
  m.def(
      "score_contraction",
      [](const std::string& dtype, uintptr_t a, uintptr_t delta, uintptr_t s, uintptr_t out,
         int64_t batch, int64_t tokens, int64_t out_features, int64_t in_features, int64_t queries,
         int device, uintptr_t stream) {
        const Precision precision = precision_from_name(dtype);
        py::gil_scoped_release release;
        pbrf::cuda::score_contraction(precision, a, delta, s, out, batch, tokens, out_features,
                                      in_features, queries, device, stream);
      },
      py::arg("dtype"), py::arg("a"), py::arg("delta"), py::arg("s"), py::arg("out"),
      py::arg("batch"), py::arg("tokens"), py::arg("out_features"), py::arg("in_features"),
      py::arg("queries"), py::arg("device"), py::arg("stream"));

  // ---- fused MLP Gauss-Newton product (mlp_gnh_cuda.cu)
  m.def("mlp_gnh_workspace_elements", &pbrf::cuda::mlp_gnh_workspace_elements,
        py::arg("dims"), py::arg("batch"), py::arg("num_vectors"));
  m.def(
      "mlp_gnh_product",
      [](const std::string& dtype, const std::vector<int64_t>& dims,
         const std::vector<int>& activations, const std::vector<int>& has_bias, int loss_kind,
         uintptr_t inputs, uintptr_t theta, uintptr_t vectors, uintptr_t out,
         uintptr_t transposed, int64_t batch, int64_t num_vectors, uintptr_t workspace,
         int64_t workspace_elements, int device, uintptr_t stream) {
        const Precision precision = precision_from_name(dtype);
        py::gil_scoped_release release;
        pbrf::cuda::mlp_gnh_product(precision, dims, activations, has_bias, loss_kind, inputs,
                                    theta, vectors, out, transposed, batch, num_vectors, workspace,
                                    workspace_elements, device, stream);
      },
      "vectors/out (d, m); transposed: 2 m d scratch elements when m > 1.");

  // ---- native LiSSA engine (lissa_engine_cuda.cu)
  m.def(
      "mlp_lissa",
      [](const std::string& dtype, const std::vector<int64_t>& dims, const std::vector<int>& activations,
         const std::vector<int>& has_bias, int loss_kind, uintptr_t inputs, int64_t num_examples,
         uintptr_t theta, uintptr_t v, int64_t num_vectors, uintptr_t schedule, int64_t repeats,
         int64_t depth, int64_t batch, double weight_decay, double damping, double scale,
         uintptr_t limits, double ceiling, int64_t check_every, uintptr_t total, uintptr_t failure_norms,
         uintptr_t workspace, int64_t workspace_elements, uintptr_t norms, uintptr_t flag, int device,
         uintptr_t stream) {
        const Precision precision = precision_from_name(dtype);
        std::vector<int64_t> o;
        {
          py::gil_scoped_release release;
          o = pbrf::cuda::mlp_lissa(precision, dims, activations, has_bias, loss_kind, inputs, num_examples,
                                    theta, v, num_vectors, schedule, repeats, depth, batch, weight_decay,
                                    damping, scale, reinterpret_cast<const double*>(limits), ceiling,
                                    check_every, total, reinterpret_cast<double*>(failure_norms), workspace,
                                    workspace_elements, norms, flag, device, stream);
        }
        return py::make_tuple(o[0] != 0, o[1] != 0, o[2], o[3]);
      },
      "The whole LiSSA recursion on the GPU; limits and failure_norms are host float64 arrays. "
      "Returns (diverged, nonfinite, repeat, step).");
}
