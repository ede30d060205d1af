"""EDAC: an Extragradient-type step to Decrease Adversarial Certainty (Zhang, Backes & Zhang,
"Generating less certain adversarial examples improves robust generalization", TMLR 2025; the
adversarial-training teacher baseline of CTBench and AD-CERT, papers/ad-cert.txt ref. [43]).

Adversarial certainty of a batch is the mean, over samples, of the standard deviation of the
logits across classes at the adversarial points (``AC = mean_b std_c f(x_adv)_bc``): a model that
predicts its training-time adversarial examples with very uneven logits is "certain" about them.
EDAC generates the training adversarial examples with a model that has first taken one gradient
step DOWN the certainty:

    x0    = PGD(theta; x)                                   (the usual attack)
    theta' = theta - gamma * grad_theta AC(theta; x0)       (the extragradient look-ahead)
    x_adv = PGD(theta'; x)                                  (less certain adversarial examples)

and the caller then trains ``theta`` on ``x_adv`` as in PGD training.

Reading of the papers (documented because they are brief): AD-CERT and CTBench only name EDAC and
its step size (0.3 for AD-CERT's CIFAR-10 8/255 teacher). CTBench applies the look-ahead through
the training optimiser as a persistent pre-update; here it is a functional look-ahead
(``torch.func.functional_call``), so the model, its ``.grad`` fields, the optimiser state and
every data-parallel replica stay untouched, and ``gamma`` is a plain gradient step size.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
from torch import nn

from adcert.attacks.bn import frozen_bn
from adcert.attacks.pgd import Eps, pgd_attack

Tensor = torch.Tensor


def adversarial_certainty(logits: Tensor) -> Tensor:
    """``mean_b std_c logits[b, c]`` (unbiased std over the classes): ``[B, C]`` -> 0-dim."""
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits: expected [B, C] with C >= 2, got shape {tuple(logits.shape)}")
    return logits.std(dim=1).mean()


class Reparametrised(nn.Module):
    """``model`` evaluated with some parameters replaced (``{name: tensor}``), without touching
    ``model``. ``model`` stays a submodule, so :func:`frozen_bn` finds its batch norms."""

    def __init__(self, model: nn.Module, params: Dict[str, Tensor]):
        super().__init__()
        self.model = model
        self.params = params

    def forward(self, x: Tensor) -> Tensor:
        return torch.func.functional_call(self.model, self.params, (x,))


def edac_lookahead(model: nn.Module, x_adv: Tensor, step_size: float,
                   bn_stats: Optional[Mapping] = None) -> Dict[str, Tensor]:
    """``{name: theta - step_size * dAC/dtheta}`` (detached) for every trainable parameter, with
    ``AC`` the adversarial certainty of ``model(x_adv)`` under the frozen BN statistics.
    Uses ``torch.autograd.grad``: parameters' ``.grad`` are never touched."""
    if not isinstance(step_size, (int, float)) or isinstance(step_size, bool) or step_size < 0:
        raise ValueError(f"step_size: expected a number >= 0, got {step_size!r}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model: has no trainable parameter for the EDAC look-ahead")
    with frozen_bn(model, bn_stats), torch.enable_grad():
        certainty = adversarial_certainty(model(x_adv.detach()))
        grads = torch.autograd.grad(certainty, [p for _, p in named], allow_unused=True)
    return {n: (p.detach() if g is None else (p - step_size * g).detach())
            for (n, p), g in zip(named, grads)}


def edac_attack(model: nn.Module, x: Tensor, y: Tensor, eps: Eps = 0.0, steps: int = 10,
                step_size: Optional[float] = None, edac_step_size: float = 0.3,
                restarts: int = 1, bn_stats: Optional[Mapping] = None,
                x_L: Optional[Tensor] = None, x_U: Optional[Tensor] = None) -> Tensor:
    """EDAC adversarial examples: CE-PGD on the look-ahead model ``theta'`` (module docstring).

    Args as :func:`pgd_attack` (``x: [B, *in]`` in [0, 1], ``y: [B]``; ``eps`` float or ``[B]``,
    or an explicit box ``x_L, x_U``); ``edac_step_size``: ``gamma``. Returns ``x_adv: [B, *in]``,
    detached, inside the box. Neither the model's parameters, their ``.grad`` nor its BN
    running statistics are changed."""
    kw = dict(steps=steps, step_size=step_size, restarts=restarts, x_L=x_L, x_U=x_U,
              bn_stats=bn_stats)
    x0 = pgd_attack(model, x, y, eps, **kw)
    params = edac_lookahead(model, x0, edac_step_size, bn_stats)
    return pgd_attack(Reparametrised(model, params), x, y, eps, **kw)


__all__ = ["adversarial_certainty", "edac_lookahead", "edac_attack", "Reparametrised"]
