"""``interval_conv2d``: a 2-D convolution on a centre-radius box: ``(conv(mu, W) + b,
conv(r, |W|))``. Zero padding only (a padded pixel is the exact point 0)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from adcert.ops._grads import box_backward, eager_autograd_function
from adcert.ops._fused import fake_layer_backward
from adcert.ops._checks import check_box
from adcert.ops._conv_shape import check_conv_args, conv_output_shape
from adcert.ops._extension import op, reference_op, register_autograd, register_fake

_op = op("interval_conv2d")
_backward_op = op("interval_conv2d_backward")


@register_fake("interval_conv2d")
def _fake(mu, r, weight, bias, stride, padding, dilation, groups):
    shape = conv_output_shape(mu.shape, weight.shape, stride, padding, dilation)
    return mu.new_empty(shape), r.new_empty(shape)


@register_fake("interval_conv2d_backward")
def _fake_backward(grad_mu, grad_r, mu, r, weight, stride, padding, dilation, groups, output_mask):
    return fake_layer_backward(mu, r, weight, output_mask)


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # unused outputs cost no zero tensors
    mu, r, weight, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(mu, r, weight)
    ctx.geometry = (stride, padding, dilation, groups)


@box_backward
def _backward(ctx, grad_mu, grad_r):
    mu, r, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0] or need[1], need[2], need[3]]
    grads = _backward_op(grad_mu, grad_r, mu, r, weight, *ctx.geometry, mask)
    return (*grads, None, None, None, None)


_Function = eager_autograd_function("IntervalConv2d", _op, _setup_context, _backward)
register_autograd("interval_conv2d", _backward, _setup_context)


def interval_conv2d(mu: torch.Tensor, r: torch.Tensor, weight: torch.Tensor,
                    bias: Optional[torch.Tensor] = None, stride=1, padding=0, dilation=1,
                    groups: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Interval conv2d. ``mu, r: [B, C_in, H, W]``, ``weight: [C_out, C_in / groups, kH, kW]``,
    ``bias: [C_out]`` -> ``(mu', r'): [B, C_out, H', W']``."""
    check_box(mu, r, ndim=4)
    stride, padding, dilation, groups = check_conv_args(mu, weight, bias, stride, padding,
                                                        dilation, groups)
    if _op is None:  # adcert._C not built: the plain-torch reference (adcert.ops._extension)
        return reference_op("interval_conv2d")(mu, r, weight, bias, stride, padding, dilation,
                                               groups)
    return _Function.apply(mu, r, weight, bias, stride, padding, dilation, groups)
