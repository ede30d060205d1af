// AD-CERT loss (papers/ad-cert.txt eq. 10; DESIGN.md section 6), CPU. One row per sample:
//   KD(t || x)  = tau^2 * KL(softmax(t / tau) || softmax(x / tau))
//   kd          = KD(t || s)                                   (no clean logits)
//               = (1 - w) KD(t || c) + w KD(t || s)            (RSLAD-CERT, w = adv_weight)
//   ce          = logsumexp_j(-m_j)        (= CE([0, -m_lb], y): m has 0 in the y entry)
//   loss        = (1 - alpha) kd + alpha ce
// The gradients of each row's loss w.r.t. s, m (and c) come out of the same pass:
//   d/ds = (1 - alpha) w_s tau (softmax(s / tau) - softmax(t / tau)),  d/dm = -alpha softmax(-m).
// The teacher takes no gradient.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "../checks.h"

namespace adcert {
namespace {

// exp(x) for x <= 0 in plain arithmetic that vectorises in an `omp simd` loop (libm's exp does
// not): x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a Taylor polynomial (relative error below
// a few ulp: degree 7 for float, 13 for double), 2^n from the exponent bits. x below the
// smallest normal exponent (and -inf) gives 0; NaN gives NaN.
template <typename scalar_t>
struct ExpTraits;
template <>
struct ExpTraits<float> {
  using int_t = int32_t;
  static constexpr int kDegree = 7;
  static constexpr float kLo = -87.0f;
  static constexpr int kBias = 127, kMant = 23;
  static constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
};
template <>
struct ExpTraits<double> {
  using int_t = int64_t;
  static constexpr int kDegree = 13;
  static constexpr double kLo = -708.0;
  static constexpr int kBias = 1023, kMant = 52;
  static constexpr double kMagic = 6755399441055744.0;  // 1.5 * 2^52
};

constexpr double kInvFactorial[14] = {
    1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040, 1.0 / 40320,
    1.0 / 362880, 1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600, 1.0 / 6227020800.0};

template <typename scalar_t>
inline scalar_t exp_nonpos(scalar_t x) {
  using T = ExpTraits<scalar_t>;
  using int_t = typename T::int_t;
  const scalar_t xc = x > T::kLo ? x : T::kLo;  // NaN -> kLo: the int conversion stays defined
  const scalar_t nf = (xc * scalar_t(1.4426950408889634) + T::kMagic) - T::kMagic;
  const scalar_t r = (xc - nf * scalar_t(0.693145751953125)) - nf * scalar_t(1.428606820309417e-06);
  // Horner on the Taylor series 1 + r + r^2/2! + ... + r^d/d! (coefficients 1/k!, no division)
  scalar_t p = scalar_t(kInvFactorial[T::kDegree]);
  for (int k = T::kDegree - 1; k >= 0; --k) p = p * r + scalar_t(kInvFactorial[k]);
  const int_t bits = (static_cast<int_t>(static_cast<int32_t>(nf)) + T::kBias) << T::kMant;
  scalar_t scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const scalar_t v = p * scale;
  return x < T::kLo ? scalar_t(0) : (x == x ? v : x);  // NaN propagates
}

template <typename scalar_t>
struct SoftmaxStats {
  scalar_t lse;  // logsumexp of x * scale
  scalar_t inv;  // 1 / sum exp(x * scale - max)
  scalar_t max;
};

// exp(x * scale - max) into e[0..C), returns max, lse and 1/sum.
template <typename scalar_t>
inline SoftmaxStats<scalar_t> softmax_row(const scalar_t* __restrict__ x, scalar_t* __restrict__ e,
                                          int64_t C, scalar_t scale) {
  scalar_t mx = -std::numeric_limits<scalar_t>::infinity();
  _Pragma("omp simd reduction(max:mx)")
  for (int64_t j = 0; j < C; ++j) {
    const scalar_t v = x[j] * scale;
    mx = v > mx ? v : mx;
  }
  scalar_t sum = 0;
  _Pragma("omp simd reduction(+:sum)")
  for (int64_t j = 0; j < C; ++j) {
    const scalar_t v = exp_nonpos(x[j] * scale - mx);
    e[j] = v;
    sum += v;
  }
  return {mx + std::log(sum), scalar_t(1) / sum, mx};
}

// KL(p_t || softmax(x / tau)) for a row whose teacher probabilities are pt = et * t_inv (and
// log-probabilities t * it - t_lse); overwrites ex (exp(x / tau - max)) with coef * (p_x - p_t).
template <typename scalar_t>
inline scalar_t kl_row(const scalar_t* __restrict__ t, const scalar_t* __restrict__ et,
                       const scalar_t* __restrict__ x, scalar_t* __restrict__ ex, int64_t C,
                       scalar_t it, const SoftmaxStats<scalar_t>& st,
                       const SoftmaxStats<scalar_t>& sx, scalar_t coef) {
  scalar_t kl = 0;
  _Pragma("omp simd reduction(+:kl)")
  for (int64_t j = 0; j < C; ++j) {
    const scalar_t pt = et[j] * st.inv;
    const scalar_t px = ex[j] * sx.inv;
    const scalar_t d = (t[j] * it - st.lse) - (x[j] * it - sx.lse);
    kl += pt != scalar_t(0) ? pt * d : scalar_t(0);  // 0 log 0 = 0 (also -inf logits); NaN stays
    ex[j] = coef * (px - pt);
  }
  return kl;
}

template <typename scalar_t>
struct LossArgs {
  const scalar_t *s, *t, *m, *c;  // c: nullptr without clean logits
  scalar_t *loss, *gs, *gm, *gc;
  int64_t C;
  scalar_t alpha, inv_tau, w_s, w_c, kd_scale, coef_s, coef_c;
};

// Rows [b, e) of the loss and its gradients.
template <typename scalar_t>
__attribute__((always_inline)) inline void loss_rows(const LossArgs<scalar_t>& A, int64_t b,
                                                     int64_t e) {
  const int64_t C = A.C;
  const scalar_t it = A.inv_tau;
  std::vector<scalar_t> et_buf(C);  // exp(t / tau - max) of the row
  scalar_t* __restrict__ et = et_buf.data();
  for (int64_t i = b; i < e; ++i) {
    const int64_t off = i * C;
    const scalar_t* __restrict__ ti = A.t + off;
    const scalar_t* __restrict__ si = A.s + off;
    const scalar_t* __restrict__ mi = A.m + off;
    scalar_t* __restrict__ gs = A.gs + off;
    scalar_t* __restrict__ gm = A.gm + off;
    const auto st = softmax_row(ti, et, C, it);
    const auto ss = softmax_row(si, gs, C, it);
    scalar_t kd = A.w_s * kl_row(ti, et, si, gs, C, it, st, ss, A.coef_s);
    if (A.c != nullptr) {
      const scalar_t* __restrict__ ci = A.c + off;
      scalar_t* __restrict__ gc = A.gc + off;
      const auto sc = softmax_row(ci, gc, C, it);
      kd += A.w_c * kl_row(ti, et, ci, gc, C, it, st, sc, A.coef_c);
    }
    // ce = logsumexp(-m); d ce / d m = -softmax(-m)
    const auto sm = softmax_row(mi, gm, C, scalar_t(-1));
    const scalar_t gcoef = -A.alpha * sm.inv;
    _Pragma("omp simd")
    for (int64_t j = 0; j < C; ++j) gm[j] *= gcoef;
    A.loss[i] = A.kd_scale * kd + A.alpha * sm.lse;
  }
}

// The row loops are exp-bound: an AVX2 clone (chosen at load time where the CPU has it) doubles
// the vector width of the default x86-64 (SSE2) build.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ADCERT_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define ADCERT_CLONES
#endif
ADCERT_CLONES void loss_rows_float(const LossArgs<float>& A, int64_t b, int64_t e) {
  loss_rows(A, b, e);
}
ADCERT_CLONES void loss_rows_double(const LossArgs<double>& A, int64_t b, int64_t e) {
  loss_rows(A, b, e);
}
inline void loss_rows_any(const LossArgs<float>& A, int64_t b, int64_t e) {
  loss_rows_float(A, b, e);
}
inline void loss_rows_any(const LossArgs<double>& A, int64_t b, int64_t e) {
  loss_rows_double(A, b, e);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adcert_loss_cpu(
    const at::Tensor& student_in, const at::Tensor& teacher_in, const at::Tensor& margin_in,
    const std::optional<at::Tensor>& clean_in, double alpha, double tau, double adv_weight) {
  ADCERT_CHECK_CPU(student_in);
  ADCERT_CHECK_CPU(teacher_in);
  ADCERT_CHECK_CPU(margin_in);
  ADCERT_CHECK_FLOAT(student_in);
  ADCERT_CHECK_SAME(student_in, teacher_in);
  ADCERT_CHECK_SAME(student_in, margin_in);
  TORCH_CHECK(student_in.dim() == 2, "student must be [B, C], got ", student_in.sizes());
  TORCH_CHECK(teacher_in.sizes() == student_in.sizes(), "teacher must have the shape of student: ",
              teacher_in.sizes(), " vs ", student_in.sizes());
  TORCH_CHECK(margin_in.sizes() == student_in.sizes(), "margin must have the shape of student: ",
              margin_in.sizes(), " vs ", student_in.sizes());
  const bool has_clean = clean_in.has_value() && clean_in->defined();
  if (has_clean) {
    ADCERT_CHECK_CPU((*clean_in));
    ADCERT_CHECK_SAME(student_in, (*clean_in));
    TORCH_CHECK(clean_in->sizes() == student_in.sizes(), "clean must have the shape of student: ",
                clean_in->sizes(), " vs ", student_in.sizes());
  }
  TORCH_CHECK(tau > 0, "tau must be > 0, got ", tau);
  const at::Tensor s = student_in.contiguous(), t = teacher_in.contiguous(),
                   m = margin_in.contiguous();
  const at::Tensor c = has_clean ? clean_in->contiguous() : at::Tensor();
  const int64_t B = s.size(0), C = s.size(1);
  at::Tensor loss = at::empty({B}, s.options());
  at::Tensor g_s = at::empty({B, C}, s.options());
  at::Tensor g_m = at::empty({B, C}, s.options());
  at::Tensor g_c = has_clean ? at::empty({B, C}, s.options()) : at::empty({0}, s.options());
  if (B == 0) return {loss, g_s, g_m, g_c};
  TORCH_CHECK(C > 0, "the number of classes must be > 0");
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "adcert_loss", [&] {
    LossArgs<scalar_t> A;
    A.s = s.const_data_ptr<scalar_t>();
    A.t = t.const_data_ptr<scalar_t>();
    A.m = m.const_data_ptr<scalar_t>();
    A.c = has_clean ? c.const_data_ptr<scalar_t>() : nullptr;
    A.loss = loss.mutable_data_ptr<scalar_t>();
    A.gs = g_s.mutable_data_ptr<scalar_t>();
    A.gm = g_m.mutable_data_ptr<scalar_t>();
    A.gc = has_clean ? g_c.mutable_data_ptr<scalar_t>() : nullptr;
    A.C = C;
    const scalar_t a = static_cast<scalar_t>(alpha);
    const scalar_t tau_s = static_cast<scalar_t>(tau);
    A.alpha = a;
    A.inv_tau = scalar_t(1) / tau_s;
    A.w_s = has_clean ? static_cast<scalar_t>(adv_weight) : scalar_t(1);
    A.w_c = has_clean ? scalar_t(1) - static_cast<scalar_t>(adv_weight) : scalar_t(0);
    A.kd_scale = (scalar_t(1) - a) * tau_s * tau_s;
    A.coef_s = (scalar_t(1) - a) * A.w_s * tau_s;  // d KD / d x = tau (p_x - p_t)
    A.coef_c = (scalar_t(1) - a) * A.w_c * tau_s;
    const int64_t grain = std::max<int64_t>(1, 8192 / C);
    at::parallel_for(0, B, grain, [&A](int64_t b, int64_t e) { loss_rows_any(A, b, e); });
  });
  return {loss, g_s, g_m, g_c};
}

}  // namespace

TORCH_LIBRARY_IMPL(adcert, CPU, m) { m.impl("adcert_loss", &adcert_loss_cpu); }

}  // namespace adcert
