"""``brent_step``: one step of a batched Brent root search (scipy ``brentq`` semantics), the
state update of the certified-radius search (DESIGN.md section 7, :mod:`adcert.radius`).

Every sample ``b`` is one independent root search, stored as column ``b`` of a state tensor
``[12, B]`` (float32 or float64) with the rows::

    0 xpre   1 xcur   2 xblk   3 fpre   4 fcur   5 fblk   6 spre   7 scur
    8 lo     9 hi     10 done  11 iters

``xcur`` is the point whose function value the caller evaluates next; ``brent_step(state, f)``
(``f = f(xcur)``, ``[B]``) records it, updates the certified bracket (``lo``: the largest point
seen with ``f < 0``; ``hi``: the smallest point seen with ``f >= 0``), runs the head of one
``brentq`` iteration (bracket, swap, convergence test ``|xblk - xcur| / 2 < (xtol + rtol
|xcur|) / 2``, interpolation or bisection) and writes the next point into ``xcur``, counting it
in ``iters``. A sample is marked ``done`` (and copied unchanged from then on) when its bracket is
converged or ``iters`` reached ``max_iter``.

Differences from ``brentq``, both for certification: ``f == 0`` (and NaN) counts as *not*
certified, the positive side; ``f == 0`` forces a bisection step (Brent's interpolation would
crawl along a plateau at 0 by ``delta`` steps) and never stops the search, so the search finds
the left end of a plateau at 0.

CPU: the C++ kernel ``csrc/cpu/brent_step_cpu.cpp``; CUDA: the Triton kernel
``kernels/brent_step.py``; :func:`brent_step_reference` is the plain-torch reference, written in
the kernels' exact order of operations so all three agree bit for bit.
"""
from __future__ import annotations

import torch

from adcert.ops._extension import op, reference_op, register_fake

Tensor = torch.Tensor

ROWS = ("xpre", "xcur", "xblk", "fpre", "fcur", "fblk", "spre", "scur", "lo", "hi", "done",
        "iters")
XPRE, XCUR, XBLK, FPRE, FCUR, FBLK, SPRE, SCUR, LO, HI, DONE, ITERS = range(len(ROWS))

_op = op("brent_step")


@register_fake("brent_step")
def _fake(state, f, xtol, rtol, max_iter):
    torch._check(state.dim() == 2 and state.shape[0] == len(ROWS),
                 lambda: f"state must be [12, B], got {tuple(state.shape)}")
    return torch.empty_like(state, memory_format=torch.contiguous_format)


def brent_init(a: Tensor, fa: Tensor, b: Tensor, fb: Tensor, done: Tensor = None) -> Tensor:
    """The state ``[12, B]`` of a search on the brackets ``[a, b]`` (``a, fa, b, fb: [B]``, the
    caller guarantees ``fa < 0 <= fb`` for the samples that are not ``done``): ``xpre = a``,
    ``xcur = b`` (so the first :func:`brent_step` takes ``fb``), ``lo = a``, ``hi = b``.
    ``done: [B]`` bool marks samples that need no search (their ``lo`` is returned as is)."""
    zero = torch.zeros_like(a)
    state = torch.stack([a, b, zero, fa, zero, zero, zero, zero, a, b, zero, zero])
    if done is not None:
        state[DONE] = done.to(state.dtype)
    return state


def _check(state: Tensor, f: Tensor, xtol: float, rtol: float, max_iter: int) -> None:
    if not isinstance(state, Tensor) or state.dtype not in (torch.float32, torch.float64):
        raise TypeError("state: expected a float32 or float64 tensor [12, B]")
    if state.dim() != 2 or state.shape[0] != len(ROWS):
        raise ValueError(f"state: expected shape [12, B], got {tuple(state.shape)}")
    if not isinstance(f, Tensor) or f.shape != state.shape[1:]:
        shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
        raise ValueError(f"f: expected a tensor of shape [{state.shape[1]}], got {shape}")
    if f.dtype != state.dtype or f.device != state.device:
        raise TypeError(f"f: expected dtype {state.dtype} on {state.device}, got {f.dtype} on "
                        f"{f.device}")
    if not (xtol > 0) or not (rtol >= 0):
        raise ValueError(f"xtol, rtol: expected xtol > 0 and rtol >= 0, got {xtol}, {rtol}")
    if int(max_iter) < 0:
        raise ValueError(f"max_iter: expected an int >= 0, got {max_iter}")


