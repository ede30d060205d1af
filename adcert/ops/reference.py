"""Plain-torch reference implementations of the interval ops.

These are the specification: the compiled kernels (C++ on CPU, Triton on CUDA) must agree with
them, and the tests compare against them in fp64. They are ordinary differentiable torch code, so
autograd through them is the reference for the ops' backward passes too.

Boxes are in centre-radius form ``(mu, r)`` with ``r >= 0``: lower ``mu - r``, upper ``mu + r``
(DESIGN.md section 3). Shapes:

* linear:  ``mu, r: [B, in]``, ``weight: [out, in]``, ``bias: [out]`` -> ``[B, out]``
* conv2d:  ``mu, r: [B, C_in, H, W]``, ``weight: [C_out, C_in / groups, kH, kW]``, ``bias: [C_out]``
* batch norm: ``mu, r: [B, C]`` or ``[B, C, *spatial]``; ``mean, var, weight, bias: [C]``
* relu: any shape.

Without the compiled extension (``adcert._C`` not built) the public ops of :mod:`adcert.ops` run
these functions (after the same argument checks); see :mod:`adcert.ops._extension`.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from adcert.ops.bn_fold import fold_batch_norm

Tensor = torch.Tensor
IntPair = Union[int, Tuple[int, int]]


def interval_linear(mu: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor] = None
                    ) -> Tuple[Tensor, Tensor]:
    """``(W mu + b, |W| r)`` for ``mu, r: [B, in]``, ``weight: [out, in]``."""
    return F.linear(mu, weight, bias), F.linear(r, weight.abs())


def interval_conv2d(mu: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                    stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1,
                    groups: int = 1) -> Tuple[Tensor, Tensor]:
    """``(conv(mu, W) + b, conv(r, |W|))`` for ``mu, r: [B, C_in, H, W]``."""
    out_mu = F.conv2d(mu, weight, bias, stride, padding, dilation, groups)
    out_r = F.conv2d(r, weight.abs(), None, stride, padding, dilation, groups)
    return out_mu, out_r


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    """Reshape a per-channel ``[C]`` tensor to broadcast against ``[B, C, *spatial]``."""
    return t.reshape((1, -1) + (1,) * (ndim - 2))


def interval_batch_norm(mu: Tensor, r: Tensor, mean: Tensor, var: Tensor,
                        weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5
                        ) -> Tuple[Tensor, Tensor]:
    """Batch norm with caller-supplied statistics: ``(s (mu - mean) + beta, |s| r)``,
    ``s = weight / sqrt(var + eps)``."""
    fold = fold_batch_norm(mean, var, weight, bias, eps)
    scale_v, shift_v = _channel_view(fold.scale, mu.dim()), _channel_view(fold.shift, mu.dim())
    return mu * scale_v + shift_v, r * scale_v.abs()


def interval_relu(mu: Tensor, r: Tensor) -> Tuple[Tensor, Tensor]:
    """``((relu(mu + r) + relu(mu - r)) / 2, (relu(mu + r) - relu(mu - r)) / 2)``."""
    upper, lower = torch.relu(mu + r), torch.relu(mu - r)
    return (upper + lower) / 2, (upper - lower) / 2


def _bn_relu_epilogue(mu: Tensor, r: Tensor, bn_mean, bn_var, bn_weight, bn_bias, bn_eps: float,
                      relu: bool) -> Tuple[Tensor, Tensor]:
    if bn_mean is not None:
        mu, r = interval_batch_norm(mu, r, bn_mean, bn_var, bn_weight, bn_bias, bn_eps)
    if relu:
        mu, r = interval_relu(mu, r)
    return mu, r


def interval_linear_bn_relu(mu: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                            bn_mean: Optional[Tensor] = None, bn_var: Optional[Tensor] = None,
                            bn_weight: Optional[Tensor] = None, bn_bias: Optional[Tensor] = None,
                            bn_eps: float = 1e-5, relu: bool = True) -> Tuple[Tensor, Tensor]:
    """Linear + bias, then (if ``bn_mean`` is given) batch-norm affine, then (if ``relu``) ReLU."""
    mu, r = interval_linear(mu, r, weight, bias)
    return _bn_relu_epilogue(mu, r, bn_mean, bn_var, bn_weight, bn_bias, bn_eps, relu)


def interval_conv2d_bn_relu(mu: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                            bn_mean: Optional[Tensor] = None, bn_var: Optional[Tensor] = None,
                            bn_weight: Optional[Tensor] = None, bn_bias: Optional[Tensor] = None,
                            bn_eps: float = 1e-5, stride: IntPair = 1, padding: IntPair = 0,
                            dilation: IntPair = 1, groups: int = 1, relu: bool = True
                            ) -> Tuple[Tensor, Tensor]:
    """Conv2d + bias, then (if ``bn_mean`` is given) batch-norm affine, then (if ``relu``) ReLU."""
    mu, r = interval_conv2d(mu, r, weight, bias, stride, padding, dilation, groups)
    return _bn_relu_epilogue(mu, r, bn_mean, bn_var, bn_weight, bn_bias, bn_eps, relu)


def adcert_loss(student_adv_logits: Tensor, teacher_logits: Tensor, margin_lb: Tensor,
                alpha: float, tau: float = 1.0, reduction: str = "mean",
                clean_logits: Optional[Tensor] = None, adv_weight: float = 5.0 / 6.0) -> Tensor:
    """AD-CERT loss (papers/ad-cert.txt eq. 10): ``(1 - alpha) KD + alpha logsumexp(-margin_lb)``
    per sample, ``KD = tau^2 KL(softmax(t / tau) || softmax(s / tau))`` (teacher detached), or
    with ``clean_logits`` RSLAD-CERT's ``(1 - adv_weight) KD(t || clean) + adv_weight KD(t || s)``.
    ``margin_lb`` has 0 in the label entry, so ``logsumexp(-margin_lb) = CE([0, -m_lb], y)``."""
    log_t = F.log_softmax(teacher_logits.detach() / tau, dim=1)

    def kd(x: Tensor) -> Tensor:
        log_x = F.log_softmax(x / tau, dim=1)
        return tau * tau * F.kl_div(log_x, log_t, reduction="none", log_target=True).sum(1)

    if clean_logits is None:
        distill = kd(student_adv_logits)
    else:
        distill = (1 - adv_weight) * kd(clean_logits) + adv_weight * kd(student_adv_logits)
    loss = (1 - alpha) * distill + alpha * torch.logsumexp(-margin_lb, dim=1)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def brent_step(state: Tensor, f: Tensor, xtol: float, rtol: float, max_iter: int) -> Tensor:
    """One batched Brent step: :func:`adcert.ops.brent_step.brent_step_reference` (the state
    layout and semantics are documented in :mod:`adcert.ops.brent_step`)."""
    from adcert.ops.brent_step import brent_step_reference

    return brent_step_reference(state, f, xtol, rtol, max_iter)
