"""S-shaped activations: ``nn.Sigmoid`` / ``torch.sigmoid`` / ``.sigmoid()`` and ``nn.Tanh`` /
``torch.tanh`` / ``.tanh()``.

Both are increasing, with an even derivative ``f'`` that increases on ``(-inf, 0]`` (``f`` convex
there) and decreases on ``[0, inf)`` (concave).

* IBP: ``[f(l), f(u)]`` (monotone, exact).
* Relaxation. Any slope ``k`` gives valid lines ``k x + b_low <= f(x) <= k x + b_up`` on
  ``[l, u]`` with the OPTIMAL intercepts ``b_low = min g``, ``b_up = max g`` of
  ``g(x) = f(x) - k x``. With ``k = f'(d)`` (the tangent slope at a point ``d``), ``g' = f' - k``
  vanishes exactly at ``-|d|`` (a local minimum, on the convex side) and ``+|d|`` (a local
  maximum), so ``b_low = min(g(l), g(u), g(-|d|) if it lies in [l, u])`` and
  ``b_up = max(g(l), g(u), g(|d|) if in [l, u])``: exact, for ANY ``d``. On the convex side the
  lower line is the tangent at ``d``; on the concave side the upper one.
  CROWN's choice: ``d`` with ``f'(d)`` = the chord slope ``(f(u) - f(l)) / (u - l)``, so one line
  is the chord and the other the parallel tangent. alpha-CROWN optimises the tangent point per
  neuron and per specification row, ``d = l + alpha (u - l)``, ``alpha`` in ``[0, 1]`` (the
  sign of the row's coefficient picks which of the two lines is used).
* Sound mode (IBP, boxes and backward): ``torch.sigmoid`` / ``torch.tanh`` are assumed accurate to
  within 8 units of roundoff (absolute; ``|f| <= 1``), so values of ``f`` and ``f'`` carry an
  absolute error ``<= 16 u``: boxes are widened by ``16 u``, intercepts by
  ``64 u (1 + 2 max(|l|, |u|))`` (which covers the slope's error over the interval and the
  rounding of ``g``), and the backward step charges ``gamma_2 |A'| . m + gamma_{n+1} |c terms|``
  like a ReLU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import nn

from adcert.bounds.layers.base import Back, Box, ForwardCtx, IbpCtx, Lowerer, Node, Piece, \
    Tensor, Walk, feature_sum, memo_enabled
from adcert.bounds.registry import register_call, register_module
from adcert.ops._rounding import down, gamma, unit_roundoff, up


def _sigmoid_grad(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 - s)


def _sigmoid_tangent_point(k: Tensor) -> Tensor:
    """``d >= 0`` with ``sigmoid'(d) = k`` for ``k`` in ``(0, 1/4]``."""
    root = torch.sqrt((1 - 4 * k).clamp(min=0))
    s = (1 + root) / 2
    return torch.log(s) - torch.log1p(-s).clamp(min=-1e4)


def _tanh_grad(x: Tensor) -> Tensor:
    t = torch.tanh(x)
    return 1 - t * t


def _tanh_tangent_point(k: Tensor) -> Tensor:
    """``d >= 0`` with ``tanh'(d) = k`` for ``k`` in ``(0, 1]``."""
    t = torch.sqrt((1 - k).clamp(min=0))
    return torch.atanh(t.clamp(max=1 - 1e-7 if t.dtype == torch.float32 else 1 - 1e-15))


@dataclass(frozen=True)
class SShape:
    """One S-shaped function: ``f``, its derivative, the inverse of the derivative on
    ``[0, inf)`` and the derivative's maximum ``f'(0)``."""
    name: str
    f: Callable[[Tensor], Tensor]
    grad: Callable[[Tensor], Tensor]
    tangent_point: Callable[[Tensor], Tensor]
    grad_max: float


SIGMOID = SShape("Sigmoid", torch.sigmoid, _sigmoid_grad, _sigmoid_tangent_point, 0.25)
TANH = SShape("Tanh", torch.tanh, _tanh_grad, _tanh_tangent_point, 1.0)

_EVAL_ULPS = 16  # absolute error of f, f' in units of roundoff (see the module docstring)


def chord_point(fn: SShape, lo: Tensor, up: Tensor) -> Tensor:
    """CROWN's tangent point: ``d`` with ``f'(d)`` = the chord slope on ``[lo, up]`` (``d`` in
    ``[lo, up]`` where possible; the midpoint for degenerate intervals)."""
    width = up - lo
    mid = (lo + up) / 2
    wide = width > 1e-6 * (1 + mid.abs())
    safe = torch.where(wide, width, torch.ones_like(width))
    k = torch.where(wide, (fn.f(up) - fn.f(lo)) / safe, fn.grad(mid))
    k = k.clamp(min=torch.finfo(lo.dtype).tiny, max=fn.grad_max)
    d = fn.tangent_point(k)
    d = torch.where((lo <= -d) & (-d <= up), -d, torch.where((lo <= d) & (d <= up), d, mid))
    return torch.where(wide, d, mid)


