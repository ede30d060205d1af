// The two products of an interval affine layer, shared by the plain and the fused ops:
//   mu_pre = W mu   (conv or linear, no bias)      r_pre = |W| r
// and their backward:
//   grad_mu = W^T g_mu,  grad_r = |W|^T g_r,  grad_W = g_mu mu^T + sign(W) * (g_r r^T)
// with sign(0) = 0 (the subgradient of |W| used by DESIGN.md section 3).
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

namespace adcert {

struct ConvGeometry {
  at::IntArrayRef stride, padding, dilation;
  int64_t groups;
};

// grad_w += sign(weight) * grad_abs in one pass (grad_w contiguous, same shape as weight).
void add_sign_product_(at::Tensor& grad_w, const at::Tensor& weight, const at::Tensor& grad_abs);

// mu, r: [B, in]; weight: [out, in] -> (mu_pre, r_pre): [B, out].
std::tuple<at::Tensor, at::Tensor> linear_products(const at::Tensor& mu, const at::Tensor& r,
                                                   const at::Tensor& weight);
// mask = {input grads, weight grad}; returns (grad_mu, grad_r, grad_weight), undefined if masked.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_products_backward(
    const at::Tensor& g_mu, const at::Tensor& g_r, const at::Tensor& mu, const at::Tensor& r,
    const at::Tensor& weight, std::array<bool, 2> mask);

// mu, r: [B, C_in, H, W]; weight: [C_out, C_in / groups, kH, kW] -> [B, C_out, H', W'] each.
// A bias, if given, is added to mu_pre inside the convolution (one pass fewer than add_).
std::tuple<at::Tensor, at::Tensor> conv_products(const at::Tensor& mu, const at::Tensor& r,
                                                 const at::Tensor& weight, const ConvGeometry& geo,
                                                 const std::optional<at::Tensor>& bias = {});
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_products_backward(
    const at::Tensor& g_mu, const at::Tensor& g_r, const at::Tensor& mu, const at::Tensor& r,
    const at::Tensor& weight, const ConvGeometry& geo, std::array<bool, 2> mask);

}  // namespace adcert
