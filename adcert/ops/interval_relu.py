"""``interval_relu``: ReLU on a centre-radius box (any shape).

``u = relu(mu + r)``, ``l = relu(mu - r)``: returns ``((u + l) / 2, (u - l) / 2)``.
"""
from __future__ import annotations

from typing import Tuple

import torch

from adcert.ops._grads import box_backward, eager_autograd_function
from adcert.ops._checks import check_box
from adcert.ops._extension import op, reference_op, register_autograd, register_fake

_op = op("interval_relu")
_backward_op = op("interval_relu_backward")


@register_fake("interval_relu")
def _fake(mu, r):
    return torch.empty_like(mu), torch.empty_like(r)


@register_fake("interval_relu_backward")
def _fake_backward(grad_mu, grad_r, mu, r):
    return torch.empty_like(mu), torch.empty_like(r)


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # unused outputs cost no zero tensors
    mu, r = inputs
    ctx.save_for_backward(mu, r)


@box_backward
def _backward(ctx, grad_mu, grad_r):
    mu, r = ctx.saved_tensors
    g_mu, g_r = _backward_op(grad_mu, grad_r, mu, r)
    return g_mu, g_r


_Function = eager_autograd_function("IntervalRelu", _op, _setup_context, _backward)
register_autograd("interval_relu", _backward, _setup_context)


def interval_relu(mu: torch.Tensor, r: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Interval ReLU. ``mu, r``: any shape, ``r >= 0`` -> ``(mu', r')`` of the same shape."""
    check_box(mu, r)
    if _op is None:  # adcert._C not built: the plain-torch reference (adcert.ops._extension)
        return reference_op("interval_relu")(mu, r)
    return _Function.apply(mu, r)
