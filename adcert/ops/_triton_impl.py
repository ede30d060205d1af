"""CUDA implementations of the ``adcert::`` interval ops: Triton kernels + cuBLAS / cuDNN.

Each function below has the exact positional signature of its op schema (``csrc/ops.cpp``) and is
registered for the CUDA dispatch key by :func:`register_cuda_kernels`. Before registration they
are plain functions over tensors, so the tests call them directly on CPU tensors with the Triton
interpreter (``TRITON_INTERPRET=1``).

Division of labour: linear layers use the fused dual-matmul kernel (``kernels/interval_linear.py``:
both products in one kernel, ``|W|`` in registers, epilogue fused; fp64 goes through cuBLAS and the
Triton epilogue); convolutions are two cuDNN calls (``F.conv2d`` forward,
``aten.convolution_backward`` backward) with the Triton epilogue / epilogue-backward kernels
(``kernels/interval_bn_relu.py``); the interval ReLU is ``kernels/interval_relu.py``.

Folding the fused op's bias and batch norm into one per-channel affine map ``scale * x + shift``
(DESIGN.md section 3; :func:`adcert.ops.bn_fold.fold_batch_norm`; no BN: ``scale = 1``,
``shift = bias``)::

    inv = rsqrt(bn_var + bn_eps)     scale = bn_weight * inv
    shift = scale * (bias - bn_mean) + bn_bias

and back, from the epilogue's sums ``S = sum gm``, ``Sx = sum gm * x``, ``Sr = sum grr * r``::

    d_scale = Sx + sign(scale) * Sr + S * (bias - bn_mean)
    g_bias = S * scale   g_bn_mean = -S * scale   g_bn_bias = S
    g_bn_weight = d_scale * inv      g_bn_var = -0.5 * d_scale * bn_weight * inv^3

Precision: fp32 products honour ``torch.backends.cuda.matmul.allow_tf32`` (linear) and
``torch.backends.cudnn.allow_tf32`` (conv, cuDNN's own default is on); sound certification must
switch both off. No host synchronisation anywhere in this file.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

try:  # installed: kernels/ is the package adcert.kernels
    from adcert.kernels import adcert_loss as _loss
    from adcert.kernels import brent_step as _brent
    from adcert.kernels import interval_bn_relu as _bn_relu
    from adcert.kernels import interval_linear as _linear
    from adcert.kernels import interval_relu as _relu
except ImportError:  # a source checkout on sys.path, without the package mapping
    from kernels import adcert_loss as _loss  # type: ignore[no-redef]
    from kernels import brent_step as _brent  # type: ignore[no-redef]
    from kernels import interval_bn_relu as _bn_relu  # type: ignore[no-redef]
    from kernels import interval_linear as _linear  # type: ignore[no-redef]
    from kernels import interval_relu as _relu  # type: ignore[no-redef]

from adcert.ops.bn_fold import fold_batch_norm

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- helpers

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _allow_tf32() -> bool:
    return bool(torch.backends.cuda.matmul.allow_tf32)


def _fold(bias, bn_mean, bn_var, bn_weight, bn_bias, bn_eps: float, dtype: torch.dtype):
    """The bias and batch norm as one per-channel affine map: ``(scale, shift, inv, centre)``,
    all ``[C]`` in the accumulation dtype (``scale, inv, centre`` are ``None`` without BN;
    ``shift`` is ``bias`` or ``None`` then): :func:`adcert.ops.bn_fold.fold_batch_norm`, plus
    ``centre = bias - bn_mean`` for the gradients."""
    if bn_mean is None:
        return None, bias, None, None
    acc = _acc_dtype(dtype)

    def cast(t):
        return None if t is None else t.to(acc)
    mean = cast(bn_mean)
    fold = fold_batch_norm(mean, cast(bn_var), cast(bn_weight), cast(bn_bias), bn_eps,
                           layer_bias=cast(bias))
    centre = -mean if bias is None else cast(bias) - mean
    return fold.scale, fold.shift, fold.inv, centre


def _param_grads(sums, bias, bn_mean, bn_weight, bn_bias, scale, inv, centre):
    """``(g_bias, g_bn_mean, g_bn_var, g_bn_weight, g_bn_bias)`` from the epilogue sums
    ``(S, Sx, Sr)`` (each ``[C]``); ``None`` for absent parameters."""
    s, sx, sr = sums
    if bn_mean is None:
        return (s.to(bias.dtype) if bias is not None else None), None, None, None, None
    dtype = bn_mean.dtype
    d_scale = sx + torch.sign(scale) * sr + s * centre
    g_bias = (s * scale).to(bias.dtype) if bias is not None else None
    g_mean = (-s * scale).to(dtype)
    gamma_d_scale = d_scale * bn_weight.to(d_scale.dtype) if bn_weight is not None else d_scale
    g_var = (gamma_d_scale * (-0.5) * inv * inv * inv).to(dtype)
    g_weight = (d_scale * inv).to(bn_weight.dtype) if bn_weight is not None else None
    g_bn_bias = s.to(bn_bias.dtype) if bn_bias is not None else None
    return g_bias, g_mean, g_var, g_weight, g_bn_bias


def _dual_matmul_t(g_mu: Tensor, g_r: Tensor, weight: Tensor):
    """``(g_mu @ W, g_r @ |W|)`` for ``g_mu, g_r: [B, out]``, ``weight: [out, in]``."""
    out = _linear.linear_forward(g_mu, g_r, weight.t(), write_pre=False,
                                 allow_tf32=_allow_tf32())
    return out[0], out[1]


def _linear_weight_grad(g_mu_pre: Tensor, g_r_pre: Tensor, mu: Tensor, r: Tensor,
                        weight: Tensor) -> Tensor:
    """``g_mu_pre^T mu + sign(W) * (g_r_pre^T r)``: ``[out, in]``."""
    return torch.addcmul(g_mu_pre.t() @ mu, weight.sign(), g_r_pre.t() @ r)


def _linear_grads(g_mu_pre, g_r_pre, mu, r, weight, need_in: bool, need_w: bool):
    """Back through the two linear products: ``(g_mu [B, in], g_r [B, in], g_weight [out,
    in])``, ``None`` where not needed."""
    g_mu_in = g_r_in = g_weight = None
    if need_in:
        g_mu_in, g_r_in = _dual_matmul_t(g_mu_pre, g_r_pre, weight)
    if need_w:
        g_weight = _linear_weight_grad(g_mu_pre, g_r_pre, mu, r, weight)
    return g_mu_in, g_r_in, g_weight


def _conv_grads(g_mu_pre, g_r_pre, mu, r, weight, stride, padding, dilation, groups,
                need_input: bool, need_weight: bool):
    """Input and weight gradients of the two convolutions ``conv(mu, W)`` and ``conv(r, |W|)``
    (cuDNN); ``(g_mu_in, g_r_in, g_weight)`` with ``None`` where not needed."""
    if not (need_input or need_weight):
        return None, None, None
    mask = [need_input, need_weight, False]
    conv_bwd = torch.ops.aten.convolution_backward
    g_mu_in, gw_mu, _ = conv_bwd(g_mu_pre, mu, weight, None, list(stride), list(padding),
                                 list(dilation), False, [0, 0], groups, mask)
    g_r_in, gw_r, _ = conv_bwd(g_r_pre, r, weight.abs(), None, list(stride), list(padding),
                               list(dilation), False, [0, 0], groups, mask)
    g_weight = gw_mu.addcmul_(weight.sign(), gw_r) if need_weight else None
    return g_mu_in, g_r_in, g_weight


# ----------------------------------------------------------------------------- the ops

def _block_backward(products_grads, grad_mu, grad_r, mu_pre, r_pre, bias, bn_mean, bn_var,
                    bn_weight, bn_bias, bn_eps: float, relu: bool, output_mask):
    """The fused block's backward, shared by conv and linear: the epilogue backward, then
    ``products_grads(g_mu_pre, g_r_pre, need_in, need_w) -> (g_mu, g_r, g_weight)`` and the
    parameter gradients. Returns the 8 gradients of the block's schema."""
    need_in, need_w, need_p = (bool(x) for x in output_mask)
    scale, shift, inv, centre = _fold(bias, bn_mean, bn_var, bn_weight, bn_bias, bn_eps,
                                      mu_pre.dtype)
    g_mu_pre, g_r_pre, *sums = _bn_relu.bn_relu_backward(
        grad_mu, grad_r, mu_pre, r_pre, scale, shift, relu,
        input_grads=need_in or need_w, sums=need_p)
    g_mu_in, g_r_in, g_weight = products_grads(g_mu_pre, g_r_pre, need_in, need_w)
    params = (None,) * 5
    if need_p:
        params = _param_grads(sums, bias, bn_mean, bn_weight, bn_bias, scale, inv, centre)
    return (g_mu_in, g_r_in, g_weight) + tuple(params)


