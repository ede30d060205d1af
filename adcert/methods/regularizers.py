"""Shi et al. (2021) warm-up regularisers for IBP-family training, and the L1 penalty.

Both warm-up terms take the pre-activation bounds of every ReLU layer (``compute_bounds(...,
relu_bounds=lst)``) and the input box. Per ReLU layer ``i`` with centre ``c = (u + l) / 2`` and radius
``r = (u - l) / 2``, and ``r0`` the mean radius of the box entering the first affine layer, i.e.
after the model's input :class:`~adcert.models.Normalize` (:func:`first_layer_radius`; Shi et al.
normalise the data before the network, so their ``r0`` is ``eps / std``):

* tightness: ``relu(tau - r0 / mean(r_i)) / tau`` -- penalises layers whose bounds grow much looser
  than the input box;
* ReLU balance: with the neurons split into active (``l > 0``) and inactive (``u < 0``) ones,
  ``mean_ratio = mean(c * active) / -mean(c * inactive)`` and ``var_ratio`` the ratio of the sums of
  ``(c - mean(c))^2`` over the two groups, each folded to ``min(x, 1/x)``;
  ``(relu(tau - mean_ratio) + relu(tau - var_ratio)) / tau``.

Terms that are NaN or infinite (e.g. a layer with no inactive neuron) are dropped; both are
averaged over the ReLU layers. ``tau = 0.5``. The total is weighted ``lambda * (1 - eps_t / eps)``
by the caller (:meth:`IBPFamily.regularizer`).
"""
from __future__ import annotations

from typing import Iterable, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from adcert.bounds import NormalizeStep, get_plan

Tensor = torch.Tensor
Bounds = Tuple[Tensor, Tensor]


def _safe_ratio(num: Tensor, den: Tensor) -> Tuple[Tensor, Tensor]:
    """``(num / den, valid)`` where ``valid = (den > 0) & finite``; invalid entries are 1 and get no
    gradient (no NaN leaks into the backward pass through a masked branch)."""
    valid = (den > 0) & torch.isfinite(num) & torch.isfinite(den)
    one = torch.ones_like(num)
    return torch.where(valid, num, one) / torch.where(valid, den, one), valid


def first_layer_radius(model: nn.Module, x_L: Tensor, x_U: Tensor) -> Tensor:
    """Radii ``[B, *in]`` of the input box ``[x_L, x_U]`` (pixel space, ``[B, *in]`` each) as it
    enters ``model``'s first affine layer: ``(x_U - x_L) / 2`` divided, per channel, by the
    ``std`` of every :class:`~adcert.models.Normalize` the model starts with (unchanged when it
    starts with none). The ``r0`` of the tightness regulariser (Shi et al. 2021; CTBench's
    ``regularization.py`` reads it from the bounds after its normalisation layer too)."""
    radius = (x_U - x_L) / 2
    for step in get_plan(model).steps:
        if not isinstance(step, NormalizeStep):
            break
        norm = step.module
        radius = radius / norm.channel_view(norm.std, radius).abs()
    return radius


def tightness_terms(input_radius: Tensor, relu_bounds: Sequence[Bounds], tau: float = 0.5
                    ) -> List[Tuple[Tensor, Tensor]]:
    """``(term, valid)`` (0-dim each) per ReLU layer; ``input_radius``: the input box's radii."""
    r0 = input_radius.mean()
    out = []
    for lb, ub in relu_bounds:
        ratio, valid = _safe_ratio(r0, ((ub - lb) / 2).mean())
        out.append((F.relu(tau - ratio) / tau, valid))
    return out


def balance_terms(relu_bounds: Sequence[Bounds], tau: float = 0.5
                  ) -> List[Tuple[Tensor, Tensor]]:
    """``(term, valid)`` (0-dim each) per ReLU layer; invalid when a layer has no active or no
    inactive neuron (the ratios are undefined)."""
    out = []
    for lb, ub in relu_bounds:
        c = (ub + lb) / 2
        active, inactive = (lb > 0).to(c.dtype), (ub < 0).to(c.dtype)
        mean_ratio, ok_mean = _safe_ratio((c * active).mean(), -(c * inactive).mean())
        delta = (c - c.mean()) ** 2
        var_ratio, ok_var = _safe_ratio((delta * active).sum(), (delta * inactive).sum())
        valid = ok_mean & ok_var & (mean_ratio > 0) & (var_ratio > 0)
        mean_ratio = torch.where(valid, mean_ratio, torch.ones_like(mean_ratio))
        var_ratio = torch.where(valid, var_ratio, torch.ones_like(var_ratio))
        mean_ratio = torch.minimum(mean_ratio, 1 / mean_ratio)
        var_ratio = torch.minimum(var_ratio, 1 / var_ratio)
        out.append(((F.relu(tau - mean_ratio) + F.relu(tau - var_ratio)) / tau, valid))
    return out


def warmup_regularizer(input_radius: Tensor, relu_bounds: Sequence[Bounds], tau: float = 0.5
                       ) -> Tensor:
    """``(sum of valid tightness terms + sum of valid balance terms) / #ReLU layers`` (0-dim).
    No host synchronisation: invalid (NaN/Inf) terms are masked, not branched on."""
    if not relu_bounds:
        return input_radius.new_zeros(())
    terms = tightness_terms(input_radius, relu_bounds, tau) + balance_terms(relu_bounds, tau)
    total = sum(torch.where(valid, t, torch.zeros_like(t)) for t, valid in terms)
    return total / len(relu_bounds)


def l1_penalty(model: nn.Module) -> Tensor:
    """Sum of ``|w|`` over the weights of every ``Conv2d`` and ``Linear`` (biases excluded)."""
    weights: Iterable[Tensor] = [m.weight for m in model.modules()
                                 if isinstance(m, (nn.Conv2d, nn.Linear))]
    return sum(w.abs().sum() for w in weights)
