"""SABR (Mueller et al. 2023; CTBench section 3 and Tables 3-7): IBP over a small box.

``x_adv`` comes from CE-PGD over the clipped eps-box ``[lb, ub] = [clamp(x - eps), clamp(x + eps)]``
(CTBench's training attack, 3 restarts, App. B.4). The small box has the half-width
``r = lambda * (ub - lb) / 2`` per coordinate (``lambda`` = CTBench's "eps shrink ratio") and the
centre ``x_adv`` projected into ``[lb + r, ub - r]``, so it lies inside the clipped eps-box; this is
CTBench's ``SmallBoxModelWrapper`` (a pixel clipped at 0 or 1 gets a proportionally smaller box).
IBP runs on it, optionally with the ReLU-output shrink (``relu_shrink``, CTBench Table 5 "ReLU
shrink ratio": 0.8 on CIFAR-10 2/255 only, off elsewhere): ``L_rob = CE(-m, y)``.
"""
from __future__ import annotations

from typing import Tuple

import torch

from adcert.methods.base import register
from adcert.methods.ibp_family import IBPFamily, check_attack_hparams

Tensor = torch.Tensor


def sabr_box(x: Tensor, x_adv: Tensor, eps: float, lambda_ratio: float) -> Tuple[Tensor, Tensor]:
    """``(x_L, x_U)``, each ``[B, *in]``: SABR's small box around ``x_adv: [B, *in]`` inside the
    clipped eps-box of ``x: [B, *in]`` (module docstring)."""
    lb, ub = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    r = lambda_ratio * (ub - lb) / 2
    centre = torch.min(torch.max(x_adv, lb + r), ub - r)
    return centre - r, centre + r


def check_shrinks(method: str, lambda_ratio: float, relu_shrink: float) -> None:
    """``ValueError`` naming the argument unless ``lambda_ratio`` is in (0, 1] and
    ``relu_shrink`` in (0, 1]."""
    for name, value in (("lambda_ratio", lambda_ratio), ("relu_shrink", relu_shrink)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"{method}: {name} must be a number in (0, 1], got {value!r}")


@register
class SABR(IBPFamily):
    """Hyper-parameters: ``lambda_ratio`` (the small box's share of the eps-box), ``steps``,
    ``restarts`` (3, CTBench App. B.4) and ``step_size`` (a fraction of the box half-width,
    default ``max(0.25, 2 / steps)``) of the attack, ``relu_shrink`` (1 = off; CTBench Table 5
    uses 0.8 on CIFAR-10 2/255), and :class:`IBPFamily`'s."""
    name = "sabr"

    def __init__(self, lambda_ratio: float = 0.4, steps: int = 8, step_size: float = None,
                 w_rob: float = 1.0, reg_lambda: float = 0.5, reg_tau: float = 0.5,
                 restarts: int = 3, relu_shrink: float = 1.0):
        super().__init__(w_rob, reg_lambda, reg_tau)
        check_shrinks(self.name, lambda_ratio, relu_shrink)
        check_attack_hparams(self.name, steps, restarts, step_size)
        self.lambda_ratio, self.steps, self.step_size = float(lambda_ratio), int(steps), step_size
        self.restarts, self.relu_shrink = int(restarts), float(relu_shrink)

    def small_box(self, x, x_adv, eps):
        """``(x_L, x_U)`` of the SABR box around the projected ``x_adv``; ``[B, *in]`` each."""
        return sabr_box(x, x_adv, eps, self.lambda_ratio)

    def robust_loss(self, model, x, y, state, logits, reg):
        x_adv = self.attack(model, x, y, state.eps, self.steps, state, self.step_size,
                            self.restarts)
        x_L, x_U = self.small_box(x, x_adv, state.eps)
        margins = self.ibp_margins(model, x, y, state, reg, x_L=x_L, x_U=x_U,
                                   relu_shrink=self.relu_shrink)
        return self.ibp_loss(margins, y), None, {}
