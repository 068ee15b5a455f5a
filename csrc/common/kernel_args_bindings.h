// pybind11 bindings of the argument structs in common/kernel_args.h, shared by
// csrc/cpu/bindings.cpp and csrc/cuda/bindings.cpp so that both modules name
// every struct and field alike.
//
// Python builds a struct in one call with every field as a keyword,
// OutputHessianArgs(loss_kind=..., dtype="float32", ..., threads=4), through
// pbrf_fast.kernels.registry.extension_args. A missing or unknown keyword is a
// TypeError naming it, so a forgotten argument never runs as a zero. One
// constructor call, not one attribute assignment per field: pybind11's
// attribute setters cost ~0.4 us each, which small kernel calls would notice.
// Nested structs (launch, mlp) appear flat in Python (threads, or device and
// stream; dims, activations, has_bias). `dtype` takes torch's dtype name.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "common/kernel_args.h"

namespace pbrf::bindings {

namespace py = pybind11;

inline Precision precision_from_name(const std::string& dtype, const char* module_name) {
  if (dtype == "float32") return Precision::kFloat32;
  if (dtype == "float64") return Precision::kFloat64;
  throw std::invalid_argument(std::string(module_name) + " supports float32 and float64, got " +
                              dtype);
}

inline const char* precision_name(Precision precision) {
  return precision == Precision::kFloat64 ? "float64" : "float32";
}

// The Python class of struct S: each field() is a read-write attribute and a
// required keyword of the constructor.
template <typename S>
class ArgsClass {
 public:
  ArgsClass(py::module_& m, const char* name)
      // module_local: _C_cuda and _C_cuda_emu hold the same C++ types and may
      // both be loaded, and a globally registered type may be registered once.
      : class_(m, name, py::module_local()), fields_(std::make_shared<std::vector<Field>>()) {
    class_.def(py::init([name = std::string(name), fields = fields_](const py::kwargs& kwargs) {
      return construct(name, *fields, kwargs);
    }));
  }

  template <typename T, typename Owner>
  ArgsClass& field(const char* name, T Owner::*member) {
    class_.def_readwrite(name, member);
    add(name, [member](S& s, py::handle value) { s.*member = value.cast<T>(); });
    return *this;
  }

  // A field of the nested struct `outer`, seen flat from Python.
  template <typename T, typename Inner, typename Owner>
  ArgsClass& field(const char* name, Inner Owner::*outer, T Inner::*member) {
    class_.def_property(
        name, [outer, member](const S& s) { return (s.*outer).*member; },
        [outer, member](S& s, const T& value) { (s.*outer).*member = value; });
    add(name, [outer, member](S& s, py::handle value) { (s.*outer).*member = value.cast<T>(); });
    return *this;
  }

  ArgsClass& dtype(const char* module_name) {
    class_.def_property(
        "dtype", [](const S& s) { return precision_name(s.dtype); },
        [module_name](S& s, const std::string& dtype) {
          s.dtype = precision_from_name(dtype, module_name);
        });
    add("dtype", [module_name](S& s, py::handle value) {
      s.dtype = precision_from_name(value.cast<std::string>(), module_name);
    });
    return *this;
  }

 private:
  struct Field {
    std::string name;
    std::function<void(S&, py::handle)> set;
  };

  void add(const char* name, std::function<void(S&, py::handle)> set) {
    if (fields_->size() == 64) throw std::logic_error("ArgsClass: construct's set mask holds 64 fields");
    fields_->push_back(Field{name, std::move(set)});
  }

  // The names of the fields whose bit in `skip` is clear.
  static std::string field_list(const std::vector<Field>& fields, uint64_t skip) {
    std::string text;
    for (size_t i = 0; i < fields.size(); ++i)
      if (!(skip >> i & 1)) text += (text.empty() ? "" : ", ") + fields[i].name;
    return text;
  }

  static S construct(const std::string& name, const std::vector<Field>& fields,
                     const py::kwargs& kwargs) {
    S s{};
    uint64_t set = 0;
    size_t i = 0;  // callers pass the fields in order, so the search starts after the last one
    for (const auto& item : kwargs) {
      Py_ssize_t length = 0;
      const char* utf8 = PyUnicode_AsUTF8AndSize(item.first.ptr(), &length);
      if (!utf8) throw py::error_already_set();
      const std::string_view key(utf8, size_t(length));
      size_t tried = 0;
      for (; tried < fields.size() && fields[i].name != key; ++tried) i = (i + 1) % fields.size();
      if (tried == fields.size())
        throw py::type_error(name + " has no field '" + std::string(key) + "'; its fields are " +
                             field_list(fields, 0));
      try {
        fields[i].set(s, item.second);
      } catch (const py::cast_error&) {
        throw py::type_error(name + "." + std::string(key) + ": cannot take a " +
                             Py_TYPE(item.second.ptr())->tp_name);
      }
      set |= uint64_t(1) << i;
      i = (i + 1) % fields.size();
    }
    if (kwargs.size() != fields.size())
      throw py::type_error(name + " needs every field; missing " + field_list(fields, set));
    return s;
  }

