// Interval batch norm with caller-supplied statistics, CPU:
//   s = weight / sqrt(var + eps):  mu' = s (mu - mean) + bias,  r' = |s| r
// Runs the shared epilogue (epilogue.h) without the ReLU.
#include <torch/library.h>

#include "../checks.h"
#include "epilogue.h"

namespace adcert {
namespace {

std::tuple<at::Tensor, at::Tensor> interval_batch_norm_cpu(
    const at::Tensor& mu_in, const at::Tensor& r_in, const at::Tensor& mean, const at::Tensor& var,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
  ADCERT_CHECK_BOX(mu_in, r_in);
  const at::Tensor mu = mu_in.contiguous(), r = r_in.contiguous();
  auto [N, C, S] = ncs_sizes(mu);
  ChannelAffine a = channel_affine(C, mu.options(), std::nullopt, mean, var, weight, bias, eps);
  at::Tensor mu_out = at::empty_like(mu, at::MemoryFormat::Contiguous);
  at::Tensor r_out = at::empty_like(r, at::MemoryFormat::Contiguous);
  epilogue_forward(mu, r, a.scale, a.shift, /*relu=*/false, mu_out, r_out);
  return {mu_out, r_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
interval_batch_norm_backward_cpu(const at::Tensor& grad_mu, const at::Tensor& grad_r,
                                 const at::Tensor& mu_in, const at::Tensor& r_in,
                                 const at::Tensor& mean, const at::Tensor& var,
                                 const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, double eps) {
  ADCERT_CHECK_BOX(mu_in, r_in);
  const at::Tensor mu = mu_in.contiguous(), r = r_in.contiguous();
  auto [N, C, S] = ncs_sizes(mu);
  ChannelAffine a = channel_affine(C, mu.options(), std::nullopt, mean, var, weight, bias, eps);
  EpilogueGrads g = epilogue_backward(grad_mu, grad_r, mu, r, a.scale, a.shift, /*relu=*/false);
  auto [g_unused, g_mean, g_var, g_weight, g_bias] =
      affine_param_grads(g, a, std::nullopt, mean, var, weight, bias);
  return {g.grad_mu_pre, g.grad_r_pre, g_mean, g_var, g_weight, g_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(adcert, CPU, m) {
  m.impl("interval_batch_norm", &interval_batch_norm_cpu);
  m.impl("interval_batch_norm_backward", &interval_batch_norm_backward_cpu);
}

}  // namespace adcert
