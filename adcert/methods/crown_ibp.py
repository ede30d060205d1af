"""CROWN-IBP certified training (Zhang et al. 2020; CTBench section 3): the margin lower bound is

    m = beta * m_CROWN-IBP + (1 - beta) * m_IBP,    beta = 1 - coef,

``coef`` the trainer's coefficient ramp (``state.coef``, default ``eps_t / eps``), so beta goes
from 1 to 0 over the eps ramp; ``L_rob = CE(-m, y)``. A convex combination of two lower bounds is
a lower bound, so ``m`` is reported as the step's certified margins. Each pass runs only when its
weight is non-zero.

``loss_fusion=True`` replaces the CROWN-IBP margins (one backward row per class) by the fused
bound of :func:`adcert.bounds.crown_ibp_ce_upper` (one backward row per sample): a per-sample
upper bound ``L_fused`` of the worst-case CE itself. There are no CROWN-IBP margins to mix then,
so the two LOSSES are mixed per sample:

    L_rob = mean_b [ beta * L_fused(b) + (1 - beta) * CE(-m_IBP(b), y_b) ].

Why the losses and not the bounds: both terms are upper bounds of ``max_box CE``, so their convex
combination is one too (the same guarantee the margin mixing gives). Mixing at the level fusion
bounds -- the sums ``sum_i exp(d_i)`` -- and then taking the log would also be sound, but by the
concavity of ``log`` it is never smaller than the mixture of the logs, so mixing the losses is the
tighter of the two. (Without fusion the margins are mixed first because ``CE`` is convex in the
margins: mixing the margins is the tighter choice there.) One IBP pass serves the fused bound,
the IBP loss and the warm-up regulariser; the reported margins are those IBP certificates. At
``beta = 0`` (after the ramp) the objective is plain IBP, as without fusion.
"""
from __future__ import annotations

import torch.nn.functional as F

from adcert.bounds import compute_bounds, crown_ibp_ce_upper
from adcert.methods.base import register
from adcert.methods.ibp_family import IBPFamily
from adcert.methods.regularizers import first_layer_radius


@register
class CrownIBP(IBPFamily):
    name = "crown-ibp"

    def __init__(self, w_rob: float = 1.0, reg_lambda: float = 0.5, reg_tau: float = 0.5,
                 loss_fusion: bool = False):
        super().__init__(w_rob, reg_lambda, reg_tau)
        if not isinstance(loss_fusion, bool):
            raise TypeError(f"{self.name}: loss_fusion must be a bool, got {loss_fusion!r}")
        self.loss_fusion = loss_fusion

    @staticmethod
    def beta(state) -> float:
        """``1 - coef`` clipped to [0, 1]."""
        coef = state.ramp if state.coef is None else float(state.coef)
        return min(1.0, max(0.0, 1.0 - coef))

    def robust_loss(self, model, x, y, state, logits, reg):
        beta = self.beta(state)
        if self.loss_fusion and beta > 0:
            return self._fused_loss(model, x, y, state, beta, reg)
        margins = None
        if beta < 1 or reg.active:
            margins = self.ibp_margins(model, x, y, state, reg)
        if beta > 0:
            crown = compute_bounds(model, x, state.eps, method="crown-ibp", y=y,
                                   bn_stats=state.bn_stats)
            margins = crown if margins is None or beta == 1 else \
                beta * crown + (1 - beta) * margins
        return self.ibp_loss(margins, y), margins, {"beta": beta}

    def _fused_loss(self, model, x, y, state, beta, reg):
        """``mean(beta * L_fused + (1 - beta) * L_IBP)`` per sample (module docstring); one IBP
        pass serves the fused bound, the IBP loss and the warm-up regulariser."""
        relu_bounds = reg.relu_bounds if reg.active else None
        if relu_bounds is not None:  # the box of compute_bounds / crown_ibp_ce_upper for eps
            reg.input_radius = first_layer_radius(model, (x - state.eps).clamp(0, 1),
                                                  (x + state.eps).clamp(0, 1))
        fused, margins = crown_ibp_ce_upper(model, x, state.eps, y, bn_stats=state.bn_stats,
                                            relu_bounds=relu_bounds, return_ibp_margins=True)
        per_sample = fused if beta == 1 else \
            beta * fused + (1 - beta) * F.cross_entropy(-margins, y, reduction="none")
        logs = {"beta": beta, "loss_fused": fused.mean().detach()}
        return per_sample.mean(), margins, logs
