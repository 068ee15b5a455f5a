// Per-element arithmetic of the fused MLP Gauss-Newton kernels, shared by the
// CPU (csrc/cpu/mlp_gnh_cpu.cpp, lissa_engine_cpu.cpp) and CUDA
// (csrc/cuda/mlp_gnh_cuda.cu) implementations.
#pragma once

#include "common/host_device.h"
#include "common/loss_math.h"

namespace pbrf {

// Must match pbrf_fast/kernels/mlp_gnh.py ACTIVATION_CODES.
enum ActivationKind : int { kIdentity = 0, kRelu = 1, kTanh = 2, kSigmoid = 3 };

PBRF_HOST_DEVICE float tanh_of(float x) { return tanhf(x); }
PBRF_HOST_DEVICE double tanh_of(double x) { return tanh(x); }

// tanh without a libm call on the host, so loops over it vectorise: odd
// Taylor series for |x| < 1/16 (no cancellation; the x^13 term is < 2e-17
// relative there), (1 - e) / (1 + e) with e = exp(-2|x|) above (relative
// error ~1 ulp of exp / (2|x|) <= 16 ulp). Device code uses the libdevice tanh.
template <typename T>
PBRF_HOST_DEVICE T fast_tanh(T x) {
#if defined(__CUDA_ARCH__)
  return tanh_of(x);
#else
  const T ax = abs_of(x);
  const T e = exp_of(T(-2) * ax);
  const T large = (T(1) - e) / (T(1) + e);
  const T x2 = ax * ax;
  T series = T(-1382.0 / 155925.0);
  series = series * x2 + T(62.0 / 2835.0);
  series = series * x2 + T(-17.0 / 315.0);
  series = series * x2 + T(2.0 / 15.0);
  series = series * x2 + T(-1.0 / 3.0);
  series = ax + ax * x2 * series;
  const T r = ax < T(0.0625) ? series : large;
  return x < T(0) ? -r : r;
#endif
}

// a = act(z) and its slope act'(z), the diagonal Jacobian of the activation.
// The slopes are written from the activation values, as autograd does
// (tanh' = 1 - a^2, sigmoid' = a (1 - a)); relu' is 0 at 0, like torch.
template <typename T>
PBRF_HOST_DEVICE void activation_and_slope(int kind, T z, T* a, T* slope) {
  if (kind == kRelu) {
    *a = z > T(0) ? z : T(0);
    *slope = z > T(0) ? T(1) : T(0);
  } else if (kind == kTanh) {
    const T t = fast_tanh(z);
    *a = t;
    *slope = T(1) - t * t;
  } else if (kind == kSigmoid) {
    const T s = sigmoid(z);
    *a = s;
    *slope = s * (T(1) - s);
  } else {
    *a = z;
    *slope = T(1);
  }
}

}  // namespace pbrf
