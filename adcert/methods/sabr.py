"""SABR (Müller et al. 2023): IBP over a small box. ``x_adv`` from CE-PGD over the full eps-ball
is projected into ``B_{eps - lambda eps}(x)``; IBP is run on the box of radius ``lambda * eps``
centred there (intersected with [0, 1]), which lies inside the eps-ball. ``L_rob = CE(-m, y)``."""
from __future__ import annotations

import torch

from adcert.methods.base import register
from adcert.methods.ibp_family import IBPFamily


@register
class SABR(IBPFamily):
    name = "sabr"

    def __init__(self, lambda_ratio: float = 0.4, steps: int = 8, step_size: float = None,
                 w_rob: float = 1.0, reg_lambda: float = 0.5, reg_tau: float = 0.5):
        super().__init__(w_rob, reg_lambda, reg_tau)
        if not 0.0 < lambda_ratio <= 1.0:
            raise ValueError(f"sabr: lambda_ratio must be in (0, 1], got {lambda_ratio}")
        self.lambda_ratio, self.steps, self.step_size = float(lambda_ratio), int(steps), step_size

    def small_box(self, x, x_adv, eps):
        """``(x_L, x_U)`` of the SABR box around the projected ``x_adv``; ``[B, *in]`` each."""
        small = self.lambda_ratio * eps
        reach = eps - small
        centre = torch.min(torch.max(x_adv, x - reach), x + reach)
        return (centre - small).clamp(0, 1), (centre + small).clamp(0, 1)

    def robust_loss(self, model, x, y, state, logits, reg):
        x_adv = self.attack(model, x, y, state.eps, self.steps, state, self.step_size)
        x_L, x_U = self.small_box(x, x_adv, state.eps)
        margins = self.ibp_margins(model, x, y, state, reg, x_L=x_L, x_U=x_U)
        return self.ibp_loss(margins, y), None, {}
