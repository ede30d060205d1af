// The fused interval block (conv2d or linear) + bias + batch-norm affine + ReLU, written once
// over the layer's products (products.h) and the fused epilogue (epilogue.h). The op files
// interval_{conv2d,linear}_bn_relu_cpu.cpp only bind the products of their layer type.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "epilogue.h"

namespace adcert {

using OptTensor = std::optional<at::Tensor>;
using BlockGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                              at::Tensor, at::Tensor, at::Tensor>;

// products() -> (mu_pre, r_pre); returns (mu, r, mu_pre, r_pre).
template <typename Products>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_block_forward(
    Products products, const OptTensor& bias, const OptTensor& bn_mean, const OptTensor& bn_var,
    const OptTensor& bn_weight, const OptTensor& bn_bias, double bn_eps, bool relu) {
  auto [mu_pre, r_pre] = products();
  ChannelAffine a = channel_affine(mu_pre.size(1), mu_pre.options(), bias, bn_mean, bn_var,
                                   bn_weight, bn_bias, bn_eps);
  at::Tensor mu_out = at::empty_like(mu_pre, at::MemoryFormat::Contiguous);
  at::Tensor r_out = at::empty_like(r_pre, at::MemoryFormat::Contiguous);
  epilogue_forward(mu_pre, r_pre, a.scale, a.shift, relu, mu_out, r_out);
  return {mu_out, r_out, mu_pre, r_pre};
}

// products_backward(g_mu_pre, g_r_pre) -> (g_mu, g_r, g_weight); returns the 8 gradients
// (mu, r, weight, bias, bn_mean, bn_var, bn_weight, bn_bias), parameters only if params_grad.
template <typename ProductsBackward>
BlockGrads fused_block_backward(ProductsBackward products_backward, const at::Tensor& grad_mu,
                                const at::Tensor& grad_r, const at::Tensor& mu_pre,
                                const at::Tensor& r_pre, const OptTensor& bias,
                                const OptTensor& bn_mean, const OptTensor& bn_var,
                                const OptTensor& bn_weight, const OptTensor& bn_bias,
                                double bn_eps, bool relu, bool params_grad) {
  ChannelAffine a = channel_affine(mu_pre.size(1), mu_pre.options(), bias, bn_mean, bn_var,
                                   bn_weight, bn_bias, bn_eps);
  EpilogueGrads e = epilogue_backward(grad_mu, grad_r, mu_pre, r_pre, a.scale, a.shift, relu);
  auto [g_mu, g_r, g_w] = products_backward(e.grad_mu_pre, e.grad_r_pre);
  at::Tensor g_b, g_mean, g_var, g_bnw, g_bnb;
  if (params_grad) {
    std::tie(g_b, g_mean, g_var, g_bnw, g_bnb) =
        affine_param_grads(e, a, bias, bn_mean, bn_var, bn_weight, bn_bias);
  }
  return {g_mu, g_r, g_w, g_b, g_mean, g_var, g_bnw, g_bnb};
}

}  // namespace adcert
