"""fp64 gradcheck on tiny inputs, torch.library.opcheck (schema, fake kernel, autograd
registration) and torch.compile for every op."""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from adcert import ops
from conftest import random_bn, random_box


def _req(*ts):
    return [None if t is None else t.clone().requires_grad_() for t in ts]


def _gradcheck(fn, tensors, **kwargs):
    # Keep the box away from the ReLU kinks so finite differences are valid.
    assert gradcheck(lambda *a: fn(*a, **kwargs), tuple(tensors), eps=1e-6, atol=1e-5)


def test_gradcheck_linear():
    mu, r = random_box((3, 4))
    _gradcheck(ops.interval_linear, _req(mu, r, torch.randn(2, 4, dtype=torch.float64),
                                         torch.randn(2, dtype=torch.float64)))


def test_gradcheck_conv2d():
    mu, r = random_box((2, 2, 5, 5))
    _gradcheck(ops.interval_conv2d, _req(mu, r, torch.randn(3, 2, 3, 3, dtype=torch.float64),
                                         torch.randn(3, dtype=torch.float64)),
               stride=2, padding=1)


def test_gradcheck_batch_norm():
    mu, r = random_box((3, 4, 2, 2))
    _gradcheck(ops.interval_batch_norm, _req(mu, r, *random_bn(4)), eps=1e-3)


def test_gradcheck_relu():
    mu, r = random_box((4, 5))
    _gradcheck(ops.interval_relu, _req(mu, r))


@pytest.mark.parametrize("relu", [True, False])
def test_gradcheck_conv2d_bn_relu(relu):
    mu, r = random_box((2, 2, 4, 4))
    tensors = _req(mu, r, torch.randn(3, 2, 3, 3, dtype=torch.float64),
                   torch.randn(3, dtype=torch.float64), *random_bn(3))
    _gradcheck(ops.interval_conv2d_bn_relu, tensors, bn_eps=1e-3, padding=1, relu=relu)


@pytest.mark.parametrize("relu", [True, False])
def test_gradcheck_linear_bn_relu(relu):
    mu, r = random_box((3, 4))
    tensors = _req(mu, r, torch.randn(5, 4, dtype=torch.float64),
                   torch.randn(5, dtype=torch.float64), *random_bn(5))
    _gradcheck(ops.interval_linear_bn_relu, tensors, bn_eps=1e-3, relu=relu)


def _opcheck_cases():
    mu, r = random_box((2, 3, 6, 6))
    w, b = torch.randn(4, 3, 3, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    m, v, bw, bb = random_bn(4)
    lmu, lr = random_box((3, 5))
    lw, lb = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    A = torch.ops.adcert
    return [
        (A.interval_linear, _req(lmu, lr, lw, lb)),
        (A.interval_conv2d, _req(mu, r, w, b) + [[2, 2], [1, 1], [1, 1], 1]),
        (A.interval_batch_norm, _req(mu, r, *random_bn(3)) + [1e-5]),
        (A.interval_relu, _req(mu, r)),
        (A.interval_linear_bn_relu, _req(lmu, lr, lw, lb, m, v, bw, bb) + [1e-5, True]),
        (A.interval_conv2d_bn_relu,
         _req(mu, r, w, b, m, v, bw, bb) + [1e-5, [1, 1], [1, 1], [1, 1], 1, True]),
    ]


@pytest.mark.parametrize("index", range(6))
def test_opcheck(index):
    op, args = _opcheck_cases()[index]
    torch.library.opcheck(op, tuple(args))


def test_torch_compile_fused_block():
    """The fused op traces through torch.compile (fake kernel + autograd) and matches eager."""
    mu, r = random_box((2, 3, 8, 8), dtype=torch.float32)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    m, v, bw, bb = random_bn(4, dtype=torch.float32)

    def block(mu, r, w):
        a, b = ops.interval_conv2d_bn_relu(mu, r, w, None, m, v, bw, bb, 1e-5, padding=1)
        return (a + b).square().sum()

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    eager_loss = block(mu, r, w)
    (eager_grad,) = torch.autograd.grad(eager_loss, [w])
    comp_loss = compiled(mu, r, w)
    (comp_grad,) = torch.autograd.grad(comp_loss, [w])
    torch.testing.assert_close(comp_loss, eager_loss)
    torch.testing.assert_close(comp_grad, eager_grad)