def interval_linear(mu: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """``mu, r: [B, in]``, ``weight: [out, in]``, ``bias: [out]`` -> ``(W mu + b, |W| r)``,
    each ``[B, out]``."""
    out = _linear.linear_forward(mu, r, weight, None, bias, relu=False, write_pre=False,
                                 allow_tf32=_allow_tf32())
    return out[0], out[1]


def interval_linear_backward(grad_mu: Tensor, grad_r: Tensor, mu: Tensor, r: Tensor,
                             weight: Tensor, output_mask: Sequence[bool]):
    """``grad_mu, grad_r: [B, out]`` -> ``(g_mu [B, in], g_r [B, in], g_weight [out, in],
    g_bias [out])``; ``output_mask = [input, weight, bias]``, ``None`` where masked out."""
    g_mu_in, g_r_in, g_weight = _linear_grads(grad_mu, grad_r, mu, r, weight,
                                              bool(output_mask[0]), bool(output_mask[1]))
    g_bias = grad_mu.sum(0) if output_mask[2] else None
    return g_mu_in, g_r_in, g_weight, g_bias


def interval_conv2d(mu: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor],
                    stride: List[int], padding: List[int], dilation: List[int], groups: int):
    """``mu, r: [B, C_in, H, W]``, ``weight: [C_out, C_in / groups, kH, kW]`` ->
    ``(conv(mu, W) + b, conv(r, |W|))``, each ``[B, C_out, H', W']``."""
    out_mu = F.conv2d(mu, weight, bias, stride, padding, dilation, groups)
    out_r = F.conv2d(r, weight.abs(), None, stride, padding, dilation, groups)
    return out_mu, out_r


