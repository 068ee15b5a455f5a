// Per-element arithmetic of the three output-space losses (MSE, softmax
// cross-entropy, sigmoid BCE with logits), shared by CPU and CUDA kernels.
#pragma once

#include "common/host_device.h"

namespace pbrf {

// sigma(x) without overflow: exp is only ever taken of a non-positive number.
// Branch-free (selects only) so CPU loops over it vectorise.
template <typename T>
PBRF_HOST_DEVICE T sigmoid(T x) {
  const T e = exp_of(-abs_of(x));
  return (x >= T(0) ? T(1) : e) / (T(1) + e);
}

// log(1 + e^x) without overflow, exact for very negative x.
template <typename T>
PBRF_HOST_DEVICE T softplus(T x) {
  return max_of(x, T(0)) + log1p_of(exp_of(-abs_of(x)));
}

// sigma(1 - sigma) written as sigma(x) sigma(-x): no cancellation in 1 - sigma
// when sigma is close to 1.
template <typename T>
PBRF_HOST_DEVICE T sigmoid_curvature(T logit) {
  return sigmoid(logit) * sigmoid(-logit);
}

// Softmax probability from the row's max and 1 / sum(exp(logit - max)).
template <typename T>
PBRF_HOST_DEVICE T softmax_probability(T logit, T row_max, T inv_normaliser) {
  return exp_of(logit - row_max) * inv_normaliser;
}

// One element of (diag(p) - p p^T) u, given p^T u: never forms the C x C matrix.
template <typename T>
PBRF_HOST_DEVICE T softmax_hessian_element(T p, T u, T p_dot_u) {
  return p * (u - p_dot_u);
}

// Bregman divergence terms, summed over the output dimension by the callers.
template <typename T>
PBRF_HOST_DEVICE T mse_bregman_element(T y, T y_ref) {
  const T diff = y - y_ref;
  return T(0.5) * diff * diff;
}

template <typename T>
PBRF_HOST_DEVICE T bce_bregman_element(T y, T y_ref) {
  return softplus(y) - softplus(y_ref) - sigmoid(y_ref) * (y - y_ref);
}

template <typename T>
PBRF_HOST_DEVICE T bce_bregman_grad(T y, T y_ref) {
  return sigmoid(y) - sigmoid(y_ref);
}

// CE divergence = lse(y) - lse(y_ref) - sum_c p_ref,c (y_c - y_ref,c); this is
// the per-element part of the last sum.
template <typename T>
PBRF_HOST_DEVICE T cross_entropy_linear_term(T p_ref, T y, T y_ref) {
  return p_ref * (y - y_ref);
}

template <typename T>
PBRF_HOST_DEVICE T log_sum_exp_from_stats(T row_max, T sum_exp) {
  return row_max + log_of(sum_exp);
}

// LiSSA recursion h <- v + (1 - damping/scale) h - (G h)/scale, with the two
// coefficients precomputed once per call.
template <typename T>
PBRF_HOST_DEVICE T lissa_element(T v, T h, T gh, T keep, T inv_scale) {
  return v + keep * h - gh * inv_scale;
}

}  // namespace pbrf
