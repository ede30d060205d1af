"""``interval_linear``: a linear layer on a centre-radius box: ``(W mu + b, |W| r)``."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from adcert.ops._grads import box_backward, eager_autograd_function
from adcert.ops._fused import fake_layer_backward
from adcert.ops._checks import check_box, check_param
from adcert.ops._extension import op, reference_op, register_autograd, register_fake

_op = op("interval_linear")
_backward_op = op("interval_linear_backward")


@register_fake("interval_linear")
def _fake(mu, r, weight, bias):
    shape = (mu.shape[0], weight.shape[0])
    return mu.new_empty(shape), r.new_empty(shape)


@register_fake("interval_linear_backward")
def _fake_backward(grad_mu, grad_r, mu, r, weight, output_mask):
    return fake_layer_backward(mu, r, weight, output_mask)


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # unused outputs cost no zero tensors
    mu, r, weight, bias = inputs
    ctx.save_for_backward(mu, r, weight)


@box_backward
def _backward(ctx, grad_mu, grad_r):
    mu, r, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0] or need[1], need[2], need[3]]
    g_mu, g_r, g_w, g_b = _backward_op(grad_mu, grad_r, mu, r, weight, mask)
    return g_mu, g_r, g_w, g_b


_Function = eager_autograd_function("IntervalLinear", _op, _setup_context, _backward)
register_autograd("interval_linear", _backward, _setup_context)


def interval_linear(mu: torch.Tensor, r: torch.Tensor, weight: torch.Tensor,
                    bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Interval linear layer. ``mu, r: [*, in]``, ``weight: [out, in]``, ``bias: [out]``
    -> ``(mu', r'): [*, out]``."""
    check_box(mu, r)
    if mu.dim() < 1:
        raise ValueError("mu: expected at least 1 dimension [*, in], got a scalar")
    check_param("weight", weight, mu)
    if weight.dim() != 2 or weight.shape[1] != mu.shape[-1]:
        raise ValueError(f"weight: expected shape [out, {mu.shape[-1]}] for mu of shape "
                         f"{tuple(mu.shape)}, got {tuple(weight.shape)}")
    check_param("bias", bias, mu, (weight.shape[0],), optional=True)
    if _op is None:  # adcert._C not built: the plain-torch reference (adcert.ops._extension)
        return reference_op("interval_linear")(mu, r, weight, bias)
    lead = mu.shape[:-1]
    mu2, r2 = mu.reshape(-1, mu.shape[-1]), r.reshape(-1, r.shape[-1])
    out_mu, out_r = _Function.apply(mu2, r2, weight, bias)
    return out_mu.reshape(*lead, weight.shape[0]), out_r.reshape(*lead, weight.shape[0])