def interval_conv2d_backward(grad_mu: Tensor, grad_r: Tensor, mu: Tensor, r: Tensor,
                             weight: Tensor, stride: List[int], padding: List[int],
                             dilation: List[int], groups: int, output_mask: Sequence[bool]):
    """``grad_mu, grad_r: [B, C_out, H', W']`` -> ``(g_mu, g_r, g_weight, g_bias)`` shaped like
    ``mu, r, weight, [C_out]``; ``None`` where masked out."""
    g_mu_in, g_r_in, g_weight = _conv_grads(grad_mu, grad_r, mu, r, weight, stride, padding,
                                            dilation, groups, output_mask[0], output_mask[1])
    g_bias = grad_mu.sum((0, 2, 3)) if output_mask[2] else None
    return g_mu_in, g_r_in, g_weight, g_bias


def interval_batch_norm(mu: Tensor, r: Tensor, mean: Tensor, var: Tensor,
                        weight: Optional[Tensor], bias: Optional[Tensor], eps: float):
    """``mu, r: [B, C]`` or ``[B, C, *]``; ``mean, var, weight, bias: [C]`` ->
    ``(s (mu - mean) + beta, |s| r)``, ``s = weight / sqrt(var + eps)``."""
    scale, shift, _, _ = _fold(None, mean, var, weight, bias, eps, mu.dtype)
    return _bn_relu.bn_relu_forward(mu, r, scale, shift, relu=False)


