// Interval linear layer, CPU:  mu' = W mu + b,  r' = |W| r.   mu, r: [B, in] -> [B, out].
#include <torch/library.h>

#include "../checks.h"
#include "products.h"

namespace adcert {
namespace {

std::tuple<at::Tensor, at::Tensor> interval_linear_cpu(const at::Tensor& mu, const at::Tensor& r,
                                                       const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias) {
  ADCERT_CHECK_BOX(mu, r);
  ADCERT_CHECK_SAME(mu, weight);
  auto [mu_pre, r_pre] = linear_products(mu, r, weight);
  if (bias.has_value() && bias->defined()) mu_pre.add_(*bias);
  return {mu_pre, r_pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> interval_linear_backward_cpu(
    const at::Tensor& grad_mu, const at::Tensor& grad_r, const at::Tensor& mu, const at::Tensor& r,
    const at::Tensor& weight, std::array<bool, 3> mask) {
  ADCERT_CHECK_BOX(mu, r);
  auto [g_mu, g_r, g_w] = linear_products_backward(grad_mu, grad_r, mu, r, weight,
                                                   {mask[0], mask[1]});
  at::Tensor g_b = mask[2] ? grad_mu.sum(0) : at::Tensor();
  return {g_mu, g_r, g_w, g_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(adcert, CPU, m) {
  m.impl("interval_linear", &interval_linear_cpu);
  m.impl("interval_linear_backward", &interval_linear_backward_cpu);
}

}  // namespace adcert
