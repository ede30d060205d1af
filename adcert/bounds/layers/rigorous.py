"""Shared rigorous-arithmetic helpers of the sound interval rules (see :mod:`adcert.bounds.sound`
for the scheme): outward rounding, the centre-radius split of an end-point box, and the widening
of a computed affine image."""
from __future__ import annotations

from typing import Optional

import torch

from adcert.bounds.layers.base import Box, Tensor
from adcert.ops._rounding import down, gamma, up


def centre_radius(L: Tensor, U: Tensor) -> Box:
    """Floats ``(c, rho)`` with ``[L, U]`` contained in the real interval ``[c - rho, c + rho]``."""
    c = (L + U) / 2
    return c, torch.maximum(up(U - c), up(c - L))


def channel_view(t: Tensor, ref: Tensor) -> Tensor:
    """A ``[C]`` vector shaped to broadcast over dimension 1 of ``ref: [B, C, *]``."""
    return t.reshape((1, -1) + (1,) * (ref.dim() - 2))


def affine_box(cen: Tensor, rad: Tensor, mag: Tensor, bias_abs: Optional[Tensor],
               bias_err: Optional[Tensor], k: int, rel_w: float, dtype) -> Box:
    """End points from a computed centre ``cen``, radius ``rad`` and magnitude ``mag`` of a
    ``k``-term affine map: ``e = 2 (gamma_(k+2) + rel_w) mag + 2 gamma_(k+2) |b| + 2 E_b +
    (k + 2) tiny``, ``t = up(rad + e)``, ``(down(cen - t), up(cen + t))``."""
    g = gamma(k + 2, dtype)
    tiny = torch.finfo(dtype).tiny
    e = 2 * (g + rel_w) * mag + (k + 2) * tiny
    if bias_abs is not None:
        e = e + 2 * g * bias_abs
    if bias_err is not None:
        e = e + 2 * bias_err
    t = up(rad + e)
    return down(cen - t), up(cen + t)
