"""Which ReLU neuron a branch-and-bound domain is split on next (:mod:`adcert.certify.bab_relu`).

Scores, one tensor ``[n, *shape_k]`` per ReLU layer for ``n`` domains (their ReLU input boxes
``boxes[k] = (lo, up)``); only unstable, unsplit neurons are candidates:

* ``width``: the triangle relaxation's height at 0, ``-l u / (u - l)``;
* ``babsr``: one CROWN backward pass of the margin rows gives, for the domain's worst row, the
  coefficient ``a_j`` reaching every ReLU output; a negative one takes the chord, whose intercept
  costs the bound ``-a_j * height``, which a split removes; that cost plus ``1e-3`` x the height
  (a tie-break for neurons whose coefficient is >= 0).

:func:`fsb_choice` (``branching="fsb"``, filtered smart branching): the ``k`` best BaBSR
candidates of each domain are looked ahead -- both children of each (the neuron's input clamped
to ``>= 0`` and to ``<= 0``) bounded by one CROWN backward pass of the margin rows with the
domain's boxes otherwise unchanged -- and the candidate whose WORSE child has the best bound
wins (a child whose clamp empties a box is infeasible: +inf). One batched pass of ``2 k n`` rows
per round. Measured on ``benchmarks/bench_bab.py``'s 24 instances (beta variant) it needed more
domains than BaBSR (135 against 95; a look-ahead with re-tightened intermediate bounds needed
960): the children's plain-CROWN bounds do not predict their beta-CROWN bounds, so BaBSR stays
the default.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from adcert.bounds.backward import backward_lower
from adcert.bounds.inputs import input_box
from adcert.bounds.spec import margin_spec_others, other_classes

Tensor = torch.Tensor
Box = Tuple[Tensor, Tensor]


def heights(boxes: Sequence[Box]) -> List[Tensor]:
    """The triangle relaxation's height at 0, ``-l u / (u - l)``, per neuron (0 if stable)."""
    tiny = torch.finfo(boxes[0][0].dtype).tiny
    return [(-lo * up / (up - lo).clamp(min=tiny)).nan_to_num(0.0) for lo, up in boxes]


def worst_margins(low, x: Tensor, y: Tensor, eps: float, boxes: Sequence[Box],
                  coefs: Dict[int, Tensor] = None) -> Tuple[Tensor, Tensor]:
    """One CROWN backward pass of the margin rows over ``n`` domains (``x: [1, *in]``):
    the margin lower bounds ``[n, C]`` (own class ``+inf``) and each domain's worst class.
    ``coefs`` receives the rows' coefficients at every ReLU, one row per class ``i != y``
    in ascending order (the zero ``y`` row is not walked; :func:`babsr_scores`)."""
    n = boxes[0][0].shape[0]
    C = low.out_shape[0]
    if C < 2:
        raise ValueError(f"branching needs at least 2 classes, the model has {C}")
    spec = margin_spec_others(y, C, x.dtype, x.device).expand(n, C - 1, C)
    mu, r = input_box(x, eps)
    with torch.no_grad():
        rows = backward_lower(low, len(low.ops), spec, mu.expand(n, *mu.shape[1:]),
                              r.expand(n, *r.shape[1:]), boxes, relu_coefs=coefs)
    lb = rows.new_full((n, C), float("inf"))
    lb = lb.scatter(1, other_classes(y, C).expand(n, C - 1), rows)
    return lb, lb.argmin(1)


def babsr_scores(low, x: Tensor, y: Tensor, eps: float, boxes: Sequence[Box]) -> List[Tensor]:
    """BaBSR scores (see the module docstring); ``low``: the lowered model."""
    h = heights(boxes)
    coefs: Dict[int, Tensor] = {}
    _, worst = worst_margins(low, x, y, eps, boxes, coefs)
    row = worst - (worst > y).long()  # the class's row among the classes i != y
    pick = torch.arange(row.shape[0], device=row.device)
    return [(-coefs[k][pick, row]).clamp(min=0) * hk + 1e-3 * hk if k in coefs else hk
            for k, hk in enumerate(h)]


def fsb_choice(low, x: Tensor, y: Tensor, eps: float, boxes: Sequence[Box], flat_scores: Tensor,
               k: int) -> Tensor:
    """The flat neuron index (over all layers concatenated) each domain splits on: among its
    ``k`` best-scored candidates (``flat_scores: [n, N]``, ``< 0`` = not a candidate), the one
    whose worse child has the best one-pass CROWN bound (see the module docstring)."""
    n, total = flat_scores.shape
    k = min(k, total)
    top_score, top = flat_scores.topk(k, dim=1)  # [n, k]
    sizes = [lo[0].numel() for lo, _ in boxes]
    offsets = torch.tensor([0] + sizes, device=top.device).cumsum(0)
    children = []
    for layer, (lo, up) in enumerate(boxes):
        shape = lo.shape[1:]
        lo_c = lo.flatten(1)[:, None, None].expand(n, k, 2, sizes[layer]).clone()
        up_c = up.flatten(1)[:, None, None].expand(n, k, 2, sizes[layer]).clone()
        here = (top >= offsets[layer]) & (top < offsets[layer + 1])  # [n, k]
        local = (top - offsets[layer]).clamp(0, sizes[layer] - 1).unsqueeze(-1)  # [n, k, 1]
        lo_on = lo_c[:, :, 0].gather(2, local)
        up_off = up_c[:, :, 1].gather(2, local)
        lo_c[:, :, 0].scatter_(2, local, torch.where(here.unsqueeze(-1), lo_on.clamp(min=0),
                                                     lo_on))
        up_c[:, :, 1].scatter_(2, local, torch.where(here.unsqueeze(-1), up_off.clamp(max=0),
                                                     up_off))
        children.append((lo_c.reshape((n * k * 2,) + tuple(shape)),
                         up_c.reshape((n * k * 2,) + tuple(shape))))
    lb, _ = worst_margins(low, x, y, eps, children)
    worst = lb.min(1).values.reshape(n, k, 2)
    empty = torch.zeros(n * k * 2, dtype=torch.bool, device=x.device)
    for lo_c, up_c in children:
        empty |= (lo_c > up_c).flatten(1).any(1)
    worst = torch.where(empty.reshape(n, k, 2), torch.full_like(worst, float("inf")), worst)
    value = worst.min(2).values.masked_fill(top_score < 0, -float("inf"))
    return top.gather(1, value.argmax(1, keepdim=True))[:, 0]
