"""The shared pieces of the bound engine (issue 14, "shared pieces live once"): the batch-norm
fold (:mod:`adcert.ops.bn_fold`), the margin specification builder (:mod:`adcert.bounds.spec`)
and the leaf-module check of the Sequential plan and the fx trace
(:func:`adcert.bounds.plan.check_leaf`).

The exact fold is checked against a plain fp64 formula and by gradcheck; the sound fold against
exact rational arithmetic (``fractions.Fraction``, with a rigorous rational enclosure of the square
root) on cancelling cases.
"""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from torch import nn

from adcert.bounds import compute_bounds
from adcert.bounds.bn import bn_scale_shift
from adcert.bounds.ibp import effective_linear
from adcert.bounds.plan import AffineStep, check_leaf
from adcert.bounds.spec import fold_margin_spec, margin_spec, zero_label_entry
from adcert.ops import reference
from adcert.ops.bn_fold import fold_batch_norm

F32, F64 = torch.float32, torch.float64


def _fp64_formula(mean, var, weight, bias, eps, layer_weight=None, layer_bias=None):
    """``scale = weight / sqrt(var + eps)``, ``shift = scale (b - mean) + bias``, in fp64."""
    mean, var = mean.double(), var.double()
    scale = 1.0 / torch.sqrt(var + eps)
    if weight is not None:
        scale = scale * weight.double()
    b = torch.zeros_like(mean) if layer_bias is None else layer_bias.double()
    shift = scale * (b - mean)
    if bias is not None:
        shift = shift + bias.double()
    folded = None if layer_weight is None else \
        layer_weight.double() * scale.reshape((-1,) + (1,) * (layer_weight.dim() - 1))
    return scale, shift, folded


