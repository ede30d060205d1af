// CPU implementation of the fused interval epilogue (see epilogue.h for the formulas).
#include "epilogue.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace adcert {

std::tuple<int64_t, int64_t, int64_t> ncs_sizes(const at::Tensor& t) {
  TORCH_CHECK(t.dim() >= 2, "expected a tensor of at least 2 dimensions [N, C, ...], got ",
              t.sizes());
  int64_t s = 1;
  for (int64_t d = 2; d < t.dim(); ++d) s *= t.size(d);
  return {t.size(0), t.size(1), s};
}

ChannelAffine channel_affine(int64_t channels, const at::TensorOptions& options,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& bn_mean,
                             const std::optional<at::Tensor>& bn_var,
                             const std::optional<at::Tensor>& bn_weight,
                             const std::optional<at::Tensor>& bn_bias, double bn_eps) {
  ChannelAffine a;
  const bool has_bias = bias.has_value() && bias->defined();
  if (bn_mean.has_value() && bn_mean->defined()) {
    TORCH_CHECK(bn_var.has_value() && bn_var->defined(), "bn_var is required with bn_mean");
    a.inv = at::rsqrt(*bn_var + bn_eps);
    a.scale = (bn_weight.has_value() && bn_weight->defined()) ? *bn_weight * a.inv : a.inv;
    a.shift = has_bias ? a.scale * (*bias - *bn_mean) : -a.scale * *bn_mean;
    if (bn_bias.has_value() && bn_bias->defined()) a.shift = a.shift + *bn_bias;
  } else {
    a.scale = at::ones({channels}, options);
    a.shift = has_bias ? bias->clone() : at::zeros({channels}, options);
  }
  a.scale = a.scale.contiguous();
  a.shift = a.shift.contiguous();
  return a;
}

namespace {

// The affine (scale, |scale|, shift) then, if relu, the interval ReLU, at one element.
template <typename T>
inline void forward_one(T m_in, T r_in, T sc, T asc, T sh, bool relu, T& mo, T& ro) {
  const T m = sc * m_in + sh;
  const T rr = asc * r_in;
  if (relu) {
    relu_forward_one(m, rr, mo, ro);
  } else {
    mo = m;
    ro = rr;
  }
}

// How many contiguous ranges to split [0, n) into: at most one per thread, none smaller than
// about 16k elements of work.
inline int64_t chunk_count(int64_t n, int64_t work_per_item) {
  const int64_t threads = at::get_num_threads();
  const int64_t by_work = std::max<int64_t>(1, (n * work_per_item) / 16384);
  return std::max<int64_t>(1, std::min<int64_t>({threads, n, by_work}));
}

}  // namespace

void epilogue_forward(const at::Tensor& mu_pre, const at::Tensor& r_pre, const at::Tensor& scale,
                      const at::Tensor& shift, bool relu, at::Tensor& mu_out, at::Tensor& r_out) {
  auto [N, C, S] = ncs_sizes(mu_pre);
  if (mu_pre.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES(mu_pre.scalar_type(), "adcert_epilogue_forward", [&] {
    const scalar_t* mp = mu_pre.const_data_ptr<scalar_t>();
    const scalar_t* rp = r_pre.const_data_ptr<scalar_t>();
    const scalar_t* sc = scale.const_data_ptr<scalar_t>();
    const scalar_t* sh = shift.const_data_ptr<scalar_t>();
    scalar_t* mo = mu_out.mutable_data_ptr<scalar_t>();
    scalar_t* ro = r_out.mutable_data_ptr<scalar_t>();
    if (S == 1) {  // linear layout: rows of C channels
      at::parallel_for(0, N, std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)),
                       [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          const int64_t base = n * C;
          _Pragma("omp simd")
          for (int64_t c = 0; c < C; ++c) {
            forward_one(mp[base + c], rp[base + c], sc[c], std::abs(sc[c]), sh[c], relu,
                        mo[base + c], ro[base + c]);
          }
        }
      });
    } else {  // conv layout: one contiguous plane of S elements per (n, c)
      at::parallel_for(0, N * C, std::max<int64_t>(1, 32768 / S), [&](int64_t b, int64_t e) {
        for (int64_t nc = b; nc < e; ++nc) {
          const int64_t c = nc % C;
          const scalar_t s = sc[c], as = std::abs(sc[c]), t = sh[c];
          const scalar_t* __restrict__ mpp = mp + nc * S;
          const scalar_t* __restrict__ rpp = rp + nc * S;
          scalar_t* __restrict__ mop = mo + nc * S;
          scalar_t* __restrict__ rop = ro + nc * S;
          _Pragma("omp simd")
          for (int64_t i = 0; i < S; ++i) {
            forward_one(mpp[i], rpp[i], s, as, t, relu, mop[i], rop[i]);
          }
        }
      });
    }
  });
}

