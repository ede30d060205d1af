// Interval 2-D convolution, CPU:  mu' = conv(mu, W) + b,  r' = conv(r, |W|).
// mu, r: [B, C_in, H, W]; weight: [C_out, C_in / groups, kH, kW].
#include <torch/library.h>

#include "../checks.h"
#include "products.h"

namespace adcert {
namespace {

std::tuple<at::Tensor, at::Tensor> interval_conv2d_cpu(
    const at::Tensor& mu, const at::Tensor& r, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups) {
  ADCERT_CHECK_BOX(mu, r);
  ADCERT_CHECK_SAME(mu, weight);
  return conv_products(mu, r, weight, {stride, padding, dilation, groups}, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> interval_conv2d_backward_cpu(
    const at::Tensor& grad_mu, const at::Tensor& grad_r, const at::Tensor& mu, const at::Tensor& r,
    const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> mask) {
  ADCERT_CHECK_BOX(mu, r);
  auto [g_mu, g_r, g_w] = conv_products_backward(
      grad_mu, grad_r, mu, r, weight, {stride, padding, dilation, groups}, {mask[0], mask[1]});
  at::Tensor g_b = mask[2] ? grad_mu.sum({0, 2, 3}) : at::Tensor();
  return {g_mu, g_r, g_w, g_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(adcert, CPU, m) {
  m.impl("interval_conv2d", &interval_conv2d_cpu);
  m.impl("interval_conv2d_backward", &interval_conv2d_backward_cpu);
}

}  // namespace adcert
