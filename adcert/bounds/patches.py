"""Receptive-field ("patches") coefficients for the backward walk.

A CROWN row that bounds ONE neuron of a convolutional layer only has non-zero coefficients in
that neuron's receptive field. :class:`Patches` holds each row's coefficients on a small window
of the feature map -- ``data: [B, S, C, ph, pw]`` and the window's top-left corner
``(top, left): [B, S]`` in map coordinates -- instead of the whole map ``[B, S, C, H, W]``, so
the back-substitution through a chain of convolutions costs what the receptive field costs, not
what the map costs (auto_LiRPA's patches mode is the same idea).

Invariant: entries of ``data`` at positions outside the map are zero (:meth:`Patches.masked`),
so sums over a window are sums over real neurons. Pieces that know patches (conv, per-channel
affine, ReLU) transform them; any other piece gets :meth:`Patches.to_dense` first, as does a
window that has grown as large as the map.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


@dataclass
class Patches:
    """Coefficients ``data: [B, S, C, ph, pw]`` on the windows at ``(top, left): [B, S]`` of a
    ``map_shape = (C, H, W)`` feature map (one window per row)."""
    data: Tensor
    top: Tensor
    left: Tensor
    map_shape: Tuple[int, int, int]
    # (flat map index [B, 1, S*ph*pw], inside [B, S, ph, pw]): computed once per window set
    _index: Optional[Tuple[Tensor, Tensor]] = field(default=None, repr=False, compare=False)

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def window(self) -> Tuple[int, int]:
        return int(self.data.shape[-2]), int(self.data.shape[-1])

    def positions(self) -> Tuple[Tensor, Tensor, Tensor]:
        """``(ys, xs, inside)``: map rows ``[B, S, ph]`` and columns ``[B, S, pw]`` of every
        window entry and whether it lies in the map ``[B, S, ph, pw]``."""
        ph, pw = self.window
        _, H, W = self.map_shape
        dev = self.top.device
        ys = self.top.unsqueeze(-1) + torch.arange(ph, device=dev)
        xs = self.left.unsqueeze(-1) + torch.arange(pw, device=dev)
        inside = ((ys >= 0) & (ys < H)).unsqueeze(-1) & ((xs >= 0) & (xs < W)).unsqueeze(-2)
        return ys, xs, inside

    def index(self) -> Tuple[Tensor, Tensor]:
        """``(flat, inside)``: the map index ``[B, 1, S*ph*pw]`` of every window entry (clamped
        into the map) and whether it lies in the map ``[B, S, ph, pw]`` (cached)."""
        if self._index is None:
            ys, xs, inside = self.positions()
            _, H, W = self.map_shape
            B, S = self.top.shape
            yc, xc = ys.clamp(0, H - 1), xs.clamp(0, W - 1)
            flat = (yc.unsqueeze(-1) * W + xc.unsqueeze(-2)).reshape(B, 1, -1)
            self._index = (flat, inside)
        return self._index

    def masked(self) -> "Patches":
        """The same patches with the entries outside the map set to zero."""
        _, inside = self.index()
        data = self.data * inside.unsqueeze(2).to(self.data.dtype)
        return Patches(data, self.top, self.left, self.map_shape, self._index)

    def gather(self, t: Tensor) -> Tensor:
        """``t: [B, C, H, W]`` (or ``[B, 1, C, H, W]``) at every window entry:
        ``[B, S, C, ph, pw]``. Entries outside the map hold the value at the nearest map
        position (finite, not 0): every use multiplies them by ``data``, which is 0 there (the
        class invariant), so masking them again would only cost a pass over the window."""
        if t.dim() == 5:
            t = t[:, 0]
        flat, inside = self.index()
        _, H, W = self.map_shape
        B, S = self.top.shape
        C = t.shape[1]
        vals = t.reshape(B, C, H * W).gather(2, flat.expand(B, C, flat.shape[-1]))
        ph, pw = self.window
        return vals.reshape(B, C, S, ph, pw).permute(0, 2, 1, 3, 4)

    def to_dense(self) -> Tensor:
        """``[B, S, C, H, W]``: every row's coefficients on the whole map."""
        ys, xs, inside = self.positions()
        C, H, W = self.map_shape
        B, S = self.top.shape
        ph, pw = self.window
        flat = (ys.clamp(0, H - 1).unsqueeze(-1) * W + xs.clamp(0, W - 1).unsqueeze(-2))
        data = self.data * inside.unsqueeze(2).to(self.data.dtype)
        out = self.data.new_zeros(B, S, C, H * W)
        idx = flat.reshape(B, S, 1, ph * pw).expand(B, S, C, ph * pw)
        out.scatter_add_(3, idx, data.reshape(B, S, C, ph * pw))
        return out.reshape(B, S, C, H, W)

    def channel_sums(self) -> Tensor:
        """``[B, S, C]``: each row's coefficients summed over its window, per channel."""
        return self.data.sum(dim=(-2, -1))

    def with_data(self, data: Tensor) -> "Patches":
        """The same windows holding ``data`` (the cached index travels along)."""
        return Patches(data, self.top, self.left, self.map_shape, self._index)

    def covers_map(self) -> bool:
        """Whether the window is as large as the map (dense is then no more expensive)."""
        ph, pw = self.window
        return ph >= self.map_shape[1] and pw >= self.map_shape[2]


def unit_patches(idx: Tensor, shape: Tuple[int, int, int], dtype, sign: bool = True
                 ) -> Patches:
    """Rows ``[e_j; -e_j]`` for the neurons ``idx: [B, n]`` (flat indices into one sample's
    ``(C, H, W)``) as 1x1 patches: ``[B, 2n, C, 1, 1]``."""
    C, H, W = shape
    B, n = idx.shape
    c, rest = idx // (H * W), idx % (H * W)
    y, x = rest // W, rest % W
    data = torch.zeros(B, n, C, 1, 1, dtype=dtype, device=idx.device)
    data.scatter_(2, c.reshape(B, n, 1, 1, 1), 1.0)
    data = torch.cat([data, -data], 1)
    return Patches(data, torch.cat([y, y], 1), torch.cat([x, x], 1), shape)
