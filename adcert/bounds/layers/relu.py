"""ReLU: ``nn.ReLU``, ``F.relu``, ``torch.relu``, ``.relu()``.

* IBP: ``(relu(l), relu(u))`` (:func:`adcert.ops.interval_relu`), optionally with SABR's
  ReLU-output shrink (:func:`shrunk_relu`, a training heuristic, unsound).
* Sound IBP: ``max(L, 0), max(U, 0)`` (exact).
* Relaxation: stable-active neurons pass ``A`` through, stable-inactive ones drop it; for an
  unstable one (``l < 0 < u``) a positive coefficient takes the lower line ``alpha z``
  (``0 <= alpha <= 1``, CROWN's adaptive choice by default, optimised by alpha-CROWN) and a
  negative one the upper (chord) line ``u (z - l) / (u - l)``. beta-CROWN's split multipliers are
  subtracted from the input coefficients.
* Sound backward: the chord slope and intercept are rounded UP (``(1 + 4u)`` factors: any larger
  slope through ``(l, 0)`` and any larger intercept is still an upper line on ``[l, u]``); lower
  slopes are in ``[0, 1]``, exactly valid; one rounding per entry of ``A'``:
  ``A . relu(z) >= A' . z + fl(c) - gamma_2 |A'| . m_z - gamma_{n+1} |c terms|``; a beta
  subtraction ``T = fl(A' - beta s)`` adds ``gamma_1 |T| . m_z``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

import torch.nn.functional as F

from adcert import ops
from adcert.bounds.registry import register_call
from adcert.bounds.layers.base import Back, Box, ForwardCtx, IbpCtx, Lowerer, Node, Piece, Tensor, \
    Walk, feature_sum, memo_enabled
from adcert.bounds.patches import Patches
from adcert.ops._rounding import gamma, unit_roundoff, up


def shrunk_relu(mu: Tensor, r: Tensor, shrink: float = 1.0) -> Box:
    """The ReLU of the box ``(mu, r)`` (any shape) with SABR's ReLU-output shrink (Mueller et
    al. 2023; CTBench Table 5 "ReLU shrink ratio", its ``relu_shrinkage``): an unstable neuron
    (``l < 0 < u``) gets the output box ``[0, shrink * u]`` instead of ``[0, u]``; stable ones are
    unchanged. ``shrink = 1`` is :func:`adcert.ops.interval_relu`. For ``shrink < 1`` the box is
    NOT sound (a training heuristic that weakens IBP's regularisation); never certify with it."""
    if shrink == 1.0:
        return ops.interval_relu(mu, r)
    lb, ub = mu - r, mu + r
    ub = torch.where((lb < 0) & (ub > 0), ub * shrink, ub)
    lo, hi = lb.clamp(min=0), ub.clamp(min=0)
    return (hi + lo) / 2, (hi - lo) / 2


def relu_out(mu: Tensor, r: Tensor, ctx: IbpCtx) -> Box:
    """A ReLU in an interval pass: record its input box when collecting, then apply it."""
    if ctx.relu_bounds is not None:
        ctx.relu_bounds.append((mu - r, mu + r))
    return shrunk_relu(mu, r, ctx.relu_shrink)


def sound_relu_out(L: Tensor, U: Tensor, ctx: IbpCtx) -> Box:
    """A ReLU in a sound pass (exact on end points), recording its input box."""
    if ctx.relu_bounds is not None:
        ctx.relu_bounds.append((L, U))
    return L.clamp(min=0), U.clamp(min=0)


def relu_lines(lower: Tensor, upper: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Masks and the upper (chord) line of ReLU on ``[lower, upper]`` (any shape).

    Returns ``(active, unstable, up_slope, up_icpt)``: ``active`` = ``lower >= 0``,
    ``unstable`` = ``lower < 0 < upper``; for unstable neurons the chord
    ``up_slope * z + up_icpt`` with ``up_slope = u / (u - l)``, ``up_icpt = -l u / (u - l)``;
    for stable ones ``up_slope`` is 1 (active) or 0 and ``up_icpt`` 0."""
    active = lower >= 0
    unstable = (lower < 0) & (upper > 0)
    denom = torch.where(unstable, upper - lower, torch.ones_like(upper))
    slope = torch.where(unstable, upper / denom, active.to(upper.dtype))
    icpt = torch.where(unstable, -lower * slope, torch.zeros_like(upper))
    return active, unstable, slope, icpt


def adaptive_alpha(lower: Tensor, upper: Tensor) -> Tensor:
    """CROWN's adaptive lower slope: 1 where ``u >= -l`` else 0 (same shape as the bounds)."""
    return (upper >= -lower).to(upper.dtype)


def relu_backward(A: Tensor, lower: Tensor, upper: Tensor, alpha: Optional[Tensor] = None
                  ) -> Tuple[Tensor, Tensor, Tensor]:
    """Lower-bound back-substitution through a ReLU.

    ``A: [B, S, *shape]``; ``lower, upper: [B, *shape]`` bounds of the ReLU input; ``alpha``:
    lower slopes for unstable neurons, broadcastable to ``A`` (default: adaptive).
    Returns ``(A_new, const, lower_slope)``: ``A . relu(z) >= A_new . z + const`` for every
    ``z`` in the box; ``const: [B, S]``."""
    active, unstable, up_slope, up_icpt = relu_lines(lower, upper)
    if alpha is None:
        alpha = adaptive_alpha(lower, upper).unsqueeze(1)
    lo_slope = torch.where(unstable.unsqueeze(1), alpha, active.unsqueeze(1).to(A.dtype))
    pos, neg = A.clamp(min=0), A.clamp(max=0)
    A_new = pos * lo_slope + neg * up_slope.unsqueeze(1)
    const = (neg * up_icpt.unsqueeze(1)).flatten(2).sum(-1)
    return A_new, const, lo_slope


class ReluPiece(Piece):
    """A ReLU of the lowered network (an activation: its relaxation reads its input box)."""
    is_activation = True
    splittable = True
    folds_source_error = True

    def forward(self, h, weight=None, bias=True):
        return torch.relu(h)

    def sound_box(self, boxes: Sequence[Box]) -> Box:
        L, U = boxes[0]
        return L.clamp(min=0), U.clamp(min=0)

    def init_alpha(self, lower, upper):
        return adaptive_alpha(lower, upper)

    def loose(self, lower, upper):
        return (lower < 0) & (upper > 0)

    def takes_patches(self, walk: Walk) -> bool:
        """Windows pass through unless this walk records coefficients, or has dense slopes or
        multipliers for this ReLU (a slope bank makes its slopes in the windows' form)."""
        k = self.act_index
        return walk.relu_coefs is None and not walk.has_dense_alpha(k) and \
            (walk.betas is None or k not in walk.betas)

    def backward(self, A: Tensor, walk: Walk) -> Back:
        k = self.act_index
        lo, up = walk.boxes[k]
        if walk.relu_coefs is not None:
            walk.relu_coefs[k] = A
        alpha = walk.alpha(self, A)
        beta = None if walk.betas is None else walk.betas.get(k)
        patches = isinstance(A, Patches)
        if not walk.sound and not patches:
            A_new, c, _ = relu_backward(A, lo, up, alpha)
            if beta is not None:
                A_new = A_new - beta
            return Back((A_new,), c)
        # the relaxation's lines on the map, then per row: the window's (patches) or the whole
        # map's, broadcast over the rows; sound: the error weights too (see rounding_error)
        lines = self.lines(lo, up, walk.sound, alpha)
        want = lines[:3]
        if walk.sound:
            want = want + self.error_maps(lines[3], beta is not None, walk.fold)
        if patches:  # on every row's window (with window-form slopes [B, S, C, ph, pw], the
            # unstable mask too)
            C = lo.shape[1]
            if alpha is not None:
                want = want + (self._unstable.to(lo.dtype),)
            got = list(A.gather(torch.cat(want, 1)).split(C, dim=2))
            if alpha is not None:
                got[0] = torch.where(got.pop() > 0, alpha.clamp(0, 1), got[0])
            data = A.data
        else:
            got = [t.unsqueeze(1) for t in want]
            data = A
            if alpha is not None:
                got[0] = torch.where(self._unstable.unsqueeze(1), alpha.clamp(0, 1), got[0])
        lo_slope, slope, icpt = got[:3]
        neg = data.clamp(max=0)
        A_new = data.clamp(min=0) * lo_slope + neg * slope
        const = feature_sum(neg * icpt)
        A_beta = None if beta is None else A_new - beta
        out = A_new if A_beta is None else A_beta
        aux = None
        if walk.sound:
            aux = (A_new, A_beta, got[3:], 0.0 if walk.fold is None else walk.fold[1])
        return Back((A.with_data(out) if patches else out,), const, aux)

    @staticmethod
    def error_maps(m_z: Tensor, beta: bool, fold) -> Tuple[Tensor, ...]:
        """The sound error weights on the input map ``[B, *shape]`` (see
        :meth:`rounding_error`): ``(W_out,)``, or with ``beta`` ``(W_out, 2 gamma_2 m_z)``;
        ``W_out = 2 gamma_c m_z + Q`` weighs the rows handed back (``c = 1`` with ``beta``, else
        2; ``Q``: the folded source errors ``fold = (Q, floor)``, or 0), rounded up."""
        dtype = m_z.dtype
        own = 2 * gamma(1 if beta else 2, dtype) * m_z
        w_out = own if fold is None else up(own + fold[0])
        return (w_out, 2 * gamma(2, dtype) * m_z) if beta else (w_out,)

    def lines(self, lo: Tensor, up: Tensor, sound: bool, alpha) -> Tuple[Tensor, ...]:
        """``(lower slope, upper slope, upper intercept, max(|l|, |u|))`` on the map
        ``[B, *shape]`` (CROWN's adaptive lower slope; sound: the chord rounded up). Memoised
        for the boxes they were computed from (a walk's row chunks reuse them)."""
        memo = getattr(self, "_lines", None) if memo_enabled() else None
        if memo is not None and memo[0] is lo and memo[1] is up and memo[2] == sound:
            self._unstable = memo[4]
            return memo[3]
        active, unstable, slope, icpt = relu_lines(lo, up)
        if sound:  # any larger slope through (l, 0) and larger intercept is still an upper line
            u_r = unit_roundoff(lo.dtype)
            slope = torch.where(unstable, slope * (1 + 4 * u_r), slope)
            icpt = torch.where(unstable, (-lo * slope) * (1 + 4 * u_r), icpt)
        lo_slope = torch.where(unstable, adaptive_alpha(lo, up), active.to(lo.dtype))
        out = (lo_slope, slope, icpt, torch.maximum(lo.abs(), up.abs()))
        self._unstable = unstable
        if memo_enabled():
            self._lines = (lo, up, sound, out, unstable)
        return out

    def rounding_error(self, A: Tensor, back: Back, walk: Walk) -> Tensor:
        """``2 gamma_2 |A'| . m_z + 2 gamma_{n+1} |c terms|`` (with ``beta`` also
        ``+ 2 gamma_1 |A' - beta| . m_z``: one rounding per entry, ``|E| <= gamma_1 |T|``) plus
        underflow; the constant's terms are all <= 0 (negative coefficients times intercepts
        >= 0), so the sum of their magnitudes is ``-const``. The rows handed back
        (``A_out = A' - beta``, or ``A'``) carry their weight ``W_out`` (:meth:`error_maps`),
        which holds the folded errors of the source chain (``walk.fold``, see
        :func:`adcert.bounds.backward.folded_source_error`): the error is computed as
        ``|A_out| . W_out (+ |A'| . 2 gamma_2 m_z with beta) - 2 gamma_{n+1} const``. Every
        weight is non-negative and the factor 2 in each covers the rounding of these sums."""
        dtype = back.const.dtype
        tiny = torch.finfo(dtype).tiny
        A_new, A_beta, weights, floor = back.aux
        n = math.prod(self.out_shape)

        def weighted(t: Tensor, w: Tensor) -> Tensor:
            return (t.abs() * w).flatten(2).sum(-1)

        A_out = A_new if A_beta is None else A_beta
        err = weighted(A_out, weights[0]) - 2 * gamma(n + 1, dtype) * back.const + 2 * n * tiny
        if A_beta is not None:
            err = err + weighted(A_new, weights[1]) + 2 * n * tiny
        return err + floor


@dataclass(frozen=True, eq=False)
class ReluStep(Node):
    """A ReLU not fused into a preceding affine step."""
    module: nn.Module

    @property
    def modules(self):
        return (self.module,)

    def forward(self, h: Tensor, ctx: ForwardCtx) -> Tensor:
        return torch.relu(h)

    def ibp(self, mu, r, ctx: IbpCtx) -> Box:
        if ctx.split:
            return relu_out(mu, r, ctx)
        return ops.interval_relu(mu, r)

    def sound_ibp(self, L, U, ctx: IbpCtx) -> Box:
        return sound_relu_out(L, U, ctx)

    def lower(self, lw: Lowerer) -> None:
        lw.add(ReluPiece())

    def first_module(self):
        return None


@register_call(F.relu, torch.relu, ".relu", ".relu_", names=("F.relu", "torch.relu", ".relu()"))
def _relu_call(args, kwargs, what):
    return nn.ReLU()
