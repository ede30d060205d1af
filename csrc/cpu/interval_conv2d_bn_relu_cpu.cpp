// The fused block on CPU: conv2d + bias + batch-norm affine + ReLU on a centre-radius box.
// mu, r: [B, C_in, H, W]; weight: [C_out, C_in / groups, kH, kW]. The hot path of every bound
// pass. Returns (mu, r, mu_pre, r_pre), see fused_block.h.
#include <torch/library.h>

#include "../checks.h"
#include "fused_block.h"
#include "products.h"

namespace adcert {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> interval_conv2d_bn_relu_cpu(
    const at::Tensor& mu, const at::Tensor& r, const at::Tensor& weight, const OptTensor& bias,
    const OptTensor& bn_mean, const OptTensor& bn_var, const OptTensor& bn_weight,
    const OptTensor& bn_bias, double bn_eps, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu) {
  ADCERT_CHECK_BOX(mu, r);
  ADCERT_CHECK_SAME(mu, weight);
  const ConvGeometry geo{stride, padding, dilation, groups};
  return fused_block_forward([&] { return conv_products(mu, r, weight, geo); }, bias, bn_mean,
                             bn_var, bn_weight, bn_bias, bn_eps, relu);
}

BlockGrads interval_conv2d_bn_relu_backward_cpu(
    const at::Tensor& grad_mu, const at::Tensor& grad_r, const at::Tensor& mu, const at::Tensor& r,
    const at::Tensor& weight, const OptTensor& bias, const OptTensor& bn_mean,
    const OptTensor& bn_var, const OptTensor& bn_weight, const OptTensor& bn_bias, double bn_eps,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    bool relu, const at::Tensor& mu_pre, const at::Tensor& r_pre, std::array<bool, 3> mask) {
  ADCERT_CHECK_BOX(mu, r);
  const ConvGeometry geo{stride, padding, dilation, groups};
  auto products_backward = [&](const at::Tensor& g_mu, const at::Tensor& g_r) {
    return conv_products_backward(g_mu, g_r, mu, r, weight, geo, {mask[0], mask[1]});
  };
  return fused_block_backward(products_backward, grad_mu, grad_r, mu_pre, r_pre, bias, bn_mean,
                              bn_var, bn_weight, bn_bias, bn_eps, relu, mask[2]);
}

}  // namespace

TORCH_LIBRARY_IMPL(adcert, CPU, m) {
  m.impl("interval_conv2d_bn_relu", &interval_conv2d_bn_relu_cpu);
  m.impl("interval_conv2d_bn_relu_backward", &interval_conv2d_bn_relu_backward_cpu);
}

}  // namespace adcert
