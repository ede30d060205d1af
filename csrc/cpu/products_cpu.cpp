// CPU products of the interval affine layers (see products.h). The matrix products go to ATen
// (oneDNN / BLAS); the weight gradient of the radius branch is folded in place with sign(W).
#include "products.h"

namespace adcert {

std::tuple<at::Tensor, at::Tensor> linear_products(const at::Tensor& mu, const at::Tensor& r,
                                                   const at::Tensor& weight) {
  return {at::mm(mu, weight.t()), at::mm(r, weight.abs().t())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_products_backward(
    const at::Tensor& g_mu, const at::Tensor& g_r, const at::Tensor& mu, const at::Tensor& r,
    const at::Tensor& weight, std::array<bool, 2> mask) {
  at::Tensor grad_mu, grad_r, grad_w;
  if (mask[0]) {
    grad_mu = at::mm(g_mu, weight);
    grad_r = at::mm(g_r, weight.abs());
  }
  if (mask[1]) {
    grad_w = at::mm(g_mu.t(), mu);
    grad_w.addcmul_(at::sign(weight), at::mm(g_r.t(), r));
  }
  return {grad_mu, grad_r, grad_w};
}

namespace {
at::Tensor conv(const at::Tensor& x, const at::Tensor& w, const ConvGeometry& g) {
  return at::convolution(x, w, std::nullopt, g.stride, g.padding, g.dilation, false, {0, 0},
                         g.groups);
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> conv_products(const at::Tensor& mu, const at::Tensor& r,
                                                 const at::Tensor& weight, const ConvGeometry& geo) {
  return {conv(mu, weight, geo).contiguous(), conv(r, weight.abs(), geo).contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_products_backward(
    const at::Tensor& g_mu, const at::Tensor& g_r, const at::Tensor& mu, const at::Tensor& r,
    const at::Tensor& weight, const ConvGeometry& geo, std::array<bool, 2> mask) {
  at::Tensor grad_mu, grad_r, grad_w;
  if (!mask[0] && !mask[1]) return {grad_mu, grad_r, grad_w};
  if (mu.size(0) == 0) {  // empty batch: nothing flows back, the weight gradient is zero
    if (mask[0]) {
      grad_mu = at::zeros_like(mu);
      grad_r = at::zeros_like(r);
    }
    if (mask[1]) grad_w = at::zeros_like(weight);
    return {grad_mu, grad_r, grad_w};
  }
  const std::array<bool, 3> out_mask{mask[0], mask[1], false};
  auto [gm, gw_mu, unused0] =
      at::convolution_backward(g_mu, mu, weight, std::nullopt, geo.stride, geo.padding,
                               geo.dilation, false, {0, 0}, geo.groups, out_mask);
  auto [gr, gw_r, unused1] =
      at::convolution_backward(g_r, r, weight.abs(), std::nullopt, geo.stride, geo.padding,
                               geo.dilation, false, {0, 0}, geo.groups, out_mask);
  if (mask[0]) {
    grad_mu = gm;
    grad_r = gr;
  }
  if (mask[1]) grad_w = gw_mu.addcmul_(at::sign(weight), gw_r);
  return {grad_mu, grad_r, grad_w};
}

}  // namespace adcert
