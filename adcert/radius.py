"""Batched certified-radius search (ACERT, papers/acert.txt eq. 7; DESIGN.md section 7).

For a sample ``(x, y)`` let ``R(eps) = -min_{i != y} m_i(eps)`` where ``m(eps)`` are the margin
lower bounds of ``z_y - z_i`` over the L-inf ball of radius ``eps`` (``compute_bounds(...,
y=y)``). The sample is certified at ``eps`` iff ``R(eps) < 0``; for IBP ``R`` is continuous and
non-decreasing. The certified radius is ``0`` when ``R(0) >= 0`` (misclassified), ``eps_max``
when ``R(eps_max) < 0``, else the leftmost root of ``R`` (the left end of a plateau at 0).

The search is a batched Brent (:func:`adcert.ops.brent_step`, scipy ``brentq`` semantics for
``xtol``, ``rtol``, ``maxiter``): every sample keeps its own bracket, one batched bound pass (a
per-sample eps ``[B]``) per iteration, converged samples are frozen, no host synchronisation in
the loop (unless ``sync_every`` asks for periodic compaction). The returned radius is always the
largest eps at which the bound *was verified* (``R < 0``), never an interpolated estimate, so it
is a certificate; ``upper`` is the smallest eps verified not certified (``inf`` when certified at
``eps_max``); with a converged search ``upper - radius < xtol + rtol * radius``.

Cost, in bound passes of ``B`` rows (a compacted pass of ``k`` rows counts ``k / B``;
``benchmarks/bench_radius.py`` counts them): ``R(eps_max)`` (1), ``R(0)`` (1, or 0 with
``logits``), then one per Brent iteration of each unconverged sample (``maxiter`` without
``sync_every``). A converged search (interior root) needs at least two more verdicts, one per side
of the root within ``xtol``, after the root is located to ``xtol / 2``; since ``R`` is piecewise
linear with a kink per ReLU crossing, secant steps gain a factor of ~10-100 each, not
quadratically, so at ``xtol = 1e-4 eps_max`` a search with ``logits`` and ``sync_every=1``
measured 4.41 passes on CNN7 at ``ibp_init`` (every sample with an interior root), 5.3-6.4 on
CNN3/CNN7 at the default initialisation and 3.4-3.5 on a trained digits model, where fewer
samples have an interior root; ACERT's ``maxiter = 2`` costs exactly 3.

Floating point: the verdicts are those of the bound passes as computed (full batch, unless
``sync_every`` compacts it). A default (``sound=False``) bound is exact only up to rounding, which
depends on the batch shape, so recomputing one sample alone can move ``R`` by an ulp-sized
amount; pass ``sound=True`` (forwarded to ``compute_bounds``) for a certificate of the
real-arithmetic network.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

from adcert.ops.brent_step import DONE, HI, ITERS, LO, XCUR, brent_init, brent_step

Tensor = torch.Tensor
# fn(x [n], rows [n] int64 or None for all rows) -> f(x) [n]
BatchedFunction = Callable[[Tensor, Optional[Tensor]], Tensor]


class RadiusResult(NamedTuple):
    """radius: ``[B]`` certified radii (``R(radius) < 0`` was verified, or ``radius = 0``);
    upper: ``[B]`` smallest eps verified *not* certified (``inf`` if certified at ``eps_max``);
    iterations: ``[B]`` int64, bound passes of the Brent loop spent on each sample;
    estimate: ``[B]`` Brent's best point (``brentq``'s return value: the bracket end with the
    smaller ``|R|``), in ``[radius, upper]`` -- *not* a certificate; what ACERT trains at when
    only a few iterations are run."""
    radius: Tensor
    upper: Tensor
    iterations: Tensor
    estimate: Tensor


def _check_options(xtol: float, rtol: float, maxiter: int, sync_every: Optional[int]) -> None:
    if not (isinstance(xtol, (int, float)) and math.isfinite(xtol) and xtol > 0):
        raise ValueError(f"xtol: expected a finite float > 0, got {xtol!r}")
    if not (isinstance(rtol, (int, float)) and math.isfinite(rtol) and rtol >= 0):
        raise ValueError(f"rtol: expected a finite float >= 0, got {rtol!r}")
    if isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 0:
        raise ValueError(f"maxiter: expected an int >= 0, got {maxiter!r}")
    if sync_every is not None and (isinstance(sync_every, bool) or not isinstance(sync_every, int)
                                   or sync_every < 1):
        raise ValueError(f"sync_every: expected None or an int >= 1, got {sync_every!r}")


def brent_search(fn: BatchedFunction, a: Tensor, fa: Tensor, b: Tensor, fb: Tensor, *,
                 xtol: float, rtol: float, maxiter: int, done: Optional[Tensor] = None,
                 sync_every: Optional[int] = None) -> Tensor:
    """Batched Brent search for the boundary of ``{x : f(x) < 0}`` of non-decreasing functions.

    Args:
        fn: ``fn(x, rows) -> f``; ``x: [n]`` points, ``rows: [n]`` int64 indices of the samples
            they belong to (``None``: all ``B`` samples in order) -> ``f: [n]``, same dtype.
        a, fa, b, fb: ``[B]`` brackets with ``fa < 0 <= fb`` for the samples that are not done.
        xtol, rtol, maxiter: ``brentq``'s tolerances and iteration limit (per sample).
        done: ``[B]`` bool, samples that need no search (their result is ``a``).
        sync_every: ``None``: exactly ``maxiter`` batched calls of ``fn`` on all ``B`` samples,
            no host synchronisation. ``k``: every ``k`` iterations one synchronisation to stop
            when every sample has converged and to call ``fn`` only on the unconverged ones.

    Returns:
        the final state ``[12, B]`` (rows in :mod:`adcert.ops.brent_step`; ``state[LO]`` is the
        largest point verified ``f < 0``, ``state[HI]`` the smallest verified ``f >= 0``).
    """
    _check_options(xtol, rtol, maxiter, sync_every)
    state = brent_step(brent_init(a, fa, b, fb, done), fb, xtol, rtol, maxiter)
    rows: Optional[Tensor] = None
    for it in range(maxiter):
        if sync_every is not None and it > 0 and it % sync_every == 0:
            rows = (state[DONE] == 0).nonzero().squeeze(1)
            if rows.numel() == 0:
                break
        if rows is None:
            state = brent_step(state, fn(state[XCUR], None), xtol, rtol, maxiter)
        else:
            sub = state[:, rows]
            sub = brent_step(sub, fn(sub[XCUR], rows), xtol, rtol, maxiter)
            state[:, rows] = sub
    return state


def margin_function(model: nn.Module, x: Tensor, y: Tensor, method: str = "ibp",
                    bn_stats=None, **bound_options) -> BatchedFunction:
    """``R(eps, rows) = -min_{i != y} m_i`` (``[n]``) of the samples ``x[rows]`` at per-sample
    radii ``eps: [n]``, computed with ``compute_bounds(..., method=method, y=y)``; the sample is
    certified at ``eps`` iff ``R < 0``."""
    from adcert.bounds import compute_bounds

    def fn(eps: Tensor, rows: Optional[Tensor]) -> Tensor:
        xs, ys = (x, y) if rows is None else (x[rows], y[rows])
        m = compute_bounds(model, xs, eps.to(xs.dtype), method=method, y=ys, bn_stats=bn_stats,
                           **bound_options)
        m = m.scatter(1, ys[:, None], math.inf)  # only i != y
        return (-m.amin(1)).to(eps.dtype)

    return fn


def _check_inputs(x, y, eps_max, init):
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor [B, *in], got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 2:
        raise ValueError(f"x: expected a batched tensor [B, *in], got shape {tuple(x.shape)}")
    if bool(torch.isnan(x).any()):
        raise ValueError("x: contains NaN")
    if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.shape != x.shape[:1]:
        raise ValueError(f"y: expected an int64 tensor [{x.shape[0]}], got "
                         f"{getattr(y, 'dtype', type(y).__name__)} "
                         f"{tuple(getattr(y, 'shape', ()))}")
    if isinstance(eps_max, bool) or not isinstance(eps_max, (int, float)) \
            or not math.isfinite(eps_max) or eps_max <= 0:
        raise ValueError(f"eps_max: expected a finite float > 0, got {eps_max!r}")
    if init is not None:
        if not isinstance(init, Tensor) or init.shape != x.shape[:1]:
            raise ValueError(f"init: expected a tensor [{x.shape[0]}] of previous radii, got "
                             f"{tuple(getattr(init, 'shape', ())) or type(init).__name__}")


def certified_radius(model: nn.Module, x: Tensor, y: Tensor, eps_max: float,
                     method: str = "ibp", xtol: Optional[float] = None,
                     rtol: Optional[float] = None, maxiter: int = 100,
                     init: Optional[Tensor] = None, init_width: float = 0.05,
                     sync_every: Optional[int] = None, bn_stats=None,
                     logits: Optional[Tensor] = None, **bound_options) -> RadiusResult:
    """Per-sample certified radius in ``[0, eps_max]`` (module docstring), batched.

    Args:
        model, x, y: the classifier, inputs ``[B, *in]`` in pixel space, labels ``[B]`` int64.
        eps_max: the largest radius of interest (> 0).
        method: any bound method :func:`adcert.bounds.compute_bounds` accepts (``"ibp"``, ...).
        xtol, rtol, maxiter: ``brentq`` semantics per sample; defaults ``xtol = 1e-4 *
            eps_max``, ``rtol = 4 * finfo(x.dtype).eps``; ``maxiter >= 1``.
        init: ``[B]`` previous radii (warm start; NaN: unknown, searched cold): the first
            passes bracket ``init -/+ (init_width * eps_max + 0.1 * init)`` instead of
            ``[0, eps_max]`` (two passes of ``B`` rows instead of one); samples whose root left
            that bracket take one more pass on their rows only (0 or ``eps_max``; with
            ``logits`` only the ``eps_max`` side needs it), which costs one host
            synchronisation before the loop.
        sync_every: see :func:`brent_search` (``None``: no synchronisation, ``maxiter`` passes).
        bn_stats: the step's batch-norm statistics for training-mode models (default: the clean
            statistics of ``x``, computed once and reused by every pass).
        logits: optional clean logits ``[B, C]`` of ``model`` on ``x`` (same mode and batch-norm
            statistics): ``R(0)`` is then read from them instead of an eps = 0 bound pass (one
            pass fewer; what a training step that already ran the forward passes in).
        **bound_options: forwarded to ``compute_bounds`` (e.g. ``sound=True``).

    Returns:
        :class:`RadiusResult` ``(radius, upper, iterations, estimate)``, each ``[B]``, in ``x``'s
        dtype; no gradient flows through the search.
    """
    _check_inputs(x, y, eps_max, init)
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    xtol = 1e-4 * eps_max if xtol is None else xtol
    rtol = 4 * torch.finfo(dtype).eps if rtol is None else rtol
    _check_options(xtol, rtol, maxiter, sync_every)
    if maxiter < 1:  # no Brent step: every radius not decided by the brackets would be 0
        raise ValueError(f"maxiter: expected an int >= 1 (with 0 no search step runs and every "
                         f"sample not decided by the bracket ends gets radius 0), got {maxiter!r}")
    n = x.shape[0]
    empty = x.new_zeros((0,), dtype=dtype)
    if n == 0:
        return RadiusResult(empty, empty.clone(), torch.zeros(0, dtype=torch.int64,
                                                               device=x.device), empty.clone())
    with torch.no_grad():
        if bn_stats is None and model.training:
            from adcert.bounds import clean_bn_stats
            bn_stats = clean_bn_stats(model, x)
        fn = margin_function(model, x, y, method, bn_stats, **bound_options)
        f0 = None
        if logits is not None:
            if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != n:
                raise ValueError(f"logits: expected a tensor [{n}, C], got "
                                 f"{tuple(getattr(logits, 'shape', ())) or type(logits)}")
            gap = logits.detach() - logits.detach().gather(1, y[:, None])  # z_i - z_y
            f0 = gap.scatter(1, y[:, None], -math.inf).amax(1).to(dtype)
        a, fa, b, fb, done, radius0 = _initial_brackets(fn, x, eps_max, init, init_width, dtype,
                                                        f0)
        state = brent_search(fn, a, fa, b, fb, xtol=xtol, rtol=rtol, maxiter=maxiter,
                             done=done, sync_every=sync_every)
    radius = torch.where(done, radius0, state[LO])
    upper = torch.where(done, torch.where(radius0 > 0, math.inf, 0.0), state[HI])
    estimate = torch.where(done, radius0, state[XCUR])
    return RadiusResult(radius, upper.to(dtype), state[ITERS].to(torch.int64), estimate)


def _initial_brackets(fn, x, eps_max, init, init_width, dtype, f0=None):
    """One batched pass at ``(a0, b0)`` per sample (``(0, eps_max)`` without ``init``) and, for
    warm starts that missed, one pass at 0 or ``eps_max`` on the rows concerned. Returns the
    Brent brackets ``a, fa, b, fb`` and, for samples decided without a search, ``done`` and
    their radius ``radius0`` (0 or ``eps_max``). ``f0``: ``R(0)`` when already known."""
    n = x.shape[0]
    zero = x.new_zeros(n, dtype=dtype)
    top = torch.full_like(zero, eps_max)
    if init is None:
        a0, b0 = zero, top
    else:
        r0 = init.detach().to(dtype).clamp(0, eps_max)
        w = init_width * eps_max + 0.1 * r0
        a0, b0 = (r0 - w).clamp_min(0), (r0 + w).clamp_max(eps_max)
        unknown = torch.isnan(r0)  # no previous radius: the cold bracket
        a0, b0 = torch.where(unknown, zero, a0), torch.where(unknown, top, b0)
    # Two passes of B rows rather than one of 2B: every verdict of the search then comes from a
    # pass of the same shape, so re-evaluating the batch at the radii reproduces it bit for bit.
    fa0 = f0 if (init is None and f0 is not None) else fn(a0, None)
    if init is not None and f0 is not None:  # R(0) from the logits, as in a cold search
        fa0 = torch.where(a0 == 0, f0, fa0)
    fb0 = fn(b0, None)
    left = ~(fa0 < 0)                # root (or misclassification) at or below a0
    right = (fb0 < 0) & ~left        # root above b0, or certified at eps_max
    # R(0) of the left misses is known when the clean logits gave f0; R(eps_max) never is
    need_zero = left & (a0 > 0)
    need = (need_zero if f0 is None else torch.zeros_like(left)) | (right & (b0 < eps_max))
    f_extra = torch.full_like(zero, math.nan)
    if f0 is not None:
        f_extra = torch.where(need_zero, f0, f_extra)
    p = torch.where(left, zero, top)
    if init is not None:  # without init a0 = 0 and b0 = eps_max: nothing is needed
        rows = need.nonzero().squeeze(1)
        if rows.numel() > 0:
            f_extra[rows] = fn(p[rows], rows)
    f_zero = torch.where(left & (a0 > 0), f_extra, fa0)     # R(0) for the left cases
    f_top = torch.where(right & (b0 < eps_max), f_extra, fb0)  # R(eps_max) for the right ones
    misclassified = left & ~(f_zero < 0)
    robust = right & (f_top < 0)
    done = misclassified | robust
    radius0 = torch.where(robust, top, zero)
    a = torch.where(left, zero, torch.where(right, b0, a0))
    fa = torch.where(left, f_zero, torch.where(right, fb0, fa0))
    b = torch.where(left, a0, torch.where(right, top, b0))
    fb = torch.where(left, fa0, torch.where(right, f_top, fb0))
    # Done samples: a bracket that brent_step never touches; a = radius0 keeps LO meaningful.
    a = torch.where(done, radius0, a)
    fa = torch.where(done, -torch.ones_like(fa), fa)
    fb = torch.where(done, torch.ones_like(fb), fb)
    return a, fa, b, fb, done, radius0


__all__ = ["certified_radius", "brent_search", "margin_function", "RadiusResult"]
