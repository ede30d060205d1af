// One step of a batched Brent root search (scipy brentq semantics) for the certified-radius
// search (DESIGN.md section 7, adcert/radius.py). Every sample is an independent column of the
// state tensor [12, B]; the rows are (see adcert/ops/brent_step.py for the full contract)
//
//   0 xpre  1 xcur  2 xblk  3 fpre  4 fcur  5 fblk  6 spre  7 scur  8 lo  9 hi  10 done  11 iters
//
// Given f = f(xcur) [B], the step records it, updates the certified bracket (lo: largest point
// seen with f < 0, hi: smallest point seen with f >= 0), runs the head of one brentq iteration
// (bracket, swap, convergence test, interpolation or bisection) and writes the next point to
// evaluate into xcur. Differences from brentq: f == 0 counts as "not certified" (the positive
// side) and forces bisection, so a plateau at 0 converges to its left end; the search stops
// only on the bracket test or at max_iter. Done samples are copied unchanged.
// The arithmetic is written in the exact order of the plain-torch reference
// (adcert.ops.reference.brent_step) so both agree bit for bit.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "../checks.h"

namespace adcert {
namespace {

constexpr int64_t kRows = 12;

template <typename T>
inline void brent_column(T* s, int64_t stride, T f, T xtol, T rtol, T max_iter) {
  T& xpre = s[0 * stride];
  T& xcur = s[1 * stride];
  T& xblk = s[2 * stride];
  T& fpre = s[3 * stride];
  T& fcur = s[4 * stride];
  T& fblk = s[5 * stride];
  T& spre = s[6 * stride];
  T& scur = s[7 * stride];
  T& lo = s[8 * stride];
  T& hi = s[9 * stride];
  T& done = s[10 * stride];
  T& iters = s[11 * stride];
  if (done != T(0)) return;
  fcur = f;
  const bool neg = fcur < T(0);  // NaN counts as not certified
  if (neg) {
    lo = std::max(lo, xcur);
  } else {
    hi = std::min(hi, xcur);
  }
  if ((fpre < T(0)) != neg) {  // the sign changed between xpre and xcur: new bracket end
    xblk = xpre;
    fblk = fpre;
    spre = xcur - xpre;
    scur = spre;
  }
  if (std::abs(fblk) < std::abs(fcur)) {  // keep the better end in xcur
    xpre = xcur;
    xcur = xblk;
    xblk = xpre;
    fpre = fcur;
    fcur = fblk;
    fblk = fpre;
  }
  const T delta = (xtol + rtol * std::abs(xcur)) / T(2);
  const T sbis = (xblk - xcur) / T(2);
  if (std::abs(sbis) < delta || iters >= max_iter) {
    done = T(1);
    return;
  }
  bool bisect = true;
  if (fcur != T(0) && std::abs(spre) > delta && std::abs(fcur) < std::abs(fpre)) {
    T stry;
    if (xpre == xblk) {  // secant
      stry = -fcur * (xcur - xpre) / (fcur - fpre);
    } else {  // inverse quadratic
      const T dpre = (fpre - fcur) / (xpre - xcur);
      const T dblk = (fblk - fcur) / (xblk - xcur);
      stry = -fcur * (fblk * dblk - fpre * dpre) / (dblk * dpre * (fblk - fpre));
    }
    if (T(2) * std::abs(stry) < std::min(std::abs(spre), T(3) * std::abs(sbis) - delta)) {
      spre = scur;
      scur = stry;
      bisect = false;
    }
  }
  if (bisect) {
    spre = sbis;
    scur = sbis;
  }
  xpre = xcur;
  fpre = fcur;
  if (std::abs(scur) > delta) {
    xcur = xcur + scur;
  } else {
    xcur = xcur + (sbis > T(0) ? delta : -delta);
  }
  iters = iters + T(1);
}

at::Tensor brent_step_cpu(const at::Tensor& state, const at::Tensor& f, double xtol, double rtol,
                          int64_t max_iter) {
  ADCERT_CHECK_CPU(state);
  ADCERT_CHECK_CPU(f);
  ADCERT_CHECK_FLOAT(state);
  ADCERT_CHECK_SAME(state, f);
  TORCH_CHECK(state.dim() == 2 && state.size(0) == kRows, "state must be [12, B], got ",
              state.sizes());
  TORCH_CHECK(f.dim() == 1 && f.size(0) == state.size(1), "f must be [B] with B = ",
              state.size(1), ", got ", f.sizes());
  at::Tensor out = state.contiguous().clone();
  const at::Tensor fc = f.contiguous();
  const int64_t n = out.size(1);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "adcert_brent_step", [&] {
    scalar_t* s = out.data_ptr<scalar_t>();
    const scalar_t* fv = fc.const_data_ptr<scalar_t>();
    const scalar_t tx = static_cast<scalar_t>(xtol), tr = static_cast<scalar_t>(rtol);
    const scalar_t mi = static_cast<scalar_t>(max_iter);
    at::parallel_for(0, n, 4096, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) brent_column<scalar_t>(s + i, n, fv[i], tx, tr, mi);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(adcert, CPU, m) { m.impl("brent_step", &brent_step_cpu); }

}  // namespace adcert
