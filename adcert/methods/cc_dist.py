"""CC-DIST (De Palma, "Learning better certified models from empirically-robust teachers";
papers/ad-cert.txt Appendix G, eqs. 59-60): CC-IBP plus an expressive feature-space distillation
from a fixed adversarially trained teacher.

The student is ``f = g o h``: ``h`` every layer before the final linear layer (the penultimate
features, ``[B, k]``), ``g`` that linear layer; the teacher is split the same way. With
``x_adv`` from CE-PGD over ``attack_range_scale * eps_t`` and ``[l, u]`` the IBP bounds of
``h`` on the eps-box,

    hi = (1 - a) h(x_adv) + a u,     lo = (1 - a) h(x_adv) + a l,
    R  = mean_b sum_i max((hi_i - t_i)^2, (lo_i - t_i)^2),       t = h_teacher(x) (clean)
    L_rob = CE(-((1 - a) m_adv + a m_IBP), y) + beta R,             beta = 5 / k by default,

``m_adv = z_y - z`` at ``x_adv`` and ``m_IBP`` the IBP margins (CC-IBP, De Palma et al. 2024).
``x_adv``: CTBench's training attack (3 restarts, App. B.4; ``step_size`` a fraction of the box
half-width, default ``max(0.25, 2 / steps)``), as every attack of the IBP family.
The teacher is frozen (eval mode, ``requires_grad=False``) and never differentiated.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from adcert.bounds import compute_bounds
from adcert.methods._split import split_before_last_linear
from adcert.methods.adcert import freeze_teacher
from adcert.methods.base import register
from adcert.methods.ibp_family import IBPFamily, check_attack_hparams
from adcert.methods.regularizers import first_layer_radius


@register
class CCDist(IBPFamily):
    name = "cc-dist"
    needs_teacher = True

    def __init__(self, teacher: nn.Module = None, alpha: float = 0.5, beta: float = None,
                 w_rob: float = 1.0, steps: int = 1, attack_range_scale: float = 1.0,
                 step_size: float = None, reg_lambda: float = 0.5, reg_tau: float = 0.5,
                 restarts: int = 3):
        super().__init__(w_rob, reg_lambda, reg_tau)
        if teacher is None:
            raise ValueError("cc-dist: needs a teacher model (teacher=...)")
        check_attack_hparams(self.name, steps, restarts, step_size)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"cc-dist: alpha must be in [0, 1], got {alpha}")
        if beta is not None and not beta >= 0:
            raise ValueError(f"cc-dist: beta must be >= 0 (or None for 5 / k), got {beta}")
        if attack_range_scale <= 0:
            raise ValueError("cc-dist: expected attack_range_scale > 0")
        self.teacher = freeze_teacher(teacher)
        self.teacher_h, _ = split_before_last_linear(teacher, "teacher")
        self.alpha, self.beta = float(alpha), None if beta is None else float(beta)
        self.steps, self.scale, self.step_size = int(steps), float(attack_range_scale), step_size
        self.restarts = int(restarts)
        self._splits = weakref.WeakKeyDictionary()

    def split(self, model):
        """``(h, nn.Sequential(g))`` of the student, built once per model."""
        parts = self._splits.get(model)
        if parts is None:
            h, g = split_before_last_linear(model)
            parts = self._splits[model] = (h, nn.Sequential(g))
        return parts

    def robust_loss(self, model, x, y, state, logits, reg):
        h, g = self.split(model)
        with torch.no_grad():
            self.teacher.eval()
            t = self.teacher_h(x).flatten(1)
        x_adv = self.attack(model, x, y, self.scale * state.eps, self.steps, state,
                            self.step_size, self.restarts)
        f_adv = self.shared_forward(h, x_adv, state)
        z_adv = g(f_adv)
        x_L, x_U = (x - state.eps).clamp(0, 1), (x + state.eps).clamp(0, 1)
        relu_bounds = reg.relu_bounds if reg.active else None
        if relu_bounds is not None:
            reg.input_radius = first_layer_radius(model, x_L, x_U)
        lb, ub = compute_bounds(h, x, x_L=x_L, x_U=x_U, bn_stats=state.bn_stats,
                                relu_bounds=relu_bounds)
        m_ibp = compute_bounds(g, (lb + ub) / 2, x_L=lb, x_U=ub, y=y, bn_stats=state.bn_stats)
        a = self.alpha
        m_adv = z_adv.gather(1, y[:, None]) - z_adv
        cc_ibp = F.cross_entropy(-((1 - a) * m_adv + a * m_ibp), y)
        f_adv, lb, ub = f_adv.flatten(1), lb.flatten(1), ub.flatten(1)
        if t.shape != f_adv.shape:
            raise ValueError(f"teacher: its features have shape {tuple(t.shape)}, the student's "
                             f"{tuple(f_adv.shape)}; CC-DIST needs the same feature width")
        hi, lo = (1 - a) * f_adv + a * ub, (1 - a) * f_adv + a * lb
        dist = torch.maximum((hi - t) ** 2, (lo - t) ** 2).sum(1).mean()
        beta = 5.0 / f_adv.shape[1] if self.beta is None else self.beta
        return cc_ibp + beta * dist, m_ibp, {"loss_ccibp": cc_ibp.detach(),
                                             "loss_dist": dist.detach()}
