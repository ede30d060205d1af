"""Triton kernel: the fused dual matmul of an interval linear layer, with the epilogue.

For a box ``mu, r: [M, K]`` and ``weight: [N, K]`` one kernel computes both products::

    mu_pre = mu @ W^T        r_pre = r @ |W|^T

loading each ``W`` tile once, taking ``|W|`` in registers and keeping two accumulators, and then
applies the per-column epilogue of :mod:`.interval_bn_relu` (``m = scale * mu_pre + shift``,
``rr = |scale| * r_pre``, optional interval ReLU). A plain linear layer is ``scale = None``,
``shift = bias``; the same kernel with ``weight = W.t()`` (a strided view) gives the input
gradients ``(g_mu @ W, g_r @ |W|)``.

Products accumulate in fp32 (fp16 / bf16 / fp32 inputs). fp32 products use IEEE fp32 unless
``allow_tf32`` is set. fp64 inputs take ``torch.matmul`` for the products and the Triton
epilogue. Pure functions over tensors; no autograd and no imports from ``adcert``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import interval_bn_relu as _epilogue

Tensor = torch.Tensor

_BLOCK_N = 64
_BLOCK_K = 32
# No FMA contraction: the GPU rounds like the reference and the interpreter, and the backward's
# recomputed ReLU masks round exactly like the forward's decisions.
_LAUNCH = dict(enable_fp_fusion=False)


@triton.jit
def _dual_matmul_kernel(mu_ptr, r_ptr, w_ptr, scale_ptr, shift_ptr,
                        mu_out_ptr, r_out_ptr, mu_pre_ptr, r_pre_ptr,
                        M, N, K,
                        stride_mu_m, stride_mu_k, stride_r_m, stride_r_k,
                        stride_w_n, stride_w_k,
                        HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, RELU: tl.constexpr,
                        WRITE_PRE: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    mu_ptrs = mu_ptr + rm64[:, None] * stride_mu_m + rk[None, :] * stride_mu_k
    r_ptrs = r_ptr + rm64[:, None] * stride_r_m + rk[None, :] * stride_r_k
    w_ptrs = w_ptr + rn64[None, :] * stride_w_n + rk[:, None] * stride_w_k      # W^T tile [K, N]
    acc_mu = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_r = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + rk) < K
        a_mask = m_mask[:, None] & k_mask[None, :]
        mu = tl.load(mu_ptrs, mask=a_mask, other=0)
        r = tl.load(r_ptrs, mask=a_mask, other=0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0)
        acc_mu = tl.dot(mu, w, acc_mu, input_precision=PRECISION)
        acc_r = tl.dot(r, tl.abs(w), acc_r, input_precision=PRECISION)
        mu_ptrs += BLOCK_K * stride_mu_k
        r_ptrs += BLOCK_K * stride_r_k
        w_ptrs += BLOCK_K * stride_w_k

    out_offs = rm64[:, None] * N + rn64[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if WRITE_PRE:
        tl.store(mu_pre_ptr + out_offs, acc_mu.to(mu_pre_ptr.dtype.element_ty), mask=out_mask)
        tl.store(r_pre_ptr + out_offs, acc_r.to(r_pre_ptr.dtype.element_ty), mask=out_mask)
    m = acc_mu
    rr = acc_r
    if HAS_SCALE:
        sc = tl.load(scale_ptr + rn, mask=n_mask, other=0).to(tl.float32)[None, :]
        m = m * sc
        rr = rr * tl.abs(sc)
    if HAS_SHIFT:
        m = m + tl.load(shift_ptr + rn, mask=n_mask, other=0).to(tl.float32)[None, :]
    if RELU:
        u = m + rr
        lo = m - rr
        u = tl.where(u < 0, 0.0, u)      # relu that keeps NaN (like torch.relu)
        lo = tl.where(lo < 0, 0.0, lo)
        m = (u + lo) * 0.5
        rr = (u - lo) * 0.5
    tl.store(mu_out_ptr + out_offs, m.to(mu_out_ptr.dtype.element_ty), mask=out_mask)
    tl.store(r_out_ptr + out_offs, rr.to(r_out_ptr.dtype.element_ty), mask=out_mask)


def _block_m(m: int) -> int:
    return 16 if m <= 16 else (32 if m <= 32 else 64)


def linear_forward(mu: Tensor, r: Tensor, weight: Tensor, scale: Optional[Tensor] = None,
                   shift: Optional[Tensor] = None, relu: bool = False, write_pre: bool = True,
                   allow_tf32: bool = False
                   ) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Fused interval linear layer with the per-column epilogue.

    Args:
        mu, r: ``[M, K]`` (any strides), same dtype as ``weight``.
        weight: ``[N, K]`` (any strides; ``W.t()`` of a ``[K, N]`` matrix is fine).
        scale, shift: ``[N]`` or ``None`` (scale 1 / shift 0); ``shift`` includes any bias.
        relu: apply the interval ReLU after the affine map.
        write_pre: also return the raw products.
        allow_tf32: let fp32 products use TF32 tensor cores (not rounding-sound; off by default).

    Returns:
        ``(mu_out, r_out, mu_pre, r_pre)``, all ``[M, N]`` contiguous in the input dtype, with
        ``mu_pre = mu @ W^T``, ``r_pre = r @ |W|^T`` (``None`` unless ``write_pre``) and
        ``mu_out, r_out`` the epilogue applied to them.
    """
    if mu.dim() != 2 or r.shape != mu.shape or weight.dim() != 2 or weight.shape[1] != mu.shape[1]:
        raise ValueError(f"expected mu, r: [M, K] and weight: [N, K], got {tuple(mu.shape)}, "
                         f"{tuple(r.shape)}, {tuple(weight.shape)}")
    if not (mu.dtype == r.dtype == weight.dtype):
        raise TypeError(f"mu, r, weight: expected one dtype, got {mu.dtype}, {r.dtype}, "
                        f"{weight.dtype}")
    m, k = mu.shape
    n = weight.shape[0]
    if mu.dtype == torch.float64:  # no fp64 tl.dot path: cuBLAS products + the Triton epilogue
        mu_pre, r_pre = mu @ weight.t(), r @ weight.abs().t()
        mu_out, r_out = _epilogue.bn_relu_forward(mu_pre, r_pre, scale, shift, relu)
        return (mu_out, r_out) + ((mu_pre, r_pre) if write_pre else (None, None))
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None and t.shape != (n,):
            raise ValueError(f"{name}: expected shape ({n},), got {tuple(t.shape)}")
    scale = scale.contiguous() if scale is not None else None
    shift = shift.contiguous() if shift is not None else None
    # separate allocations: the outputs of a custom op must not share storage
    outs = [torch.empty(m, n, dtype=mu.dtype, device=mu.device)
            for _ in range(4 if write_pre else 2)]
    mu_out, r_out = outs[0], outs[1]
    mu_pre, r_pre = (outs[2], outs[3]) if write_pre else (None, None)
    if m == 0 or n == 0:
        return mu_out, r_out, mu_pre, r_pre
    block_m = _block_m(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, _BLOCK_N))
    _dual_matmul_kernel[grid](
        mu, r, weight, scale, shift, mu_out, r_out, mu_pre, r_pre, m, n, k,
        mu.stride(0), mu.stride(1), r.stride(0), r.stride(1), weight.stride(0), weight.stride(1),
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, RELU=bool(relu),
        WRITE_PRE=bool(write_pre), PRECISION="tf32" if allow_tf32 else "ieee",
        BLOCK_M=block_m, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, **_LAUNCH)
    return mu_out, r_out, mu_pre, r_pre
