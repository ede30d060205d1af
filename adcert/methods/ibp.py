"""IBP certified training (Gowal et al. 2018; Shi et al. 2021 initialisation and warm-up
regularisers): ``L_rob = CE(-m_lb, y)`` with IBP margin lower bounds at the scheduled eps."""
from __future__ import annotations

from adcert.methods.base import register
from adcert.methods.ibp_family import IBPFamily


@register
class IBP(IBPFamily):
    name = "ibp"

    def __init__(self, w_rob: float = 1.0, reg_lambda: float = 0.5, reg_tau: float = 0.5):
        super().__init__(w_rob, reg_lambda, reg_tau)

    def robust_loss(self, model, x, y, state, logits, reg):
        margins = self.ibp_margins(model, x, y, state, reg)
        return self.ibp_loss(margins, y), margins, {}