def _params(dtype, C=6, affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(C, generator=g, dtype=F64).to(dtype)
    var = (torch.rand(C, generator=g, dtype=F64) + 0.05).to(dtype)
    weight = torch.randn(C, generator=g, dtype=F64).to(dtype) if affine else None
    bias = torch.randn(C, generator=g, dtype=F64).to(dtype) if affine else None
    lw = torch.randn(C, 3, 2, 2, generator=g, dtype=F64).to(dtype)
    lb = torch.randn(C, generator=g, dtype=F64).to(dtype)
    return mean, var, weight, bias, lw, lb


# ----------------------------------------------------------------------------- exact fold


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("with_layer", [True, False])
def test_exact_fold_equals_plain_fp64_formula(dtype, affine, with_layer):
    mean, var, weight, bias, lw, lb = _params(dtype, affine=affine)
    layer = dict(layer_weight=lw, layer_bias=lb) if with_layer else {}
    fold = fold_batch_norm(mean, var, weight, bias, 1e-5, **layer)
    scale, shift, folded = _fp64_formula(mean, var, weight, bias, 1e-5, **layer)
    tol = dict(rtol=1e-14, atol=1e-14) if dtype == F64 else dict(rtol=1e-5, atol=1e-6)
    assert fold.scale.dtype == dtype and fold.shift.dtype == dtype
    torch.testing.assert_close(fold.scale.double(), scale, **tol)
    torch.testing.assert_close(fold.shift.double(), shift, **tol)
    if with_layer:
        torch.testing.assert_close(fold.weight.double(), folded, **tol)
    else:
        assert fold.weight is None
    assert fold.rel_err == 0.0 and fold.shift_err is None


@pytest.mark.parametrize("dtype", [F32, F64])
def test_exact_fold_has_the_kernels_order_of_operations(dtype):
    """Bitwise: ``rsqrt(var + eps) * weight``, ``-mean * scale + bias`` without a layer and
    ``scale * (b - mean) + bias`` with one (the C++ ``channel_affine`` and the Triton wrappers)."""
    mean, var, weight, bias, lw, lb = _params(dtype)
    fold = fold_batch_norm(mean, var, weight, bias, 1e-5)
    scale = torch.rsqrt(var + 1e-5) * weight
    assert torch.equal(fold.scale, scale) and torch.equal(fold.inv, torch.rsqrt(var + 1e-5))
    assert torch.equal(fold.shift, -mean * scale + bias)
    fold = fold_batch_norm(mean, var, weight, bias, 1e-5, layer_weight=lw, layer_bias=lb)
    assert torch.equal(fold.shift, scale * (lb - mean) + bias)
    assert torch.equal(fold.weight, lw * scale[:, None, None, None])


def test_exact_fold_is_differentiable_in_statistics_parameters_and_layer():
    mean, var, weight, bias, lw, lb = (t.clone().requires_grad_() for t in _params(F64, C=3))

    def f(mean, var, weight, bias, lw, lb):
        fold = fold_batch_norm(mean, var, weight, bias, 1e-3, layer_weight=lw, layer_bias=lb)
        return fold.scale, fold.shift, fold.weight
    assert torch.autograd.gradcheck(f, (mean, var, weight, bias, lw, lb))


def test_every_exact_fold_caller_uses_the_shared_fold():
    """The reference op, the bound engine's per-channel map and its final-layer fold all give the
    shared fold's numbers (bitwise)."""
    torch.manual_seed(3)
    lin, bn = nn.Linear(4, 5).double(), nn.BatchNorm1d(5).double().eval()
    mean, var, weight, bias, _, _ = _params(F64, C=5, seed=4)
    with torch.no_grad():
        bn.weight.copy_(weight), bn.bias.copy_(bias)
    fold = fold_batch_norm(mean, var, weight, bias, bn.eps)
    scale, shift = bn_scale_shift(bn, mean, var)
    assert torch.equal(scale, fold.scale) and torch.equal(shift, fold.shift)
    mu, r = torch.randn(2, 5, dtype=F64), torch.rand(2, 5, dtype=F64)
    out_mu, out_r = reference.interval_batch_norm(mu, r, mean, var, weight, bias, bn.eps)
    assert torch.equal(out_mu, mu * fold.scale + fold.shift)
    assert torch.equal(out_r, r * fold.scale.abs())
    step = AffineStep(lin, bn, False, (lin, bn))
    w, b = effective_linear(step, {bn: (mean, var)})
    fold = fold_batch_norm(mean, var, weight, bias, bn.eps, layer_weight=lin.weight,
                           layer_bias=lin.bias)
    assert torch.equal(w, fold.weight) and torch.equal(b, fold.shift)


def test_triton_fold_is_the_shared_fold():
    pytest.importorskip("triton")
    from adcert.ops import _triton_impl
    mean, var, weight, bias, _, lb = _params(F32)
    scale, shift, inv, centre = _triton_impl._fold(lb, mean, var, weight, bias, 1e-5, F32)
    fold = fold_batch_norm(mean, var, weight, bias, 1e-5, layer_bias=lb)
    assert torch.equal(scale, fold.scale) and torch.equal(shift, fold.shift)
    assert torch.equal(inv, fold.inv) and torch.equal(centre, lb - mean)


# ----------------------------------------------------------------------------- sound fold


def _q(t):
    return [Fraction(float(v)) for v in t.reshape(-1).tolist()]


def _sqrt_bounds(q: Fraction, bits: int = 200):
    """Rationals ``lo <= sqrt(q) <= hi`` (``q >= 0``), ``hi - lo`` about ``2^-bits`` relative."""
    n, d = q.numerator, q.denominator
    k = 1 << bits
    s = math.isqrt(n * d * k * k)
    return Fraction(s, d * k), Fraction(s + 1, d * k)


def _mul_interval(lo: Fraction, hi: Fraction, c: Fraction):
    return (lo * c, hi * c) if c >= 0 else (hi * c, lo * c)


def _cancelling_case(dtype):
    """Channels where ``b - mean`` cancels (b and mean nearly equal and large), where the shift
    cancels to about 0 (beta ~ -scale (b - mean)), where eps dominates var, and huge values."""
    def t(vals):
        return torch.tensor(vals, dtype=F64).to(dtype)
    big = t([1000.0, 3.0e4, 0.37, -1.0e4, 2.5, 0.0])
    mean = big
    lb = torch.nextafter(big, torch.full_like(big, math.inf))  # one ulp above the mean
    lb[3] = -mean[3] * 1.0000001  # nearly equal magnitude, opposite sign
    lb[5] = torch.tensor(1e-30, dtype=dtype)
    var = t([3.0e-3, 1.0e6, 0.0, 1.0e-7, 7.0, 1.0])
    weight = t([-7.3, 1.0e3, 2.5, -1.0e-3, 0.1, -1.0])
    approx = (weight.double() / torch.sqrt(var.double() + 1e-5)) * (lb.double() - mean.double())
    bias = (-approx).to(dtype)  # the folded shift cancels to ~0
    bias[4] = 0.9
    lw = t([[1.0e4, -3.0], [1.0e-3, 7.0], [-2.0, 0.5], [1.0, 1.0], [3.0, -1.0e5], [0.25, 4.0]])
    return mean, var, weight, bias, lw, lb


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("with_layer_bias", [True, False])
def test_sound_fold_contains_the_exact_rational_fold(dtype, affine, with_layer_bias):
    mean, var, weight, bias, lw, lb = _cancelling_case(dtype)
    eps = 1e-5  # the exact computation uses this double, the fp32 one its rounding
    if not affine:
        weight = bias = None
    fold = fold_batch_norm(mean, var, weight, bias, eps, layer_weight=lw,
                           layer_bias=lb if with_layer_bias else None, sound=True)
    assert fold.shift_err is not None and fold.rel_err > 0
    scale, shift, errs, folded = _q(fold.scale), _q(fold.shift), _q(fold.shift_err), _q(fold.weight)
    rel = Fraction(fold.rel_err)
    ms, vs, bs = _q(mean), _q(var), _q(lb)
    ws = _q(weight) if affine else [Fraction(1)] * len(ms)
    betas = _q(bias) if affine else [Fraction(0)] * len(ms)
    lws = [_q(row) for row in lw]
    cancel = 0
    for c in range(len(ms)):
        root_lo, root_hi = _sqrt_bounds(vs[c] + Fraction(eps))
        s_lo, s_hi = _mul_interval(1 / root_hi, 1 / root_lo, ws[c])
        # scale: relative error <= rel_err
        assert abs(scale[c] - s_lo) <= rel * abs(scale[c]) and \
            abs(scale[c] - s_hi) <= rel * abs(scale[c]), c
        # folded weight: |fl(w s) - w s_exact| <= rel_err |fl(w s)|
        for k, w in enumerate(lws[c]):
            e_lo, e_hi = _mul_interval(s_lo, s_hi, w)
            got = folded[c * len(lws[c]) + k]
            assert abs(got - e_lo) <= rel * abs(got) and abs(got - e_hi) <= rel * abs(got), (c, k)
        # shift: |computed - exact| <= shift_err
        centre = (bs[c] if with_layer_bias else Fraction(0)) - ms[c]
        lo, hi = _mul_interval(s_lo, s_hi, centre)
        lo, hi = lo + betas[c], hi + betas[c]
        assert shift[c] - errs[c] <= lo and hi <= shift[c] + errs[c], c
        cancel += abs(shift[c]) < Fraction(1, 10 ** 3) * (abs(centre) * abs(scale[c]) +
                                                           abs(betas[c]))
    if affine and with_layer_bias:
        assert cancel >= 3  # the case really cancels


def test_sound_fold_is_detached_and_ieee_rounded():
    mean, var, weight, bias, lw, lb = (t.clone().requires_grad_() for t in _params(F32))
    fold = fold_batch_norm(mean, var, weight, bias, 1e-5, layer_weight=lw, layer_bias=lb,
                           sound=True)
    assert not any(t.requires_grad for t in (fold.scale, fold.shift, fold.weight, fold.shift_err))
    d = (mean.detach(), var.detach(), weight.detach(), bias.detach())
    assert torch.equal(fold.scale, d[2] / torch.sqrt(d[1] + 1e-5))  # IEEE sqrt and division
    assert torch.equal(fold.shift, (lb.detach() - d[0]) * fold.scale + d[3])


# ----------------------------------------------------------------------------- margin spec


def test_margin_spec_builder():
    y = torch.tensor([2, 0, 1, 2])
    spec = margin_spec(y, 3, F64, "cpu")
    eye = torch.eye(3, dtype=F64)
    assert torch.equal(spec, eye[y][:, None] - eye[None])
    z = torch.randn(4, 3, dtype=F64)
    torch.testing.assert_close(torch.einsum("bij,bj->bi", spec, z),
                               z.gather(1, y[:, None]) - z, rtol=0, atol=0)
    w, b = torch.randn(3, 5, dtype=F64), torch.randn(3, dtype=F64)
    ws, bs = fold_margin_spec(w, b, y)
    assert torch.equal(ws, torch.einsum("bij,jk->bik", spec, w))
    assert torch.equal(bs, torch.einsum("bij,j->bi", spec, b))
    m = zero_label_entry(torch.ones(4, 3), y)
    assert m.sum() == 8 and bool((m.gather(1, y[:, None]) == 0).all())


# ----------------------------------------------------------------------------- check_leaf


class _Doubled(nn.ReLU):
    def forward(self, x):
        return 2 * super().forward(x)


class _Wrapped(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.inner = layer

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("bad, why", [
    (nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
    (_Doubled(), "_Doubled.*not supported"),
])
def test_sequential_and_traced_models_share_the_leaf_check(bad, why):
    x = torch.rand(2, 1, 5, 5)
    with pytest.raises(NotImplementedError, match=why):
        compute_bounds(nn.Sequential(bad, nn.Flatten()), x, 0.1)
    with pytest.raises(NotImplementedError, match=why):
        compute_bounds(_Wrapped(bad), x, 0.1)  # traced: the error names the module's path
    seen = []
    with pytest.raises(ValueError):
        check_leaf(bad, lambda w: seen.append(w) or ValueError(w))
    assert len(seen) == 1
    check_leaf(nn.AvgPool2d(2), ValueError)  # registered: accepted on both paths
    with pytest.raises(ValueError):
        check_leaf(nn.GELU(), ValueError)
