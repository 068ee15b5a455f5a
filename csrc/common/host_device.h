// Portability layer so the per-element math below compiles both as plain C++
// (g++, CPU kernels) and as __host__ __device__ code (nvcc, CUDA kernels).
// Sharing it means the CPU parity tests also check the CUDA arithmetic.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define PBRF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PBRF_HOST_DEVICE inline
#endif

namespace pbrf {

// Must match pbrf_fast/kernels/registry.py LOSS_KIND_CODES.
enum LossKind : int { kMse = 0, kCrossEntropy = 1, kBce = 2 };

// glibc's exp is a scalar call that stops gcc from vectorising a loop (and
// costs ~5 ns); this polynomial exponential is branch-free, so host loops over
// it vectorise, and is accurate to ~1-2 ulp (tested against torch at 1e-12
// relative in float64). Device code uses the hardware/libdevice exp instead.
// exp(x) = 2^n e^r, n = round(x / ln 2), |r| <= ln2 / 2; Taylor series for e^r.
// Rounding uses the 1.5 * 2^23 magic constant (no floor call, so it
// vectorises); the exponent is built from the integer bits of the same sum.
PBRF_HOST_DEVICE float polynomial_exp(float x) {
  // Sequential single selects, not nested ones: gcc if-converts these and vectorises.
  float clamped = x < -87.0f ? -87.0f : x;
  clamped = clamped > 88.0f ? 88.0f : clamped;
  const float magic = 12582912.0f;  // 1.5 * 2^23
  const float shifted = clamped * 1.44269504088896341f + magic;
  const float n = shifted - magic;
  const float r = (clamped - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t shifted_bits, magic_bits;
  memcpy(&shifted_bits, &shifted, 4);
  memcpy(&magic_bits, &magic, 4);
  const int32_t scale_bits = (shifted_bits - magic_bits + 127) << 23;
  float scale;
  memcpy(&scale, &scale_bits, 4);
  return x < -87.0f ? 0.0f : p * scale;  // below -87 the true value is < 2e-38
}

PBRF_HOST_DEVICE double polynomial_exp(double x) {
  double clamped = x < -708.0 ? -708.0 : x;
  clamped = clamped > 709.0 ? 709.0 : clamped;
  const double magic = 6755399441055744.0;  // 1.5 * 2^52
  const double shifted = clamped * 1.4426950408889634074 + magic;
  const double n = shifted - magic;
  const double r = (clamped - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
  // Taylor to r^13: truncation error < 2e-17 relative for |r| <= ln2 / 2.
  double p = 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  int64_t shifted_bits, magic_bits;
  memcpy(&shifted_bits, &shifted, 8);
  memcpy(&magic_bits, &magic, 8);
  const int64_t scale_bits = (shifted_bits - magic_bits + 1023) << 52;
  double scale;
  memcpy(&scale, &scale_bits, 8);
  return x < -708.0 ? 0.0 : p * scale;  // below -708 the true value is < 3e-308
}

// C math names differ by precision; overloads let templates pick the right one
// on host and device alike.
PBRF_HOST_DEVICE float exp_of(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return polynomial_exp(x);
#endif
}
PBRF_HOST_DEVICE double exp_of(double x) {
#if defined(__CUDA_ARCH__)
  return exp(x);
#else
  return polynomial_exp(x);
#endif
}
PBRF_HOST_DEVICE float log_of(float x) { return logf(x); }
PBRF_HOST_DEVICE double log_of(double x) { return log(x); }
PBRF_HOST_DEVICE float log1p_of(float x) { return log1pf(x); }
PBRF_HOST_DEVICE double log1p_of(double x) { return log1p(x); }

template <typename T>
PBRF_HOST_DEVICE T max_of(T a, T b) { return a > b ? a : b; }

template <typename T>
PBRF_HOST_DEVICE T abs_of(T x) { return x < T(0) ? -x : x; }

// Branch-free finiteness test that survives -O3 (x - x is 0 only for finite x);
// usable in vectorised loops where std::isfinite is not.
template <typename T>
PBRF_HOST_DEVICE bool is_nonfinite(T x) { return (x - x) != T(0); }

}  // namespace pbrf