def brent_step(state: Tensor, f: Tensor, xtol: float, rtol: float, max_iter: int) -> Tensor:
    """One Brent step for every not-done sample. ``state: [12, B]``, ``f: [B]`` (the function
    at ``state[XCUR]``, same dtype and device) -> the new state ``[12, B]`` (a new tensor).
    No host synchronisation."""
    _check(state, f, xtol, rtol, max_iter)
    if _op is None:  # adcert._C not built: the plain-torch reference (adcert.ops._extension)
        return reference_op("brent_step")(state, f, xtol, rtol, max_iter)
    if state.device.type != "cpu":
        from adcert.ops import GPU_KERNELS

        if not GPU_KERNELS:  # no Triton: the reference is the same arithmetic
            return brent_step_reference(state, f, xtol, rtol, max_iter)
    return _op(state, f, float(xtol), float(rtol), int(max_iter))


def brent_step_reference(state: Tensor, f: Tensor, xtol: float, rtol: float,
                         max_iter: int) -> Tensor:
    """Plain-torch :func:`brent_step` (same contract, same order of floating-point operations)."""
    dt = state.dtype
    xtol_t = torch.tensor(xtol, dtype=dt, device=state.device)
    rtol_t = torch.tensor(rtol, dtype=dt, device=state.device)
    (xpre, xcur, xblk, fpre, _, fblk, spre, scur, lo, hi, done, iters) = state.unbind(0)
    active = done == 0
    fcur = f
    neg = fcur < 0
    lo = torch.where(neg, torch.maximum(lo, xcur), lo)
    hi = torch.where(neg, hi, torch.minimum(hi, xcur))
    flip = (fpre < 0) != neg
    xblk = torch.where(flip, xpre, xblk)
    fblk = torch.where(flip, fpre, fblk)
    spre = torch.where(flip, xcur - xpre, spre)
    scur = torch.where(flip, spre, scur)
    swap = fblk.abs() < fcur.abs()
    xpre, xcur, xblk = (torch.where(swap, xcur, xpre), torch.where(swap, xblk, xcur),
                        torch.where(swap, xcur, xblk))
    fpre, fcur, fblk = (torch.where(swap, fcur, fpre), torch.where(swap, fblk, fcur),
                        torch.where(swap, fcur, fblk))
    delta = (xtol_t + rtol_t * xcur.abs()) / 2
    sbis = (xblk - xcur) / 2
    stop = (sbis.abs() < delta) | (iters >= max_iter)
    secant = -fcur * (xcur - xpre) / (fcur - fpre)
    dpre = (fpre - fcur) / (xpre - xcur)
    dblk = (fblk - fcur) / (xblk - xcur)
    quad = -fcur * (fblk * dblk - fpre * dpre) / (dblk * dpre * (fblk - fpre))
    stry = torch.where(xpre == xblk, secant, quad)
    try_interp = (fcur != 0) & (spre.abs() > delta) & (fcur.abs() < fpre.abs())
    good = try_interp & (2 * stry.abs() < torch.minimum(spre.abs(), 3 * sbis.abs() - delta))
    spre_n, scur_n = torch.where(good, scur, sbis), torch.where(good, stry, sbis)
    step = torch.where(scur_n.abs() > delta, scur_n, torch.where(sbis > 0, delta, -delta))
    moved = [xcur, xcur + step, xblk, fcur, fcur, fblk, spre_n, scur_n, lo, hi, done, iters + 1]
    stopped = [xpre, xcur, xblk, fpre, fcur, fblk, spre, scur, lo, hi,
               torch.ones_like(done), iters]
    head = torch.stack([torch.where(stop, s, m) for s, m in zip(stopped, moved)])
    return torch.where(active, head, state)
