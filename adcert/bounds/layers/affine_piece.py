"""Affine pieces ``z = W h + c``: dense (``Linear``, ``Conv2d``) and elementwise (a constant
scale and shift broadcast over one sample: batch norm, ``Normalize``, arithmetic with constants).

Back-substitution: ``A . (W h + c) = (A W) . h + A . c``; a convolution goes back with
``conv_transpose2d`` (with the ``output_padding`` that restores the input size).

Sound rules (see :mod:`adcert.bounds.crown_sound`): the rigorous box is
``W+ l + W- u + b -/+ (2 gamma_{k+2+c} (|W| m + |b|) + k tiny)`` (``m = max(|l|, |u|)``, ``c``
roundings in the coefficients); a backward step's error is
``2 gamma_{k+c+1} (|A||W|) . m_h + 2 gamma_{n+c+1} |A| . |b|`` plus underflow.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from adcert.bounds.layers.base import Back, Box, Piece, Tensor, Walk, feature_sum, memo_enabled
from adcert.bounds.patches import Patches
from adcert.ops._rounding import down, gamma, unit_roundoff, up


class AffinePiece(Piece):
    """Common rules of ``z = W h + c``. Subclasses give :meth:`forward` (with ``weight``
    overriding ``W`` and ``bias=False`` dropping ``c``), :meth:`apply_transpose` (``A W``),
    :meth:`bias_term` and :attr:`dot_length`.

    ``bias_mag``: upper bounds of the magnitudes of the terms summed into ``bias`` (sound mode;
    ``None`` = ``|bias|``); ``coef_rel_err``: roundings in computing ``weight``/``bias`` from the
    model (sound mode)."""

    def __init__(self, weight: Optional[Tensor], bias: Optional[Tensor],
                 bias_mag: Optional[Tensor] = None, coef_rel_err: int = 0):
        self.weight, self.bias = weight, bias
        self.bias_mag, self.coef_rel_err = bias_mag, coef_rel_err

    dot_length = 1

    def apply_transpose(self, A: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        raise NotImplementedError

    def bias_term(self, A: Tensor, magnitude: bool = False) -> Optional[Tensor]:
        raise NotImplementedError

    def bias_view(self, t: Tensor, ndim: int) -> Tensor:
        """A per-output bias vector reshaped to broadcast over ``[N, *out_shape]``."""
        raise NotImplementedError

    def _bias_mag(self) -> Optional[Tensor]:
        if self.bias is None:
            return None
        return self.bias_mag if self.bias_mag is not None else self.bias.abs()

    def bias_value(self, magnitude: bool = False) -> Optional[Tensor]:
        """``c`` (``None`` without a bias), or with ``magnitude`` its magnitude bound."""
        return self._bias_mag() if magnitude else self.bias

    # -- back-substitution -------------------------------------------------------------
    def backward(self, A: Tensor, walk: Walk) -> Back:
        if isinstance(A, Patches):
            return self.backward_patches(A)
        return Back((self.apply_transpose(A),), self.bias_term(A))

    def backward_patches(self, A: Patches) -> Back:
        raise NotImplementedError

    def error_weights(self, walk: Walk) -> Tensor:
        """``Q = 2 gamma_k |W| m_h + 2 gamma_n |b|``: ``[B, *out_shape]``, so that a backward step's
        rounding error is ``|A| . Q`` (see :meth:`rounding_error`); ``m_h = max(|l|, |u|)`` of
        the source box. Memoised for the box it was computed from: every chunk of a walk's rows
        reuses it."""
        box = walk.hook.out_boxes[self.src]
        memo = getattr(self, "_error_weights", None) if memo_enabled() else None
        if memo is not None and memo[0] is box[0]:
            return memo[1]
        dtype = box[0].dtype
        m_h = torch.maximum(box[0].abs(), box[1].abs())
        k = self.dot_length + self.coef_rel_err + 1
        q = 2 * gamma(k, dtype) * self.forward(m_h, self.weight.abs(), bias=False)
        if self.bias is not None:
            n = math.prod(self.out_shape) + self.coef_rel_err + 1
            q = q + 2 * gamma(n, dtype) * self.bias_view(self._bias_mag(), q.dim())
        if memo_enabled():
            self._error_weights = (box[0], q)
        return q

    def error_floor(self, dtype) -> float:
        """The underflow allowance of a backward step's error (:meth:`rounding_error`)."""
        return 2 * (math.prod(self.in_shape) + 2 * math.prod(self.out_shape)) * \
            torch.finfo(dtype).tiny

    def folded_error(self, walk: Walk):
        q = self.error_weights(walk)
        return q, self.error_floor(q.dtype)

    def rounding_error(self, A: Tensor, back: Back, walk: Walk) -> Tensor:
        """``2 gamma_k (|A||W|) . m_h + 2 gamma_n |A| . |b|``, computed as ``|A| . Q`` with
        ``Q = 2 gamma_k |W| m_h + 2 gamma_n |b|`` (:meth:`error_weights`): equal in real
        arithmetic, ``(|A||W|) . m = |A| . (|W| m)``, and one forward product of the box per
        piece instead of a transposed product per row. Every factor is non-negative, so the
        floating-point value is within a factor ``1 -/+ gamma`` of the exact one, which the
        factor 2 covers; plus underflow."""
        q = self.error_weights(walk)
        if isinstance(A, Patches):
            err = (A.data.abs() * A.gather(q)).flatten(2).sum(-1)
        else:
            err = torch.einsum("bsn,bn->bs", A.abs().flatten(2),
                               q.flatten(1).expand(A.shape[0], -1))
        return err + self.error_floor(A.dtype)

    # -- rigorous box ------------------------------------------------------------------
    def sound_box(self, boxes: Sequence[Box]) -> Box:
        L, U = boxes[0]
        tiny = torch.finfo(L.dtype).tiny
        w = self.weight
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        lo = self.forward(L, wp, bias=False) + self.forward(U, wn, bias=False)
        hi = self.forward(U, wp, bias=False) + self.forward(L, wn, bias=False)
        m = torch.maximum(L.abs(), U.abs())
        k = self.dot_length + 2 + self.coef_rel_err
        size = self.forward(m, w.abs(), bias=False)
        if self.bias is not None:
            b = self.bias_view(self.bias, lo.dim())
            lo, hi = lo + b, hi + b
            size = size + self.bias_view(self._bias_mag(), lo.dim())
        err = 2 * gamma(k, L.dtype) * size + k * tiny
        return down(down(lo) - err), -down(down(-hi) - err)