  py::class_<S> class_;
  // Shared with the constructor, which outlives this builder.
  std::shared_ptr<std::vector<Field>> fields_;
};

// The launch fields of an argument struct: CPU `threads`, CUDA `device` and `stream`.
template <typename S, typename Owner>
void launch_fields(ArgsClass<S>& c, CpuLaunch Owner::*launch) {
  c.field("threads", launch, &CpuLaunch::threads);
}

template <typename S, typename Owner>
void launch_fields(ArgsClass<S>& c, CudaLaunch Owner::*launch) {
  c.field("device", launch, &CudaLaunch::device).field("stream", launch, &CudaLaunch::stream);
}

template <typename S>
void mlp_shape_fields(ArgsClass<S>& c) {
  c.field("dims", &S::mlp, &MlpShape::dims)
      .field("activations", &S::mlp, &MlpShape::activations)
      .field("has_bias", &S::mlp, &MlpShape::has_bias);
}

inline void bind_lissa_outcome(py::module_& m) {
  py::class_<LissaOutcome>(m, "LissaOutcome", py::module_local())
      .def_readonly("diverged", &LissaOutcome::diverged)
      .def_readonly("nonfinite", &LissaOutcome::nonfinite)
      .def_readonly("repeat", &LissaOutcome::repeat)
      .def_readonly("step", &LissaOutcome::step);
}

// The class of an entry point's argument struct S: its dtype and launch
// fields, the rest added by the caller.
template <typename S>
ArgsClass<S> entry_args_class(py::module_& m, const char* name, const char* module_name) {
  ArgsClass<S> c(m, name);
  c.dtype(module_name);
  launch_fields(c, &S::launch);
  return c;
}

// Each bind_*_args below binds one shared struct's fields on a backend's
// struct S (the shared struct itself or one derived from it; the caller adds
// a derived struct's own fields to the returned class).

template <typename S>
ArgsClass<S> bind_output_hessian_args(py::module_& m, const char* module_name) {
  ArgsClass<S> c = entry_args_class<S>(m, "OutputHessianArgs", module_name);
  c.field("loss_kind", &S::loss_kind).field("logits", &S::logits).field("vectors", &S::vectors);
  c.field("out", &S::out).field("batch", &S::batch).field("classes", &S::classes);
  return c.field("num_vectors", &S::num_vectors);
}

template <typename S>
ArgsClass<S> bind_bregman_divergence_args(py::module_& m, const char* module_name) {
  ArgsClass<S> c = entry_args_class<S>(m, "BregmanDivergenceArgs", module_name);
  c.field("loss_kind", &S::loss_kind).field("outputs", &S::outputs);
  c.field("ref_outputs", &S::ref_outputs).field("values", &S::values).field("grad", &S::grad);
  return c.field("batch", &S::batch).field("classes", &S::classes);
}

template <typename S>
ArgsClass<S> bind_lissa_update_args(py::module_& m, const char* module_name) {
  ArgsClass<S> c = entry_args_class<S>(m, "LissaUpdateArgs", module_name);
  c.field("h", &S::h).field("v", &S::v).field("gh", &S::gh);
  c.field("damping", &S::damping).field("scale", &S::scale);
  return c.field("rows", &S::rows).field("cols", &S::cols).field("norms_squared", &S::norms_squared);
}

template <typename S>
ArgsClass<S> bind_score_contraction_args(py::module_& m, const char* module_name) {
  ArgsClass<S> c = entry_args_class<S>(m, "ScoreContractionArgs", module_name);
  c.field("a", &S::a).field("delta", &S::delta).field("s", &S::s).field("out", &S::out);
  c.field("batch", &S::batch).field("tokens", &S::tokens).field("queries", &S::queries);
  return c.field("out_features", &S::out_features).field("in_features", &S::in_features);
}

template <typename S>
ArgsClass<S> bind_mlp_gnh_product_args(py::module_& m, const char* module_name) {
  ArgsClass<S> c = entry_args_class<S>(m, "MlpGnhProductArgs", module_name);
  mlp_shape_fields(c);
  c.field("loss_kind", &S::loss_kind).field("inputs", &S::inputs).field("theta", &S::theta);
  c.field("vectors", &S::vectors).field("out", &S::out);
  return c.field("batch", &S::batch).field("num_vectors", &S::num_vectors);
}

template <typename S>
ArgsClass<S> bind_mlp_lissa_args(py::module_& m, const char* module_name) {
  ArgsClass<S> c = entry_args_class<S>(m, "MlpLissaArgs", module_name);
  mlp_shape_fields(c);
  c.field("loss_kind", &S::loss_kind).field("inputs", &S::inputs);
  c.field("num_examples", &S::num_examples).field("theta", &S::theta).field("v", &S::v);
  c.field("num_vectors", &S::num_vectors).field("schedule", &S::schedule);
  c.field("repeats", &S::repeats).field("depth", &S::depth).field("batch", &S::batch);
  c.field("weight_decay", &S::weight_decay).field("damping", &S::damping);
  c.field("scale", &S::scale).field("limits", &S::limits).field("ceiling", &S::ceiling);
  c.field("check_every", &S::check_every).field("total", &S::total);
  return c.field("failure_norms", &S::failure_norms);
}

// Binds `R f(const Args&)` as name(args), the GIL released while it runs.
template <typename R, typename Args>
void def_entry_point(py::module_& m, const char* name, R (*f)(const Args&), const char* doc = "") {
  m.def(
      name,
      [f](const Args& args) {
        py::gil_scoped_release release;
        return f(args);
      },
      py::arg("args"), doc);
}

}  // namespace pbrf::bindings