EpilogueGrads epilogue_backward(const at::Tensor& grad_mu_in, const at::Tensor& grad_r_in,
                                const at::Tensor& mu_pre, const at::Tensor& r_pre,
                                const at::Tensor& scale, const at::Tensor& shift, bool relu) {
  auto [N, C, S] = ncs_sizes(mu_pre);
  const at::Tensor grad_mu = grad_mu_in.contiguous();
  const at::Tensor grad_r = grad_r_in.contiguous();
  EpilogueGrads g;
  g.grad_mu_pre = at::empty_like(mu_pre, at::MemoryFormat::Contiguous);
  g.grad_r_pre = at::empty_like(r_pre, at::MemoryFormat::Contiguous);
  const int64_t chunks = chunk_count(N, C * S);
  // Per-chunk partial sums in double, reduced in a fixed order: deterministic results.
  std::vector<double> partial(static_cast<size_t>(chunks) * 3 * C, 0.0);
  if (mu_pre.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(mu_pre.scalar_type(), "adcert_epilogue_backward", [&] {
      const scalar_t* mp = mu_pre.const_data_ptr<scalar_t>();
      const scalar_t* rp = r_pre.const_data_ptr<scalar_t>();
      const scalar_t* gmo = grad_mu.const_data_ptr<scalar_t>();
      const scalar_t* gro = grad_r.const_data_ptr<scalar_t>();
      const scalar_t* sc = scale.const_data_ptr<scalar_t>();
      const scalar_t* sh = shift.const_data_ptr<scalar_t>();
      scalar_t* gmp = g.grad_mu_pre.mutable_data_ptr<scalar_t>();
      scalar_t* grp = g.grad_r_pre.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
        for (int64_t chunk = cb; chunk < ce; ++chunk) {
          const int64_t n0 = N * chunk / chunks, n1 = N * (chunk + 1) / chunks;
          double* acc = partial.data() + chunk * 3 * C;
          if (S == 1) {  // linear layout: vectorise across channels, accumulate per channel
            for (int64_t n = n0; n < n1; ++n) {
              const int64_t off = n * C;
      _Pragma("omp simd")
              for (int64_t c = 0; c < C; ++c) {
                const int64_t i = off + c;
                const scalar_t s = sc[c], as = std::abs(sc[c]);
                scalar_t gm = gmo[i], grr = gro[i];
                if (relu) relu_backward_one(s * mp[i] + sh[c], as * rp[i], gm, grr);
                gmp[i] = s * gm;
                grp[i] = as * grr;
                acc[c] += gm;
                acc[C + c] += static_cast<double>(gm) * mp[i];
                acc[2 * C + c] += static_cast<double>(grr) * rp[i];
              }
            }
            continue;
          }
          for (int64_t n = n0; n < n1; ++n) {
            for (int64_t c = 0; c < C; ++c) {
              const scalar_t s = sc[c], as = std::abs(sc[c]), t = sh[c];
              const int64_t off = (n * C + c) * S;
              const scalar_t* __restrict__ mpp = mp + off;
              const scalar_t* __restrict__ rpp = rp + off;
              const scalar_t* __restrict__ gmop = gmo + off;
              const scalar_t* __restrict__ grop = gro + off;
              scalar_t* __restrict__ gmpp = gmp + off;
              scalar_t* __restrict__ grpp = grp + off;
              // One plane of S elements: summed in scalar_t (vectorised), then added in double.
              scalar_t a_m = 0, a_mx = 0, a_rr = 0;
              _Pragma("omp simd reduction(+ : a_m, a_mx, a_rr)")
              for (int64_t i = 0; i < S; ++i) {
                scalar_t gm = gmop[i], grr = grop[i];
                if (relu) relu_backward_one(s * mpp[i] + t, as * rpp[i], gm, grr);
                gmpp[i] = s * gm;
                grpp[i] = as * grr;
                a_m += gm;
                a_mx += gm * mpp[i];
                a_rr += grr * rpp[i];
              }
              acc[c] += a_m;
              acc[C + c] += a_mx;
              acc[2 * C + c] += a_rr;
            }
          }
        }
      });
    });
  }
  auto sums = at::zeros({3, C}, mu_pre.options().dtype(at::kDouble));
  double* out = sums.mutable_data_ptr<double>();
  for (int64_t chunk = 0; chunk < chunks; ++chunk)
    for (int64_t j = 0; j < 3 * C; ++j) out[j] += partial[chunk * 3 * C + j];
  sums = sums.to(mu_pre.scalar_type());
  g.sum_gm = sums[0];
  g.sum_gm_x = sums[1];
  g.sum_grr_r = sums[2];
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> affine_param_grads(
    const EpilogueGrads& g, const ChannelAffine& a, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_mean, const std::optional<at::Tensor>& bn_var,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias) {
  const bool has_bias = bias.has_value() && bias->defined();
  const bool has_bn = bn_mean.has_value() && bn_mean->defined();
  at::Tensor g_bias, g_mean, g_var, g_weight, g_bn_bias;
  if (!has_bn) {
    if (has_bias) g_bias = g.sum_gm.clone();
    return {g_bias, g_mean, g_var, g_weight, g_bn_bias};
  }
  // d loss / d scale, through both mu (scale * x) and r (|scale| * r) and the shift's
  // dependence on scale (shift = scale * (bias - mean) + bn_bias).
  at::Tensor centred = has_bias ? (*bias - *bn_mean) : -*bn_mean;
  at::Tensor d_scale = g.sum_gm_x + at::sign(a.scale) * g.sum_grr_r + g.sum_gm * centred;
  if (has_bias) g_bias = g.sum_gm * a.scale;
  g_mean = -g.sum_gm * a.scale;
  const bool has_w = bn_weight.has_value() && bn_weight->defined();
  at::Tensor w = has_w ? *bn_weight : at::ones_like(a.inv);
  g_var = d_scale * w * (-0.5) * a.inv * a.inv * a.inv;
  if (has_w) g_weight = d_scale * a.inv;
  if (bn_bias.has_value() && bn_bias->defined()) g_bn_bias = g.sum_gm.clone();
  return {g_bias, g_mean, g_var, g_weight, g_bn_bias};
}

}  // namespace adcert