def interval_batch_norm_backward(grad_mu: Tensor, grad_r: Tensor, mu: Tensor, r: Tensor,
                                 mean: Tensor, var: Tensor, weight: Optional[Tensor],
                                 bias: Optional[Tensor], eps: float):
    """-> ``(g_mu, g_r, g_mean, g_var, g_weight, g_bias)``: the first two shaped like ``mu``,
    the rest ``[C]`` (``None`` for an absent weight / bias)."""
    scale, shift, inv, centre = _fold(None, mean, var, weight, bias, eps, mu.dtype)
    g_mu, g_r, *sums = _bn_relu.bn_relu_backward(grad_mu, grad_r, mu, r, scale, shift,
                                                 relu=False)
    _, g_mean, g_var, g_weight, g_bias = _param_grads(sums, None, mean, weight, bias, scale,
                                                      inv, centre)
    return g_mu, g_r, g_mean, g_var, g_weight, g_bias


def interval_relu(mu: Tensor, r: Tensor):
    """Any shape -> ``((relu(mu + r) + relu(mu - r)) / 2, (relu(mu + r) - relu(mu - r)) / 2)``."""
    return _relu.relu_forward(mu, r)


def interval_relu_backward(grad_mu: Tensor, grad_r: Tensor, mu: Tensor, r: Tensor):
    """Any shape -> ``(g_mu, g_r)`` shaped like ``mu``."""
    return _relu.relu_backward(grad_mu, grad_r, mu, r)


def interval_linear_bn_relu(mu: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor],
                            bn_mean: Optional[Tensor], bn_var: Optional[Tensor],
                            bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                            bn_eps: float, relu: bool):
    """``mu, r: [B, in]``, ``weight: [out, in]``, the rest ``[out]`` -> ``(mu_out, r_out,
    mu_pre, r_pre)``, each ``[B, out]``; ``mu_pre = mu @ W^T`` (no bias), ``r_pre = r @ |W|^T``."""
    scale, shift, _, _ = _fold(bias, bn_mean, bn_var, bn_weight, bn_bias, bn_eps, mu.dtype)
    return _linear.linear_forward(mu, r, weight, scale, shift, relu=relu, write_pre=True,
                                  allow_tf32=_allow_tf32())


def interval_linear_bn_relu_backward(grad_mu: Tensor, grad_r: Tensor, mu: Tensor, r: Tensor,
                                     weight: Tensor, bias: Optional[Tensor],
                                     bn_mean: Optional[Tensor], bn_var: Optional[Tensor],
                                     bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                                     bn_eps: float, relu: bool, mu_pre: Tensor, r_pre: Tensor,
                                     output_mask: Sequence[bool]):
    """-> ``(g_mu, g_r, g_weight, g_bias, g_bn_mean, g_bn_var, g_bn_weight, g_bn_bias)``;
    ``output_mask = [input, weight, params]``; ``None`` where masked out or absent."""
    def products_grads(g_mu_pre, g_r_pre, need_in, need_w):
        return _linear_grads(g_mu_pre, g_r_pre, mu, r, weight, need_in, need_w)

    return _block_backward(products_grads, grad_mu, grad_r, mu_pre, r_pre, bias, bn_mean, bn_var,
                           bn_weight, bn_bias, bn_eps, relu, output_mask)


