"""Average pooling: ``nn.AvgPool2d``, ``nn.AdaptiveAvgPool2d``, ``F.avg_pool2d``,
``F.adaptive_avg_pool2d``.

Linear with non-negative weights ``1 / count``, so the box maps to ``(pool(mu), pool(r))``
exactly. Sound IBP (``n``-element windows): ``L' = down(pool(L) - 2 gamma_(n+3) pool(|L|) -
(n+3) tiny)``, likewise ``U'`` upward (``n``: the kernel area, or the whole plane for adaptive
pooling). Back-substitution: ``A P``, the vector-Jacobian product of the pooling (exact: the
adjoint of a linear map); sound: ``A' = fl(A P)`` (``t``-term sums, ``t`` = windows covering one
input) with ``|E| <= gamma_{t+2} |A| P``, and the rigorous box ``[P l, P u] -/+ gamma_{k+2} P m``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from adcert.bounds.layers.base import Back, Box, ForwardCtx, IbpCtx, Lowerer, Node, Piece, \
    Tensor, Walk, feature_sum
from adcert.bounds.registry import register_call, register_module, unsupported_call
from adcert.ops._rounding import down, gamma, up


def _pair(v) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def linear_adjoint(fn, A: Tensor, in_shape, out_shape) -> Tensor:
    """``A M`` for a linear map ``M = fn`` on one sample (``A: [B, S, *out_shape]`` ->
    ``[B, S, *in_shape]``): the vector-Jacobian product (differentiable in ``A``)."""
    lead = A.shape[:2]
    flat = A.reshape((-1,) + tuple(out_shape))
    with torch.enable_grad():
        dummy = torch.zeros((flat.shape[0],) + tuple(in_shape), dtype=A.dtype, device=A.device,
                            requires_grad=True)
        (back,) = torch.autograd.grad(fn(dummy), dummy, grad_outputs=flat,
                                      create_graph=A.requires_grad)
    return back.reshape(lead + tuple(in_shape))


class AvgPoolPiece(Piece):
    """An average pooling of the lowered network."""
    dense = True

    def __init__(self, pool: nn.Module):
        self.pool = pool

    def forward(self, h, weight=None, bias=True):
        return self.pool(h)

    def terms(self) -> Tuple[int, int]:
        """``(k, t)``: ``k`` bounds the inputs averaged into one output, ``t`` the outputs one
        input is averaged into (the terms of one entry of ``A P``)."""
        mod = self.pool
        out_hw = math.prod(self.out_shape[1:])
        if isinstance(mod, nn.AvgPool2d):
            kh, kw = _pair(mod.kernel_size)
            sh, sw = _pair(mod.stride if mod.stride else mod.kernel_size)
            t = min(out_hw, -(-kh // sh) * -(-kw // sw))
            return kh * kw, max(1, t)
        return math.prod(self.in_shape[1:]), max(1, out_hw)

    def backward(self, A: Tensor, walk: Walk) -> Back:
        return Back((linear_adjoint(self.pool, A, self.in_shape, self.out_shape),))

    def rounding_error(self, A: Tensor, back: Back, walk: Walk) -> Tensor:
        _, t = self.terms()
        dtype = A.dtype
        m_h = walk.magnitude(self.src)
        return (2 * gamma(t + 2, dtype)
                * feature_sum(linear_adjoint(self.pool, A.abs(), self.in_shape, self.out_shape) * m_h)
                + 2 * (math.prod(self.in_shape) + math.prod(self.out_shape)) * (t + 2)
                * torch.finfo(dtype).tiny)

    def sound_box(self, boxes: Sequence[Box]) -> Box:
        L, U = boxes[0]
        k, _ = self.terms()
        lo, hi = self.pool(L), self.pool(U)
        size = self.pool(torch.maximum(L.abs(), U.abs()))
        err = 2 * gamma(k + 2, L.dtype) * size + (k + 2) * torch.finfo(L.dtype).tiny
        return down(down(lo) - err), -down(down(-hi) - err)


@dataclass(frozen=True, eq=False)
class AvgPoolStep(Node):
    """``nn.AvgPool2d`` or ``nn.AdaptiveAvgPool2d``."""
    module: Union[nn.AvgPool2d, nn.AdaptiveAvgPool2d]

    @property
    def modules(self):
        return (self.module,)

    def forward(self, h: Tensor, ctx: ForwardCtx) -> Tensor:
        return self.module(h)

    def ibp(self, mu: Tensor, r: Tensor, ctx: IbpCtx) -> Box:
        return self.module(mu), self.module(r)  # non-negative weights: exact

    def sound_ibp(self, L: Tensor, U: Tensor, ctx: IbpCtx) -> Box:
        mod = self.module
        if isinstance(mod, nn.AvgPool2d):
            ks = mod.kernel_size if isinstance(mod.kernel_size, tuple) else (mod.kernel_size,) * 2
            n = int(ks[0] * ks[1])
        else:
            n = int(L.shape[-1] * L.shape[-2])
        g = gamma(n + 3, L.dtype)
        tiny = torch.finfo(L.dtype).tiny
        lo = mod(L) - up(2 * g * mod(L.abs()) + (n + 3) * tiny)
        hi = mod(U) + up(2 * g * mod(U.abs()) + (n + 3) * tiny)
        return down(down(lo)), up(up(hi))

    def lower(self, lw: Lowerer) -> None:
        lw.add(AvgPoolPiece(self.module))


register_module(nn.AvgPool2d, nn.AdaptiveAvgPool2d, build=AvgPoolStep)


@register_call(F.avg_pool2d, F.adaptive_avg_pool2d,
               names=("F.avg_pool2d", "F.adaptive_avg_pool2d"))
def _pool_call(args, kwargs, what):
    cls = nn.AdaptiveAvgPool2d if "adaptive" in what else nn.AvgPool2d
    try:
        return AvgPoolStep(cls(*args, **kwargs))
    except TypeError as exc:
        raise unsupported_call(what, f"arguments: {exc}") from exc
