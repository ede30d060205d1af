"""Per-step schedules: the eps ramp (CTBench / Shi et al. 2021) and the method-coefficient ramp.

The eps schedule: ``clean`` steps at eps 0, then a smooth ramp over ``ramp`` steps -- power-4 growth
for the first ``mid`` fraction of the ramp, linear after it, continuous with a continuous slope --
then the target eps.

The optimiser and its learning-rate schedule (``train.optimizer`` / ``train.lr_schedule``, see
:class:`adcert.train.config.TrainConfig`), built by :func:`build_optimizer` and
:func:`build_lr_scheduler`:

* ``milestones``: ``MultiStepLR``, stepped once per epoch (CTBench App. B.3: Adam 5e-4, x0.2 at
  the milestones).
* ``onecycle``: ``OneCycleLR`` over all optimiser steps, stepped once per step (ACERT App. B,
  Table 4: ``OneCycleLR`` with linear annealing and ``max_lr`` 2e-3).
* ``cyclic``: :class:`TriangularLR`, one linear up-and-down cycle from 0 to ``max_lr`` and back
  over all optimiser steps, stepped once per step (AD-CERT App. D: the short-cycle teachers, SGD
  with momentum 0.9, 30 epochs, the rate rising linearly from 0 to 0.2 over the first half and
  back to 0).

Every scheduler is a ``torch.optim.lr_scheduler.LRScheduler`` whose ``state_dict`` holds only
numbers and strings, so the trainer's checkpoint resumes it exactly.
"""
from __future__ import annotations

from typing import Iterable, Tuple

import torch
from torch.optim.lr_scheduler import LRScheduler


def smooth_ramp(t: float, mid: float = 0.25) -> float:
    """The ramp shape ``s(t)`` for ``t`` in [0, 1] (clamped): ``s(0) = 0``, ``s(1) = 1``,
    ``a t^4`` up to ``mid``, then linear with the same value and slope at ``mid``."""
    t = min(1.0, max(0.0, float(t)))
    a = 1.0 / (mid ** 4 + 4 * mid ** 3 * (1 - mid))
    s = a * t ** 4 if t < mid else a * mid ** 4 + 4 * a * mid ** 3 * (t - mid)
    return min(1.0, s)


def ramp_fraction(step: int, clean: int, ramp: int) -> float:
    """Linear progress through the ramp window in [0, 1]: 0 before ``clean`` steps, 1 after
    ``clean + ramp`` (1 right after the clean steps when ``ramp`` is 0)."""
    if step < clean:
        return 0.0
    if ramp <= 0:
        return 1.0
    return min(1.0, (step - clean) / ramp)


def eps_at(step: int, clean: int, ramp: int, eps: float, mid: float = 0.25) -> float:
    """The scheduled radius ``eps_t`` of global step ``step`` (0-based)."""
    if step < clean:
        return 0.0
    return eps * smooth_ramp(ramp_fraction(step, clean, ramp), mid)


def coef_at(kind: str, step: int, clean: int, ramp: int, eps_t: float, eps: float) -> float:
    """``StepState.coef``: ``eps`` -> ``eps_t / eps``; ``linear`` -> linear progress through the
    ramp window; ``none`` -> 1."""
    if kind == "eps":
        return 1.0 if eps <= 0 else min(1.0, eps_t / eps)
    if kind == "linear":
        return ramp_fraction(step, clean, ramp)
    if kind == "none":
        return 1.0
    raise ValueError(f"train.coef_ramp: expected eps, linear or none, got {kind!r}")


def triangle(t: float, peak: float = 0.5) -> float:
    """The cyclic schedule's shape at run fraction ``t`` (clamped to [0, 1]): ``t / peak`` up to
    ``peak``, then ``(1 - t) / (1 - peak)``; 0 at both ends, 1 at ``peak``."""
    t = min(1.0, max(0.0, float(t)))
    return t / peak if t <= peak else (1.0 - t) / (1.0 - peak)


class TriangularLR(LRScheduler):
    """One linear cycle ``0 -> max_lr -> 0`` over ``total_steps`` optimiser steps, the peak at
    the fraction ``pct_start``: step ``s`` (0-based) runs at ``max_lr * triangle((s + 1) /
    total_steps, pct_start)`` (the convention of the short-cycle adversarial-training code that
    AD-CERT App. D follows: the rate is set from ``epoch + (i + 1) / len(loader)`` before step
    ``i``), so the first step has a small positive rate and the last one rate 0. Step it once
    after every optimiser step. Closed form in ``last_epoch``: resuming from ``state_dict`` is
    exact."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_lr: float, total_steps: int,
                 pct_start: float = 0.5, last_epoch: int = -1):
        if not max_lr > 0:
            raise ValueError(f"max_lr: expected > 0, got {max_lr!r}")
        if int(total_steps) < 1:
            raise ValueError(f"total_steps: expected >= 1, got {total_steps!r}")
        if not 0 < pct_start < 1:
            raise ValueError(f"pct_start: expected a fraction in (0, 1), got {pct_start!r}")
        self.max_lr, self.total_steps = float(max_lr), int(total_steps)
        self.pct_start = float(pct_start)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, step: int) -> float:
        """The rate of optimiser step ``step`` (0-based)."""
        return self.max_lr * triangle((step + 1) / self.total_steps, self.pct_start)

    def get_lr(self):
        return [self.lr_at(self.last_epoch) for _ in self.optimizer.param_groups]


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg) -> torch.optim.Optimizer:
    """``cfg.optimizer`` (a :class:`TrainConfig`): Adam, or SGD with ``cfg.momentum``. The
    initial rate is ``cfg.lr`` (the schedule of ``onecycle`` / ``cyclic`` overrides it)."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    raise ValueError(f"train.optimizer: expected adam or sgd, got {cfg.optimizer!r}")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg, steps_per_epoch: int
                       ) -> Tuple[LRScheduler, bool]:
    """``(scheduler, per_step)`` for ``cfg.lr_schedule`` (a :class:`TrainConfig`):
    ``per_step`` True means ``scheduler.step()`` after every optimiser step, False after every
    epoch. ``steps_per_epoch``: optimiser steps per epoch (the run has ``cfg.epochs`` times
    that)."""
    total = cfg.epochs * steps_per_epoch
    if cfg.lr_schedule == "milestones":
        return torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=list(cfg.lr_milestones), gamma=cfg.lr_decay), False
    if cfg.lr_schedule == "onecycle":
        pct = 0.3 if cfg.lr_pct_start is None else cfg.lr_pct_start  # torch's default
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.max_lr, total_steps=total, pct_start=pct,
            anneal_strategy=cfg.lr_anneal, cycle_momentum=cfg.lr_cycle_momentum,
            div_factor=cfg.lr_div_factor, final_div_factor=cfg.lr_final_div_factor), True
    if cfg.lr_schedule == "cyclic":
        pct = 0.5 if cfg.lr_pct_start is None else cfg.lr_pct_start  # AD-CERT App. D
        return TriangularLR(optimizer, cfg.max_lr, total, pct), True
    raise ValueError(f"train.lr_schedule: expected milestones, onecycle or cyclic, got "
                     f"{cfg.lr_schedule!r}")


__all__ = ["smooth_ramp", "ramp_fraction", "eps_at", "coef_at", "triangle", "TriangularLR",
           "build_optimizer", "build_lr_scheduler"]
