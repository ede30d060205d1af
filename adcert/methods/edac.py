"""EDAC adversarial training (Zhang et al., TMLR 2025; CTBench's second adversarial baseline and
an AD-CERT teacher): PGD training with an extragradient look-ahead step that decreases the
adversarial certainty ``AC = mean_b std_c f(x_adv)`` (:mod:`adcert.attacks.edac`):

    L = (1 - w_rob) CE(f(x), y) + w_rob CE(f(x_adv), y)

``lookahead="optimizer"`` (default; CTBench, ``model_wrapper._EDACMixin.EDAC_step`` of
github.com/eth-sri/CTBench): before the loss, one persistent step of the TRAINING optimiser on
``edac_step_size * AC(theta; PGD(theta; x))`` moves the model to ``theta_{t+1/2}``; the clean
forward, ``x_adv = PGD(theta_{t+1/2}; x)`` and ``L`` are then computed there, and the trainer's
own step moves on from ``theta_{t+1/2}`` (:func:`adcert.attacks.edac_optimizer_step`). The method
needs the optimiser: :class:`adcert.train.Trainer` passes it through :meth:`EDAC.bind_optimizer`
(the optimiser's moments, step count and scheduled rate are the training run's; the look-ahead
runs once per ``loss`` call, so the trainer requires ``grad_accum: 1``). ``keep_lookahead_grad``
(default True, as CTBench's code): the look-ahead's gradient stays in ``.grad`` and is added to
the training loss's; False clears it (the EDAC authors' code).

``lookahead="functional"``: ``x_adv = PGD(theta'; x)`` with the functional look-ahead ``theta' =
theta - gamma grad AC(theta; PGD(theta; x))`` (a plain gradient step, the model untouched), and
``L`` at ``theta`` (no optimiser needed).

``gamma = edac_step_size`` (0.3: papers/ad-cert.txt App. F.3, CTBench's scripts). The attack is
the training PGD of :meth:`IBPFamily.attack` (CTBench App. B.4: 3 restarts).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from adcert.attacks.edac import edac_attack, edac_optimizer_step
from adcert.methods.base import register
from adcert.methods.pgd import PGD

LOOKAHEADS = ("optimizer", "functional")


@register
class EDAC(PGD):
    name = "edac"

    def __init__(self, w_rob: float = 1.0, steps: int = 10, attack_range_scale: float = 1.0,
                 step_size: float = None, restarts: int = 3, edac_step_size: float = 0.3,
                 lookahead: str = "optimizer", keep_lookahead_grad: bool = True):
        super().__init__(w_rob=w_rob, steps=steps, attack_range_scale=attack_range_scale,
                         step_size=step_size, restarts=restarts)
        if (not isinstance(edac_step_size, (int, float)) or isinstance(edac_step_size, bool)
                or edac_step_size < 0):
            raise ValueError(f"edac: edac_step_size must be a number >= 0, got "
                             f"{edac_step_size!r}")
        if lookahead not in LOOKAHEADS:
            raise ValueError(f"edac: lookahead must be one of {', '.join(LOOKAHEADS)}, got "
                             f"{lookahead!r}")
        if not isinstance(keep_lookahead_grad, bool):
            raise TypeError(f"edac: keep_lookahead_grad must be a bool, got "
                            f"{keep_lookahead_grad!r}")
        self.edac_step_size = float(edac_step_size)
        self.lookahead, self.keep_lookahead_grad = lookahead, keep_lookahead_grad
        self.optimizer: Optional[torch.optim.Optimizer] = None

    # -- the optimiser look-ahead -----------------------------------------------------------
    @property
    def uses_optimizer(self) -> bool:
        """True when the look-ahead steps the training optimiser (``lookahead="optimizer"``)."""
        return self.lookahead == "optimizer"

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Give the method the training optimiser (the trainer calls this once)."""
        self.optimizer = optimizer

    def loss(self, model, x, y, state):
        if self.uses_optimizer and model.training:
            if self.optimizer is None:
                raise RuntimeError("edac: lookahead='optimizer' steps the training optimiser; "
                                   "call bind_optimizer(optimizer) first (adcert's Trainer "
                                   "does) or use lookahead='functional'")
            edac_optimizer_step(model, self.optimizer, x, y, self.scale * state.eps,
                                edac_step_size=self.edac_step_size, steps=self.steps,
                                step_size=self.step_size, restarts=self.restarts,
                                schedule="ctbench", keep_grad=self.keep_lookahead_grad)
        return super().loss(model, x, y, state)

    # -- the training loss at the (updated) parameters ---------------------------------------
    def edac_examples(self, model, x, y, state):
        """``x_adv: [B, *in]`` over ``attack_range_scale * eps_t``: the training PGD at the
        current parameters (``lookahead="optimizer"``: already ``theta_{t+1/2}``), or
        :func:`edac_attack` on the functional look-ahead model."""
        eps = self.scale * state.eps
        if self.uses_optimizer:
            return self.attack(model, x, y, eps, self.steps, state, self.step_size,
                               self.restarts)
        return edac_attack(model, x, y, eps, steps=self.steps, step_size=self.step_size,
                           edac_step_size=self.edac_step_size, restarts=self.restarts,
                           bn_stats=state.bn_stats, schedule="ctbench")

    def robust_loss(self, model, x, y, state, logits, reg):
        x_adv = self.edac_examples(model, x, y, state)
        return F.cross_entropy(self.shared_forward(model, x_adv, state), y), None, {}
