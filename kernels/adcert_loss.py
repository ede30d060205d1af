"""Triton kernel: the AD-CERT loss (papers/ad-cert.txt eq. 10) per sample and its gradients,
one program per row (``BLOCK_C = next_power_of_2(C)``), as ``adcert::adcert_loss``::

    KD(t || x) = tau^2 KL(softmax(t / tau) || softmax(x / tau))
    kd   = w_s KD(t || s) + w_c KD(t || c)      (w_s = 1, w_c = 0 without clean logits c;
                                                 w_s = adv_weight, w_c = 1 - adv_weight with)
    ce   = logsumexp(-m)
    loss = (1 - alpha) kd + alpha ce
    d/ds = (1 - alpha) w_s tau (softmax(s / tau) - softmax(t / tau))   (same for c with w_c)
    d/dm = -alpha softmax(-m)

Arithmetic runs in the input dtype (fp32 or fp64). The scalar coefficients travel in a small
tensor of that dtype (Triton would pass Python floats as fp32). Pure functions over tensors; no
autograd and no imports from ``adcert``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

_LAUNCH = dict(enable_fp_fusion=False)


@triton.jit
def _softmax_stats(x, mask):
    mx = tl.max(x, 0)
    e = tl.where(mask, tl.exp(x - mx), 0.0)
    total = tl.sum(e, 0)
    return e / total, mx + tl.log(total)


@triton.jit
def _kl_grad(x_ptr, g_ptr, offs, mask, inv_tau, p_t, log_t, coef, ACC: tl.constexpr):
    x = tl.load(x_ptr + offs, mask=mask, other=0).to(ACC) * inv_tau
    x = tl.where(mask, x, float("-inf"))
    p_x, lse_x = _softmax_stats(x, mask)
    log_x = tl.where(mask, x - lse_x, 0.0)
    kl = tl.sum(tl.where(p_t != 0, p_t * (log_t - log_x), 0.0), 0)  # 0 log 0 = 0; NaN stays
    tl.store(g_ptr + offs, (coef * (p_x - p_t)).to(g_ptr.dtype.element_ty), mask=mask)
    return kl


@triton.jit
def _adcert_loss_kernel(s_ptr, t_ptr, m_ptr, c_ptr, params_ptr, loss_ptr, gs_ptr, gm_ptr, gc_ptr,
                        C, HAS_CLEAN: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    offs = row * C + cols
    alpha = tl.load(params_ptr + 0).to(ACC)
    inv_tau = tl.load(params_ptr + 1).to(ACC)
    kd_scale = tl.load(params_ptr + 2).to(ACC)
    w_s = tl.load(params_ptr + 3).to(ACC)
    w_c = tl.load(params_ptr + 4).to(ACC)
    coef_s = tl.load(params_ptr + 5).to(ACC)
    coef_c = tl.load(params_ptr + 6).to(ACC)

    t = tl.load(t_ptr + offs, mask=mask, other=0).to(ACC) * inv_tau
    t = tl.where(mask, t, float("-inf"))
    p_t, lse_t = _softmax_stats(t, mask)
    log_t = tl.where(mask, t - lse_t, 0.0)  # padding lanes: 0, not -inf (no inf - inf)
    kd = w_s * _kl_grad(s_ptr, gs_ptr, offs, mask, inv_tau, p_t, log_t, coef_s, ACC)
    if HAS_CLEAN:
        kd += w_c * _kl_grad(c_ptr, gc_ptr, offs, mask, inv_tau, p_t, log_t, coef_c, ACC)

    neg_m = -tl.load(m_ptr + offs, mask=mask, other=0).to(ACC)
    neg_m = tl.where(mask, neg_m, float("-inf"))
    p_m, lse_m = _softmax_stats(neg_m, mask)
    tl.store(gm_ptr + offs, (-alpha * p_m).to(gm_ptr.dtype.element_ty), mask=mask)
    tl.store(loss_ptr + row, (kd_scale * kd + alpha * lse_m).to(loss_ptr.dtype.element_ty))


def adcert_loss_forward(student: Tensor, teacher: Tensor, margin: Tensor, clean: Optional[Tensor],
                        alpha: float, tau: float, adv_weight: float):
    """``[B, C]`` logits -> ``(loss [B], grad_student, grad_margin, grad_clean)`` (``grad_clean``
    is empty, shape ``[0]``, when ``clean`` is None)."""
    s, t, m = student.contiguous(), teacher.contiguous(), margin.contiguous()
    c = clean.contiguous() if clean is not None else None
    B, C = s.shape
    loss = s.new_empty((B,))
    g_s, g_m = torch.empty_like(s), torch.empty_like(s)
    g_c = torch.empty_like(s) if c is not None else s.new_empty((0,))
    if B == 0 or C == 0:
        return loss, g_s, g_m, g_c
    w_s, w_c = (adv_weight, 1.0 - adv_weight) if c is not None else (1.0, 0.0)
    params = torch.tensor([alpha, 1.0 / tau, (1 - alpha) * tau * tau, w_s, w_c,
                           (1 - alpha) * w_s * tau, (1 - alpha) * w_c * tau],
                          dtype=s.dtype, device=s.device)
    acc = tl.float64 if s.dtype == torch.float64 else tl.float32
    block = triton.next_power_of_2(C)
    _adcert_loss_kernel[(B,)](
        s, t, m, c if c is not None else s, params, loss, g_s, g_m,
        g_c if c is not None else g_s, C, HAS_CLEAN=c is not None, ACC=acc, BLOCK_C=block,
        num_warps=4 if block <= 2048 else 8, **_LAUNCH)
    return loss, g_s, g_m, g_c
