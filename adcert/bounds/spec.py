"""The margin specification ``z_y - z_i`` (DESIGN.md sections 6-7).

The tight way (used whenever the model ends in a ``Linear`` without ReLU): fold the specification
into that layer, i.e. bound ``(W_y - W_i) h + (b_y - b_i)`` with a per-sample weight
``[B, C, K]`` over the box of the last hidden layer ``h``. This is never looser than subtracting
logit bounds, ``lb_y - ub_i``, which is the fallback for other models.

In both cases the ``y`` entry of the result is exactly 0, so ``F.cross_entropy(-margins, y)`` is
the IBP loss ``CE([0, -m_lb], 0)``.
"""
from __future__ import annotations

from typing import Tuple

import torch

Tensor = torch.Tensor


def zero_label_entry(margins: Tensor, y: Tensor) -> Tensor:
    """``margins: [B, C]`` with the entry ``[b, y_b]`` of every row set to exactly 0."""
    classes = torch.arange(margins.shape[1], device=margins.device)
    is_y = classes.unsqueeze(0) == y.unsqueeze(1)
    return torch.where(is_y, torch.zeros((), dtype=margins.dtype, device=margins.device), margins)


def margin_rows(t: Tensor, y: Tensor) -> Tensor:
    """``out[b, i] = t[y_b] - t[i]`` for ``t: [C, *]``, ``y: [B]`` -> ``[B, C, *]`` (the
    ``y`` row is exactly zero): the margin specification applied to ``t``'s rows."""
    return t[y].unsqueeze(1) - t.unsqueeze(0)


def margin_spec(y: Tensor, n: int, dtype: torch.dtype, device) -> Tensor:
    """The margin specification ``[B, n, n]``: row ``i`` of sample ``b`` is ``e_{y_b} - e_i``, so
    that ``spec[b] @ z = z_{y_b} - z`` for logits ``z: [n]``."""
    return margin_rows(torch.eye(n, dtype=dtype, device=device), y)


def other_classes(y: Tensor, n: int) -> Tensor:
    """``[B, n - 1]``: the classes ``i != y_b`` of every sample, ascending."""
    others = torch.arange(n - 1, device=y.device).unsqueeze(0)
    return others + (others >= y.unsqueeze(1)).long()


def margin_spec_others(y: Tensor, n: int, dtype: torch.dtype, device) -> Tensor:
    """:func:`margin_spec` without the ``y`` row (identically zero): ``[B, n - 1, n]``, row ``j``
    of sample ``b`` is ``e_{y_b} - e_i`` for ``i = other_classes(y, n)[b, j]``."""
    eye = torch.eye(n, dtype=dtype, device=device)
    return eye[y].unsqueeze(1) - eye[other_classes(y, n)]


def scatter_others(lb: Tensor, y: Tensor) -> Tensor:
    """``lb: [B, n - 1]`` (the rows of :func:`margin_spec_others`) -> ``[B, n]`` with the ``y``
    entry exactly 0."""
    n = lb.shape[1] + 1
    out = lb.new_zeros((lb.shape[0], n))
    return out.scatter(1, other_classes(y, n), lb)


def fold_margin_spec(weight: Tensor, bias: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-sample margin layer: ``W_spec[b, i] = W[y_b] - W[i]``, ``b_spec[b, i] = b[y_b] - b[i]``.

    ``weight: [C, K]``, ``bias: [C]``, ``y: [B]`` -> ``W_spec: [B, C, K]``, ``b_spec: [B, C]``
    (the ``y`` row is exactly zero); :func:`margin_spec` folded into the layer."""
    return margin_rows(weight, y), margin_rows(bias, y)


def margin_lower_folded(mu: Tensor, r: Tensor, weight: Tensor, bias: Tensor, y: Tensor) -> Tensor:
    """Lower bounds ``[B, C]`` of ``z_y - z_i`` where ``z = weight h + bias`` and ``h`` lies in the
    box ``(mu, r): [B, K]``; the ``y`` entry is 0."""
    w_spec, b_spec = fold_margin_spec(weight, bias, y)
    centre = torch.einsum("bck,bk->bc", w_spec, mu) + b_spec
    radius = torch.einsum("bck,bk->bc", w_spec.abs(), r)
    return zero_label_entry(centre - radius, y)


def margin_lower_from_logits(mu: Tensor, r: Tensor, y: Tensor) -> Tensor:
    """Lower bounds ``[B, C]`` of ``z_y - z_i`` from a logit box ``(mu, r): [B, C]``:
    ``lb_y - ub_i``; the ``y`` entry is 0."""
    lower_y = (mu - r).gather(1, y[:, None])
    return zero_label_entry(lower_y - (mu + r), y)
