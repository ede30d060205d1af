"""L-inf projected gradient descent (Madry et al.), gradients w.r.t. the input only."""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Tuple, Union

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


def pgd_attack(model: nn.Module, x: Tensor, y: Tensor, eps: Eps = 0.0, steps: int = 10,
               step_size: Optional[float] = None, restarts: int = 1, random_start: bool = True,
               loss: Union[str, Callable[[Tensor, Tensor], Tensor]] = "ce",
               x_L: Optional[Tensor] = None, x_U: Optional[Tensor] = None,
               bn_stats: Optional[Mapping] = None) -> Tensor:
    """The worst point found by signed-gradient ascent on ``loss`` inside the box.

    Args:
        x: ``[B, *in]`` pixels in [0, 1]; ``y``: ``[B]`` int64.
        eps: float or ``[B]``; the box is ``[clamp(x - eps, 0, 1), clamp(x + eps, 0, 1)]``
            unless ``x_L``/``x_U`` (``[B, *in]``) are given.
        steps: ascent steps per restart (0: the random start, or ``x`` itself).
        step_size: default ``2.5 * eps / steps`` (box half-width for explicit boxes).
        restarts: independent random starts; per sample the one with the highest loss is kept.
        loss: ``"ce"``, ``"margin"`` or ``fn(logits, y) -> [B]``.
        bn_stats: frozen batch-norm statistics of the step (see :func:`frozen_bn`); running
            statistics are never updated by the attack.

    Returns ``x_adv: [B, *in]``, detached. Parameter gradients (``.grad``) are never touched.
    """
    if steps < 0 or restarts < 1:
        raise ValueError(f"steps, restarts: expected steps >= 0 and restarts >= 1, got "
                         f"{steps}, {restarts}")
    loss_fn = LOSSES[loss] if isinstance(loss, str) else loss
    lo, hi = _box(x, eps, x_L, x_U)
    half = (hi - lo) / 2
    if step_size is None:
        alpha = 2.5 * half / max(steps, 1)
    else:
        alpha = torch.full_like(half, float(step_size))
    x = x.detach()
    best_x, best_loss = x, None
    with frozen_bn(model, bn_stats), torch.enable_grad():
        for _ in range(restarts):
            if random_start:
                x_adv = lo + (hi - lo) * torch.rand_like(x)
            else:
                x_adv = x.clone()
            for _ in range(steps):
                x_adv.requires_grad_(True)
                value = loss_fn(model(x_adv), y).sum()
                (grad,) = torch.autograd.grad(value, x_adv)
                x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), lo), hi)
            if restarts == 1:
                return x_adv.detach()
            with torch.no_grad():
                final = loss_fn(model(x_adv), y)
            if best_loss is None:
                best_x, best_loss = x_adv.detach(), final
            else:
                better = (final > best_loss).view(-1, *([1] * (x.dim() - 1)))
                best_x = torch.where(better, x_adv.detach(), best_x)
                best_loss = torch.maximum(final, best_loss)
    return best_x
