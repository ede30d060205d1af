"""L-inf projected gradient descent (Madry et al.), gradients w.r.t. the input only.

Two step schedules (``pgd_attack(..., schedule=...)``):

* ``"fixed"`` (the default; evaluation attacks, :mod:`adcert.train.evaluate`, the certifier): a
  constant absolute step ``step_size`` (default ``2.5 * eps / steps``); each restart returns its
  LAST iterate, and across restarts the one with the highest loss is kept per sample.
* ``"ctbench"`` (the training attack of every method, CTBench App. B.4 and its published
  ``attacks.py``): the step is ``step_size`` times the box half-width ``(x_U - x_L) / 2`` per
  coordinate, ``step_size`` defaulting to ``max(0.25, 2 / steps)``, decayed during the steps
  (:func:`ctbench_step_factors`); every iterate of every restart is a candidate (the random start
  included) and per sample the one with the highest loss is returned.
"""
from __future__ import annotations

import math
from typing import Callable, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from adcert.attacks.bn import frozen_bn

Tensor = torch.Tensor
Eps = Union[float, Tensor]


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample CW margin ``max_{i != y} z_i - z_y`` (positive = misclassified): ``[B]``."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return others.max(dim=1).values - z_y


LOSSES = {
    "ce": lambda z, y: F.cross_entropy(z, y, reduction="none"),
    "margin": margin_loss,
}


def _box(x: Tensor, eps: Eps, x_L: Optional[Tensor], x_U: Optional[Tensor]
         ) -> Tuple[Tensor, Tensor]:
    if x_L is not None or x_U is not None:
        if x_L is None or x_U is None:
            raise ValueError("x_L, x_U: give both or neither")
        return x_L.detach(), x_U.detach()
    if isinstance(eps, Tensor):
        if eps.dim() == 1 and eps.shape[0] == x.shape[0]:
            eps = eps.view(-1, *([1] * (x.dim() - 1)))
        if bool((eps < 0).any()):
            raise ValueError("eps: expected >= 0")
    elif eps < 0:
        raise ValueError(f"eps: expected >= 0, got {eps}")
    return (x - eps).clamp(0, 1).detach(), (x + eps).clamp(0, 1).detach()


SCHEDULES = ("fixed", "ctbench")


def ctbench_step_factors(steps: int) -> List[float]:
    """Multiplier of the base step at each ascent step ``0 .. steps - 1`` of CTBench's training
    attack (its published ``attacks.py`` step scheduler; the paper is silent):

    * ``steps >= 50``: x0.1 at steps ``ceil(0.5 n)``, ``ceil(0.8 n)``, ``ceil(0.9 n)``;
    * ``20 <= steps < 50``: x0.1 at step ``ceil(0.7 n)``;
    * ``steps < 20``: x0.2 every 10 steps (so only attacks of 11-19 steps decay, at step 10).

    Returns a list of ``steps`` floats, non-increasing, starting at 1."""
    if steps >= 50:
        gamma, milestones = 0.1, [math.ceil(f * steps) for f in (0.5, 0.8, 0.9)]
    elif steps >= 20:
        gamma, milestones = 0.1, [math.ceil(0.7 * steps)]
    else:
        gamma, milestones = 0.2, list(range(10, max(steps, 0), 10))
    return [gamma ** sum(i >= m for m in milestones) for i in range(steps)]


def _step_sizes(half: Tensor, steps: int, step_size: Optional[float], schedule: str
                ) -> List[Tensor]:
    """The step of every ascent step, each ``[B, *in]`` (or broadcastable): see the module
    docstring. ``half``: the box half-widths ``[B, *in]``."""
    if schedule == "fixed":
        alpha = 2.5 * half / max(steps, 1) if step_size is None else \
            torch.full_like(half, float(step_size))
        return [alpha] * steps
    base = max(0.25, 2.0 / max(steps, 1)) if step_size is None else float(step_size)
    return [(base * f) * half for f in ctbench_step_factors(steps)]


def _loss_and_grad(model: nn.Module, loss_fn, x_adv: Tensor, y: Tensor, need_grad: bool
                   ) -> Tuple[Tensor, Optional[Tensor]]:
    """Per-sample loss ``[B]`` (detached) at ``x_adv`` and, if ``need_grad``, its input
    gradient ``[B, *in]``."""
    if not need_grad:
        with torch.no_grad():
            return loss_fn(model(x_adv), y).detach(), None
    x_adv = x_adv.detach().requires_grad_(True)
    value = loss_fn(model(x_adv), y)
    (grad,) = torch.autograd.grad(value.sum(), x_adv)
    return value.detach(), grad


