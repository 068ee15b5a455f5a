// The floating-point type a kernel call runs in, shared by the CPU and CUDA
// entry points (the bindings map torch's dtype names onto it).
#pragma once

#include <cstddef>

namespace pbrf {

enum class Precision { kFloat32, kFloat64 };

constexpr size_t element_bytes(Precision precision) {
  return precision == Precision::kFloat64 ? sizeof(double) : sizeof(float);
}

// f(float{}) or f(double{}): a generic lambda then reads the element type as
// decltype(zero), so each entry point states its typed body once.
template <typename F>
decltype(auto) with_element_type(Precision precision, F&& f) {
  if (precision == Precision::kFloat64) return f(double{});
  return f(float{});
}

}  // namespace pbrf
