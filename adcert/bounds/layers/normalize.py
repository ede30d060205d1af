""":class:`adcert.models.Normalize`: ``(x - mean) / std`` per channel (an exact affine map).

IBP ``((mu - mean) / std, r / |std|)``; sound ``down(down(L - m) / sd)``, ``up(up(U - m) / sd)``
(``sd > 0``, monotone); lowered to a per-channel piece with coefficients ``1 / std`` and
``-mean / std`` (4 roundings charged in sound mode). A user's own normalisation module written
as arithmetic with constants is traced into :mod:`adcert.bounds.layers.arith` steps instead.
"""
from __future__ import annotations

from dataclasses import dataclass

from adcert.bounds.layers.affine_piece import ChannelPiece
from adcert.bounds.layers.base import Box, ForwardCtx, IbpCtx, Lowerer, Node, Tensor
from adcert.bounds.registry import register_module
from adcert.models.normalize import Normalize
from adcert.ops._rounding import down, up


@dataclass(frozen=True, eq=False)
class NormalizeStep(Node):
    """``(x - mean) / std`` (exact affine map)."""
    module: Normalize

    @property
    def modules(self):
        return (self.module,)

    def first_module(self):
        return None

    def forward(self, h: Tensor, ctx: ForwardCtx) -> Tensor:
        return self.module(h)

    def ibp(self, mu: Tensor, r: Tensor, ctx: IbpCtx) -> Box:
        m = self.module
        std = m.channel_view(m.std, mu)
        # |std|: sound even if the buffer was overwritten with negative values after construction
        return (mu - m.channel_view(m.mean, mu)) / std, r / std.abs()

    def sound_ibp(self, L: Tensor, U: Tensor, ctx: IbpCtx) -> Box:
        m = self.module
        sd = m.channel_view(m.std, L)
        if bool((sd <= 0).any()):
            raise ValueError("model: sound bounds need Normalize std > 0 everywhere")
        mean = m.channel_view(m.mean, L)
        return down(down(L - mean) / sd), up(up(U - mean) / sd)

    def lower(self, lw: Lowerer) -> None:
        m = self.module
        std = m.std.to(dtype=lw.dtype, device=lw.device)
        mean = m.mean.to(dtype=lw.dtype, device=lw.device)
        C = lw.shape[0] if len(lw.shape) >= 1 else 1
        scale, shift = (1.0 / std).expand(C), (-mean / std).expand(C)
        lw.add(ChannelPiece(scale.detach(), shift.detach(), bias_mag=shift.abs().detach(),
                            coef_rel_err=4))


register_module(Normalize, build=NormalizeStep)
