// The fused block on CPU: linear + bias + batch-norm affine + ReLU on a centre-radius box.
// mu, r: [B, in]; weight: [out, in].
// The two products go to ATen; bias, batch norm and ReLU run as one fused pass (epilogue.h).
// Returns (mu, r, mu_pre, r_pre): the pre-affine products are kept for the backward pass.
#include <torch/library.h>

#include "../checks.h"
#include "epilogue.h"
#include "products.h"

namespace adcert {
namespace {

using OptT = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> interval_linear_bn_relu_cpu(
    const at::Tensor& mu, const at::Tensor& r, const at::Tensor& weight, const OptT& bias,
    const OptT& bn_mean, const OptT& bn_var, const OptT& bn_weight, const OptT& bn_bias,
    double bn_eps, bool relu) {
  ADCERT_CHECK_BOX(mu, r);
  ADCERT_CHECK_SAME(mu, weight);
  auto [mu_pre, r_pre] = linear_products(mu, r, weight);
  ChannelAffine a = channel_affine(mu_pre.size(1), mu_pre.options(), bias, bn_mean, bn_var,
                                   bn_weight, bn_bias, bn_eps);
  at::Tensor mu_out = at::empty_like(mu_pre, at::MemoryFormat::Contiguous);
  at::Tensor r_out = at::empty_like(r_pre, at::MemoryFormat::Contiguous);
  epilogue_forward(mu_pre, r_pre, a.scale, a.shift, relu, mu_out, r_out);
  return {mu_out, r_out, mu_pre, r_pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
interval_linear_bn_relu_backward_cpu(
    const at::Tensor& grad_mu, const at::Tensor& grad_r, const at::Tensor& mu, const at::Tensor& r,
    const at::Tensor& weight, const OptT& bias, const OptT& bn_mean, const OptT& bn_var,
    const OptT& bn_weight, const OptT& bn_bias, double bn_eps, bool relu,
    const at::Tensor& mu_pre, const at::Tensor& r_pre, std::array<bool, 3> mask) {
  ADCERT_CHECK_BOX(mu, r);
  ChannelAffine a = channel_affine(mu_pre.size(1), mu_pre.options(), bias, bn_mean, bn_var,
                                   bn_weight, bn_bias, bn_eps);
  EpilogueGrads e = epilogue_backward(grad_mu, grad_r, mu_pre, r_pre, a.scale, a.shift, relu);
  auto [g_mu, g_r, g_w] = linear_products_backward(e.grad_mu_pre, e.grad_r_pre, mu, r, weight, {mask[0], mask[1]});
  at::Tensor g_b, g_mean, g_var, g_bnw, g_bnb;
  if (mask[2]) {
    std::tie(g_b, g_mean, g_var, g_bnw, g_bnb) =
        affine_param_grads(e, a, bias, bn_mean, bn_var, bn_weight, bn_bias);
  }
  return {g_mu, g_r, g_w, g_b, g_mean, g_var, g_bnw, g_bnb};
}

}  // namespace

TORCH_LIBRARY_IMPL(adcert, CPU, m) {
  m.impl("interval_linear_bn_relu", &interval_linear_bn_relu_cpu);
  m.impl("interval_linear_bn_relu_backward", &interval_linear_bn_relu_backward_cpu);
}

}  // namespace adcert
