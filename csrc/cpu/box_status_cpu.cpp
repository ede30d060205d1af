// One fused pass over a box (mu, r) that reports the first problem a user should hear about:
//   0 valid, 1 mu has NaN, 2 r has NaN, 3 r has a negative entry.
// Used by the Python argument checks on CPU; replaces three separate reductions.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>

#include "../checks.h"

namespace adcert {
namespace {

int64_t box_status_cpu(const at::Tensor& mu_in, const at::Tensor& r_in) {
  ADCERT_CHECK_BOX(mu_in, r_in);
  const at::Tensor mu = mu_in.contiguous(), r = r_in.contiguous();
  std::atomic<int> nan_mu{0}, nan_r{0}, neg_r{0};
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "adcert_box_status", [&] {
    const scalar_t* __restrict__ m = mu.const_data_ptr<scalar_t>();
    const scalar_t* __restrict__ rr = r.const_data_ptr<scalar_t>();
    at::parallel_for(0, mu.numel(), 65536, [&](int64_t b, int64_t e) {
      int bad_m = 0, bad_r = 0, bad_neg = 0;
      _Pragma("omp simd reduction(| : bad_m, bad_r, bad_neg)")
      for (int64_t i = b; i < e; ++i) {
        bad_m |= (m[i] != m[i]);
        bad_r |= (rr[i] != rr[i]);
        bad_neg |= (rr[i] < scalar_t(0));
      }
      if (bad_m) nan_mu = 1;
      if (bad_r) nan_r = 1;
      if (bad_neg) neg_r = 1;
    });
  });
  return nan_mu ? 1 : nan_r ? 2 : neg_r ? 3 : 0;
}

}  // namespace

TORCH_LIBRARY_IMPL(adcert, CPU, m) { m.impl("box_status", &box_status_cpu); }

}  // namespace adcert
