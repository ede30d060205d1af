"""CROWN-IBP certified training (Zhang et al. 2020; CTBench section 3): the margin lower bound is

    m = beta * m_CROWN-IBP + (1 - beta) * m_IBP,    beta = 1 - coef,

``coef`` the trainer's coefficient ramp (``state.coef``, default ``eps_t / eps``), so beta goes
from 1 to 0 over the eps ramp; ``L_rob = CE(-m, y)``. A convex combination of two lower bounds is
a lower bound, so ``m`` is reported as the step's certified margins. Each pass runs only when its
weight is non-zero. (CROWN-IBP's loss fusion is a cost trick for many-class datasets; the margins
here are computed for all ``C`` classes, which gives the same loss.)
"""
from __future__ import annotations

from adcert.bounds import compute_bounds
from adcert.methods.base import register
from adcert.methods.ibp_family import IBPFamily


@register
class CrownIBP(IBPFamily):
    name = "crown-ibp"

    def __init__(self, w_rob: float = 1.0, reg_lambda: float = 0.5, reg_tau: float = 0.5):
        super().__init__(w_rob, reg_lambda, reg_tau)

    @staticmethod
    def beta(state) -> float:
        """``1 - coef`` clipped to [0, 1]."""
        coef = state.ramp if state.coef is None else float(state.coef)
        return min(1.0, max(0.0, 1.0 - coef))

    def robust_loss(self, model, x, y, state, logits, reg):
        beta = self.beta(state)
        margins = None
        if beta < 1 or reg.active:
            margins = self.ibp_margins(model, x, y, state, reg)
        if beta > 0:
            crown = compute_bounds(model, x, state.eps, method="crown-ibp", y=y,
                                   bn_stats=state.bn_stats)
            margins = crown if margins is None or beta == 1 else \
                beta * crown + (1 - beta) * margins
        return self.ibp_loss(margins, y), margins, {"beta": beta}
