"""``interval_linear_bn_relu``: the fused block linear + bias + batch-norm affine + ReLU on a
centre-radius box, one pass for the affine epilogue in forward and in backward.

The compiled op returns ``(mu, r, mu_pre, r_pre)``; the pre-affine products are saved for the
backward pass (which recomputes the ReLU masks from them) and hidden by the public function.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from adcert.ops._grads import box_backward, eager_autograd_function
from adcert.ops._fused import block_output_mask, fake_block_backward
from adcert.ops._checks import check_bn, check_box, check_param
from adcert.ops._extension import op, reference_op, register_autograd, register_fake

_op = op("interval_linear_bn_relu")
_backward_op = op("interval_linear_bn_relu_backward")


@register_fake("interval_linear_bn_relu")
def _fake(mu, r, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, bn_eps, relu):
    shape = (mu.shape[0], weight.shape[0])
    return mu.new_empty(shape), r.new_empty(shape), mu.new_empty(shape), r.new_empty(shape)


@register_fake("interval_linear_bn_relu_backward")
def _fake_backward(grad_mu, grad_r, mu, r, weight, bias, bn_mean, bn_var, bn_weight, bn_bias,
                   bn_eps, relu, mu_pre, r_pre, output_mask):
    return fake_block_backward(mu, r, weight, (bias, bn_mean, bn_var, bn_weight, bn_bias),
                               output_mask)


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # unused outputs cost no zero tensors
    mu, r, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, bn_eps, relu = inputs
    mu_pre, r_pre = output[2], output[3]
    ctx.mark_non_differentiable(mu_pre, r_pre)
    ctx.save_for_backward(mu, r, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, mu_pre, r_pre)
    ctx.bn_eps, ctx.relu = bn_eps, relu


@box_backward
def _backward(ctx, grad_mu, grad_r, _grad_mu_pre, _grad_r_pre):
    mu, r, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, mu_pre, r_pre = ctx.saved_tensors
    mask = block_output_mask(ctx.needs_input_grad)
    grads = _backward_op(grad_mu, grad_r, mu, r, weight, bias, bn_mean, bn_var, bn_weight,
                         bn_bias, ctx.bn_eps, ctx.relu, mu_pre, r_pre, mask)
    return (*grads, None, None)


_Function = eager_autograd_function("IntervalLinearBnRelu", _op, _setup_context, _backward)
register_autograd("interval_linear_bn_relu", _backward, _setup_context)


def interval_linear_bn_relu(mu: torch.Tensor, r: torch.Tensor, weight: torch.Tensor,
                            bias: Optional[torch.Tensor] = None,
                            bn_mean: Optional[torch.Tensor] = None,
                            bn_var: Optional[torch.Tensor] = None,
                            bn_weight: Optional[torch.Tensor] = None,
                            bn_bias: Optional[torch.Tensor] = None, bn_eps: float = 1e-5,
                            relu: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused interval block. ``mu, r: [B, in]``, ``weight: [out, in]``, ``bias: [out]``; batch
    norm (applied when ``bn_mean`` is given) with ``bn_mean, bn_var, bn_weight, bn_bias: [out]``;
    ReLU when ``relu``. Returns ``(mu', r'): [B, out]``. Equal to ``interval_linear`` ->
    ``interval_batch_norm`` -> ``interval_relu`` (see ``adcert.ops.reference``)."""
    check_box(mu, r, ndim=2)
    check_param("weight", weight, mu)
    if weight.dim() != 2 or weight.shape[1] != mu.shape[1]:
        raise ValueError(f"weight: expected shape [out, {mu.shape[1]}] for mu of shape "
                         f"{tuple(mu.shape)}, got {tuple(weight.shape)}")
    check_param("bias", bias, mu, (weight.shape[0],), optional=True)
    check_bn(bn_mean, bn_var, bn_weight, bn_bias, bn_eps, weight.shape[0], mu)
    if _op is None:  # adcert._C not built: the plain-torch reference (adcert.ops._extension)
        return reference_op("interval_linear_bn_relu")(mu, r, weight, bias, bn_mean, bn_var,
                                                       bn_weight, bn_bias, float(bn_eps),
                                                       bool(relu))
    out = _Function.apply(mu, r, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, float(bn_eps), bool(relu))
    return out[0], out[1]
