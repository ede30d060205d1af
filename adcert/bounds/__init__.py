"""Whole-model bounds.

* :func:`compute_bounds` -- output bounds ``(lb, ub)`` or margin lower bounds (``y`` given) of an
  ``nn.Sequential`` model over an L-inf box; ``method="ibp"``, ``"crown-ibp"``, ``"crown"``,
  ``"alpha-crown"`` (:mod:`adcert.bounds.crown`; ``sound=True``: :mod:`adcert.bounds.crown_sound`).
* :func:`clean_bn_stats` -- clean-batch statistics of the training-mode batch norms, to be
  reused across the attack and bound passes of one training step (DESIGN.md section 5).
* :func:`crown_ibp_ce_upper` -- CROWN-IBP loss fusion: a per-sample upper bound of the CE loss
  over the box with one backward row per sample (:mod:`adcert.bounds.loss_fusion`).
* The engine: :func:`get_plan` / :class:`LayerPlan` (a model compiled once to steps, one class
  per operation type, :mod:`adcert.bounds.layers`; what is supported: :func:`supported_text`),
  :func:`ibp_forward` over a plan, :func:`input_box`, and the margin specification helpers.
"""
from adcert.bounds.api import METHODS, PLANNED_METHODS, BoundRequest, compute_bounds
from adcert.bounds.forward import clean_bn_stats, clean_forward, resolve_bn_stats
from adcert.bounds.ibp import ibp_forward, ibp_steps
from adcert.bounds.inputs import input_box
from adcert.bounds.loss_fusion import crown_ibp_ce_upper
from adcert.bounds.plan import (
    SUPPORTED_MODULES, AffineStep, AvgPoolStep, BatchNormStep, CatStep, FlattenStep, LayerPlan,
    NormalizeStep, ReluStep, ReshapeStep, ResidualStep, build_plan, get_plan, iter_steps,
)
from adcert.bounds.registry import supported_text
from adcert.bounds.spec import fold_margin_spec, margin_lower_folded, margin_lower_from_logits

__all__ = [
    "compute_bounds", "BoundRequest", "clean_bn_stats", "clean_forward", "resolve_bn_stats", "ibp_forward",
    "ibp_steps", "CatStep", "supported_text",
    "input_box", "get_plan", "build_plan", "LayerPlan", "AffineStep", "BatchNormStep",
    "NormalizeStep", "ReluStep", "FlattenStep", "AvgPoolStep", "ReshapeStep", "ResidualStep",
    "iter_steps", "SUPPORTED_MODULES", "METHODS", "PLANNED_METHODS",
    "fold_margin_spec", "margin_lower_folded", "margin_lower_from_logits",
    "crown_ibp_ce_upper",
]
