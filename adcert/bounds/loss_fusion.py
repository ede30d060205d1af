"""CROWN-IBP loss fusion: an upper bound of the cross-entropy loss over the input box with ONE
backward specification row per sample (instead of one per class).

With logits ``z`` and label ``y``, ``CE(z, y) = log sum_i exp(d_i)``, ``d_i = z_i - z_y``
(``d_y = 0``). :func:`crown_ibp_ce_upper` bounds ``max_{x in box} CE(f(x), y)`` as follows:

1. IBP (one pass, the margin specification folded into the last linear layer) gives
   ``l_i <= d_i <= u_i`` and every ReLU's input box.
2. ``exp`` is convex, so on ``[l_i, u_i]`` its chord is an upper line. With the shift
   ``M = max_i u_i`` (detached; the result does not depend on it in real arithmetic, it only
   keeps every ``exp`` <= 1):

       exp(d_i - M) <= a_i (d_i - l_i) + exp(l_i - M),
       a_i = (exp(u_i - M) - exp(l_i - M)) / (u_i - l_i) >= 0

   (``a_i = exp(l_i - M)`` when ``u_i = l_i``; ``a_y = 0``). Summing, the scaled sum
   ``S'(x) = sum_i exp(d_i - M)`` satisfies ``S' <= T(z) = c . z + b`` with the single row
   ``c = sum_i a_i (e_i - e_y)`` and ``b = sum_i (exp(l_i - M) - a_i l_i)``.
3. One CROWN-IBP back-substitution of the row ``-c`` (the negated row: ``backward_lower`` gives
   lower bounds; IBP boxes for the ReLUs, CROWN's adaptive lower slopes) gives
   ``T* >= max_{x in box} T(z(x))``.
4. ``log`` is concave and increasing: for any ``t > 0``, ``log s <= log t - 1 + s / t`` (its
   tangent at ``t``), so ``CE <= M + log t - 1 + T* / t``. The row ``c / t`` scales with ``1/t``
   only, so one back-substitution of ``c`` serves every ``t``, and the best tangent point,
   ``t = T*`` (the minimiser of ``log t - 1 + T*/t``), is chosen AFTER it: the bound is
   ``M + log T*``. This is never worse than the tangent at the log of the IBP upper bound of the
   sum or at the clean point (any other ``t`` gives a larger value of the same expression).

Soundness (real arithmetic): every step is an over-approximation; ``T*`` is clamped below by the
smallest positive normal number before the log (raising an upper bound keeps it sound; in real
arithmetic ``T* >= exp(d_y - M) > 0`` anyway). No rounding-sound mode: this is a training loss.
Precision: ``T*`` sums terms of size up to ``sum_i exp(u_i - M)`` (>= 1), so when it is many
orders of magnitude smaller, rounding dominates; where the clamp acts the gradient is zero.

Relation to the unfused CROWN-IBP loss ``CE(-m, y)`` (``m`` the CROWN-IBP margins): neither is
always smaller. The back-substitution with fixed ReLU lines maximises a linear function over a
fixed relaxed set, so it is subadditive: ``T* <= sum_i chord_i(U_i)`` with ``U_i = -m_i`` the
unfused CROWN-IBP upper bounds of ``d_i`` (same IBP boxes, same slopes). The chord slack can make
the fused bound looser than the unfused one, the shared relaxation tighter.
"""
from __future__ import annotations

from typing import List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from adcert.bounds.bn import check_bn_stats
from adcert.bounds.forward import resolve_bn_stats
from adcert.bounds.ibp import effective_linear, ibp_steps
from adcert.bounds.inputs import Eps, check_x, check_x_for_plan, check_y, check_y_range, input_box
from adcert.bounds.linear_relax import backward_lower, lower_plan
from adcert.bounds.plan import get_plan
from adcert.bounds.spec import fold_margin_spec, margin_spec, zero_label_entry
from adcert.ops._checks import value_checks

Tensor = torch.Tensor
Box = Tuple[Tensor, Tensor]

__all__ = ["crown_ibp_ce_upper", "exp_chord"]


def exp_chord(lower: Tensor, upper: Tensor) -> Tuple[Tensor, Tensor]:
    """The chord of ``exp`` on ``[lower, upper]`` (any shape, ``lower <= upper`` elementwise):
    ``(slope, value_at_lower)`` with ``exp(d) <= slope * (d - lower) + value_at_lower`` for every
    ``d`` in the interval; ``slope = exp(lower)`` where the interval is a point.

    Computed without cancellation for narrow intervals (``exp(l) expm1(w) / w``, ``w = u - l``)
    and without overflow for wide ones (``(exp(u) - exp(l)) / w``); NaN-free gradients."""
    e_lo = lower.exp()
    w = upper - lower
    wide = w > 0.5
    w_wide = torch.where(wide, w, torch.ones_like(w))
    slope_wide = (upper.exp() - e_lo) / w_wide
    w_small = torch.where(wide | (w <= 0), torch.ones_like(w), w)
    ratio = torch.where(w > 0, torch.expm1(w_small) / w_small, torch.ones_like(w))
    slope = torch.where(wide, slope_wide, e_lo * ratio)
    return slope, e_lo


