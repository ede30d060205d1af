"""ACERT: adaptive certified training (papers/acert.txt; DESIGN.md sections 6-7).

Each sample is trained at its own certified radius, capped at the scheduled ``eps_max_t =
state.eps`` (the paper schedules ``eps_max_t`` from 0 to ``eps_max`` during warm-up)::

    E_i    = certified radius of (x_i, y_i) in [0, eps_max_t]     (adcert.certified_radius, IBP)
    L_rob  = mean_i CE(-m(x_i, y_i; E_i), y_i)                    (eq. 9: IBP margins at E_i)
    L      = kappa CE(f(x), y) + (1 - kappa) L_rob                (eq. 11)
             + reg_lambda (1 - eps_t / eps) R_warmup               (Shi et al.'s regularisers)

``E_i`` is found without gradient (Brent, ``maxiter`` iterations; the paper uses 2, xtol 1e-6,
rtol 1e-4); by default the loss uses Brent's best point (``brentq``'s answer, as the paper does);
``certified_only=True`` trains at the verified lower end instead. ``acert-fast`` (the paper's
zero-iteration variant, Appendix B) sets ``E_i = eps_max_t`` for correctly classified samples and
0 for misclassified ones.

Warm starts across epochs (``warm_start``, off by default): with dataset indices
(``state.index: [B]`` int64, which the trainer fills from its batch iterator, or ``loss(...,
index=idx)``) each sample's radius is cached (as a fraction of ``eps_max_t``) and its next
search starts from a narrow bracket around it; samples never seen before start from ``[0,
eps_max_t]``. The cache is part of :meth:`ACERT.state_dict`, so resumable checkpoints restore it.
Without indices every search starts cold. Cost: a warm bracket takes two bound passes instead of
one (a cold search reads ``R(0)`` from the clean logits) plus up to two host synchronisations,
i.e. 4+ passes instead of 3 at ``maxiter = 2``; it buys a more accurate estimate per iteration,
but on a small digits model early in training a cold search given the same number of passes was
as accurate (radii drifted 10-20% of ``eps_max_t`` between epochs), so the default is the
cheaper cold search; ``warm_start=True`` turns the cache on.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from adcert.bounds import compute_bounds
from adcert.methods.base import Method, MethodOutput, StepState, register, with_bn_stats
from adcert.radius import certified_radius

try:  # Shi et al.'s warm-up regularisers (adcert.methods.regularizers, when present)
    from adcert.methods.regularizers import first_layer_radius, warmup_regularizer
except ImportError:  # pragma: no cover - older trees: the warm-up regulariser is unavailable
    warmup_regularizer = None

Tensor = torch.Tensor


class RadiusCache:
    """Last radii per dataset index, stored as fractions of that step's ``eps_max_t`` (NaN:
    unknown). ``get(index, eps, like)`` -> ``[B]`` radii (unknown: NaN, which
    :func:`adcert.certified_radius` searches cold); ``put(index, radius, eps)``;
    ``known(index)``: any stored. Grows on demand; lives on the device of the radii. A batch
    with no stored radius starts cold (``init=None``)."""

    def __init__(self):
        self.frac: Optional[Tensor] = None

    def _grow(self, index: Tensor, like: Tensor) -> None:
        need = int(index.max()) + 1 if index.numel() else 0
        if self.frac is None or self.frac.numel() < need or self.frac.device != like.device:
            new = torch.full((max(need, 1),), math.nan, dtype=like.dtype, device=like.device)
            if self.frac is not None:
                k = min(self.frac.numel(), new.numel())
                new[:k] = self.frac[:k].to(new)
            self.frac = new

    def known(self, index: Tensor) -> bool:
        """Whether any of ``index`` has a stored radius."""
        if self.frac is None or index.numel() == 0:
            return False
        inside = index[index < self.frac.numel()]
        return bool((~torch.isnan(self.frac[inside])).any())

    def get(self, index: Tensor, eps: float, like: Tensor) -> Tensor:
        self._grow(index, like)
        return self.frac[index] * eps

    def put(self, index: Tensor, radius: Tensor, eps: float) -> None:
        self._grow(index, radius)
        self.frac[index] = (radius.detach() / eps).to(self.frac.dtype)

    def state_dict(self) -> dict:
        """``{"frac": [N] CPU tensor or None}``."""
        return {"frac": None if self.frac is None else self.frac.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        frac = state.get("frac") if isinstance(state, dict) else state
        if frac is not None and (not isinstance(frac, Tensor) or frac.dim() != 1
                                 or not frac.is_floating_point()):
            raise ValueError(f"state['frac']: expected None or a float tensor [N], got "
                             f"{getattr(frac, 'shape', type(frac).__name__)}")
        self.frac = None if frac is None else frac.clone()


def _check_hparams(name, kappa, maxiter, xtol, rtol, reg_lambda, reg_tau):
    for key, v in (("kappa", kappa), ("xtol", xtol), ("rtol", rtol), ("reg_lambda", reg_lambda),
                   ("reg_tau", reg_tau)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise TypeError(f"{name}: {key} must be a finite number, got {v!r}")
    if not 0.0 <= kappa <= 1.0:
        raise ValueError(f"{name}: kappa must be in [0, 1], got {kappa}")
    if isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 1:
        raise ValueError(f"{name}: maxiter must be an int >= 1 (acert-fast is the search-free "
                         f"variant), got {maxiter!r}")
    if xtol <= 0 or rtol < 0 or reg_lambda < 0 or reg_tau <= 0:
        raise ValueError(f"{name}: expected xtol > 0, rtol >= 0, reg_lambda >= 0, reg_tau > 0; "
                         f"got {xtol}, {rtol}, {reg_lambda}, {reg_tau}")


@register
class ACERT(Method):
    """Hyper-parameters (paper defaults, Table 4 / section 4.2):

    kappa:          weight of the clean CE (eq. 11); 0 in the paper's main tables.
    maxiter:        Brent iterations per step (2 in the paper; >= 1: ``acert-fast`` is the
                    search-free variant).
    xtol, rtol:     Brent tolerances (1e-6, 1e-4).
    certified_only: train at the verified lower radius instead of Brent's best point.
    reg_lambda, reg_tau: Shi et al.'s warm-up regulariser weight (0.5; 0.2 for TinyImageNet)
                    and tolerance, weighted ``reg_lambda * (1 - eps_t / eps)``.
    fast:           the ACERT-fast variant (no search: ``eps_max_t`` if correct, else 0).
    warm_start:     start each sample's search from its radius of the previous epoch (needs
                    dataset indices, see the module docstring).
    """
    name = "acert"

    def __init__(self, kappa: float = 0.0, maxiter: int = 2, xtol: float = 1e-6,
                 rtol: float = 1e-4, certified_only: bool = False, reg_lambda: float = 0.5,
                 reg_tau: float = 0.5, fast: bool = False, warm_start: bool = False):
        _check_hparams(self.name, kappa, maxiter, xtol, rtol, reg_lambda, reg_tau)
        self.kappa, self.maxiter = float(kappa), int(maxiter)
        self.xtol, self.rtol = float(xtol), float(rtol)
        self.certified_only, self.fast = bool(certified_only), bool(fast)
        self.warm_start = bool(warm_start)
        self.reg_lambda, self.reg_tau = float(reg_lambda), float(reg_tau)
        self.cache = RadiusCache()

    def state_dict(self) -> dict:
        """``{"radius_cache": ...}``: the warm-start cache (see :class:`RadiusCache`)."""
        return {"radius_cache": self.cache.state_dict()}

    def load_state_dict(self, state) -> None:
        unknown = sorted(set(state) - {"radius_cache"})
        if unknown:
            raise ValueError(f"state: unknown key(s) {unknown} for method {self.name!r}")
        self.cache.load_state_dict(state.get("radius_cache", {"frac": None}))

    def radii(self, model: nn.Module, x: Tensor, y: Tensor, logits: Tensor, state: StepState,
              index: Optional[Tensor] = None):
        """``(E [B] detached, iterations [B] or None)`` at ``eps_max_t = state.eps``."""
        eps = float(state.eps)
        if self.fast:
            correct = logits.detach().argmax(1) == y
            return torch.where(correct, eps, 0.0).to(x.dtype), None
        if not self.warm_start:
            index = None
        init = None
        if index is not None and self.cache.known(index):  # one host sync per step
            init = self.cache.get(index, eps, x.new_empty(0))
        res = certified_radius(model, x, y, eps, xtol=self.xtol, rtol=self.rtol,
                               maxiter=self.maxiter, init=init, bn_stats=state.bn_stats,
                               logits=logits)
        radius = res.radius if self.certified_only else res.estimate
        if index is not None:
            self.cache.put(index, radius, eps)
        return radius.detach(), res.iterations

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, state: StepState,
             index: Optional[Tensor] = None) -> MethodOutput:
        """``x: [B, *in]``, ``y: [B]``; ``index: [B]`` int64 dataset indices (default
        ``state.index``; enables warm starts across epochs)."""
        if index is None:
            index = state.index
        if index is not None and (not isinstance(index, Tensor) or index.dtype != torch.int64
                                  or index.shape != y.shape):
            raise ValueError(f"index: expected an int64 tensor [{len(y)}] of dataset indices, "
                             f"got {getattr(index, 'dtype', type(index).__name__)} "
                             f"{tuple(getattr(index, 'shape', ()))}")
        logits = model(x)
        nat = F.cross_entropy(logits, y)
        if state.eps <= 0:
            return MethodOutput(nat, logits.detach(), None, {"loss_nat": nat.detach()})
        state = with_bn_stats(model, x, state)
        radius, iters = self.radii(model, x, y, logits, state, index)
        reg_on = self.reg_lambda > 0 and state.warmup and warmup_regularizer is not None
        relu_bounds = [] if reg_on else None
        margins = compute_bounds(model, x, radius, y=y, bn_stats=state.bn_stats,
                                 relu_bounds=relu_bounds)
        rob = F.cross_entropy(-margins, y)
        total = self.kappa * nat + (1 - self.kappa) * rob
        logs = {"loss_nat": nat.detach(), "loss_rob": rob.detach(),
                "acr_train": radius.mean() / state.eps}
        if iters is not None:
            logs["brent_iters"] = iters.to(radius.dtype).mean()
        if reg_on and relu_bounds:
            e = radius.view(-1, *[1] * (x.dim() - 1))
            box_radius = first_layer_radius(model, (x - e).clamp(0, 1), (x + e).clamp(0, 1))
            penalty = warmup_regularizer(box_radius, relu_bounds, self.reg_tau)
            total = total + self.reg_lambda * (1 - state.ramp) * penalty
            logs["loss_reg"] = penalty.detach()
        return MethodOutput(total, logits.detach(), None, logs)


@register
class ACERTFast(ACERT):
    """ACERT-fast (papers/acert.txt Appendix B): zero search iterations; a correctly classified
    sample is trained at ``eps_max_t``, a misclassified one at 0."""
    name = "acert-fast"

    def __init__(self, kappa: float = 0.0, reg_lambda: float = 0.5, reg_tau: float = 0.5):
        super().__init__(kappa=kappa, reg_lambda=reg_lambda, reg_tau=reg_tau, fast=True)


__all__ = ["ACERT", "ACERTFast", "RadiusCache"]
