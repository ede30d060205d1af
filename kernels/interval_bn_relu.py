"""Triton kernels: the fused per-channel affine (bias + batch norm) + interval-ReLU epilogue.

A box ``(mu, r)`` in centre-radius form goes through ``y = scale[c] * x + shift[c]`` and then,
optionally, the interval ReLU (DESIGN.md section 3)::

    m  = scale * mu_pre + shift          rr = |scale| * r_pre
    u  = m + rr,  l = m - rr             (upper / lower end)
    mu_out = (relu(u) + relu(l)) / 2     r_out = (relu(u) - relu(l)) / 2     (relu)
    mu_out = m                           r_out = rr                           (no relu)

The backward recomputes ``u`` and ``l`` (no stored masks) and also returns the per-channel sums
from which the caller forms the gradients of bias, scale and the batch-norm parameters.

Layout: tensors ``[N, C, *spatial]`` with the channel in dim 1, viewed as ``[N, C, S]``
(``S = prod(spatial)``, ``S = 1`` for ``[N, C]``). Contiguous tensors are used as they are, and
so are 4-D channels-last ones (viewed as ``[N * H * W, C, 1]``); anything else is copied to
contiguous. Arithmetic runs in fp32 for fp16 / bf16 / fp32 and in fp64 for fp64.

Pure functions over tensors; no autograd and no imports from ``adcert``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

_FWD_BLOCK = 1024        # elements per program in the forward
_BWD_TILE = 1024         # elements per [BLOCK_C, BLOCK_J] tile in the backward
_BWD_PROGRAMS = 1024     # target number of programs of a reducing backward launch
_MAX_GRID_Y = 65535      # CUDA limit on the second grid dimension
# No FMA contraction: the GPU rounds like the reference and the interpreter, and the backward's
# recomputed ReLU masks round exactly like the forward's decisions.
_LAUNCH = dict(enable_fp_fusion=False)


@triton.jit
def _bn_relu_fwd_kernel(mu_ptr, r_ptr, scale_ptr, shift_ptr, mu_out_ptr, r_out_ptr,
                        numel, C, S,
                        HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, RELU: tl.constexpr,
                        ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    c = (offs // S) % C
    m = tl.load(mu_ptr + offs, mask=mask, other=0).to(ACC)
    rr = tl.load(r_ptr + offs, mask=mask, other=0).to(ACC)
    if HAS_SCALE:
        sc = tl.load(scale_ptr + c, mask=mask, other=0).to(ACC)
        m = m * sc
        rr = rr * tl.abs(sc)
    if HAS_SHIFT:
        m = m + tl.load(shift_ptr + c, mask=mask, other=0).to(ACC)
    if RELU:
        # relu as where(x < 0, 0, x) keeps NaN visible (like torch.relu)
        u = m + rr
        lo = m - rr
        u = tl.where(u < 0, 0.0, u)
        lo = tl.where(lo < 0, 0.0, lo)
        m = (u + lo) * 0.5
        rr = (u - lo) * 0.5
    tl.store(mu_out_ptr + offs, m.to(mu_out_ptr.dtype.element_ty), mask=mask)
    tl.store(r_out_ptr + offs, rr.to(r_out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_relu_bwd_kernel(g_mu_ptr, g_r_ptr, mu_ptr, r_ptr, scale_ptr, shift_ptr,
                        g_mu_in_ptr, g_r_in_ptr, part_ptr,
                        C, S, NS, n_splits, blocks_per_split,
                        HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, RELU: tl.constexpr,
                        WRITE_GRADS: tl.constexpr, SUMS: tl.constexpr, ACC: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr):
    # program (pid_c, pid_s): channels [pid_c * BLOCK_C, +BLOCK_C) and the blocks of BLOCK_J
    # flat (n, s) positions pid_s, pid_s + n_splits, ... (interleaved, so neighbouring programs
    # read neighbouring memory). Partial sums go to part[k, c, pid_s]: deterministic, no atomics.
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cs < C
    if HAS_SCALE:
        sc = tl.load(scale_ptr + cs, mask=c_mask, other=0).to(ACC)[:, None]
    else:
        sc = tl.full([BLOCK_C, 1], 1.0, ACC)
    if HAS_SHIFT:
        sh = tl.load(shift_ptr + cs, mask=c_mask, other=0).to(ACC)[:, None]
    else:
        sh = tl.zeros([BLOCK_C, 1], ACC)
    abs_sc = tl.abs(sc)
    c_off = cs.to(tl.int64)[:, None] * S
    acc_gm = tl.zeros([BLOCK_C, BLOCK_J], ACC)
    acc_gmx = tl.zeros([BLOCK_C, BLOCK_J], ACC)
    acc_grr = tl.zeros([BLOCK_C, BLOCK_J], ACC)
    for it in range(0, blocks_per_split):
        j = (pid_s + it * n_splits).to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J)
        n = j // S
        offs = c_off + (n * C * S + (j - n * S))[None, :]
        mask = c_mask[:, None] & (j < NS)[None, :]
        g_mu = tl.load(g_mu_ptr + offs, mask=mask, other=0).to(ACC)
        g_r = tl.load(g_r_ptr + offs, mask=mask, other=0).to(ACC)
        if RELU or SUMS:
            x = tl.load(mu_ptr + offs, mask=mask, other=0).to(ACC)
            rad = tl.load(r_ptr + offs, mask=mask, other=0).to(ACC)
        if RELU:
            m = x * sc + sh
            rr = rad * abs_sc
            du = tl.where(m + rr > 0, (g_mu + g_r) * 0.5, 0.0)
            dl = tl.where(m - rr > 0, (g_mu - g_r) * 0.5, 0.0)
            gm = du + dl
            grr = du - dl
        else:
            gm = g_mu
            grr = g_r
        if WRITE_GRADS:
            tl.store(g_mu_in_ptr + offs, (gm * sc).to(g_mu_in_ptr.dtype.element_ty), mask=mask)
            tl.store(g_r_in_ptr + offs, (grr * abs_sc).to(g_r_in_ptr.dtype.element_ty), mask=mask)
        if SUMS:  # masked lanes carry g_mu = g_r = 0, hence gm = grr = 0
            acc_gm += gm
            acc_gmx += gm * x
            acc_grr += grr * rad
    if SUMS:
        p = part_ptr + cs.to(tl.int64) * n_splits + pid_s
        plane = C * n_splits
        tl.store(p, tl.sum(acc_gm, axis=1), mask=c_mask)
        tl.store(p + plane, tl.sum(acc_gmx, axis=1), mask=c_mask)
        tl.store(p + 2 * plane, tl.sum(acc_grr, axis=1), mask=c_mask)


def _acc_dtypes(dtype: torch.dtype):
    """(triton, torch) accumulation dtypes: fp64 for fp64 inputs, fp32 otherwise."""
    if dtype == torch.float64:
        return tl.float64, torch.float64
    return tl.float32, torch.float32


def _layout(t: Tensor) -> Tuple[Tensor, torch.memory_format, int, int, int]:
    """``t: [N, C, *spatial]`` -> (t dense, its memory format, N', C, S') with the memory of ``t``
    laid out as ``[N', C, S']``: ``(N, C, S)`` if contiguous, ``(N*H*W, C, 1)`` if channels-last."""
    if t.dim() < 2:
        raise ValueError(f"expected a tensor [N, C, *spatial], got shape {tuple(t.shape)}")
    n, c, s = t.shape[0], t.shape[1], math.prod(t.shape[2:])
    if t.is_contiguous():
        return t, torch.contiguous_format, n, c, s
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t, torch.channels_last, n * s, c, 1
    t = t.contiguous()
    return t, torch.contiguous_format, n, c, s


def _like(t: Tensor, ref: Tensor, fmt: torch.memory_format) -> Tensor:
    """``t`` with the shape of ``ref``, dense in memory format ``fmt``."""
    if t.shape != ref.shape:
        raise ValueError(f"expected shape {tuple(ref.shape)}, got {tuple(t.shape)}")
    return t.contiguous(memory_format=fmt)


def _channel_param(t: Optional[Tensor], c: int, name: str) -> Optional[Tensor]:
    if t is None:
        return None
    if t.shape != (c,):
        raise ValueError(f"{name}: expected shape ({c},), got {tuple(t.shape)}")
    return t.contiguous()


def bn_relu_forward(mu_pre: Tensor, r_pre: Tensor, scale: Optional[Tensor] = None,
                    shift: Optional[Tensor] = None, relu: bool = True) -> Tuple[Tensor, Tensor]:
    """The epilogue forward.

    Args:
        mu_pre, r_pre: ``[N, C, *spatial]`` (``[N, C]`` for linear layers), same dtype.
        scale, shift: ``[C]`` float, or ``None`` (scale 1 / shift 0).
        relu: apply the interval ReLU after the affine map.

    Returns:
        ``(mu_out, r_out)``, shape, dtype and memory format of ``mu_pre`` (contiguous or
        channels-last).
    """
    mu_pre, fmt, n, c, s = _layout(mu_pre)
    r_pre = _like(r_pre, mu_pre, fmt)
    scale, shift = _channel_param(scale, c, "scale"), _channel_param(shift, c, "shift")
    mu_out, r_out = torch.empty_like(mu_pre), torch.empty_like(mu_pre)
    numel = mu_pre.numel()
    if numel == 0:
        return mu_out, r_out
    acc, _ = _acc_dtypes(mu_pre.dtype)
    grid = (triton.cdiv(numel, _FWD_BLOCK),)
    _bn_relu_fwd_kernel[grid](
        mu_pre, r_pre, scale, shift, mu_out, r_out, numel, c, s,
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, RELU=bool(relu),
        ACC=acc, BLOCK=_FWD_BLOCK, **_LAUNCH)
    return mu_out, r_out


def _pow2(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))


def bn_relu_backward(g_mu: Tensor, g_r: Tensor, mu_pre: Tensor, r_pre: Tensor,
                     scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                     relu: bool = True, input_grads: bool = True, sums: bool = True):
    """The epilogue backward, with the per-channel sums for the parameter gradients.

    Args:
        g_mu, g_r: ``[N, C, *spatial]``, gradients of ``mu_out, r_out``.
        mu_pre, r_pre: ``[N, C, *spatial]``, the epilogue's inputs (saved from the forward).
        scale, shift: ``[C]`` or ``None``, as in the forward.
        relu: as in the forward (``u, l`` are recomputed, no stored masks).
        input_grads: compute ``g_mu_pre, g_r_pre`` (else they are returned as ``None``).
        sums: compute the per-channel sums (else they are returned as ``None``).

    Returns:
        ``(g_mu_pre, g_r_pre, sum_gm, sum_gm_x, sum_grr_r)``: the first two shaped like
        ``mu_pre`` (its dtype and memory format), ``g_mu_pre = scale * gm``,
        ``g_r_pre = |scale| * grr``; the sums ``[C]`` in fp32 (fp64 for fp64 inputs) over ``N``
        and the spatial positions: ``sum gm``, ``sum gm * mu_pre``, ``sum grr * r_pre``, where
        ``gm, grr`` are the gradients of ``m = scale * mu_pre + shift`` and ``rr = |scale| r_pre``.
        Then ``d shift = sum_gm`` and ``d scale = sum_gm_x + sign(scale) * sum_grr_r``.
    """
    mu_pre, fmt, n, c, s = _layout(mu_pre)
    r_pre, g_mu, g_r = (_like(t, mu_pre, fmt) for t in (r_pre, g_mu, g_r))
    scale, shift = _channel_param(scale, c, "scale"), _channel_param(shift, c, "shift")
    acc, acc_torch = _acc_dtypes(mu_pre.dtype)
    g_mu_in = torch.empty_like(mu_pre) if input_grads else None
    g_r_in = torch.empty_like(mu_pre) if input_grads else None
    ns = n * s
    if not sums:
        if input_grads and ns * c > 0:
            _launch_bwd(g_mu, g_r, mu_pre, r_pre, scale, shift, g_mu_in, g_r_in, None,
                        c, s, ns, relu, True, acc, split_all=True)
        return g_mu_in, g_r_in, None, None, None
    if ns * c == 0:
        zeros = torch.zeros(3, c, dtype=acc_torch, device=mu_pre.device)
        return g_mu_in, g_r_in, zeros[0], zeros[1], zeros[2]
    part = _launch_bwd(g_mu, g_r, mu_pre, r_pre, scale, shift, g_mu_in, g_r_in, acc_torch,
                       c, s, ns, relu, input_grads, acc, split_all=False)
    totals = part.sum(dim=2) if part.shape[2] > 1 else part[:, :, 0]
    return g_mu_in, g_r_in, totals[0], totals[1], totals[2]


def _launch_bwd(g_mu, g_r, mu_pre, r_pre, scale, shift, g_mu_in, g_r_in, part_dtype,
                c, s, ns, relu, write_grads, acc, split_all):
    """Launch the backward kernel; returns the partial sums ``[3, C, n_splits]`` (or ``None``)."""
    block_j = min(_BWD_TILE, max(16, _pow2(s)))
    block_c = max(1, min(_pow2(c), _BWD_TILE // block_j))
    block_j = max(1, min(_BWD_TILE // block_c, _pow2(ns)))
    c_blocks = triton.cdiv(c, block_c)
    j_blocks = triton.cdiv(ns, block_j)
    n_splits = j_blocks if split_all else max(1, min(j_blocks, _BWD_PROGRAMS // c_blocks))
    n_splits = min(n_splits, _MAX_GRID_Y)
    per_split = triton.cdiv(j_blocks, n_splits)
    part = None
    if part_dtype is not None:
        part = torch.empty(3, c, n_splits, dtype=part_dtype, device=mu_pre.device)
    _bn_relu_bwd_kernel[(c_blocks, n_splits)](
        g_mu, g_r, mu_pre, r_pre, scale, shift, g_mu_in, g_r_in, part,
        c, s, ns, n_splits, per_split,
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, RELU=bool(relu),
        WRITE_GRADS=bool(write_grads), SUMS=part is not None, ACC=acc,
        BLOCK_C=block_c, BLOCK_J=block_j, **_LAUNCH)
    return part
