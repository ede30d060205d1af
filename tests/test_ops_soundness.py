"""Soundness of the interval ops: every point of the input box (vertices included) maps inside the
output box. Checked by sampling, through the plain (non-interval) torch layer on each point."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from adcert import ops
from conftest import random_bn

DTYPES = [torch.float32, torch.float64]


def _points_in_box(mu, r, n_random=64):
    """``[P, *mu.shape]``: random interior points, random vertices and (for small boxes) all
    vertices of the box ``[mu - r, mu + r]``."""
    lo, hi = mu - r, mu + r
    pts = [lo, hi, mu]
    u = torch.rand((n_random,) + tuple(mu.shape), dtype=mu.dtype)
    pts += list(lo + (hi - lo) * u)
    corners = torch.randint(0, 2, (n_random,) + tuple(mu.shape)).to(mu.dtype)
    pts += list(lo + (hi - lo) * corners)
    if mu.numel() <= 10:
        for bits in itertools.product([0.0, 1.0], repeat=mu.numel()):
            c = torch.tensor(bits, dtype=mu.dtype).reshape(mu.shape)
            pts.append(lo + (hi - lo) * c)
    return torch.stack(pts)


def _assert_contains(mu, r, values, dtype):
    slack = 1e-5 if dtype == torch.float32 else 1e-12
    scale = 1 + values.abs().amax(0)
    assert bool((values >= (mu - r) - slack * scale).all()), "a point fell below the lower bound"
    assert bool((values <= (mu + r) + slack * scale).all()), "a point rose above the upper bound"
    assert bool((r >= 0).all()), "negative output radius"


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_bn_relu_contains_sampled_points(dtype):
    for trial in range(5):
        mu = torch.randn(1, 3, dtype=dtype)  # 3 inputs -> all 8 vertices enumerated
        r = torch.rand(1, 3, dtype=dtype)
        w, b = torch.randn(6, 3, dtype=dtype), torch.randn(6, dtype=dtype)
        mean, var, bw, bb = [t.to(dtype) for t in random_bn(6)]
        out_mu, out_r = ops.interval_linear_bn_relu(mu, r, w, b, mean, var, bw, bb, 1e-5)
        pts = _points_in_box(mu[0], r[0])
        z = F.linear(pts, w, b)
        z = F.relu(F.batch_norm(z, mean, var, bw, bb, training=False, eps=1e-5))
        _assert_contains(out_mu[0], out_r[0], z, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", [dict(stride=1, padding=1), dict(stride=2, padding=0),
                                      dict(stride=1, padding=2, dilation=2),
                                      dict(stride=1, padding=1, groups=2)])
def test_conv2d_bn_relu_contains_sampled_points(dtype, geometry):
    groups = geometry.get("groups", 1)
    mu, r = torch.randn(1, 2, 5, 5, dtype=dtype), torch.rand(1, 2, 5, 5, dtype=dtype)
    w, b = torch.randn(4, 2 // groups, 3, 3, dtype=dtype), torch.randn(4, dtype=dtype)
    mean, var, bw, bb = [t.to(dtype) for t in random_bn(4)]
    out_mu, out_r = ops.interval_conv2d_bn_relu(mu, r, w, b, mean, var, bw, bb, 1e-5, **geometry)
    pts = _points_in_box(mu[0], r[0], n_random=200)
    z = F.conv2d(pts, w, b, **geometry)
    z = F.relu(F.batch_norm(z, mean, var, bw, bb, training=False, eps=1e-5))
    _assert_contains(out_mu[0], out_r[0], z, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_and_batch_norm_contain_sampled_points(dtype):
    mu, r = torch.randn(1, 4, dtype=dtype) * 2, torch.rand(1, 4, dtype=dtype)
    mean, var, w, b = [t.to(dtype) for t in random_bn(4)]
    pts = _points_in_box(mu[0], r[0])
    _assert_contains(*[t[0] for t in ops.interval_relu(mu, r)], F.relu(pts), dtype)
    bn_mu, bn_r = ops.interval_batch_norm(mu, r, mean, var, w, b, 1e-5)
    z = F.batch_norm(pts, mean, var, w, b, training=False, eps=1e-5)
    _assert_contains(bn_mu[0], bn_r[0], z, dtype)


def test_bounds_are_tight_for_single_layer():
    """For one affine layer interval arithmetic is exact: some vertex attains each bound."""
    mu, r = torch.randn(1, 3, dtype=torch.float64), torch.rand(1, 3, dtype=torch.float64)
    w = torch.randn(2, 3, dtype=torch.float64)
    out_mu, out_r = ops.interval_linear(mu, r, w)
    z = F.linear(_points_in_box(mu[0], r[0]), w)
    torch.testing.assert_close(z.amin(0), (out_mu - out_r)[0])
    torch.testing.assert_close(z.amax(0), (out_mu + out_r)[0])


def test_relu_of_box_straddling_zero():
    mu = torch.tensor([[-1.0, 1.0, 0.0, -3.0]])
    r = torch.tensor([[2.0, 0.5, 0.0, 1.0]])
    out_mu, out_r = ops.interval_relu(mu, r)
    torch.testing.assert_close(out_mu - out_r, torch.tensor([[0.0, 0.5, 0.0, 0.0]]))
    torch.testing.assert_close(out_mu + out_r, torch.tensor([[1.0, 1.5, 0.0, 0.0]]))
