"""EDAC adversarial training (Zhang et al., TMLR 2025; CTBench's second adversarial baseline and
an AD-CERT teacher): PGD training whose adversarial examples come from the extragradient
look-ahead that decreases adversarial certainty (:mod:`adcert.attacks.edac`):

    L = (1 - w_rob) CE(f(x), y) + w_rob CE(f(x_adv), y),
    x_adv = PGD(theta'; x),  theta' = theta - gamma grad_theta mean_b std_c f_theta(PGD(theta; x))

``gamma = edac_step_size`` (0.3, papers/ad-cert.txt Appendix F.3). The look-ahead is functional:
the model is never modified by the method (see the attack module for this reading of the paper).
"""
from __future__ import annotations

import torch.nn.functional as F

from adcert.attacks.edac import edac_attack
from adcert.methods.base import register
from adcert.methods.pgd import PGD


@register
class EDAC(PGD):
    name = "edac"

    def __init__(self, w_rob: float = 1.0, steps: int = 10, attack_range_scale: float = 1.0,
                 step_size: float = None, restarts: int = 1, edac_step_size: float = 0.3):
        super().__init__(w_rob, steps, attack_range_scale, step_size, restarts)
        if (not isinstance(edac_step_size, (int, float)) or isinstance(edac_step_size, bool)
                or edac_step_size < 0):
            raise ValueError(f"edac: edac_step_size must be a number >= 0, got "
                             f"{edac_step_size!r}")
        self.edac_step_size = float(edac_step_size)

    def edac_examples(self, model, x, y, state):
        """``x_adv: [B, *in]`` from :func:`edac_attack` over ``attack_range_scale * eps_t``."""
        return edac_attack(model, x, y, self.scale * state.eps, steps=self.steps,
                           step_size=self.step_size, edac_step_size=self.edac_step_size,
                           restarts=self.restarts, bn_stats=state.bn_stats)

    def robust_loss(self, model, x, y, state, logits, reg):
        x_adv = self.edac_examples(model, x, y, state)
        return F.cross_entropy(self.shared_forward(model, x_adv, state), y), None, {}
