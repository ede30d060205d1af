"""Triton kernels: the interval ReLU on centre-radius boxes, elementwise (any shape).

Forward (DESIGN.md section 3), with ``u = relu(mu + r)``, ``l = relu(mu - r)``::

    mu_out = (u + l) / 2        r_out = (u - l) / 2

Backward, recomputing the masks from ``mu, r``::

    du = (g_mu + g_r) / 2 * [mu + r > 0]     dl = (g_mu - g_r) / 2 * [mu - r > 0]
    g_mu_in = du + dl                         g_r_in = du - dl

Arithmetic runs in fp32 for fp16 / bf16 / fp32 and in fp64 for fp64. Pure functions over
tensors; no autograd and no imports from ``adcert``.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

_BLOCK = 1024
# No FMA contraction: the GPU rounds like the reference and the interpreter, and the backward's
# recomputed ReLU masks round exactly like the forward's decisions.
_LAUNCH = dict(enable_fp_fusion=False)


@triton.jit
def _relu_fwd_kernel(mu_ptr, r_ptr, mu_out_ptr, r_out_ptr, numel,
                     ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    mu = tl.load(mu_ptr + offs, mask=mask, other=0).to(ACC)
    r = tl.load(r_ptr + offs, mask=mask, other=0).to(ACC)
    u = mu + r
    lo = mu - r
    u = tl.where(u < 0, 0.0, u)      # relu that keeps NaN (like torch.relu)
    lo = tl.where(lo < 0, 0.0, lo)
    tl.store(mu_out_ptr + offs, ((u + lo) * 0.5).to(mu_out_ptr.dtype.element_ty), mask=mask)
    tl.store(r_out_ptr + offs, ((u - lo) * 0.5).to(r_out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _relu_bwd_kernel(g_mu_ptr, g_r_ptr, mu_ptr, r_ptr, g_mu_in_ptr, g_r_in_ptr, numel,
                     ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g_mu = tl.load(g_mu_ptr + offs, mask=mask, other=0).to(ACC)
    g_r = tl.load(g_r_ptr + offs, mask=mask, other=0).to(ACC)
    mu = tl.load(mu_ptr + offs, mask=mask, other=0).to(ACC)
    r = tl.load(r_ptr + offs, mask=mask, other=0).to(ACC)
    du = tl.where(mu + r > 0, (g_mu + g_r) * 0.5, 0.0)
    dl = tl.where(mu - r > 0, (g_mu - g_r) * 0.5, 0.0)
    tl.store(g_mu_in_ptr + offs, (du + dl).to(g_mu_in_ptr.dtype.element_ty), mask=mask)
    tl.store(g_r_in_ptr + offs, (du - dl).to(g_r_in_ptr.dtype.element_ty), mask=mask)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _same_shape(name: str, t: Tensor, ref: Tensor) -> Tensor:
    if t.shape != ref.shape:
        raise ValueError(f"{name}: expected shape {tuple(ref.shape)}, got {tuple(t.shape)}")
    return t.contiguous()


def relu_forward(mu: Tensor, r: Tensor) -> Tuple[Tensor, Tensor]:
    """Interval ReLU forward.

    Args:
        mu, r: any shape (the same), same dtype; non-contiguous inputs are copied.

    Returns:
        ``(mu_out, r_out)``, contiguous, the shape and dtype of ``mu``.
    """
    mu = mu.contiguous()
    r = _same_shape("r", r, mu)
    mu_out, r_out = torch.empty_like(mu), torch.empty_like(mu)
    numel = mu.numel()
    if numel > 0:
        _relu_fwd_kernel[(triton.cdiv(numel, _BLOCK),)](
            mu, r, mu_out, r_out, numel, ACC=_acc(mu.dtype), BLOCK=_BLOCK, **_LAUNCH)
    return mu_out, r_out


def relu_backward(g_mu: Tensor, g_r: Tensor, mu: Tensor, r: Tensor) -> Tuple[Tensor, Tensor]:
    """Interval ReLU backward.

    Args:
        g_mu, g_r: gradients of ``mu_out, r_out``; the shape of ``mu``.
        mu, r: the forward's inputs, any shape (the same).

    Returns:
        ``(g_mu_in, g_r_in)``, contiguous, the shape and dtype of ``mu``.
    """
    mu = mu.contiguous()
    r, g_mu, g_r = (_same_shape(n, t, mu) for n, t in (("r", r), ("g_mu", g_mu), ("g_r", g_r)))
    g_mu_in, g_r_in = torch.empty_like(mu), torch.empty_like(mu)
    numel = mu.numel()
    if numel > 0:
        _relu_bwd_kernel[(triton.cdiv(numel, _BLOCK),)](
            g_mu, g_r, mu, r, g_mu_in, g_r_in, numel, ACC=_acc(mu.dtype), BLOCK=_BLOCK, **_LAUNCH)
    return g_mu_in, g_r_in
