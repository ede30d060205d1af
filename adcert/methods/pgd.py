"""PGD adversarial training (Madry et al. 2018), for teachers: ``L_rob = CE(f(x_adv), y)`` with
``x_adv`` from ``steps``-step CE-PGD in the ball of radius ``attack_range_scale * eps_t``: CTBench's
training attack (its ``PGDModelWrapper``; App. B.4: 3 restarts everywhere, so ``restarts = 3`` by
default as for every other method; ``step_size`` a fraction of the box half-width, default
``max(0.25, 2 / steps)``; the best-loss iterate)."""
from __future__ import annotations

import torch.nn.functional as F

from adcert.methods.base import register
from adcert.methods.ibp_family import IBPFamily, check_attack_hparams


@register
class PGD(IBPFamily):
    name = "pgd"

    def __init__(self, w_rob: float = 1.0, steps: int = 10, attack_range_scale: float = 1.0,
                 step_size: float = None, restarts: int = 3):
        super().__init__(w_rob, 0.0, 0.5)
        check_attack_hparams(self.name, steps, restarts, step_size)
        if attack_range_scale <= 0:
            raise ValueError(f"pgd: expected attack_range_scale > 0, got {attack_range_scale}")
        self.steps, self.scale = int(steps), float(attack_range_scale)
        self.step_size, self.restarts = step_size, int(restarts)

    def robust_loss(self, model, x, y, state, logits, reg):
        x_adv = self.attack(model, x, y, self.scale * state.eps, self.steps, state,
                            self.step_size, self.restarts)
        return F.cross_entropy(self.shared_forward(model, x_adv, state), y), None, {}