def _keep_best(best_x: Optional[Tensor], best_loss: Optional[Tensor], x_adv: Tensor,
               value: Tensor) -> Tuple[Tensor, Tensor]:
    """Per sample, ``x_adv`` (``[B, *in]``) where ``value > best_loss`` (``[B]``), else the best
    so far (the first candidate when there is none)."""
    if best_x is None:
        return x_adv.detach(), value
    better = value > best_loss
    best_x = torch.where(better.view(-1, *([1] * (x_adv.dim() - 1))), x_adv.detach(), best_x)
    return best_x, torch.where(better, value, best_loss)


def _run_restart(model, loss_fn, start: Tensor, y: Tensor, lo: Tensor, hi: Tensor,
                 alphas: List[Tensor], keep_best: bool, need_loss: bool
                 ) -> Tuple[Tensor, Optional[Tensor]]:
    """One restart from ``start: [B, *in]``: signed-gradient ascent with step ``alphas[i]`` at
    step ``i``, projected into ``[lo, hi]``. Returns ``(x, loss [B] or None)``: the best iterate
    when ``keep_best`` (the start and the last iterate included), else the last iterate (its loss
    only when ``need_loss``)."""
    x_adv, best_x, best_loss = start, None, None
    for i in range(len(alphas) + 1):
        last = i == len(alphas)
        if last and not (keep_best or need_loss):
            return x_adv.detach(), None
        value, grad = _loss_and_grad(model, loss_fn, x_adv, y, need_grad=not last)
        if keep_best:
            best_x, best_loss = _keep_best(best_x, best_loss, x_adv, value)
        if last:
            return (best_x, best_loss) if keep_best else (x_adv.detach(), value)
        x_adv = torch.min(torch.max(x_adv.detach() + alphas[i] * grad.sign(), lo), hi)
    raise AssertionError("unreachable")  # pragma: no cover


def pgd_attack(model: nn.Module, x: Tensor, y: Tensor, eps: Eps = 0.0, steps: int = 10,
               step_size: Optional[float] = None, restarts: int = 1, random_start: bool = True,
               loss: Union[str, Callable[[Tensor, Tensor], Tensor]] = "ce",
               x_L: Optional[Tensor] = None, x_U: Optional[Tensor] = None,
               bn_stats: Optional[Mapping] = None, schedule: str = "fixed") -> Tensor:
    """The worst point found by signed-gradient ascent on ``loss`` inside the box.

    Args:
        x: ``[B, *in]`` pixels in [0, 1]; ``y``: ``[B]`` int64.
        eps: float or ``[B]``; the box is ``[clamp(x - eps, 0, 1), clamp(x + eps, 0, 1)]``
            unless ``x_L``/``x_U`` (``[B, *in]``) are given.
        steps: ascent steps per restart (0: the random start, or ``x`` itself).
        step_size: ``schedule="fixed"``: the absolute step, default ``2.5 * eps / steps`` (box
            half-width for explicit boxes); ``schedule="ctbench"``: a fraction (> 0) of the box
            half-width, default ``max(0.25, 2 / steps)``, decayed by :func:`ctbench_step_factors`.
        restarts: independent uniform random starts in the box; per sample the one with the
            highest loss is kept.
        loss: ``"ce"``, ``"margin"`` or ``fn(logits, y) -> [B]``.
        bn_stats: frozen batch-norm statistics of the step (see :func:`frozen_bn`); running
            statistics are never updated by the attack.
        schedule: ``"fixed"`` (each restart's last iterate; evaluation) or ``"ctbench"`` (the
            best-loss iterate of all steps and restarts; training), see the module docstring.

    Returns ``x_adv: [B, *in]``, detached. Parameter gradients (``.grad``) are never touched.
    """
    if steps < 0 or restarts < 1:
        raise ValueError(f"steps, restarts: expected steps >= 0 and restarts >= 1, got "
                         f"{steps}, {restarts}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    if schedule == "ctbench" and step_size is not None and not float(step_size) > 0:
        raise ValueError(f"step_size: expected a fraction of the box half-width > 0, got "
                         f"{step_size}")
    loss_fn = LOSSES[loss] if isinstance(loss, str) else loss
    lo, hi = _box(x, eps, x_L, x_U)
    alphas = _step_sizes((hi - lo) / 2, steps, step_size, schedule)
    keep_best = schedule == "ctbench"
    x = x.detach()
    best_x = best_loss = None
    with frozen_bn(model, bn_stats), torch.enable_grad():
        for _ in range(restarts):
            start = lo + (hi - lo) * torch.rand_like(x) if random_start else x.clone()
            x_adv, value = _run_restart(model, loss_fn, start, y, lo, hi, alphas, keep_best,
                                        need_loss=restarts > 1)
            if restarts == 1:
                return x_adv
            best_x, best_loss = _keep_best(best_x, best_loss, x_adv, value)
    return best_x
