"""AD-CERT (papers/ad-cert.txt eq. 10, Algorithm 1) and RSLAD-CERT (its Table 2 baseline).

AD-CERT:     ``L_rob = (1 - a) KL(P_T(x) || P_S(x_adv)) + a CE(-m_IBP, y)``
RSLAD-CERT:  the KL term becomes ``(1 - l) KL(P_T(x) || P_S(x)) + l KL(P_T(x) || P_S(x_adv))``,
             ``l = adv_weight = 5/6``.

The teacher is a fixed, adversarially trained model, kept in eval mode and never differentiated;
``x_adv`` is PGD on the student over ``attack_range_scale * eps_t`` (CTBench's training attack, 3
restarts, App. B.4): AD-CERT maximises CE with the hard labels; RSLAD-CERT maximises
``KL(P_T(x) || P_S(x_adv))``, the teacher's soft labels (papers/ad-cert.txt Table 4 footnote, as
RSLAD, Zi et al. 2021). With ``alpha_ramp`` the
coefficient ramps with eps during warm-up (``a_t = a * eps_t / eps``, Algorithm 1 line 7). Both use
the fused :func:`adcert.ops.adcert_loss`: one pass over the logits writes the loss and its
gradients. KL is averaged over the batch, ``tau = 1``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from adcert.methods.base import register
from adcert.methods.ibp_family import IBPFamily, check_attack_hparams
from adcert.ops import adcert_loss


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """Eval mode and ``requires_grad=False`` on every parameter (returns ``teacher``)."""
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher: expected an nn.Module, got {type(teacher).__name__}")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def soft_label_kl(teacher_logits: torch.Tensor, tau: float = 1.0
                  ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``fn(student_logits [B, C], y [B]) -> [B]``: ``KL(P_T || P_S)`` per sample at temperature
    ``tau``, ``P_T = softmax(teacher_logits / tau)`` (``[B, C]``, detached); ``y`` is unused. The
    attack loss of RSLAD (Zi et al. 2021) and RSLAD-CERT."""
    log_p = F.log_softmax(teacher_logits.detach() / tau, dim=1)

    def kl(student_logits: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
        return (log_p.exp() * (log_p - F.log_softmax(student_logits / tau, dim=1))).sum(1)
    return kl


@register
class ADCert(IBPFamily):
    name = "adcert"
    needs_teacher = True

    def __init__(self, teacher: nn.Module = None, alpha: float = 0.5, w_rob: float = 1.0,
                 steps: int = 10, attack_range_scale: float = 1.0, step_size: float = None,
                 tau: float = 1.0, alpha_ramp: bool = True, reg_lambda: float = 0.5,
                 reg_tau: float = 0.5, restarts: int = 3):
        super().__init__(w_rob, reg_lambda, reg_tau)
        if teacher is None:
            raise ValueError(f"{self.name}: needs a teacher model (teacher=...)")
        check_attack_hparams(self.name, steps, restarts, step_size)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"{self.name}: alpha must be in [0, 1], got {alpha}")
        if attack_range_scale <= 0 or tau <= 0:
            raise ValueError(f"{self.name}: expected attack_range_scale > 0 and tau > 0")
        self.teacher = freeze_teacher(teacher)
        self.alpha, self.steps, self.scale = float(alpha), int(steps), float(attack_range_scale)
        self.step_size, self.tau, self.alpha_ramp = step_size, float(tau), bool(alpha_ramp)
        self.restarts = int(restarts)

    def current_alpha(self, state) -> float:
        coef = state.ramp if state.coef is None else state.coef
        return self.alpha * coef if self.alpha_ramp else self.alpha

    adv_weight = 5 / 6  # RSLAD-CERT's weight of the adversarial KL (unused by AD-CERT)

    def clean_term(self, logits):
        """The clean student logits for RSLAD-CERT's extra KL term (``None`` for AD-CERT)."""
        return None

    def attack_loss(self, teacher_logits):
        """The loss the attack maximises: CE with the hard labels (AD-CERT)."""
        return "ce"

    def robust_loss(self, model, x, y, state, logits, reg):
        with torch.no_grad():
            self.teacher.eval()
            teacher_logits = self.teacher(x)
        x_adv = self.attack(model, x, y, self.scale * state.eps, self.steps, state,
                            self.step_size, self.restarts, self.attack_loss(teacher_logits))
        margins = self.ibp_margins(model, x, y, state, reg)
        alpha = self.current_alpha(state)
        adv_logits = self.shared_forward(model, x_adv, state)
        loss = adcert_loss(adv_logits, teacher_logits, margins, alpha, tau=self.tau,
                           clean_logits=self.clean_term(logits), adv_weight=self.adv_weight)
        return loss, margins, {"alpha": alpha}


@register
class RSLADCert(ADCert):
    name = "rslad-cert"

    def __init__(self, teacher: nn.Module = None, alpha: float = 0.5, w_rob: float = 1.0,
                 steps: int = 10, attack_range_scale: float = 1.0, step_size: float = None,
                 tau: float = 1.0, alpha_ramp: bool = True, adv_weight: float = 5 / 6,
                 reg_lambda: float = 0.5, reg_tau: float = 0.5, restarts: int = 3):
        super().__init__(teacher, alpha, w_rob, steps, attack_range_scale, step_size, tau,
                         alpha_ramp, reg_lambda, reg_tau, restarts)
        if not 0.0 <= adv_weight <= 1.0:
            raise ValueError(f"rslad-cert: adv_weight must be in [0, 1], got {adv_weight}")
        self.adv_weight = float(adv_weight)

    def clean_term(self, logits):
        return logits

    def attack_loss(self, teacher_logits):
        """``KL(P_T(x) || P_S(x_adv))`` per sample: x_adv is generated against the teacher's soft
        labels (papers/ad-cert.txt Table 4 footnote)."""
        return soft_label_kl(teacher_logits, self.tau)
