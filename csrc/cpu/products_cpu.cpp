// CPU products of the interval affine layers (see products.h). The matrix products go to ATen
// (oneDNN / BLAS); the weight gradient of the radius branch is folded in place with sign(W).
#include "products.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace adcert {

void add_sign_product_(at::Tensor& grad_w, const at::Tensor& weight, const at::Tensor& grad_abs) {
  TORCH_CHECK(grad_w.is_contiguous() && grad_w.sizes() == weight.sizes(),
              "add_sign_product_: grad_w must be contiguous with the weight's shape");
  const at::Tensor w = weight.contiguous(), ga = grad_abs.contiguous();
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "adcert_add_sign_product", [&] {
    scalar_t* __restrict__ out = grad_w.mutable_data_ptr<scalar_t>();
    const scalar_t* __restrict__ wp = w.const_data_ptr<scalar_t>();
    const scalar_t* __restrict__ gp = ga.const_data_ptr<scalar_t>();
    at::parallel_for(0, w.numel(), 32768, [&](int64_t b, int64_t e) {
      _Pragma("omp simd")
      for (int64_t i = b; i < e; ++i) {
        const scalar_t s = scalar_t(wp[i] > 0) - scalar_t(wp[i] < 0);
        out[i] += s * gp[i];
      }
    });
  });
}

namespace {

// Large weights (the 32768 x 512 layer of CNN7 is 64 MiB) make |W| and the radius branch's
// weight gradient memory-bound: materialising them costs whole extra passes over W and fresh
// page-faulted allocations. Above this size the radius products run over blocks of output rows,
// with |W| of one block (about 1 MiB) kept hot in cache between its abs and its GEMMs.
constexpr int64_t kBlockedWeightNumel = 1 << 20;
constexpr int64_t kBlockBytes = 1 << 20;

int64_t block_rows(const at::Tensor& weight) {
  const int64_t row_bytes = weight.size(1) * weight.element_size();
  return std::max<int64_t>(8, kBlockBytes / std::max<int64_t>(row_bytes, 1));
}

bool use_blocks(const at::Tensor& weight) {
  return weight.numel() >= kBlockedWeightNumel && weight.size(0) > 8;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_products(const at::Tensor& mu, const at::Tensor& r,
                                                   const at::Tensor& weight) {
  at::Tensor mu_pre = at::mm(mu, weight.t());
  if (!use_blocks(weight)) return {mu_pre, at::mm(r, weight.abs().t())};
  // r_pre^T [out, B] = |W| r^T, one block of output rows at a time.
  const int64_t out = weight.size(0), rows = block_rows(weight);
  at::Tensor r_pre_t = at::empty({out, r.size(0)}, r.options());
  at::Tensor abs_buf = at::empty({rows, weight.size(1)}, weight.options());
  const at::Tensor r_t = r.t();
  for (int64_t o0 = 0; o0 < out; o0 += rows) {
    const int64_t n = std::min(rows, out - o0);
    at::Tensor abs_blk = abs_buf.narrow(0, 0, n);
    at::abs_out(abs_blk, weight.narrow(0, o0, n));
    at::Tensor dst = r_pre_t.narrow(0, o0, n);
    at::mm_out(dst, abs_blk, r_t);
  }
  return {mu_pre, r_pre_t.t().contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_products_backward(
    const at::Tensor& g_mu, const at::Tensor& g_r, const at::Tensor& mu, const at::Tensor& r,
    const at::Tensor& weight, std::array<bool, 2> mask) {
  at::Tensor grad_mu, grad_r, grad_w;
  if (mask[0]) grad_mu = at::mm(g_mu, weight);
  if (mask[1]) grad_w = at::mm(g_mu.t(), mu).contiguous();
  if (!use_blocks(weight)) {
    if (mask[0]) grad_r = at::mm(g_r, weight.abs());
    if (mask[1]) add_sign_product_(grad_w, weight, at::mm(g_r.t(), r));
    return {grad_mu, grad_r, grad_w};
  }
  // One sweep over blocks of output rows: |W_blk| feeds grad_r, sign(W_blk) the weight grad.
  const int64_t out = weight.size(0), rows = block_rows(weight);
  if (mask[0]) grad_r = at::zeros({g_r.size(0), weight.size(1)}, g_r.options());
  at::Tensor buf = at::empty({rows, weight.size(1)}, weight.options());
  const at::Tensor g_r_t = g_r.t();
  for (int64_t o0 = 0; o0 < out; o0 += rows) {
    const int64_t n = std::min(rows, out - o0);
    const at::Tensor w_blk = weight.narrow(0, o0, n);
    at::Tensor tmp = buf.narrow(0, 0, n);
    if (mask[0]) {
      at::abs_out(tmp, w_blk);
      grad_r.addmm_(g_r.narrow(1, o0, n), tmp);
    }
    if (mask[1]) {
      at::mm_out(tmp, g_r_t.narrow(0, o0, n), r);
      at::Tensor gw_blk = grad_w.narrow(0, o0, n);
      add_sign_product_(gw_blk, w_blk, tmp);
    }
  }
  return {grad_mu, grad_r, grad_w};
}

namespace {
at::Tensor conv(const at::Tensor& x, const at::Tensor& w, const ConvGeometry& g,
                const std::optional<at::Tensor>& bias = {}) {
  return at::convolution(x, w, bias, g.stride, g.padding, g.dilation, false, {0, 0}, g.groups);
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> conv_products(const at::Tensor& mu, const at::Tensor& r,
                                                 const at::Tensor& weight, const ConvGeometry& geo,
                                                 const std::optional<at::Tensor>& bias) {
  return {conv(mu, weight, geo, bias).contiguous(), conv(r, weight.abs(), geo).contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_products_backward(
    const at::Tensor& g_mu, const at::Tensor& g_r, const at::Tensor& mu, const at::Tensor& r,
    const at::Tensor& weight, const ConvGeometry& geo, std::array<bool, 2> mask) {
  at::Tensor grad_mu, grad_r, grad_w;
  if (!mask[0] && !mask[1]) return {grad_mu, grad_r, grad_w};
  if (mu.size(0) == 0) {  // empty batch: nothing flows back, the weight gradient is zero
    if (mask[0]) {
      grad_mu = at::zeros_like(mu);
      grad_r = at::zeros_like(r);
    }
    if (mask[1]) grad_w = at::zeros_like(weight);
    return {grad_mu, grad_r, grad_w};
  }
  const std::array<bool, 3> out_mask{mask[0], mask[1], false};
  const at::Tensor abs_w = weight.abs();
  auto [gm, gw_mu, unused0] =
      at::convolution_backward(g_mu, mu, weight, std::nullopt, geo.stride, geo.padding,
                               geo.dilation, false, {0, 0}, geo.groups, out_mask);
  auto [gr, gw_r, unused1] =
      at::convolution_backward(g_r, r, abs_w, std::nullopt, geo.stride, geo.padding,
                               geo.dilation, false, {0, 0}, geo.groups, out_mask);
  if (mask[0]) {
    grad_mu = gm;
    grad_r = gr;
  }
  if (mask[1]) {
    grad_w = gw_mu.contiguous();
    add_sign_product_(grad_w, weight, gw_r);
  }
  return {grad_mu, grad_r, grad_w};
}

}  // namespace adcert
