"""MTL-IBP, CC-IBP and Exp-IBP (De Palma et al. 2024), the expressive combinations of an
adversarial and an IBP loss with coefficient ``alpha``:

* MTL-IBP: ``(1 - alpha) CE(f(x_adv), y) + alpha CE(-m_IBP, y)``;
* CC-IBP:  ``CE(-((1 - alpha) m_adv + alpha m_IBP), y)`` with ``m_adv = z_y - z`` at ``x_adv``;
* Exp-IBP: ``L_IBP^alpha * L_adv^(1 - alpha)``.

``x_adv``: CE-PGD with ``steps`` steps over ``attack_range_scale * eps_t``: CTBench's training
attack (``restarts`` = 3, App. B.4; ``step_size`` a fraction of the box half-width, default
``max(0.25, 2 / steps)``; the best-loss iterate).
"""
from __future__ import annotations

import torch.nn.functional as F

from adcert.methods.base import register
from adcert.methods.ibp_family import IBPFamily, check_attack_hparams


class _Expressive(IBPFamily):
    def __init__(self, alpha: float = 0.5, w_rob: float = 1.0, steps: int = 1,
                 attack_range_scale: float = 1.0, step_size: float = None,
                 reg_lambda: float = 0.5, reg_tau: float = 0.5, restarts: int = 3):
        super().__init__(w_rob, reg_lambda, reg_tau)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"{self.name}: alpha must be in [0, 1], got {alpha}")
        check_attack_hparams(self.name, steps, restarts, step_size)
        if attack_range_scale <= 0:
            raise ValueError(f"{self.name}: expected attack_range_scale > 0")
        self.alpha, self.steps, self.scale = float(alpha), int(steps), float(attack_range_scale)
        self.step_size, self.restarts = step_size, int(restarts)

    def combine(self, adv_logits, margins, y):
        raise NotImplementedError

    def robust_loss(self, model, x, y, state, logits, reg):
        x_adv = self.attack(model, x, y, self.scale * state.eps, self.steps, state,
                            self.step_size, self.restarts)
        adv_logits = self.shared_forward(model, x_adv, state) if self.alpha < 1 else None
        margins = self.ibp_margins(model, x, y, state, reg)
        return self.combine(adv_logits, margins, y), margins, {}


@register
class MTLIBP(_Expressive):
    name = "mtl-ibp"

    def combine(self, adv_logits, margins, y):
        ibp = self.ibp_loss(margins, y)
        if adv_logits is None:
            return ibp
        return (1 - self.alpha) * F.cross_entropy(adv_logits, y) + self.alpha * ibp


@register
class CCIBP(_Expressive):
    name = "cc-ibp"

    def combine(self, adv_logits, margins, y):
        if adv_logits is None:
            return self.ibp_loss(margins, y)
        adv_margins = adv_logits.gather(1, y[:, None]) - adv_logits
        mixed = (1 - self.alpha) * adv_margins + self.alpha * margins
        return F.cross_entropy(-mixed, y)


@register
class ExpIBP(_Expressive):
    name = "exp-ibp"

    def combine(self, adv_logits, margins, y):
        ibp = self.ibp_loss(margins, y)
        if adv_logits is None:
            return ibp
        adv = F.cross_entropy(adv_logits, y)
        return ibp ** self.alpha * adv ** (1 - self.alpha)
