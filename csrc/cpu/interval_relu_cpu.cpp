// Interval ReLU on centre-radius boxes (any shape), CPU.
//   u = max(mu + r, 0), l = max(mu - r, 0):  mu' = (u + l) / 2,  r' = (u - l) / 2
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "epilogue.h"

namespace adcert {
namespace {

std::tuple<at::Tensor, at::Tensor> interval_relu_cpu(const at::Tensor& mu_in, const at::Tensor& r_in) {
  ADCERT_CHECK_BOX(mu_in, r_in);
  const at::Tensor mu = mu_in.contiguous(), r = r_in.contiguous();
  at::Tensor mu_out = at::empty_like(mu, at::MemoryFormat::Contiguous);
  at::Tensor r_out = at::empty_like(r, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "adcert_interval_relu", [&] {
    const scalar_t* m_base = mu.const_data_ptr<scalar_t>();
    const scalar_t* r_base = r.const_data_ptr<scalar_t>();
    scalar_t* mo_base = mu_out.mutable_data_ptr<scalar_t>();
    scalar_t* ro_base = r_out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, mu.numel(), 32768, [=](int64_t b, int64_t e) {
      // Local restrict pointers (not captured references) so the loop vectorises.
      const scalar_t* __restrict__ m = m_base;
      const scalar_t* __restrict__ rr = r_base;
      scalar_t* __restrict__ mo = mo_base;
      scalar_t* __restrict__ ro = ro_base;
      _Pragma("omp simd")
      for (int64_t i = b; i < e; ++i) {
        relu_forward_one(m[i], rr[i], mo[i], ro[i]);
      }
    });
  });
  return {mu_out, r_out};
}

std::tuple<at::Tensor, at::Tensor> interval_relu_backward_cpu(const at::Tensor& grad_mu_in,
                                                              const at::Tensor& grad_r_in,
                                                              const at::Tensor& mu_in,
                                                              const at::Tensor& r_in) {
  ADCERT_CHECK_BOX(mu_in, r_in);
  const at::Tensor mu = mu_in.contiguous(), r = r_in.contiguous();
  const at::Tensor gmu = grad_mu_in.contiguous(), gr = grad_r_in.contiguous();
  at::Tensor g_mu = at::empty_like(mu, at::MemoryFormat::Contiguous);
  at::Tensor g_r = at::empty_like(r, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "adcert_interval_relu_backward", [&] {
    const scalar_t* m_base = mu.const_data_ptr<scalar_t>();
    const scalar_t* r_base = r.const_data_ptr<scalar_t>();
    const scalar_t* gm_base = gmu.const_data_ptr<scalar_t>();
    const scalar_t* gr_base = gr.const_data_ptr<scalar_t>();
    scalar_t* om_base = g_mu.mutable_data_ptr<scalar_t>();
    scalar_t* or_base = g_r.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, mu.numel(), 32768, [=](int64_t b, int64_t e) {
      const scalar_t* __restrict__ m = m_base;
      const scalar_t* __restrict__ rr = r_base;
      const scalar_t* __restrict__ gm = gm_base;
      const scalar_t* __restrict__ grr = gr_base;
      scalar_t* __restrict__ om = om_base;
      scalar_t* __restrict__ orr = or_base;
      _Pragma("omp simd")
      for (int64_t i = b; i < e; ++i) {
        scalar_t g_m = gm[i], g_r = grr[i];
        relu_backward_one(m[i], rr[i], g_m, g_r);
        om[i] = g_m;
        orr[i] = g_r;
      }
    });
  });
  return {g_mu, g_r};
}

}  // namespace

TORCH_LIBRARY_IMPL(adcert, CPU, m) {
  m.impl("interval_relu", &interval_relu_cpu);
  m.impl("interval_relu_backward", &interval_relu_backward_cpu);
}

}  // namespace adcert
