// The fused block on CPU: linear + bias + batch-norm affine + ReLU on a centre-radius box.
// mu, r: [B, in]; weight: [out, in]. Returns (mu, r, mu_pre, r_pre), see fused_block.h.
#include <torch/library.h>

#include "../checks.h"
#include "fused_block.h"
#include "products.h"

namespace adcert {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> interval_linear_bn_relu_cpu(
    const at::Tensor& mu, const at::Tensor& r, const at::Tensor& weight, const OptTensor& bias,
    const OptTensor& bn_mean, const OptTensor& bn_var, const OptTensor& bn_weight,
    const OptTensor& bn_bias, double bn_eps, bool relu) {
  ADCERT_CHECK_BOX(mu, r);
  ADCERT_CHECK_SAME(mu, weight);
  return fused_block_forward([&] { return linear_products(mu, r, weight); }, bias, bn_mean,
                             bn_var, bn_weight, bn_bias, bn_eps, relu);
}

BlockGrads interval_linear_bn_relu_backward_cpu(
    const at::Tensor& grad_mu, const at::Tensor& grad_r, const at::Tensor& mu, const at::Tensor& r,
    const at::Tensor& weight, const OptTensor& bias, const OptTensor& bn_mean,
    const OptTensor& bn_var, const OptTensor& bn_weight, const OptTensor& bn_bias, double bn_eps,
    bool relu, const at::Tensor& mu_pre, const at::Tensor& r_pre, std::array<bool, 3> mask) {
  ADCERT_CHECK_BOX(mu, r);
  auto products_backward = [&](const at::Tensor& g_mu, const at::Tensor& g_r) {
    return linear_products_backward(g_mu, g_r, mu, r, weight, {mask[0], mask[1]});
  };
  return fused_block_backward(products_backward, grad_mu, grad_r, mu_pre, r_pre, bias, bn_mean,
                              bn_var, bn_weight, bn_bias, bn_eps, relu, mask[2]);
}

}  // namespace

TORCH_LIBRARY_IMPL(adcert, CPU, m) {
  m.impl("interval_linear_bn_relu", &interval_linear_bn_relu_cpu);
  m.impl("interval_linear_bn_relu_backward", &interval_linear_bn_relu_backward_cpu);
}

}  // namespace adcert
