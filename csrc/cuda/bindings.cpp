// pybind11 module pbrf_fast._C_cuda: CUDA launchers. Compiled by the host C++
// compiler (no CUDA headers here); tensors cross as data_ptr() integers and
// the current stream as an integer, so no libtorch is linked. Importing never
// touches a GPU: device_count()/status() report what is there. Mirrors
// csrc/cpu/bindings.cpp: the same entry points in the same order, each taking
// its argument struct.
//
// The same file also builds pbrf_fast._C_cuda_emu: the same launchers compiled
// by g++ against the CPU emulator of csrc/emulation (PBRF_CUDA_EMULATION), with
// a few extra functions to steer and inspect the emulator.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "common/kernel_args_bindings.h"
#include "cuda/cuda_ops.h"

#ifdef PBRF_CUDA_EMULATION
#include <stdexcept>
#include <string>

#include "emulator_control.h"
#include "emulator_selftest.h"
#define PBRF_CUDA_MODULE _C_cuda_emu
#define PBRF_CUDA_MODULE_NAME "pbrf_fast._C_cuda_emu"
#else
#define PBRF_CUDA_MODULE _C_cuda
#define PBRF_CUDA_MODULE_NAME "pbrf_fast._C_cuda"
#endif

namespace py = pybind11;
namespace bind = pbrf::bindings;
namespace cuda = pbrf::cuda;

namespace {

constexpr const char* kModule = PBRF_CUDA_MODULE_NAME;

#ifdef PBRF_CUDA_EMULATION
// Steering and inspection of the emulator (csrc/emulation): only _C_cuda_emu has them.
void bind_emulator_controls(py::module_& m) {
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
}
#endif

}  // namespace

PYBIND11_MODULE(PBRF_CUDA_MODULE, m) {
  m.doc() = "pbrf_fast CUDA kernels (tensors passed as data_ptr integers, stream as integer)";

  // ---- argument structs (common/kernel_args.h, cuda/cuda_ops.h)
  bind::bind_lissa_outcome(m);
  bind::bind_output_hessian_args<cuda::OutputHessianArgs>(m, kModule);
  bind::bind_bregman_divergence_args<cuda::BregmanDivergenceArgs>(m, kModule);
  bind::bind_lissa_update_args<cuda::LissaUpdateArgs>(m, kModule)
      .field("nonfinite_flag", &cuda::LissaUpdateArgs::nonfinite_flag);
  bind::bind_score_contraction_args<cuda::ScoreContractionArgs>(m, kModule);
  bind::bind_mlp_gnh_product_args<cuda::MlpGnhProductArgs>(m, kModule)
      .field("transposed", &cuda::MlpGnhProductArgs::transposed)
      .field("workspace", &cuda::MlpGnhProductArgs::workspace)
      .field("workspace_elements", &cuda::MlpGnhProductArgs::workspace_elements);
  bind::bind_mlp_lissa_args<cuda::MlpLissaArgs>(m, kModule)
      .field("workspace", &cuda::MlpLissaArgs::workspace)
      .field("workspace_elements", &cuda::MlpLissaArgs::workspace_elements)
      .field("norms", &cuda::MlpLissaArgs::norms)
      .field("flag", &cuda::MlpLissaArgs::flag);

  // ---- entry points (cuda/cuda_ops.h)
  bind::def_entry_point(m, "output_hessian_product", &cuda::output_hessian_product);
  bind::def_entry_point(m, "bregman_divergence", &cuda::bregman_divergence);
  bind::def_entry_point(m, "lissa_update", &cuda::lissa_update,
                        "Sets nonfinite_flag if any updated element is NaN or Inf.");
  bind::def_entry_point(m, "score_contraction", &cuda::score_contraction);
  bind::def_entry_point(m, "mlp_gnh_product", &cuda::mlp_gnh_product);
  bind::def_entry_point(m, "mlp_lissa", &cuda::mlp_lissa,
                        "The whole LiSSA recursion; returns a LissaOutcome.");

  // ---- CUDA only: devices, and the fused product's scratch size
  m.def("device_count", &cuda::device_count,
        "Number of CUDA devices visible to this module's runtime (0 without driver or GPU).");
  m.def("status", &cuda::status, "Human-readable device status; never raises.");
  m.def("mlp_gnh_workspace_elements", &cuda::mlp_gnh_workspace_elements, py::arg("dims"),
        py::arg("batch"), py::arg("num_vectors"));

#ifdef PBRF_CUDA_EMULATION
  m.attr("emulated") = true;
  bind_emulator_controls(m);
#else
  m.attr("emulated") = false;
#endif
}
