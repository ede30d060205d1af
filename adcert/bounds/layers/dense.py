"""``Conv2d`` / ``Linear`` (+ bias), then optionally a batch norm, then optionally ReLU: ONE step.

This fused step is the training fast path: interval propagation runs it as one fused op
(``interval_conv2d_bn_relu`` / ``interval_linear_bn_relu``). Back-substitution lowers it to a
:class:`~adcert.bounds.layers.affine_piece.ConvPiece` / ``LinearPiece`` (with the batch norm
folded in, exact in real arithmetic; the sound mode keeps the batch norm as a separate
:class:`ChannelPiece` and charges its coefficients' rounding) and a ReLU piece.

Sound IBP folds the batch norm with the rigorous fold (:func:`adcert.ops.bn_fold.fold_batch_norm`
with ``sound=True``) and applies the centre-radius affine rule of :mod:`adcert.bounds.sound`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch.nn.functional as F
from torch import nn

from adcert import ops
from adcert.bounds.registry import register_module
from adcert.bounds.layers.affine_piece import ChannelPiece, ConvPiece, LinearPiece
from adcert.bounds.layers.base import Box, ForwardCtx, IbpCtx, Lowerer, Node, Stats, Tensor
from adcert.bounds.layers.relu import ReluPiece, relu_out, sound_relu_out
from adcert.bounds.layers.rigorous import affine_box, centre_radius, channel_view
from adcert.ops.bn_fold import EXACT_FOLD_ROUNDINGS, exact_shift_magnitude, fold_batch_norm

BatchNorm = Union[nn.BatchNorm1d, nn.BatchNorm2d]


def conv_padding(layer: nn.Conv2d) -> Tuple[int, int]:
    """``layer.padding`` as an int pair (``'valid'`` -> 0, symmetric ``'same'`` resolved)."""
    if not isinstance(layer.padding, str):
        return tuple(int(p) for p in layer.padding)  # type: ignore[return-value]
    if layer.padding == "valid":
        return (0, 0)
    pads = []
    for k, d in zip(layer.kernel_size, layer.dilation):
        total = d * (k - 1)
        if total % 2:
            raise NotImplementedError(
                f"model: Conv2d with padding='same' and an even kernel {tuple(layer.kernel_size)}"
                " pads asymmetrically, which compute_bounds does not support")
        pads.append(total // 2)
    return (pads[0], pads[1])


def bn_channel_piece(bn: nn.Module, stats: Stats, lw: Lowerer) -> ChannelPiece:
    """A batch norm with resolved statistics as a per-channel piece (exact-mode coefficients; the
    sound mode charges their rounding as :data:`EXACT_FOLD_ROUNDINGS`)."""
    mean, var = stats[bn]
    fold = fold_batch_norm(mean, var, bn.weight, bn.bias, bn.eps)
    mag = exact_shift_magnitude(mean, fold.scale, bn.bias)
    return ChannelPiece(lw.detach(fold.scale), lw.detach(fold.shift), bias_mag=lw.detach(mag),
                        coef_rel_err=EXACT_FOLD_ROUNDINGS)


def bn_normalise(bn: nn.Module, h: Tensor, ctx: ForwardCtx) -> Tensor:
    """The batch norm of ``h`` in a clean forward (statistics per :class:`ForwardCtx`)."""
    from adcert.bounds import bn as bnlib  # local: bounds.bn imports nothing from here
    mean, var = bnlib.pick_stats(bn, h, ctx.given, ctx.collect, ctx.model_training)
    return bnlib.normalise(bn, h, mean, var)


@dataclass(frozen=True, eq=False)
class AffineStep(Node):
    """``Conv2d`` or ``Linear`` (+ bias), then optionally a batch norm, then optionally ReLU.

    ``modules`` are the original modules fused into this step, in order (for error messages and
    for methods that need per-layer state, e.g. alpha-CROWN's per-ReLU slopes)."""
    layer: Union[nn.Conv2d, nn.Linear]
    bn: Optional[BatchNorm]
    relu: bool
    modules: Tuple[nn.Module, ...]

    @property
    def is_linear(self) -> bool:
        return isinstance(self.layer, nn.Linear)

    def batch_norms(self):
        return [self.bn] if self.bn is not None else []

    def first_module(self):
        return self.layer

    # -- rules ----------------------------------------------------------------------------
    def forward(self, h: Tensor, ctx: ForwardCtx) -> Tensor:
        layer = self.layer
        if isinstance(layer, nn.Linear):
            h = F.linear(h, layer.weight, layer.bias)
        else:
            h = F.conv2d(h, layer.weight, layer.bias, layer.stride, layer.padding,
                         layer.dilation, layer.groups)
        if self.bn is not None:
            h = bn_normalise(self.bn, h, ctx)
        return h.relu() if self.relu else h

    def _bn_args(self, stats: Stats) -> dict:
        if self.bn is None:
            return {}
        bn = self.bn
        mean, var = stats[bn]
        return dict(bn_mean=mean, bn_var=var, bn_weight=bn.weight, bn_bias=bn.bias, bn_eps=bn.eps)

    def _fused(self, mu: Tensor, r: Tensor, stats: Stats, relu: bool) -> Box:
        layer = self.layer
        bn_kw = self._bn_args(stats)
        if isinstance(layer, nn.Linear):
            if mu.dim() != 2:
                raise ValueError(f"x: {layer} expects a [B, {layer.in_features}] input box, got "
                                 f"shape {tuple(mu.shape)} (add an nn.Flatten before it)")
            return ops.interval_linear_bn_relu(mu, r, layer.weight, layer.bias, relu=relu,
                                               **bn_kw)
        return ops.interval_conv2d_bn_relu(mu, r, layer.weight, layer.bias,
                                           stride=tuple(layer.stride),
                                           padding=conv_padding(layer),
                                           dilation=tuple(layer.dilation), groups=layer.groups,
                                           relu=relu, **bn_kw)

    def ibp(self, mu: Tensor, r: Tensor, ctx: IbpCtx) -> Box:
        if self.relu and ctx.split:
            mu, r = self._fused(mu, r, ctx.stats, False)
            return relu_out(mu, r, ctx)
        return self._fused(mu, r, ctx.stats, self.relu)

    def folded(self, stats: Stats):
        """The weight/bias with the batch norm folded in (the sound fold):
        ``(W', b', eps_w, E_b)``; ``E_b`` ``[C_out]`` bounds ``|b'_computed - b'_exact|``."""
        layer = self.layer
        w, b = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
        if self.bn is None:
            return w, b, 0.0, None
        bn = self.bn
        mean, var = stats[bn]
        fold = fold_batch_norm(mean, var, bn.weight, bn.bias, bn.eps, layer_weight=w,
                               layer_bias=b, sound=True)
        return fold.weight, fold.shift, fold.rel_err, fold.shift_err

    def effective_linear(self, stats: Stats) -> Tuple[Tensor, Tensor]:
        """A ``Linear`` (+ batch norm) step as one affine map ``z = W h + b`` (``W: [C, K]``,
        ``b: [C]``; the batch norm folded in with its resolved statistics)."""
        layer, bn = self.layer, self.bn
        if bn is not None:
            mean, var = stats[bn]
            fold = fold_batch_norm(mean, var, bn.weight, bn.bias, bn.eps,
                                   layer_weight=layer.weight, layer_bias=layer.bias)
            return fold.weight, fold.shift
        weight = layer.weight
        bias = layer.bias if layer.bias is not None else weight.new_zeros(weight.shape[0])
        return weight, bias

    def sound_ibp(self, L: Tensor, U: Tensor, ctx: IbpCtx) -> Box:
        layer = self.layer
        w, b, rel_w, b_err = self.folded(ctx.stats)
        c, rho = centre_radius(L, U)
        if isinstance(layer, nn.Linear):
            if c.dim() != 2:
                raise ValueError(f"x: {layer} expects a [B, {layer.in_features}] input box, got "
                                 f"shape {tuple(c.shape)} (add an nn.Flatten before it)")
            k = w.shape[1]

            def lin(t, weight, bias=None):
                return F.linear(t, weight, bias)
            view = lambda t, ref: t  # noqa: E731
        else:
            k = w.shape[1] * w.shape[2] * w.shape[3]
            kw = dict(stride=tuple(layer.stride), padding=conv_padding(layer),
                      dilation=tuple(layer.dilation), groups=layer.groups)

            def lin(t, weight, bias=None):
                return F.conv2d(t, weight, bias, **kw)
            view = channel_view
        aw = w.abs()
        cen = lin(c, w, b)
        rad = lin(rho, aw)
        mag = lin(c.abs() + rho, aw)
        bias_abs = view(b.abs(), cen) if b is not None else None
        bias_err = view(b_err, cen) if b_err is not None else None
        L, U = affine_box(cen, rad, mag, bias_abs, bias_err, k, rel_w, c.dtype)
        return sound_relu_out(L, U, ctx) if self.relu else (L, U)

    def lower(self, lw: Lowerer) -> None:
        layer = self.layer
        w, b = lw.detach(layer.weight), lw.detach(layer.bias)
        if isinstance(layer, nn.Linear):
            if len(lw.shape) != 1:
                raise ValueError(f"x: {layer} expects a [B, {layer.in_features}] input, got "
                                 f"one-sample shape {lw.shape} (add an nn.Flatten before it)")
            piece = LinearPiece(w, b)
        else:
            piece = ConvPiece(w, b, stride=layer.stride, padding=conv_padding(layer),
                              dilation=layer.dilation, groups=layer.groups)
        if self.bn is not None and lw.fold_bn:
            bn = self.bn
            mean, var = lw.stats[bn]
            fold = fold_batch_norm(mean, var, bn.weight, bn.bias, bn.eps, layer_weight=w,
                                   layer_bias=b)
            piece.weight, piece.bias = lw.detach(fold.weight), lw.detach(fold.shift)
            lw.add(piece)
        else:
            lw.add(piece)
            if self.bn is not None:
                lw.add(bn_channel_piece(self.bn, lw.stats, lw))
        if self.relu:
            lw.add(ReluPiece())


@dataclass(frozen=True, eq=False)
class BatchNormStep(Node):
    """A batch norm not preceded by a conv/linear (e.g. first layer, or after a ReLU), then
    optionally ReLU."""
    bn: BatchNorm
    relu: bool
    modules: Tuple[nn.Module, ...]

    def batch_norms(self):
        return [self.bn]

    def first_module(self):
        return self.bn

    def forward(self, h: Tensor, ctx: ForwardCtx) -> Tensor:
        h = bn_normalise(self.bn, h, ctx)
        return h.relu() if self.relu else h

    def ibp(self, mu: Tensor, r: Tensor, ctx: IbpCtx) -> Box:
        bn = self.bn
        mean, var = ctx.stats[bn]
        mu, r = ops.interval_batch_norm(mu, r, mean, var, bn.weight, bn.bias, bn.eps)
        if not self.relu:
            return mu, r
        return relu_out(mu, r, ctx) if ctx.split else ops.interval_relu(mu, r)

    def sound_ibp(self, L: Tensor, U: Tensor, ctx: IbpCtx) -> Box:
        bn = self.bn
        mean, var = ctx.stats[bn]
        fold = fold_batch_norm(mean, var, bn.weight, bn.bias, bn.eps, sound=True)
        c, rho = centre_radius(L, U)
        sv = channel_view(fold.scale, c)
        cen = sv * c + channel_view(fold.shift, c)
        rad = sv.abs() * rho
        mag = sv.abs() * (c.abs() + rho)
        L, U = affine_box(cen, rad, mag, channel_view(fold.shift.abs(), c),
                          channel_view(fold.shift_err, c), 1, fold.rel_err, c.dtype)
        return sound_relu_out(L, U, ctx) if self.relu else (L, U)

    def lower(self, lw: Lowerer) -> None:
        lw.add(bn_channel_piece(self.bn, lw.stats, lw))
        if self.relu:
            lw.add(ReluPiece())


# the plan fuses these into AffineStep / BatchNormStep / ReluStep (plan.fuse_modules)
register_module(nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, build=lambda m: m)