def interval_conv2d_bn_relu(mu: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor],
                            bn_mean: Optional[Tensor], bn_var: Optional[Tensor],
                            bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                            bn_eps: float, stride: List[int], padding: List[int],
                            dilation: List[int], groups: int, relu: bool):
    """``mu, r: [B, C_in, H, W]``, ``weight: [C_out, C_in / groups, kH, kW]``, the rest
    ``[C_out]`` -> ``(mu_out, r_out, mu_pre, r_pre)``, each ``[B, C_out, H', W']``, with
    ``mu_pre = conv(mu, W)`` (no bias), ``r_pre = conv(r, |W|)``."""
    mu_pre = F.conv2d(mu, weight, None, stride, padding, dilation, groups)
    r_pre = F.conv2d(r, weight.abs(), None, stride, padding, dilation, groups)
    scale, shift, _, _ = _fold(bias, bn_mean, bn_var, bn_weight, bn_bias, bn_eps, mu.dtype)
    mu_out, r_out = _bn_relu.bn_relu_forward(mu_pre, r_pre, scale, shift, relu)
    return mu_out, r_out, mu_pre, r_pre


def interval_conv2d_bn_relu_backward(grad_mu: Tensor, grad_r: Tensor, mu: Tensor, r: Tensor,
                                     weight: Tensor, bias: Optional[Tensor],
                                     bn_mean: Optional[Tensor], bn_var: Optional[Tensor],
                                     bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                                     bn_eps: float, stride: List[int], padding: List[int],
                                     dilation: List[int], groups: int, relu: bool,
                                     mu_pre: Tensor, r_pre: Tensor,
                                     output_mask: Sequence[bool]):
    """-> ``(g_mu, g_r, g_weight, g_bias, g_bn_mean, g_bn_var, g_bn_weight, g_bn_bias)``;
    ``output_mask = [input, weight, params]``; ``None`` where masked out or absent."""
    def products_grads(g_mu_pre, g_r_pre, need_in, need_w):
        return _conv_grads(g_mu_pre, g_r_pre, mu, r, weight, stride, padding, dilation, groups,
                           need_in, need_w)

    return _block_backward(products_grads, grad_mu, grad_r, mu_pre, r_pre, bias, bn_mean, bn_var,
                           bn_weight, bn_bias, bn_eps, relu, output_mask)


def adcert_loss(student: Tensor, teacher: Tensor, margin: Tensor, clean: Optional[Tensor],
                alpha: float, tau: float, adv_weight: float):
    """``[B, C]`` logits -> ``(loss [B], grad_student, grad_margin, grad_clean)``."""
    return _loss.adcert_loss_forward(student, teacher, margin, clean, alpha, tau, adv_weight)


def brent_step(state: Tensor, f: Tensor, xtol: float, rtol: float, max_iter: int) -> Tensor:
    """``state: [12, B]``, ``f: [B]`` -> the new Brent state (``adcert/ops/brent_step.py``)."""
    return _brent.brent_step(state, f, xtol, rtol, max_iter)


# ----------------------------------------------------------------------------- registration

CUDA_KERNELS = {
    "adcert_loss": adcert_loss,
    "brent_step": brent_step,
    "interval_linear": interval_linear,
    "interval_linear_backward": interval_linear_backward,
    "interval_conv2d": interval_conv2d,
    "interval_conv2d_backward": interval_conv2d_backward,
    "interval_batch_norm": interval_batch_norm,
    "interval_batch_norm_backward": interval_batch_norm_backward,
    "interval_relu": interval_relu,
    "interval_relu_backward": interval_relu_backward,
    "interval_linear_bn_relu": interval_linear_bn_relu,
    "interval_linear_bn_relu_backward": interval_linear_bn_relu_backward,
    "interval_conv2d_bn_relu": interval_conv2d_bn_relu,
    "interval_conv2d_bn_relu_backward": interval_conv2d_bn_relu_backward,
}

_registered = False


def register_cuda_kernels() -> None:
    """Register every function of :data:`CUDA_KERNELS` as the CUDA kernel of ``adcert::<name>``
    (the schemas come from ``adcert._C``, which must be loaded first). Idempotent."""
    global _registered
    if _registered:
        return
    for name, fn in CUDA_KERNELS.items():
        torch.library.register_kernel(f"adcert::{name}", "cuda", fn)
    _registered = True
