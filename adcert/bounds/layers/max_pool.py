"""Max pooling: ``nn.MaxPool2d`` and ``F.max_pool2d`` (any kernel, stride, padding, dilation;
overlapping windows included; ``ceil_mode`` and ``return_indices`` are refused).

* IBP: max pooling is monotone, so ``[pool(l), pool(u)]`` is the exact image of the box.
* Sound IBP: the same (a maximum rounds nothing).
* Relaxation (per window ``j`` with inputs ``x_i``, bounds ``[l_i, u_i]``; the standard one, as in
  auto_LiRPA's ``BoundMaxPool``): ``i*`` = the input with the largest lower bound. Lower line:
  ``z_j >= x_{i*}`` (a max is at least any of its inputs). Upper line: if ``i*`` dominates
  (``l_{i*} >=`` every other input's upper bound) the window's output IS ``x_{i*}``, so
  ``z_j <= x_{i*}``; otherwise the constant ``z_j <= max_i u_i``. Padding never wins (it is
  ``-inf`` for max pooling). The relaxation has no free parameters (alpha-CROWN leaves it as is).
* Sound backward: ``A'`` sums at most ``t`` window contributions per input (``t`` windows cover
  one input), each an exact product of ``A`` with 0 or 1: ``|E| <= gamma_t |A'|``; the constant
  ``sum A- max u`` has ``n`` rounded products and sums: ``gamma_{n+1} sum |A-| |max u|``.

An activation: its input bounds are computed (IBP, tightened by CROWN) before its relaxation is
used, and are reported in ``relu_bounds`` in order with the ReLUs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from adcert.bounds.layers.base import Back, Box, ForwardCtx, IbpCtx, Lowerer, Node, Piece, \
    Tensor, Walk, feature_sum, memo_enabled
from adcert.bounds.registry import register_call, register_module, unsupported_call
from adcert.ops._rounding import gamma


def _pair(v) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass(frozen=True)
class PoolGeometry:
    """``kernel``, ``stride``, ``padding``, ``dilation`` as int pairs."""
    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]

    def pool(self, t: Tensor) -> Tensor:
        return F.max_pool2d(t, self.kernel, self.stride, self.padding, self.dilation)

    def windows(self, t: Tensor, fill: float) -> Tensor:
        """``t: [N, H, W]`` -> ``[N, K, P]``: every window's ``K`` entries, ``P`` windows
        (padding filled with ``fill``)."""
        ph, pw = self.padding
        padded = F.pad(t.unsqueeze(1), (pw, pw, ph, ph), value=fill)
        return F.unfold(padded, self.kernel, dilation=self.dilation, stride=self.stride)

    @property
    def overlap(self) -> int:
        """The most windows one input can belong to."""
        return math.prod(-(-(d * (k - 1) + 1) // s) for k, s, d in
                         zip(self.kernel, self.stride, self.dilation))


class MaxPoolPiece(Piece):
    """A max pooling of the lowered network (an activation)."""
    is_activation = True

    def __init__(self, geometry: PoolGeometry):
        self.geometry = geometry
        self._memo = None

    def forward(self, h, weight=None, bias=True):
        return self.geometry.pool(h)

    def sound_box(self, boxes: Sequence[Box]) -> Box:
        L, U = boxes[0]
        return self.geometry.pool(L), self.geometry.pool(U)

    def relaxation(self, lo: Tensor, up: Tensor):
        """``(index, dominant, max_upper)``, each ``[B, C, P]``: the flat input index (into
        ``H*W``) of every window's ``i*``, whether it dominates, and the window's largest upper
        bound. Memoised for the boxes it was computed from (alpha-CROWN reuses them)."""
        memo = self._memo if memo_enabled() else None
        if memo is not None and memo[0] is lo and memo[1] is up:
            return memo[2]
        B, C, H, W = lo.shape
        g = self.geometry
        lw = g.windows(lo.reshape(B * C, H, W), -math.inf)
        uw = g.windows(up.reshape(B * C, H, W), -math.inf)
        ids = torch.arange(H * W, dtype=torch.float64, device=lo.device).reshape(1, H, W)
        iw = g.windows(ids, -1.0)  # [1, K, P]
        star = lw.argmax(1, keepdim=True)  # [BC, 1, P]
        l_star = lw.gather(1, star)[:, 0]
        others = uw.scatter(1, star, -math.inf).amax(1)
        dominant = l_star >= others
        max_upper = uw.amax(1)
        index = iw.expand(B * C, -1, -1).gather(1, star)[:, 0].long()
        P = index.shape[-1]
        out = (index.reshape(B, C, P), dominant.reshape(B, C, P), max_upper.reshape(B, C, P))
        if memo_enabled():
            self._memo = (lo, up, out)
        return out

    def backward(self, A: Tensor, walk: Walk) -> Back:
        lo, up = walk.boxes[self.act_index]
        index, dominant, max_upper = self.relaxation(lo, up)
        B, S = A.shape[:2]
        C, H, W = self.in_shape
        Af = A.reshape(B, S, C, -1)
        pos, neg = Af.clamp(min=0), Af.clamp(max=0)
        dom = dominant.unsqueeze(1).to(A.dtype)
        coef = pos + neg * dom
        terms = neg * (1 - dom) * max_upper.unsqueeze(1)
        idx = index.unsqueeze(1).expand(B, S, C, index.shape[-1])
        A_in = Af.new_zeros(B, S, C, H * W).scatter_add(3, idx, coef)
        const = feature_sum(terms)
        aux = (idx, coef.abs(), terms) if walk.sound else None
        return Back((A_in.reshape((B, S) + tuple(self.in_shape)),), const, aux)

    def rounding_error(self, A: Tensor, back: Back, walk: Walk) -> Tensor:
        idx, abs_coef, terms = back.aux
        dtype = A.dtype
        B, S = A.shape[:2]
        C, H, W = self.in_shape
        lo, up = walk.boxes[self.act_index]
        m_h = torch.maximum(lo.abs(), up.abs()).unsqueeze(1)
        spread = A.new_zeros(B, S, C, H * W).scatter_add(3, idx, abs_coef)
        n = math.prod(self.out_shape)
        return (2 * gamma(self.geometry.overlap, dtype)
                * feature_sum(spread.reshape((B, S) + tuple(self.in_shape)) * m_h)
                + 2 * gamma(n + 1, dtype) * feature_sum(terms.abs())
                + 2 * (n + math.prod(self.in_shape)) * torch.finfo(dtype).tiny)


@dataclass(frozen=True, eq=False)
class MaxPoolStep(Node):
    """``F.max_pool2d`` with the given geometry; ``module``: the ``nn.MaxPool2d`` if any."""
    geometry: PoolGeometry
    module: nn.Module = None

    @property
    def modules(self):
        return (self.module,) if self.module is not None else ()

    @staticmethod
    def build(kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
              return_indices=False, module=None, what="max pooling") -> "MaxPoolStep":
        if ceil_mode or return_indices:
            raise unsupported_call(what, "ceil_mode=True / return_indices=True")
        stride = kernel_size if stride is None or stride == [] else stride
        geo = PoolGeometry(_pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation))
        return MaxPoolStep(geo, module)

    def _check(self, t: Tensor) -> None:
        if t.dim() != 4:
            raise ValueError(f"x: max pooling needs a [B, C, H, W] input, got shape "
                             f"{tuple(t.shape)}")

    def forward(self, h: Tensor, ctx: ForwardCtx) -> Tensor:
        return self.geometry.pool(h)

    def ibp(self, mu: Tensor, r: Tensor, ctx: IbpCtx) -> Box:
        self._check(mu)
        lo, up = mu - r, mu + r
        if ctx.relu_bounds is not None:
            ctx.relu_bounds.append((lo, up))
        lo, up = self.geometry.pool(lo), self.geometry.pool(up)
        return (up + lo) / 2, (up - lo) / 2

    def sound_ibp(self, L: Tensor, U: Tensor, ctx: IbpCtx) -> Box:
        self._check(L)
        if ctx.relu_bounds is not None:
            ctx.relu_bounds.append((L, U))
        return self.geometry.pool(L), self.geometry.pool(U)

    def lower(self, lw: Lowerer) -> None:
        if len(lw.shape) != 3:
            raise ValueError(f"x: max pooling needs a [B, C, H, W] input, got one-sample shape "
                             f"{lw.shape}")
        lw.add(MaxPoolPiece(self.geometry))


@register_module(nn.MaxPool2d)
def _max_pool_module(m: nn.MaxPool2d) -> MaxPoolStep:
    return MaxPoolStep.build(m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                             m.return_indices, module=m,
                             what=f"nn.MaxPool2d{(m.kernel_size, m.stride)}")


@register_call(F.max_pool2d, torch.max_pool2d, names=("F.max_pool2d", "torch.max_pool2d"))
def _max_pool_call(args, kwargs, what):
    try:
        return MaxPoolStep.build(*args, **kwargs, what=what)
    except TypeError as exc:
        raise unsupported_call(what, f"arguments: {exc}") from exc
