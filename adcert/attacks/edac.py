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

Two implementations of the look-ahead:

* :func:`edac_optimizer_step` -- what CTBench does (``model_wrapper._EDACMixin.EDAC_step`` of
  github.com/eth-sri/CTBench, as in the EDAC authors' ``at_edac_cifar10.py``): the look-ahead is
  a real, persistent step of the TRAINING optimiser (Adam in CTBench, with its moments, step
  count and scheduled rate) on the loss ``gamma * AC(theta; x0)``; the step's adversarial
  examples and training loss are then computed at the updated ``theta_{t+1/2}``, and the
  training step moves on from there. ``gamma`` scales the certainty loss the optimiser sees.
  The EDAC training method (:mod:`adcert.methods.edac`) uses this by default.
* :func:`edac_lookahead` / :func:`edac_attack` -- a functional look-ahead
  (``torch.func.functional_call``): ``theta' = theta - gamma * dAC/dtheta`` as a plain gradient
  step, used only to generate ``x_adv``; the model, its ``.grad`` fields and the optimiser state
  stay untouched (no optimiser needed: stand-alone use, tests).
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from adcert.attacks.bn import frozen_bn, shared_bn
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
                x_L: Optional[Tensor] = None, x_U: Optional[Tensor] = None,
                schedule: str = "fixed") -> Tensor:
    """EDAC adversarial examples: CE-PGD on the look-ahead model ``theta'`` (module docstring).

    Args as :func:`pgd_attack` (``x: [B, *in]`` in [0, 1], ``y: [B]``; ``eps`` float or ``[B]``,
    or an explicit box ``x_L, x_U``; ``schedule``); ``edac_step_size``: ``gamma``. Returns
    ``x_adv: [B, *in]``, detached, inside the box. Neither the model's parameters, their
    ``.grad`` nor its BN running statistics are changed."""
    kw = dict(steps=steps, step_size=step_size, restarts=restarts, x_L=x_L, x_U=x_U,
              bn_stats=bn_stats, schedule=schedule)
    x0 = pgd_attack(model, x, y, eps, **kw)
    params = edac_lookahead(model, x0, edac_step_size, bn_stats)
    return pgd_attack(Reparametrised(model, params), x, y, eps, **kw)


def edac_optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor,
                        y: Tensor, eps: Eps, edac_step_size: float = 0.3, steps: int = 10,
                        step_size: Optional[float] = None, restarts: int = 3,
                        bn_stats: Optional[Mapping] = None, schedule: str = "ctbench",
                        keep_grad: bool = True) -> Tensor:
    """CTBench's EDAC pre-update (module docstring), in place: ``x0`` = CE-PGD of ``model`` at
    ``x`` (:func:`pgd_attack` with ``steps``, ``step_size``, ``restarts``, ``schedule``; ``x``
    itself when ``eps`` is 0), then ``optimizer.zero_grad(); (edac_step_size * AC).backward();
    optimizer.step()`` with ``AC = adversarial_certainty(model(x0))``.

    Batch norm: the clean statistics of ``x`` (``bn_stats``, default: computed here with
    :func:`adcert.bounds.clean_bn_stats` at the current parameters) normalise both the attack
    (detached) and the certainty forward (differentiable, as CTBench's reuse of the clean
    batch's statistics); no running statistics move. Under ``torch.distributed`` the certainty
    gradients are averaged over processes before the step, so the replicas stay identical.

    ``keep_grad=True`` (CTBench's code): the certainty gradients stay in the parameters'
    ``.grad`` after the step, so the caller's training-loss backward adds to them (CTBench's
    training step then uses ``gamma dAC/dtheta + dL/dtheta``); ``False`` (the EDAC authors' code,
    which zeroes the gradients before the training backward): ``.grad`` is put back to what it
    was before the call. Returns ``AC`` (0-dim, detached, before the step)."""
    if not isinstance(edac_step_size, (int, float)) or isinstance(edac_step_size, bool) \
            or edac_step_size < 0:
        raise ValueError(f"edac_step_size: expected a number >= 0, got {edac_step_size!r}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    before = [p.grad for p in params]
    if bn_stats is None:
        from adcert.bounds import clean_bn_stats  # lazy: adcert.bounds imports adcert.attacks
        bn_stats = clean_bn_stats(model, x)
    if isinstance(eps, (int, float)) and eps <= 0:
        x0 = x.detach()
    else:
        x0 = pgd_attack(model, x, y, eps, steps=steps, step_size=step_size, restarts=restarts,
                        bn_stats=bn_stats, schedule=schedule)
    optimizer.zero_grad(set_to_none=True)
    with shared_bn(model, bn_stats), torch.enable_grad():
        certainty = adversarial_certainty(model(x0))
    (edac_step_size * certainty).backward()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= world
    optimizer.step()
    if not keep_grad:
        for p, g in zip(params, before):
            p.grad = g
    return certainty.detach()


__all__ = ["adversarial_certainty", "edac_lookahead", "edac_attack", "edac_optimizer_step",
           "Reparametrised"]