class LinearPiece(AffinePiece):
    """``nn.Linear``: ``weight [out, in]``, ``bias [out]``."""
    dense = True

    @property
    def dot_length(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, h, weight=None, bias=True):
        return F.linear(h, self.weight if weight is None else weight,
                        self.bias if bias else None)

    def apply_transpose(self, A, weight=None):
        return A.matmul(self.weight if weight is None else weight)

    def bias_term(self, A, magnitude=False):
        c = self.bias_value(magnitude)
        return None if c is None else A.matmul(c)

    def bias_view(self, t, ndim):
        return t


class ChannelBias:
    """The bias rules of pieces whose bias is per channel (dimension 1 of ``[B, C, *]``)."""

    def bias_term(self, A, magnitude=False):
        c = self.bias_value(magnitude)
        if c is None:
            return None
        per_channel = A.sum(dim=tuple(range(3, A.dim()))) if A.dim() > 3 else A
        return per_channel.matmul(c)

    def bias_view(self, t, ndim):
        return t.reshape((1, -1) + (1,) * (ndim - 2))


class ConvPiece(ChannelBias, AffinePiece):
    """``nn.Conv2d``: its weight and bias plus ``stride/padding/dilation/groups``."""
    dense = True

    def __init__(self, weight, bias, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                 **kw):
        super().__init__(weight, bias, **kw)
        self.stride, self.padding = tuple(stride), tuple(padding)
        self.dilation, self.groups = tuple(dilation), int(groups)

    @property
    def dot_length(self) -> int:
        w = self.weight
        return int(w.shape[0] // self.groups * w.shape[2] * w.shape[3])

    def forward(self, h, weight=None, bias=True):
        return F.conv2d(h, self.weight if weight is None else weight,
                        self.bias if bias else None, self.stride, self.padding, self.dilation,
                        self.groups)

    def takes_patches(self, walk: Walk) -> bool:
        return self.groups == 1

    def backward_patches(self, A: Patches) -> Back:
        """The transposed convolution of every row's window (no padding: the window grows by
        the kernel's reach, its corner moves to ``top * stride - padding``), masked to the
        input map; the bias term sums each row's (masked) window per channel."""
        B, S, C, ph, pw = A.data.shape
        back = F.conv_transpose2d(A.data.reshape(B * S, C, ph, pw), self.weight, None,
                                  self.stride, 0, 0, 1, self.dilation)
        out = Patches(back.reshape((B, S) + tuple(back.shape[1:])),
                      A.top * self.stride[0] - self.padding[0],
                      A.left * self.stride[1] - self.padding[1], self.in_shape).masked()
        const = None if self.bias is None else A.channel_sums().matmul(self.bias)
        return Back((out.to_dense() if out.covers_map() else out,), const)

    def apply_transpose(self, A, weight=None):
        w = self.weight if weight is None else weight
        lead = A.shape[:2]
        flat = A.reshape((-1,) + self.out_shape)
        out_hw = []
        for i in range(2):
            k = w.shape[2 + i]
            full = ((self.out_shape[1 + i] - 1) * self.stride[i] - 2 * self.padding[i]
                    + self.dilation[i] * (k - 1) + 1)
            out_hw.append(self.in_shape[1 + i] - full)
        back = F.conv_transpose2d(flat, w, None, self.stride, self.padding, tuple(out_hw),
                                  self.groups, self.dilation)
        return back.reshape(lead + self.in_shape)

class ChannelPiece(ChannelBias, AffinePiece):
    """A per-channel scale and shift: ``weight``, ``bias`` are ``[C]`` acting on dimension 1 of
    ``[B, C, *]`` (batch norm with resolved statistics, ``Normalize``)."""

    def forward(self, h, weight=None, bias=True):
        w = self.weight if weight is None else weight
        z = h * self.bias_view(w, h.dim())
        return z + self.bias_view(self.bias, h.dim()) if (bias and self.bias is not None) else z

    def apply_transpose(self, A, weight=None):
        w = self.weight if weight is None else weight
        return A * w.reshape((1, 1, -1) + (1,) * (A.dim() - 3))

    diagonal = True

    def takes_patches(self, walk: Walk) -> bool:
        return len(self.in_shape) == 3

    def pull_error_weights(self, Q: Tensor) -> Tensor:
        """``|w| Q`` rounded up, times ``1 + 4u``: the rows on the input are ``fl(A w)``, at
        most ``(1 + u) |A| |w|`` entrywise."""
        return up(up(self.forward(Q, self.weight.abs(), bias=False)) *
                  (1 + 4 * unit_roundoff(Q.dtype)))

    def backward_patches(self, A: Patches) -> Back:
        out = A.with_data(A.data * self.weight.reshape(1, 1, -1, 1, 1))
        const = None if self.bias is None else A.channel_sums().matmul(self.bias)
        return Back((out,), const)


class ElementwisePiece(AffinePiece):
    """``z = h * weight + bias`` with ``weight`` / ``bias`` (either may be ``None``: 1 / 0)
    broadcast over one sample: tensors of shape ``[*s]`` broadcastable to ``in_shape``
    (arithmetic with constants or buffers, per element or per channel)."""

    def _b(self, t: Tensor, ndim: int) -> Tensor:
        return t.reshape((1,) * (ndim - t.dim()) + tuple(t.shape))

    def forward(self, h, weight=None, bias=True):
        w = self.weight if weight is None else weight
        z = h * self._b(w, h.dim()) if w is not None else h
        return z + self._b(self.bias, h.dim()) if (bias and self.bias is not None) else z

    def apply_transpose(self, A, weight=None):
        w = self.weight if weight is None else weight
        return A * self._b(w, A.dim()) if w is not None else A

    def bias_term(self, A, magnitude=False):
        c = self.bias_value(magnitude)
        return None if c is None else feature_sum(A * self._b(c, A.dim()))

    def bias_view(self, t, ndim):
        return self._b(t, ndim)

    def sound_box(self, boxes: Sequence[Box]) -> Box:
        if self.weight is None:  # a pure shift: one rounded addition per entry
            L, U = boxes[0]
            tiny = torch.finfo(L.dtype).tiny
            b = self._b(self.bias, L.dim())
            if self.coef_rel_err == 0:
                return down(L + b), up(U + b)
            err = 2 * gamma(self.coef_rel_err + 1, L.dtype) * self._b(self._bias_mag(), L.dim())
            return down(down(L + b) - (err + tiny)), up(up(U + b) + (err + tiny))
        return super().sound_box(boxes)

    def folded_error(self, walk: Walk):
        return None  # its own rule (:meth:`rounding_error`), not folded into a consumer's

    def rounding_error(self, A, back, walk):
        if self.weight is None:  # A passes unchanged: only the constant's sum is rounded
            if back.const is None:
                return None
            dtype = A.dtype
            n = math.prod(self.out_shape) + self.coef_rel_err + 1
            return (2 * gamma(n, dtype) * self.bias_term(A.abs(), magnitude=True)
                    + 2 * math.prod(self.out_shape) * torch.finfo(dtype).tiny)
        return super().rounding_error(A, back, walk)

