"""Per-step schedules: the eps ramp (CTBench / Shi et al. 2021) and the method-coefficient ramp.

The eps schedule: ``clean`` steps at eps 0, then a smooth ramp over ``ramp`` steps -- power-4 growth
for the first ``mid`` fraction of the ramp, linear after it, continuous with a continuous slope --
then the target eps. The learning rate is Adam's with milestone decay (``MultiStepLR`` per epoch).
"""
from __future__ import annotations


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


__all__ = ["smooth_ramp", "ramp_fraction", "eps_at", "coef_at"]
