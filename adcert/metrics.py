"""Robustness metrics from per-sample certified radii (papers/acert.txt section 3.3;
DESIGN.md section 7).

    radius: [N] certified radii in [0, eps_max] (adcert.certified_radius)
    correct: [N] bool, clean prediction correct (default: radius > 0)

    certified_accuracy(radius, eps)  = mean(correct & radius >= eps)
    ACR = mean(radius) / eps_max      (normalised average certified radius, eq. 12)
    ART = sqrt(Acc * ACR)             (accuracy-robustness trade-off, eq. 13)

A radius is a certificate at every ``eps <= radius`` (the bounds of nested boxes are nested), so
the certified accuracy is a step function of eps whose area over ``[0, eps_max]`` equals
``mean(radius)`` (the unnormalised ACR).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Union

import torch

Tensor = torch.Tensor


def _check_radius(radius, eps_max: Optional[float] = None) -> Tensor:
    if not isinstance(radius, Tensor) or radius.dim() != 1 or not radius.is_floating_point():
        raise ValueError(f"radius: expected a 1-D float tensor [N], got "
                         f"{getattr(radius, 'shape', type(radius).__name__)}")
    if radius.numel() == 0:
        raise ValueError("radius: expected at least one sample, got an empty tensor")
    if bool(torch.isnan(radius).any()) or bool((radius < 0).any()):
        raise ValueError("radius: expected radii >= 0 without NaN")
    if eps_max is not None:
        if not (isinstance(eps_max, (int, float)) and math.isfinite(eps_max) and eps_max > 0):
            raise ValueError(f"eps_max: expected a finite float > 0, got {eps_max!r}")
        if bool((radius > eps_max * (1 + 1e-6)).any()):
            raise ValueError(f"radius: expected radii <= eps_max = {eps_max}")
    return radius


def _correct(radius: Tensor, correct: Optional[Tensor]) -> Tensor:
    if correct is None:
        return radius > 0
    if not isinstance(correct, Tensor) or correct.shape != radius.shape:
        raise ValueError(f"correct: expected a bool tensor of shape {tuple(radius.shape)}, got "
                         f"{getattr(correct, 'shape', type(correct).__name__)}")
    correct = correct.bool()
    if bool((~correct & (radius > 0)).any()):
        raise ValueError("correct: a sample with a positive radius is marked misclassified")
    return correct


def certified_accuracy(radius: Tensor, eps: Union[float, Sequence[float], Tensor],
                       correct: Optional[Tensor] = None) -> Tensor:
    """Fraction of samples certified at each ``eps`` (a float -> 0-dim tensor; a sequence or
    tensor ``[E]`` -> ``[E]``): ``mean(correct & (radius >= eps))``."""
    radius = _check_radius(radius)
    ok = _correct(radius, correct)
    grid = torch.as_tensor(eps, dtype=radius.dtype, device=radius.device)
    if bool(torch.isnan(grid).any()) or bool((grid < 0).any()):
        raise ValueError("eps: expected values >= 0 without NaN")
    cert = ok & (radius >= grid.reshape(-1, 1))
    return cert.to(radius.dtype).mean(1).reshape(grid.shape)


def acr(radius: Tensor, eps_max: float) -> Tensor:
    """Normalised average certified radius ``mean(radius) / eps_max`` (0-dim tensor)."""
    return _check_radius(radius, eps_max).mean() / eps_max


def art(accuracy: Union[float, Tensor], acr_value: Union[float, Tensor]) -> Tensor:
    """``sqrt(accuracy * ACR)``, both in [0, 1]."""
    a = torch.as_tensor(accuracy, dtype=torch.float64)
    c = torch.as_tensor(acr_value, dtype=torch.float64)
    if bool(((a < 0) | (a > 1) | (c < 0) | (c > 1) | a.isnan() | c.isnan()).any()):
        raise ValueError(f"accuracy, acr_value: expected values in [0, 1], got {accuracy}, "
                         f"{acr_value}")
    return torch.sqrt(a * c)


def radius_metrics(radius: Tensor, eps_max: float, correct: Optional[Tensor] = None,
                   eps_grid: Optional[Sequence[float]] = None) -> Dict[str, float]:
    """``{"acc", "acr", "art"}`` and ``"cert_acc@<eps>"`` for every eps of ``eps_grid``
    (default ``eps_max``), as Python floats (one host transfer)."""
    radius = _check_radius(radius, eps_max)
    ok = _correct(radius, correct)
    acc = ok.to(torch.float64).mean()
    c = acr(radius, eps_max).to(torch.float64)
    grid = [eps_max] if eps_grid is None else list(eps_grid)
    cert = certified_accuracy(radius, grid, ok).to(torch.float64)
    values = torch.cat([torch.stack([acc, c, art(acc, c)]), cert.reshape(-1)]).tolist()
    out = {"acc": values[0], "acr": values[1], "art": values[2]}
    out.update({f"cert_acc@{e:g}": v for e, v in zip(grid, values[3:])})
    return out


__all__ = ["certified_accuracy", "acr", "art", "radius_metrics"]
