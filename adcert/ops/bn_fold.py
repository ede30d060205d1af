"""The batch-norm fold: a batch norm with given statistics as a per-channel affine map, optionally
folded into the conv/linear layer before it. Every part of adcert that folds a batch norm calls
:func:`fold_batch_norm` (the reference ops, the Triton wrappers, the bound engine's IBP, CROWN and
sound modes, the clean forward of :mod:`adcert.bounds.bn`).

For statistics ``mean, var``, affine ``weight`` (gamma), ``bias`` (beta), all ``[C]``::

    scale = weight / sqrt(var + eps)
    shift = scale * (b - mean) + bias        (b: the bias of the layer folded into, else 0)
    W'    = W * scale                        (per output channel, the layer folded into)

so that ``bn(W h + b) = W' h + shift``. The order of operations is the compiled kernels' (the C++
``channel_affine`` in ``csrc/cpu/epilogue_cpu.cpp`` and the Triton wrappers), so the kernels, the
reference ops and the bound engine compute the same coefficients.

Two roundings of the formula, chosen by ``sound``:

* ``sound=False`` (exact mode): ``scale = rsqrt(var + eps) * weight`` in plain torch,
  differentiable with respect to ``mean``, ``var``, ``weight`` and ``bias`` (training's robust
  loss flows through the clean batch's statistics, DESIGN.md section 5) and to the layer's
  ``W, b``.
* ``sound=True`` (rigorous, used by sound IBP, :mod:`adcert.bounds.sound`): IEEE ``sqrt`` and
  division (each correctly rounded), inputs detached, and error bounds with the result:
  ``rel_err = gamma_8`` bounds the relative error of ``scale`` against the exact real
  ``weight / sqrt(var + eps)``, and of ``fl(w * scale)`` against ``w * exact scale`` for an exact
  ``w`` (``scale`` takes <= 3 roundings, the product one more; ``gamma_8`` leaves slack for a
  sqrt/division that is not correctly rounded); ``shift_err = gamma_10 ((|b| + |mean|) |scale| +
  |bias|)`` bounds ``|computed shift - exact shift|`` (``[C]``).

The sound CROWN family (:mod:`adcert.bounds.crown_sound`) does NOT use ``sound=True``: it keeps
each batch norm as a separate per-channel op with the EXACT-mode coefficients (no layer folded
in) and charges their rounding itself, as :data:`EXACT_FOLD_ROUNDINGS` extra roundings in every
``gamma_k`` of that op, with :func:`exact_shift_magnitude` as the magnitude of the terms summed
into ``shift`` (see :func:`adcert.bounds.linear_relax.lower_plan`). That accounting was derived
for the rsqrt-based coefficients; switching that mode to the ``sound=True`` coefficients would
change its bounds (by roundings, in either direction), so the two sound accountings stay separate,
side by side here.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from adcert.ops._rounding import gamma

Tensor = torch.Tensor

#: Roundings charged per coefficient of an exact-mode fold without a layer by the sound CROWN
#: family (``coef_rel_err`` of its batch-norm ops): ``scale`` takes at most four (``var + eps``,
#: a reciprocal square root counted as two, the product with ``weight``), ``shift`` two more.
EXACT_FOLD_ROUNDINGS = 6


class BatchNormFold(NamedTuple):
    """The result of :func:`fold_batch_norm` (per-channel tensors are ``[C]``)."""
    scale: Tensor
    shift: Tensor  # with a layer folded in: the folded bias
    weight: Optional[Tensor] = None  # the folded layer weight ``W * scale`` (layer_weight given)
    inv: Optional[Tensor] = None  # exact mode: ``rsqrt(var + eps)`` (for the kernels' gradients)
    rel_err: float = 0.0  # sound mode: relative error bound of ``scale`` and of ``W * scale``
    shift_err: Optional[Tensor] = None  # sound mode: absolute error bound of ``shift``


def scale_rows(layer_weight: Tensor, scale: Tensor) -> Tensor:
    """``layer_weight`` (``[out, ...]``, a Linear or Conv2d weight) with output channel ``o``
    multiplied by ``scale[o]``."""
    return layer_weight * scale.reshape((-1,) + (1,) * (layer_weight.dim() - 1))


def fold_batch_norm(mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    eps: float, *, layer_weight: Optional[Tensor] = None,
                    layer_bias: Optional[Tensor] = None, sound: bool = False) -> BatchNormFold:
    """The batch norm with statistics ``mean, var`` and affine ``weight, bias`` (``None``: absent)
    as ``y = scale * x + shift``, folded into a preceding layer with weight ``layer_weight``
    (``[C, ...]``) and bias ``layer_bias`` (``[C]``) when given (see the module docstring for the
    formula and what ``sound`` changes)."""
    if sound:
        mean, var = mean.detach(), var.detach()
        weight = None if weight is None else weight.detach()
        bias = None if bias is None else bias.detach()
        layer_weight = None if layer_weight is None else layer_weight.detach()
        layer_bias = None if layer_bias is None else layer_bias.detach()
        inv = None
        root = torch.sqrt(var + eps)
        scale = weight / root if weight is not None else 1.0 / root
    else:
        inv = torch.rsqrt(var + eps)
        scale = inv * weight if weight is not None else inv
    centre = -mean if layer_bias is None else layer_bias - mean
    shift = centre * scale
    if bias is not None:
        shift = shift + bias
    folded = None if layer_weight is None else scale_rows(layer_weight, scale)
    if not sound:
        return BatchNormFold(scale, shift, folded, inv)
    mag = mean.abs() if layer_bias is None else layer_bias.abs() + mean.abs()
    mag = mag * scale.abs()
    if bias is not None:
        mag = mag + bias.abs()
    return BatchNormFold(scale, shift, folded, None, gamma(8, scale.dtype),
                         gamma(10, scale.dtype) * mag)


def exact_shift_magnitude(mean: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """An upper bound ``|mean * scale| + |bias|`` (``[C]``) of the magnitudes of the terms summed
    into an exact-mode ``shift`` without a layer (the sound CROWN family's ``bias_mag``)."""
    return (mean * scale).abs() + (bias.abs() if bias is not None else 0.0)
