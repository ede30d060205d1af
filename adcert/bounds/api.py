"""``compute_bounds``: whole-model output bounds (or margin lower bounds) for an input box."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from adcert.bounds.bn import check_bn_stats
from adcert.ops._checks import value_checks
from adcert.bounds.forward import resolve_bn_stats
from adcert.bounds.ibp import effective_linear, ibp_forward, ibp_steps
from adcert.bounds.inputs import (
    Eps, check_x, check_x_for_plan, check_y, check_y_range, input_box, input_shape_error,
)
from adcert.bounds.plan import LayerPlan, get_plan
from adcert.bounds.sound import sound_ibp_bounds
from adcert.bounds.spec import margin_lower_folded, margin_lower_from_logits

Tensor = torch.Tensor
Stats = Mapping[nn.Module, Tuple[Tensor, Tensor]]
Result = Union[Tensor, Tuple[Tensor, Tensor]]


@dataclass
class BoundRequest:
    """What a bounding method is asked for (built once by :func:`compute_bounds`).

    y:           labels ``[B]`` (int64, range-checked against the output width by the method) or
                 ``None``. With ``y`` the result is margin lower bounds ``[B, C]`` (``y`` entry 0).
    C:           a user specification ``[B, S, C_out]`` or ``None``; with ``C`` the result is
                 ``(lb, ub)`` of ``C z``, each ``[B, S]``. ``y`` and ``C`` are exclusive.
    sound:       widen every bound outward by a rigorous floating-point error bound
                 (DESIGN.md section 4; fp32/fp64 only, TF32 off). Training leaves it False.
    relu_bounds: when a list, the method appends ``(lb, ub)`` of every ReLU's INPUT, in order
                 (differentiable; used by the warm-up regularisers).
    options:     method-specific options (e.g. alpha-CROWN's iterations); each method rejects
                 keys it does not know, naming them.
    """
    y: Optional[Tensor] = None
    C: Optional[Tensor] = None
    sound: bool = False
    relu_bounds: Optional[List[Tuple[Tensor, Tensor]]] = None
    options: Dict[str, Any] = field(default_factory=dict)


# A bounding method: (plan, mu, r, resolved BN stats, request) -> the result described in
# BoundRequest. Input checks, the input box and BN statistics are shared and done once in
# compute_bounds; new methods register in METHODS.
Method = Callable[[LayerPlan, Tensor, Tensor, Stats, BoundRequest], Result]


def reject_options(method: str, options: Mapping[str, Any], known=()) -> None:
    """Raise ``TypeError`` naming every option in ``options`` that is not in ``known``."""
    unknown = [k for k in options if k not in known]
    if unknown:
        accepted = ", ".join(sorted(known)) or "none"
        raise TypeError(f"compute_bounds: unknown option(s) {', '.join(map(repr, unknown))} for "
                        f"method {method!r}; accepted: {accepted}")


def relu_shrink_option(options: Mapping[str, Any], sound: bool) -> float:
    """The ``relu_shrink`` option of method ``"ibp"`` (default 1 = plain IBP): a number in
    [0, 1], the ratio of SABR's ReLU-output shrink (:func:`adcert.bounds.ibp.shrunk_relu`;
    CTBench Table 5). Unsound below 1, so rejected with ``sound=True``."""
    shrink = options.get("relu_shrink", 1.0)
    if isinstance(shrink, bool) or not isinstance(shrink, (int, float)):
        raise TypeError(f"relu_shrink: expected a number in [0, 1], got {shrink!r}")
    if not 0.0 <= shrink <= 1.0:
        raise ValueError(f"relu_shrink: expected a number in [0, 1], got {shrink}")
    if sound and shrink != 1.0:
        raise ValueError(f"relu_shrink: {shrink} shrinks ReLU boxes (unsound); sound=True needs 1")
    return float(shrink)


def _ibp_method(plan: LayerPlan, mu: Tensor, r: Tensor, stats: Stats,
                request: BoundRequest) -> Result:
    reject_options("ibp", request.options, known=("relu_shrink",))
    shrink = relu_shrink_option(request.options, request.sound)
    if request.C is not None:
        raise NotImplementedError("C: not supported by method 'ibp' yet")
    y = request.y
    if request.sound:  # rounding-sound plain-torch path (adcert.bounds.sound)
        return sound_ibp_bounds(plan, mu, r, stats, y, request.relu_bounds, check_y_range)
    if y is None:
        mu, r = ibp_forward(plan, mu, r, stats, request.relu_bounds, shrink)
        return mu - r, mu + r
    final = plan.final_linear()
    if final is not None:  # fold the margin specification into the last linear layer
        weight, bias = effective_linear(final, stats)
        check_y_range(y, weight.shape[0])
        mu, r = ibp_steps(plan.steps[:-1], mu, r, stats, request.relu_bounds, shrink)
        if mu.dim() != 2:
            raise ValueError(f"x: the last Linear expects a [B, {weight.shape[1]}] input box, "
                             f"got shape {tuple(mu.shape)} (add an nn.Flatten before it)")
        return margin_lower_folded(mu, r, weight, bias, y)
    mu, r = ibp_forward(plan, mu, r, stats, request.relu_bounds, shrink)
    if mu.dim() != 2:
        raise ValueError(f"y: margins need logits of shape [B, C], but the model outputs shape "
                         f"{tuple(mu.shape)}")
    check_y_range(y, mu.shape[1])
    return margin_lower_from_logits(mu, r, y)


from adcert.bounds.crown import alpha_crown_method, crown_ibp_method, crown_method  # noqa: E402

METHODS: Dict[str, Method] = {"ibp": _ibp_method, "crown-ibp": crown_ibp_method,
                              "crown": crown_method, "alpha-crown": alpha_crown_method}
PLANNED_METHODS: Tuple[str, ...] = ()


def _get_method(method) -> Method:
    key = method.lower() if isinstance(method, str) else None
    if key in METHODS:
        return METHODS[key]
    supported = ", ".join(repr(m) for m in METHODS)
    planned = " (planned, not implemented yet)" if key in PLANNED_METHODS else ""
    raise NotImplementedError(f"method: {method!r} is not supported{planned}; "
                              f"supported methods: {supported}")


def compute_bounds(model: nn.Module, x: Tensor, eps: Optional[Eps] = None, method: str = "ibp",
                   y: Optional[Tensor] = None, x_L: Optional[Tensor] = None,
                   x_U: Optional[Tensor] = None, bn_stats: Optional[Stats] = None,
                   C: Optional[Tensor] = None, sound: bool = False,
                   relu_bounds: Optional[List[Tuple[Tensor, Tensor]]] = None,
                   data_range: Tuple[float, float] = (0.0, 1.0), **options: Any) -> Result:
    """Bounds of ``model``'s outputs over an L-inf input box around ``x``.

    Args:
        model: an ``nn.Sequential`` (nested ones are flattened) of ``Conv2d``, ``Linear``,
            ``BatchNorm1d/2d``, ``ReLU``, ``Flatten``, :class:`~adcert.models.Normalize`,
            ``Identity`` and dropout (the identity for bounds) -- or any ``nn.Module`` that
            ``torch.fx`` can trace into those plus ``AvgPool2d``/``AdaptiveAvgPool2d``,
            ``F.relu``, batch-keeping ``view``/``reshape``/``flatten`` and residual adds
            (ResNet blocks); see :mod:`adcert.bounds.trace`. Built once per model, cached.
        x: clean inputs ``[B, *in]`` in pixel space ``[0, 1]`` (normalisation belongs in the
            model, :class:`~adcert.models.Normalize`), the model's dtype and device; with
            ``eps``, values outside ``data_range`` raise ``ValueError`` (checked on CPU).
        eps: a float >= 0 or a per-sample tensor ``[B]``; the box is
            ``[clamp(x - eps, 0, 1), clamp(x + eps, 0, 1)]``.
        method: ``"ibp"``, ``"crown-ibp"``, ``"crown"`` or ``"alpha-crown"`` (see
            :mod:`adcert.bounds.crown`; options ``max_spec_elements``, ``patches``, ``splits``,
            and for alpha-crown ``intermediate``, ``max_alpha_elements``, ``iterations``, ``lr``, ``lr_decay``, ``patience``, ``tol``, ``beta``,
            ``lr_beta`` and the warm start ``init_alphas``, ``init_betas``, ``alpha_out``;
            for ibp ``relu_shrink``, SABR's unsound ReLU-output shrink for training, default 1).
        y: optional labels ``[B]`` (int64). If given, the result is the margin lower bounds.
        x_L, x_U: an explicit input box ``[B, *in]`` (used as is), instead of ``eps``.
        bn_stats: ``{bn_module: (mean, var)}`` for training-mode batch norms, e.g. from
            :func:`~adcert.bounds.clean_bn_stats`, reused across the passes of a training step.
            Missing ones are computed from a clean forward of ``x``. Batch norms in eval mode
            (``model.training`` False, or the module's own flag False) always use their running
            statistics. Running statistics are never updated.

        C: a specification ``[B, S, C_out]`` (exclusive with ``y``): bound ``C z`` instead.
        sound: rigorous floating-point widening for certification (DESIGN.md section 4);
            for ``"ibp"`` see :mod:`adcert.bounds.sound` (fp32/fp64 only, TF32 off for the
            call, result detached).
        relu_bounds: a list to which ``(lb, ub)`` of every ReLU input is appended, in order.
        data_range: ``(lo, hi)``, the input domain the eps-box is clamped to (default the
            pixel range ``(0, 1)``); not used with ``x_L, x_U``.
        **options: method-specific options (unknown ones raise ``TypeError``).

    Returns:
        without ``y``: ``(lb, ub)``, each the model's output shape (``[B, C]`` for classifiers);
        with ``y``: ``margins: [B, C]``, lower bounds of ``z_y - z_i`` with the ``y`` entry exactly
        0, computed with the specification folded into the last linear layer when the model ends
        in one; ``F.cross_entropy(-margins, y)`` is the IBP loss.

    Differentiable w.r.t. the model's parameters (and ``x``, ``eps``, ``x_L``, ``x_U``) and, for
    training-mode batch norms, through their statistics (given or computed from ``x``; DESIGN.md
    section 5). Raises ``NotImplementedError`` for unsupported modules or methods,
    ``TypeError``/``ValueError`` naming the argument for bad inputs.
    """
    run = _get_method(method)
    check_x(x)
    plan = get_plan(model)
    check_x_for_plan(plan, x)
    mu, r = input_box(x, eps, x_L, x_U, data_range)
    labels = check_y(y, x) if y is not None else None
    if labels is not None and C is not None:
        raise ValueError("C: give either y (margin specification) or C, not both")
    request = BoundRequest(y=labels, C=C, sound=bool(sound), relu_bounds=relu_bounds,
                           options=dict(options))
    try:
        stats = resolve_bn_stats(plan, x, check_bn_stats(bn_stats), model.training)
        # The input box is validated above; every later box comes out of our own ops.
        with value_checks(False):
            return run(plan, mu, r, stats, request)
    except (ValueError, RuntimeError) as err:
        # A shape error deep inside names an internal layer; if x's shape is the cause, say so.
        msg = input_shape_error(model, x)
        if msg is None:
            raise
        raise ValueError(msg) from err