def _margin_boxes(plan, mu: Tensor, r: Tensor, stats, y: Tensor, n: int,
                  relu_boxes: List[Box]) -> Box:
    """IBP bounds ``(l, u)``, each ``[B, n]``, of ``d_i = z_i - z_y`` (exactly 0 at ``i = y``),
    the rows ``e_i - e_y`` folded into the last linear layer when the model ends in one (one
    centre and one radius product serve both bounds); appends every ReLU input box to
    ``relu_boxes``."""
    final = plan.final_linear()
    if final is not None:
        h_mu, h_r = ibp_steps(plan.steps[:-1], mu, r, stats, relu_boxes)
        weight, bias = effective_linear(final, stats)                 # [n, K], [n]
        w_spec, b_spec = fold_margin_spec(weight, bias, y)             # rows of z_y - z_i
        A, const = -w_spec, -b_spec                                    # [B, n, K], [B, n]
    else:
        h_mu, h_r = ibp_steps(plan.steps, mu, r, stats, relu_boxes)
        A, const = -margin_spec(y, n, mu.dtype, mu.device), 0.0        # rows e_i - e_y
    centre = torch.einsum("bnk,bk->bn", A, h_mu) + const
    radius = torch.einsum("bnk,bk->bn", A.abs(), h_r)
    return zero_label_entry(centre - radius, y), zero_label_entry(centre + radius, y)


def crown_ibp_ce_upper(model: nn.Module, x: Tensor, eps: Optional[Eps], y: Tensor,
                       bn_stats: Optional[Mapping[nn.Module, Tuple[Tensor, Tensor]]] = None,
                       x_L: Optional[Tensor] = None, x_U: Optional[Tensor] = None,
                       relu_bounds: Optional[List[Box]] = None,
                       return_ibp_margins: bool = False
                       ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Per-sample upper bound ``[B]`` of ``max_{x' in box} CE(model(x'), y)`` by CROWN-IBP loss
    fusion (see the module docstring for the construction and the choice of the tangent point).

    Args: as :func:`adcert.bounds.compute_bounds` -- ``x: [B, *in]`` pixels in [0, 1], ``eps``
    (float or ``[B]``) or an explicit box ``x_L, x_U: [B, *in]``, labels ``y: [B]`` int64, frozen
    batch-norm statistics ``bn_stats`` for training-mode batch norms (missing ones come from a
    clean forward of ``x``). The model must output logits ``[B, C]``.

    relu_bounds: a list to which ``(lb, ub)`` of every ReLU input (the IBP boxes the relaxation
    uses) is appended, in order, as with ``compute_bounds`` (for the warm-up regulariser).
    return_ibp_margins: also return the IBP margin lower bounds ``[B, C]`` of ``z_y - z_i``
    (``y`` entry 0) from the same IBP pass: ``F.cross_entropy(-margins, y)`` is the IBP loss.

    Returns ``[B]`` (or ``([B], [B, C])`` with ``return_ibp_margins``), differentiable w.r.t. the
    model's parameters (and ``x``/``eps``/the box); ``.mean()`` is the fused CROWN-IBP training
    loss. Raises ``TypeError``/``ValueError`` naming the argument for bad inputs,
    ``NotImplementedError`` for unsupported modules."""
    check_x(x)
    plan = get_plan(model)
    check_x_for_plan(plan, x)
    mu, r = input_box(x, eps, x_L, x_U)
    labels = check_y(y, x)
    stats = resolve_bn_stats(plan, x, check_bn_stats(bn_stats), model.training)
    with value_checks(False):  # the input box is validated; later boxes come from our own ops
        low = lower_plan(plan, stats, tuple(mu.shape[1:]), mu.dtype, mu.device, "crown-ibp")
        out = low.out_shape
        if len(out) != 1:
            raise ValueError(f"y: the CE loss needs logits of shape [B, C], but the model "
                             f"outputs shape {(x.shape[0],) + tuple(out)}")
        n = out[0]
        check_y_range(labels, n)
        relu_boxes: List[Box] = []
        lo, up = _margin_boxes(plan, mu, r, stats, labels, n, relu_boxes)
        shift = up.detach().amax(1, keepdim=True)            # M >= u_y = 0
        slope, e_lo = exp_chord(lo - shift, up - shift)      # [B, n]
        is_y = F.one_hot(labels, n).bool()
        slope = torch.where(is_y, torch.zeros_like(slope), slope)
        # T(z) = sum_i slope_i (d_i - l_i) + exp(l_i - M) = c . z + b   (d_y = 0: the y term
        # is the constant exp(-M), kept through e_lo with l_y = 0)
        c = slope - is_y.to(slope.dtype) * slope.sum(1, keepdim=True)
        b = (e_lo - slope * lo).sum(1)
        t_star = -backward_lower(low, len(low.ops), (-c).unsqueeze(1), mu, r, relu_boxes)[:, 0]
        t_star = (t_star + b).clamp(min=torch.finfo(t_star.dtype).tiny)
        bound = shift[:, 0] + t_star.log()
    if relu_bounds is not None:
        relu_bounds.extend(relu_boxes)
    return (bound, -up) if return_ibp_margins else bound
