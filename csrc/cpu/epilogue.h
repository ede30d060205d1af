// The fused interval epilogue shared by the CPU kernels: per-channel affine (bias + batch norm)
// then an optional interval ReLU, on centre-radius boxes laid out as [N, C, S]
// (S = H * W for convolutions, S = 1 for linear layers).
//
//   m  = scale[c] * mu_pre + shift[c]        rr = |scale[c]| * r_pre
//   relu:  u = max(m + rr, 0), l = max(m - rr, 0), mu = (u + l) / 2, r = (u - l) / 2
//
// The backward pass recomputes u, l from the saved pre-activation (no masks are stored) and
// returns the gradients of mu_pre, r_pre and the per-channel sums that the parameter gradients
// need: sum_gm = sum(g_m), sum_gm_x = sum(g_m * mu_pre), sum_grr_r = sum(g_rr * r_pre).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace adcert {

// ReLU as a select that compilers turn into vector blends (std::max compiles to branches in
// these loops, and mispredicted branches cost ~10x). NaN propagates: NaN < 0 is false.
template <typename T>
inline T relu0(T x) {
  return x < T(0) ? T(0) : x;
}

// The ReLU's gradient gate: v where x > 0, else 0 (both sides computed, so it vectorises).
template <typename T>
inline T pass_if_positive(T x, T v) {
  return x > T(0) ? v : T(0);
}

// The interval ReLU at one element with centre m and radius rr.
template <typename T>
inline void relu_forward_one(T m, T rr, T& mo, T& ro) {
  const T u = relu0(m + rr);
  const T l = relu0(m - rr);
  mo = (u + l) * T(0.5);
  ro = (u - l) * T(0.5);
}

// Backward of the interval ReLU at one element with pre-activation centre m and radius rr:
// turns the output gradients (gm, grr) into the pre-activation ones, in place.
template <typename T>
inline void relu_backward_one(T m, T rr, T& gm, T& grr) {
  const T gu = pass_if_positive(m + rr, (gm + grr) * T(0.5));
  const T gl = pass_if_positive(m - rr, (gm - grr) * T(0.5));
  gm = gu + gl;
  grr = gu - gl;
}

// Per-channel affine of "conv/linear (+ bias) (+ batch norm)":
//   inv = 1 / sqrt(var + eps), scale = bn_weight * inv, shift = scale * (bias - mean) + bn_bias.
// Without batch norm: scale = 1, shift = bias (or 0). All tensors are [C].
struct ChannelAffine {
  at::Tensor scale, shift, inv;  // inv is undefined without batch norm
};

ChannelAffine channel_affine(int64_t channels, const at::TensorOptions& options,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& bn_mean,
                             const std::optional<at::Tensor>& bn_var,
                             const std::optional<at::Tensor>& bn_weight,
                             const std::optional<at::Tensor>& bn_bias, double bn_eps);

// Writes mu_out, r_out ([N, C, S], contiguous, preallocated) from mu_pre, r_pre.
void epilogue_forward(const at::Tensor& mu_pre, const at::Tensor& r_pre, const at::Tensor& scale,
                      const at::Tensor& shift, bool relu, at::Tensor& mu_out, at::Tensor& r_out);

struct EpilogueGrads {
  at::Tensor grad_mu_pre, grad_r_pre;         // [N, C, S]
  at::Tensor sum_gm, sum_gm_x, sum_grr_r;     // [C], accumulated in double, cast to the dtype
};

EpilogueGrads epilogue_backward(const at::Tensor& grad_mu, const at::Tensor& grad_r,
                                const at::Tensor& mu_pre, const at::Tensor& r_pre,
                                const at::Tensor& scale, const at::Tensor& shift, bool relu);

// Gradients of the affine's parameters from the epilogue sums, in the order
// (bias, bn_mean, bn_var, bn_weight, bn_bias); undefined where the parameter is absent.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> affine_param_grads(
    const EpilogueGrads& g, const ChannelAffine& a, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_mean, const std::optional<at::Tensor>& bn_var,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias);

// View a [N, C, *] tensor as (N, C, S).
std::tuple<int64_t, int64_t, int64_t> ncs_sizes(const at::Tensor& t);

}  // namespace adcert
