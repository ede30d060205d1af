"""The clean (point) forward pass through a :class:`~adcert.bounds.plan.LayerPlan`.

It computes exactly what the model computes, with the bound engine's batch-norm convention
(:mod:`adcert.bounds.bn`) and without touching running statistics. Its main use is
:func:`clean_bn_stats`: the clean-batch statistics of every training-mode batch norm.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

from adcert.bounds import bn as bnlib
from adcert.bounds.bn import BNStats
from adcert.bounds.inputs import check_x
from adcert.bounds.layers.base import ForwardCtx, forward_steps
from adcert.bounds.plan import LayerPlan, get_plan

Tensor = torch.Tensor


def clean_forward(plan: LayerPlan, x: Tensor, bn_stats: Optional[Mapping] = None,
                  collect: Optional[BNStats] = None, model_training: bool = True) -> Tensor:
    """The model's output at ``x: [B, *in]`` computed step by step (no running-stat updates).

    Training-mode batch norms (see :func:`adcert.bounds.bn.uses_batch_stats`; ``model_training``
    is the model's own ``training`` flag) use ``bn_stats[bn]`` when given, else the batch
    statistics of their clean input, which are then stored in ``collect`` (if given)."""
    return forward_steps(plan.steps, x, ForwardCtx(bn_stats, collect, model_training))


def clean_bn_stats(model: nn.Module, x: Tensor) -> BNStats:
    """Clean-batch statistics ``{bn_module: (mean, var)}`` (both ``[C]``) for every batch norm of
    ``model`` that is in training mode (``model.training`` and the module's own flag, or no
    running statistics), from one clean forward of ``x: [B, *in]``.

    Pass the result as ``compute_bounds(..., bn_stats=...)`` to reuse the same statistics for
    every attack and bound pass of a training step (DESIGN.md section 5). Under autograd they
    are differentiable functions of the parameters (and ``x``), so a loss computed with them
    has the gradient the clean forward would give it; ``.detach()`` them for a constant map.
    Eval-mode batch norms use their running statistics and are not included. Running
    statistics are not updated.
    """
    check_x(x)
    plan = get_plan(model)
    collect: BNStats = {}
    clean_forward(plan, x, None, collect, model.training)
    return collect


def resolve_bn_stats(plan: LayerPlan, x: Tensor, given: Optional[Mapping],
                     model_training: bool) -> BNStats:
    """The ``(mean, var)`` every batch norm of ``plan`` is to use in a bound pass: running
    statistics in eval mode; ``given[bn]`` or the clean-batch statistics of ``x``
    (differentiable) in training mode (one clean forward, only if some training-mode batch norm
    is missing from ``given``).
    ``model_training``: the model's own ``training`` flag."""
    bns = plan.batch_norms()
    missing = [m for m in bns if bnlib.uses_batch_stats(m, model_training)
               and (given is None or m not in given)]
    merged = dict(given) if given is not None else {}
    if missing:
        clean_forward(plan, x, given, merged, model_training)
    return {m: bnlib.pick_stats(m, None, merged, None, model_training) for m in bns}
