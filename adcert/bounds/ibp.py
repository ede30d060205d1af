"""Interval bound propagation over a :class:`~adcert.bounds.plan.LayerPlan`.

Boxes are centre-radius ``(mu, r)`` (DESIGN.md section 3). Each step is one call of a public
:mod:`adcert.ops` op -- an :class:`AffineStep` is a single fused
``interval_{conv2d,linear}_bn_relu``
-- except Normalize, Flatten/reshape and average pooling, which are exact and cheap in plain
torch. A :class:`ResidualStep` sums its branches' boxes (DESIGN.md section 3). The ops are looked up on
:mod:`adcert.ops` at call time, so whichever backend it exports (reference or compiled) is used.

No host synchronisation happens here.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type

import torch
from torch import nn

from adcert import ops
from adcert.bounds.plan import (
    AffineStep, AvgPoolStep, BatchNormStep, FlattenStep, LayerPlan, NormalizeStep, ReluStep,
    ReshapeStep, ResidualStep, Step,
)
from adcert.ops.bn_fold import fold_batch_norm

Tensor = torch.Tensor
Box = Tuple[Tensor, Tensor]
Stats = Mapping[nn.Module, Tuple[Tensor, Tensor]]


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


def _bn_args(bn: Optional[nn.Module], stats: Stats) -> dict:
    if bn is None:
        return {}
    mean, var = stats[bn]
    return dict(bn_mean=mean, bn_var=var, bn_weight=bn.weight, bn_bias=bn.bias, bn_eps=bn.eps)


def _affine(step: AffineStep, mu: Tensor, r: Tensor, stats: Stats) -> Box:
    layer = step.layer
    bn_kw = _bn_args(step.bn, stats)
    if isinstance(layer, nn.Linear):
        if mu.dim() != 2:
            raise ValueError(f"x: {layer} expects a [B, {layer.in_features}] input box, got shape "
                             f"{tuple(mu.shape)} (add an nn.Flatten before it)")
        return ops.interval_linear_bn_relu(mu, r, layer.weight, layer.bias, relu=step.relu,
                                           **bn_kw)
    return ops.interval_conv2d_bn_relu(mu, r, layer.weight, layer.bias,
                                       stride=tuple(layer.stride), padding=conv_padding(layer),
                                       dilation=tuple(layer.dilation), groups=layer.groups,
                                       relu=step.relu, **bn_kw)


def _batch_norm(step: BatchNormStep, mu: Tensor, r: Tensor, stats: Stats) -> Box:
    mean, var = stats[step.bn]
    mu, r = ops.interval_batch_norm(mu, r, mean, var, step.bn.weight, step.bn.bias, step.bn.eps)
    if step.relu:
        mu, r = ops.interval_relu(mu, r)
    return mu, r


def _normalize(step: NormalizeStep, mu: Tensor, r: Tensor, stats: Stats) -> Box:
    m = step.module
    std = m.channel_view(m.std, mu)
    # |std|: sound even if the buffer was overwritten with negative values after construction
    return (mu - m.channel_view(m.mean, mu)) / std, r / std.abs()


def _relu(step: ReluStep, mu: Tensor, r: Tensor, stats: Stats) -> Box:
    return ops.interval_relu(mu, r)


def _flatten(step: FlattenStep, mu: Tensor, r: Tensor, stats: Stats) -> Box:
    start = step.module.start_dim % mu.dim()
    if start == 0:
        raise NotImplementedError("model: an nn.Flatten that merges the batch dimension "
                                  "(start_dim=0) is not supported")
    return step.module(mu), step.module(r)


def _avg_pool(step: AvgPoolStep, mu: Tensor, r: Tensor, stats: Stats) -> Box:
    # linear with non-negative weights: exact in centre-radius form
    return step.module(mu), step.module(r)


def _reshape(step: ReshapeStep, mu: Tensor, r: Tensor, stats: Stats) -> Box:
    return step.apply(mu), step.apply(r)


def shrunk_relu(mu: Tensor, r: Tensor, shrink: float = 1.0) -> Box:
    """The ReLU of the box ``(mu, r)`` (any shape) with SABR's ReLU-output shrink (Mueller et
    al. 2023; CTBench Table 5 "ReLU shrink ratio", its ``relu_shrinkage``): an unstable neuron
    (``l < 0 < u``) gets the output box ``[0, shrink * u]`` instead of ``[0, u]``; stable ones are
    unchanged. ``shrink = 1`` is :func:`adcert.ops.interval_relu`. For ``shrink < 1`` the box is
    NOT sound (a training heuristic that weakens IBP's regularisation); never certify with it."""
    if shrink == 1.0:
        return ops.interval_relu(mu, r)
    lb, ub = mu - r, mu + r
    ub = torch.where((lb < 0) & (ub > 0), ub * shrink, ub)
    lo, hi = lb.clamp(min=0), ub.clamp(min=0)
    return (hi + lo) / 2, (hi - lo) / 2


def _relu_out(mu: Tensor, r: Tensor, relu_bounds: Optional[List[Box]], shrink: float) -> Box:
    """A ReLU in a de-fused pass: record its input box when collecting, then apply it."""
    if relu_bounds is not None:
        relu_bounds.append((mu - r, mu + r))
    return shrunk_relu(mu, r, shrink)


def _residual(step: ResidualStep, mu: Tensor, r: Tensor, stats: Stats,
              relu_bounds: Optional[List[Box]] = None, relu_shrink: float = 1.0) -> Box:
    """Sum of the branches' boxes (``mu1 + mu2``, ``r1 + r2``), then optionally ReLU. ReLU inputs
    are collected branch by branch, in branch order, then the join's own ReLU."""
    out_mu = out_r = None
    for branch in step.branches:
        b_mu, b_r = ibp_steps(branch, mu, r, stats, relu_bounds, relu_shrink)
        out_mu = b_mu if out_mu is None else out_mu + b_mu
        out_r = b_r if out_r is None else out_r + b_r
    if step.relu:
        out_mu, out_r = _relu_out(out_mu, out_r, relu_bounds, relu_shrink)
    return out_mu, out_r


IBP_RULES: Dict[Type[Step], Callable[[Step, Tensor, Tensor, Stats], Box]] = {
    AffineStep: _affine,  # type: ignore[dict-item]
    BatchNormStep: _batch_norm,  # type: ignore[dict-item]
    NormalizeStep: _normalize,  # type: ignore[dict-item]
    ReluStep: _relu,  # type: ignore[dict-item]
    FlattenStep: _flatten,  # type: ignore[dict-item]
    AvgPoolStep: _avg_pool,  # type: ignore[dict-item]
    ReshapeStep: _reshape,  # type: ignore[dict-item]
    ResidualStep: _residual,  # type: ignore[dict-item]
}


def _without_relu(step: Step) -> Optional[Step]:
    """The same step with its fused ReLU removed, or ``None`` if it has none."""
    if isinstance(step, (AffineStep, BatchNormStep)) and step.relu:
        return dataclasses.replace(step, relu=False)
    return None


def ibp_steps(steps: Sequence[Step], mu: Tensor, r: Tensor, stats: Stats,
              relu_bounds: Optional[List[Box]] = None, relu_shrink: float = 1.0) -> Box:
    """Propagate the box ``(mu, r)`` through ``steps``; ``stats`` holds ``(mean, var)`` for every
    batch norm among them (see :func:`adcert.bounds.forward.resolve_bn_stats`).

    ``relu_bounds``: if a list, ``(lb, ub)`` of every ReLU's input is appended to it, in order
    (differentiable). ``relu_shrink``: every ReLU is :func:`shrunk_relu` with this ratio (1: plain
    IBP). With either, fused steps run their ReLU as a separate op, which is slower: use them only
    when needed (e.g. the warm-up regularisers, SABR's shrink)."""
    split = relu_bounds is not None or relu_shrink != 1.0
    for step in steps:
        if isinstance(step, ResidualStep):
            mu, r = _residual(step, mu, r, stats, relu_bounds, relu_shrink)
            continue
        if split:
            bare = _without_relu(step)
            if bare is not None:
                mu, r = IBP_RULES[type(bare)](bare, mu, r, stats)
                mu, r = _relu_out(mu, r, relu_bounds, relu_shrink)
                continue
            if isinstance(step, ReluStep):
                mu, r = _relu_out(mu, r, relu_bounds, relu_shrink)
                continue
        mu, r = IBP_RULES[type(step)](step, mu, r, stats)
    return mu, r


def ibp_forward(plan: LayerPlan, mu: Tensor, r: Tensor, stats: Stats,
                relu_bounds: Optional[List[Box]] = None, relu_shrink: float = 1.0) -> Box:
    """The output box ``(mu, r)`` of the whole plan for the input box ``(mu, r): [B, *in]``
    (``relu_bounds``, ``relu_shrink``: see :func:`ibp_steps`)."""
    return ibp_steps(plan.steps, mu, r, stats, relu_bounds, relu_shrink)


def effective_linear(step: AffineStep, stats: Stats) -> Tuple[Tensor, Tensor]:
    """A final ``Linear`` (+ batch norm) step as one affine map ``z = W h + b``;
    ``W: [C, K]``, ``b: [C]`` (the batch norm folded in with its resolved statistics)."""
    layer, bn = step.layer, step.bn
    if bn is not None:
        mean, var = stats[bn]
        fold = fold_batch_norm(mean, var, bn.weight, bn.bias, bn.eps, layer_weight=layer.weight,
                               layer_bias=layer.bias)
        return fold.weight, fold.shift
    weight = layer.weight
    bias = layer.bias if layer.bias is not None else weight.new_zeros(weight.shape[0])
    return weight, bias
