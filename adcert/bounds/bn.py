"""Batch-norm statistics for bound propagation (the CTBench convention, DESIGN.md section 5).

* In eval mode -- the model's ``training`` flag is False, or the batch norm's own is -- a batch norm
  uses its running statistics.
* In training mode (both flags True), or when it has no running statistics, it uses the
  per-channel mean and biased variance of the CLEAN batch at its input. They are computed once
  per training step (by the trainer's clean forward, or :func:`adcert.bounds.clean_bn_stats`) and
  reused by the attack and every bound pass of the step, as given: differentiable tensors stay
  differentiable, so a robust loss's gradient flows through the clean batch's statistics
  (DESIGN.md section 5); pass detached ones for a constant map.
* Nothing here ever updates running statistics.

A statistics dict maps each batch-norm module to ``(mean, var)``, both ``[C]``.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from adcert.ops.bn_fold import fold_batch_norm

Tensor = torch.Tensor
BNStats = Dict[nn.Module, Tuple[Tensor, Tensor]]


def uses_batch_stats(bn: nn.Module, model_training: bool = True) -> bool:
    """Whether ``bn`` normalises with batch statistics: the model and ``bn`` are in training mode,
    or ``bn`` has no running statistics."""
    if bn.running_mean is None or bn.running_var is None:
        return True
    return bool(model_training) and bool(bn.training)


def batch_stats(h: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``h: [B, C, *]`` (differentiable); both ``[C]``."""
    dims = [0] + list(range(2, h.dim()))
    var, mean = torch.var_mean(h, dim=dims, correction=0)
    return mean, var


def bn_scale_shift(bn: nn.Module, mean: Tensor, var: Tensor) -> Tuple[Tensor, Tensor]:
    """The batch norm as a per-channel affine map ``y = scale * x + shift`` given statistics;
    ``scale = weight / sqrt(var + eps)``, ``shift = bias - mean * scale``; both ``[C]``
    (:func:`adcert.ops.bn_fold.fold_batch_norm`, exact mode: differentiable in the statistics)."""
    fold = fold_batch_norm(mean, var, bn.weight, bn.bias, bn.eps)
    return fold.scale, fold.shift


def normalise(bn: nn.Module, h: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """``bn``'s normalisation of ``h: [B, C, *]`` with statistics ``mean, var: [C]`` as the
    affine map :func:`bn_scale_shift` (the form the bound engine folds, so a bound pass at radius
    0 reproduces it), differentiable with respect to the statistics too -- ``F.batch_norm``
    refuses gradients for them in evaluation mode."""
    scale, shift = bn_scale_shift(bn, mean, var)
    shape = [1, -1] + [1] * (h.dim() - 2)
    return h * scale.view(shape) + shift.view(shape)


def running_stats(bn: nn.Module) -> Tuple[Tensor, Tensor]:
    return bn.running_mean.detach(), bn.running_var.detach()


def check_bn_stats(bn_stats) -> Optional[Mapping[nn.Module, Tuple[Tensor, Tensor]]]:
    """Validate a caller-supplied statistics dict (type and entry form only; shapes are checked by
    the ops)."""
    if bn_stats is None:
        return None
    if not isinstance(bn_stats, Mapping):
        raise TypeError(f"bn_stats: expected a dict {{bn_module: (mean, var)}}, "
                        f"got {type(bn_stats).__name__}")
    for key, value in bn_stats.items():
        if not isinstance(key, (nn.BatchNorm1d, nn.BatchNorm2d)):
            raise TypeError(f"bn_stats: keys must be BatchNorm modules, got {type(key).__name__}")
        if not (isinstance(value, (tuple, list)) and len(value) == 2
                and all(isinstance(t, torch.Tensor) for t in value)):
            raise TypeError("bn_stats: values must be (mean, var) pairs of tensors")
        for t in value:
            if tuple(t.shape) != (key.num_features,):
                raise ValueError(f"bn_stats: statistics of {key} must have shape "
                                 f"({key.num_features},), got {tuple(t.shape)}")
    return bn_stats


def pick_stats(bn: nn.Module, h: Optional[Tensor], given: Optional[Mapping],
               collect: Optional[BNStats], model_training: bool) -> Tuple[Tensor, Tensor]:
    """The ``(mean, var)`` to normalise with at ``bn``.

    Eval mode -> running statistics. Training mode -> ``given[bn]`` if present (as given, not
    detached), else the batch statistics of the clean activation ``h`` (then also stored in
    ``collect``).
    """
    if not uses_batch_stats(bn, model_training):
        return running_stats(bn)
    if given is not None and bn in given:
        return given[bn]
    if h is None:
        raise ValueError(f"bn_stats: no statistics for the training-mode {type(bn).__name__}"
                         f"({bn.num_features}); pass clean_bn_stats(model, x) for this model")
    mean, var = batch_stats(h)
    if collect is not None:
        collect[bn] = (mean, var)
    return mean, var