def lines(fn: SShape, lo: Tensor, up: Tensor, d: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(k, b_low, b_up)`` for the tangent point ``d`` (broadcast with ``lo, up``): slope
    ``k = f'(d)`` and the optimal intercepts on ``[lo, up]`` (see the module docstring)."""
    k = fn.grad(d)
    c = d.abs()
    g_lo, g_up = fn.f(lo) - k * lo, fn.f(up) - k * up
    inf = torch.full_like(g_lo, math.inf)
    low_in = (lo <= -c) & (-c <= up)
    up_in = (lo <= c) & (c <= up)
    b_low = torch.minimum(torch.minimum(g_lo, g_up),
                          torch.where(low_in, fn.f(-c) + k * c, inf))
    b_up = torch.maximum(torch.maximum(g_lo, g_up),
                         torch.where(up_in, fn.f(c) - k * c, -inf))
    return k, b_low, b_up


class SShapePiece(Piece):
    """Sigmoid or Tanh in the lowered network (an activation)."""
    is_activation = True

    def __init__(self, fn: SShape):
        self.fn = fn
        self._memo = None

    def forward(self, h, weight=None, bias=True):
        return self.fn.f(h)

    def sound_box(self, boxes: Sequence[Box]) -> Box:
        L, U = boxes[0]
        return sound_image(self.fn, L, U)

    def _chord(self, lo: Tensor, up: Tensor) -> Tensor:
        memo = self._memo if memo_enabled() else None
        if memo is not None and memo[0] is lo and memo[1] is up:
            return memo[2]
        d = chord_point(self.fn, lo, up)
        if memo_enabled():
            self._memo = (lo, up, d)
        return d

    def init_alpha(self, lower: Tensor, upper: Tensor) -> Tensor:
        d = self._chord(lower, upper)
        width = upper - lower
        safe = torch.where(width > 0, width, torch.ones_like(width))
        return torch.where(width > 0, (d - lower) / safe, torch.full_like(d, 0.5)).clamp(0, 1)

    def backward(self, A: Tensor, walk: Walk) -> Back:
        lo, hi = walk.boxes[self.act_index]
        alpha = walk.alpha(self, A)
        lo1, up1 = lo.unsqueeze(1), hi.unsqueeze(1)
        if alpha is None:
            d = self._chord(lo, hi).unsqueeze(1)
        else:
            d = lo1 + alpha.clamp(0, 1) * (up1 - lo1)
        k, b_low, b_up = lines(self.fn, lo1, up1, d)
        if walk.sound:
            m = torch.maximum(lo1.abs(), up1.abs())
            slack = _EVAL_ULPS * 4 * unit_roundoff(A.dtype) * (1 + 2 * m)
            b_low, b_up = down(b_low - slack), up(b_up + slack)
        pos, neg = A.clamp(min=0), A.clamp(max=0)
        A_new = A * k
        terms = pos * b_low + neg * b_up
        return Back((A_new,), feature_sum(terms), (A_new, terms) if walk.sound else None)

    def rounding_error(self, A: Tensor, back: Back, walk: Walk) -> Tensor:
        A_new, terms = back.aux
        dtype = A.dtype
        lo, up = walk.boxes[self.act_index]
        m_h = torch.maximum(lo.abs(), up.abs()).unsqueeze(1)
        n = math.prod(self.out_shape)
        return (2 * (gamma(2, dtype) * feature_sum(A_new.abs() * m_h)
                     + gamma(n + 1, dtype) * feature_sum(terms.abs()))
                + 2 * n * torch.finfo(dtype).tiny)


def sound_image(fn: SShape, L: Tensor, U: Tensor) -> Box:
    """A rigorous box of ``f([L, U])`` (monotone; ``f`` accurate to ``_EVAL_ULPS / 2`` units of
    roundoff, absolute)."""
    e = _EVAL_ULPS * unit_roundoff(L.dtype)
    return down(fn.f(L) - e), up(fn.f(U) + e)


@dataclass(frozen=True, eq=False)
class SShapeStep(Node):
    """An elementwise Sigmoid or Tanh; ``module``: the ``nn.Sigmoid``/``nn.Tanh`` if any."""
    fn: SShape
    module: Optional[nn.Module] = None

    @property
    def modules(self):
        return (self.module,) if self.module is not None else ()

    def first_module(self):
        return None

    def forward(self, h: Tensor, ctx: ForwardCtx) -> Tensor:
        return self.fn.f(h)

    def ibp(self, mu: Tensor, r: Tensor, ctx: IbpCtx) -> Box:
        lo, up = mu - r, mu + r
        if ctx.relu_bounds is not None:
            ctx.relu_bounds.append((lo, up))
        lo, up = self.fn.f(lo), self.fn.f(up)
        return (up + lo) / 2, (up - lo) / 2

    def sound_ibp(self, L: Tensor, U: Tensor, ctx: IbpCtx) -> Box:
        if ctx.relu_bounds is not None:
            ctx.relu_bounds.append((L, U))
        return sound_image(self.fn, L, U)

    def lower(self, lw: Lowerer) -> None:
        lw.add(SShapePiece(self.fn))


register_module(nn.Sigmoid, build=lambda m: SShapeStep(SIGMOID, m))
register_module(nn.Tanh, build=lambda m: SShapeStep(TANH, m))


@register_call(torch.sigmoid, ".sigmoid", names=("torch.sigmoid", ".sigmoid()"))
def _sigmoid_call(args, kwargs, what):
    return SShapeStep(SIGMOID)


@register_call(torch.tanh, ".tanh", names=("torch.tanh", ".tanh()"))
def _tanh_call(args, kwargs, what):
    return SShapeStep(TANH)
