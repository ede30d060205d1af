"""Triton kernel: one step of a batched Brent root search, the state update of the
certified-radius search (contract in ``adcert/ops/brent_step.py``; rows of the state ``[12, B]``:
``xpre xcur xblk fpre fcur fblk spre scur lo hi done iters``).

One program handles ``BLOCK`` samples (columns); every quantity is a register vector and every
branch of the C++ kernel is a select, in the C++ kernel's order of operations (no FMA
contraction), so the result equals the CPU kernel and the plain-torch reference bit for bit.
Pure functions over tensors; no autograd and no imports from ``adcert``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

_BLOCK = 256
_LAUNCH = dict(enable_fp_fusion=False)


@triton.jit
def _brent_step_kernel(s_ptr, f_ptr, p_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    xpre0 = tl.load(s_ptr + 0 * n + offs, mask=mask, other=0)
    xcur0 = tl.load(s_ptr + 1 * n + offs, mask=mask, other=0)
    xblk0 = tl.load(s_ptr + 2 * n + offs, mask=mask, other=0)
    fpre0 = tl.load(s_ptr + 3 * n + offs, mask=mask, other=0)
    fcur0 = tl.load(s_ptr + 4 * n + offs, mask=mask, other=0)
    fblk0 = tl.load(s_ptr + 5 * n + offs, mask=mask, other=0)
    spre0 = tl.load(s_ptr + 6 * n + offs, mask=mask, other=0)
    scur0 = tl.load(s_ptr + 7 * n + offs, mask=mask, other=0)
    lo0 = tl.load(s_ptr + 8 * n + offs, mask=mask, other=0)
    hi0 = tl.load(s_ptr + 9 * n + offs, mask=mask, other=0)
    done = tl.load(s_ptr + 10 * n + offs, mask=mask, other=1)
    iters = tl.load(s_ptr + 11 * n + offs, mask=mask, other=0)
    xtol = tl.load(p_ptr + 0)
    rtol = tl.load(p_ptr + 1)
    max_iter = tl.load(p_ptr + 2)
    xpre, xcur, xblk, fpre, fblk, spre, scur, lo, hi = (xpre0, xcur0, xblk0, fpre0, fblk0,
                                                         spre0, scur0, lo0, hi0)
    f = tl.load(f_ptr + offs, mask=mask, other=0)
    active = done == 0

    fcur = f
    neg = fcur < 0
    lo = tl.where(neg, tl.where(lo < xcur, xcur, lo), lo)
    hi = tl.where(neg, hi, tl.where(xcur < hi, xcur, hi))
    flip = (fpre < 0) != neg
    xblk = tl.where(flip, xpre, xblk)
    fblk = tl.where(flip, fpre, fblk)
    spre = tl.where(flip, xcur - xpre, spre)
    scur = tl.where(flip, spre, scur)
    swap = tl.abs(fblk) < tl.abs(fcur)
    xpre, xcur, xblk = (tl.where(swap, xcur, xpre), tl.where(swap, xblk, xcur),
                        tl.where(swap, xcur, xblk))
    fpre, fcur, fblk = (tl.where(swap, fcur, fpre), tl.where(swap, fblk, fcur),
                        tl.where(swap, fcur, fblk))
    delta = (xtol + rtol * tl.abs(xcur)) / 2
    sbis = (xblk - xcur) / 2
    stop = (tl.abs(sbis) < delta) | (iters >= max_iter)
    secant = -fcur * (xcur - xpre) / (fcur - fpre)
    dpre = (fpre - fcur) / (xpre - xcur)
    dblk = (fblk - fcur) / (xblk - xcur)
    quad = -fcur * (fblk * dblk - fpre * dpre) / (dblk * dpre * (fblk - fpre))
    stry = tl.where(xpre == xblk, secant, quad)
    try_interp = (fcur != 0) & (tl.abs(spre) > delta) & (tl.abs(fcur) < tl.abs(fpre))
    bound = 3 * tl.abs(sbis) - delta
    bound = tl.where(bound < tl.abs(spre), bound, tl.abs(spre))  # std::min(|spre|, bound)
    good = try_interp & (2 * tl.abs(stry) < bound)
    spre_n = tl.where(good, scur, sbis)
    scur_n = tl.where(good, stry, sbis)
    step = tl.where(tl.abs(scur_n) > delta, scur_n, tl.where(sbis > 0, delta, -delta))

    # Done samples: the state is copied through.
    o = out_ptr + offs
    tl.store(o + 0 * n, tl.where(active, tl.where(stop, xpre, xcur), xpre0), mask=mask)
    tl.store(o + 1 * n, tl.where(active, tl.where(stop, xcur, xcur + step), xcur0), mask=mask)
    tl.store(o + 2 * n, tl.where(active, xblk, xblk0), mask=mask)
    tl.store(o + 3 * n, tl.where(active, tl.where(stop, fpre, fcur), fpre0), mask=mask)
    tl.store(o + 4 * n, tl.where(active, fcur, fcur0), mask=mask)
    tl.store(o + 5 * n, tl.where(active, fblk, fblk0), mask=mask)
    tl.store(o + 6 * n, tl.where(active, tl.where(stop, spre, spre_n), spre0), mask=mask)
    tl.store(o + 7 * n, tl.where(active, tl.where(stop, scur, scur_n), scur0), mask=mask)
    tl.store(o + 8 * n, tl.where(active, lo, lo0), mask=mask)
    tl.store(o + 9 * n, tl.where(active, hi, hi0), mask=mask)
    tl.store(o + 10 * n, tl.where(active & stop, 1.0, done).to(done.dtype), mask=mask)
    tl.store(o + 11 * n, tl.where(active, tl.where(stop, iters, iters + 1), iters), mask=mask)


def brent_step(state: Tensor, f: Tensor, xtol: float, rtol: float, max_iter: int) -> Tensor:
    """``state: [12, B]``, ``f: [B]`` (same float dtype) -> the new state ``[12, B]``.

    Arithmetic runs in the state's dtype (float32 or float64)."""
    if state.dim() != 2 or state.shape[0] != 12:
        raise ValueError(f"state: expected shape [12, B], got {tuple(state.shape)}")
    if f.shape != state.shape[1:]:
        raise ValueError(f"f: expected shape [{state.shape[1]}], got {tuple(f.shape)}")
    state = state.contiguous()
    f = f.contiguous()
    out = torch.empty_like(state)
    n = state.shape[1]
    if n > 0:
        # The scalars in the state's dtype, rounded once like the CPU kernel rounds them.
        params = torch.tensor([xtol, rtol, max_iter], dtype=state.dtype, device=state.device)
        _brent_step_kernel[(triton.cdiv(n, _BLOCK),)](state, f, params, out, n, BLOCK=_BLOCK,
                                                      **_LAUNCH)
    return out
