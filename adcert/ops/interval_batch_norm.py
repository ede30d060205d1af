"""``interval_batch_norm``: batch norm with caller-supplied statistics on a centre-radius box.

``s = weight / sqrt(var + eps)``: ``mu' = s (mu - mean) + bias``, ``r' = |s| r``. The statistics
are inputs, not computed here: clean-batch statistics in training (DESIGN.md section 5), running or
population ones in evaluation. Gradients flow to mu, r, mean, var, weight and bias.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from adcert.ops._grads import box_backward, eager_autograd_function
from adcert.ops._checks import check_bn, check_box
from adcert.ops._extension import op, reference_op, register_autograd, register_fake

_op = op("interval_batch_norm")
_backward_op = op("interval_batch_norm_backward")


@register_fake("interval_batch_norm")
def _fake(mu, r, mean, var, weight, bias, eps):
    return torch.empty_like(mu), torch.empty_like(r)


@register_fake("interval_batch_norm_backward")
def _fake_backward(grad_mu, grad_r, mu, r, mean, var, weight, bias, eps):
    return (torch.empty_like(mu), torch.empty_like(r), torch.empty_like(mean),
            torch.empty_like(var), None if weight is None else torch.empty_like(weight),
            None if bias is None else torch.empty_like(bias))


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # unused outputs cost no zero tensors
    mu, r, mean, var, weight, bias, eps = inputs
    ctx.save_for_backward(mu, r, mean, var, weight, bias)
    ctx.eps = eps


@box_backward
def _backward(ctx, grad_mu, grad_r):
    mu, r, mean, var, weight, bias = ctx.saved_tensors
    grads = _backward_op(grad_mu, grad_r, mu, r, mean, var, weight, bias, ctx.eps)
    return (*grads, None)


_Function = eager_autograd_function("IntervalBatchNorm", _op, _setup_context, _backward)
register_autograd("interval_batch_norm", _backward, _setup_context)


def interval_batch_norm(mu: torch.Tensor, r: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                        weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                        eps: float = 1e-5) -> Tuple[torch.Tensor, torch.Tensor]:
    """Interval batch norm. ``mu, r: [B, C]`` or ``[B, C, *spatial]``; ``mean, var, weight,
    bias: [C]`` (``weight``/``bias`` may be None: 1 and 0) -> ``(mu', r')`` of the input shape."""
    check_box(mu, r)
    if mu.dim() < 2:
        raise ValueError(f"mu: expected [B, C] or [B, C, *spatial], got shape {tuple(mu.shape)}")
    if mean is None or var is None:
        raise TypeError("mean, var: interval_batch_norm needs both statistics as tensors")
    check_bn(mean, var, weight, bias, eps, mu.shape[1], mu)
    if _op is None:  # adcert._C not built: the plain-torch reference (adcert.ops._extension)
        return reference_op("interval_batch_norm")(mu, r, mean, var, weight, bias, float(eps))
    return _Function.apply(mu, r, mean, var, weight, bias, float(eps))
