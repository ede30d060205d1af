"""Shared machinery of the IBP-family objectives (DESIGN.md section 6):

    loss = (1 - w_rob) CE(f(x), y) + w_rob L_rob + lambda (1 - eps_t / eps) R_warmup

``f(x)`` is the clean training-mode forward; every other forward and bound pass of the step
normalises with the step's clean-batch statistics (``state.bn_stats``), differentiably, so the
robust loss's gradient flows through them as CTBench's does (DESIGN.md section 5); only the
attack's inner steps use detached copies. At ``eps_t = 0`` (the clean first epoch) the loss is plain CE. Subclasses
implement :meth:`robust_loss`.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from adcert.attacks import pgd_attack, shared_bn
from adcert.bounds import compute_bounds
from adcert.methods.base import Method, MethodOutput, StepState, with_bn_stats
from adcert.methods.regularizers import first_layer_radius, warmup_regularizer

Tensor = torch.Tensor


def check_attack_hparams(method: str, steps: int, restarts: int, step_size: Optional[float],
                         restarts_name: str = "restarts", steps_name: str = "steps") -> None:
    """Raise ``ValueError`` naming the argument unless ``steps`` is an int >= 0, ``restarts`` an
    int >= 1 and ``step_size`` None or a number > 0 (a fraction of the box half-width)."""
    for name, value, low in ((steps_name, steps, 0), (restarts_name, restarts, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{method}: {name} must be an int >= {low}, got {value!r}")
    if step_size is not None and (isinstance(step_size, bool)
                                  or not isinstance(step_size, (int, float)) or step_size <= 0):
        raise ValueError(f"{method}: step_size must be None or a number > 0 (a fraction of the "
                         f"attack box's half-width), got {step_size!r}")


class RegContext:
    """Collects what the warm-up regulariser needs from a bound pass: the input-box radii and the
    ReLU pre-activation bounds (only when the regulariser is active)."""

    def __init__(self, active: bool):
        self.active = active
        self.input_radius: Optional[Tensor] = None
        self.relu_bounds: Optional[List[Tuple[Tensor, Tensor]]] = [] if active else None


class IBPFamily(Method):
    """Base of the IBP-family methods. Hyper-parameters common to all:

    w_rob:       weight of the robust loss against clean CE (1 = robust loss only).
    reg_lambda:  weight of Shi et al.'s warm-up regulariser (0 disables it).
    reg_tau:     its tolerance ``tau``.
    """

    def __init__(self, w_rob: float = 1.0, reg_lambda: float = 0.5, reg_tau: float = 0.5):
        for name, value in (("w_rob", w_rob), ("reg_lambda", reg_lambda), ("reg_tau", reg_tau)):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"{self.name}: {name} must be a number, got {value!r}")
        if not 0.0 <= w_rob <= 1.0:
            raise ValueError(f"{self.name}: w_rob must be in [0, 1], got {w_rob}")
        if reg_lambda < 0 or reg_tau <= 0:
            raise ValueError(f"{self.name}: expected reg_lambda >= 0 and reg_tau > 0, got "
                             f"{reg_lambda}, {reg_tau}")
        self.w_rob, self.reg_lambda, self.reg_tau = float(w_rob), float(reg_lambda), float(reg_tau)

    # -- helpers for subclasses -------------------------------------------------------------
    def ibp_margins(self, model: nn.Module, x: Tensor, y: Tensor, state: StepState,
                    reg: Optional[RegContext] = None, eps: Optional[float] = None,
                    x_L: Optional[Tensor] = None, x_U: Optional[Tensor] = None,
                    relu_shrink: float = 1.0) -> Tensor:
        """IBP margin lower bounds ``[B, C]`` over the box (``eps`` defaults to ``state.eps``),
        with the step's BN statistics; fills ``reg`` when it is active (``r0``: the box's radii
        after the model's Normalize, :func:`first_layer_radius`). ``relu_shrink``: SABR's
        ReLU-output shrink (1 = plain IBP; < 1 makes the margins unsound)."""
        if x_L is None:
            e = state.eps if eps is None else eps
            x_L, x_U = (x - e).clamp(0, 1), (x + e).clamp(0, 1)
        relu_bounds = reg.relu_bounds if reg is not None and reg.active else None
        if relu_bounds is not None:
            reg.input_radius = first_layer_radius(model, x_L, x_U)
        return compute_bounds(model, x, y=y, x_L=x_L, x_U=x_U, bn_stats=state.bn_stats,
                              relu_bounds=relu_bounds, relu_shrink=relu_shrink)

    @staticmethod
    def ibp_loss(margins: Tensor, y: Tensor) -> Tensor:
        """``CE([0, -m_lb], 0) = CE(-margins, y)`` averaged over the batch."""
        return F.cross_entropy(-margins, y)

    @staticmethod
    def shared_forward(model: nn.Module, x: Tensor, state: StepState) -> Tensor:
        """``model(x)`` normalised with the step's BN statistics, gradients flowing through
        them, and no running-statistics update: every forward of a loss except the clean one
        (DESIGN.md section 5)."""
        with shared_bn(model, state.bn_stats):
            return model(x)

    @staticmethod
    def attack(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int,
               state: StepState, step_size: Optional[float] = None, restarts: int = 3,
               loss: Union[str, Callable[[Tensor, Tensor], Tensor]] = "ce") -> Tensor:
        """PGD on ``loss`` (default CE) in the eps-ball with the step's BN statistics, detached
        (input gradients only): CTBench's training attack (``schedule="ctbench"`` of
        :func:`pgd_attack`; CTBench App. B.4: 3 restarts everywhere), ``step_size`` a fraction of
        the box half-width (default ``max(0.25, 2 / steps)``), the best-loss iterate kept.
        ``x: [B, *in]``, ``y: [B]`` -> ``x_adv: [B, *in]``."""
        if eps <= 0:
            return x.detach()
        return pgd_attack(model, x, y, eps, steps=steps, step_size=step_size,
                          restarts=restarts, loss=loss, schedule="ctbench",
                          bn_stats=state.bn_stats)

    # -- the objective ----------------------------------------------------------------------
    def robust_loss(self, model: nn.Module, x: Tensor, y: Tensor, state: StepState,
                    logits: Tensor, reg: RegContext) -> Tuple[Tensor, Optional[Tensor], Dict]:
        """``(L_rob, IBP margins at state.eps or None, extra logs)``."""
        raise NotImplementedError

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, state: StepState) -> MethodOutput:
        logits = model(x)
        nat = F.cross_entropy(logits, y)
        if state.eps <= 0:
            return MethodOutput(nat, logits.detach(), None, {"loss_nat": nat.detach()})
        reg = RegContext(self.reg_lambda > 0 and state.warmup)
        state = with_bn_stats(model, x, state)
        rob, margins, logs = self.robust_loss(model, x, y, state, logits, reg)
        total = (1 - self.w_rob) * nat + self.w_rob * rob
        logs = {"loss_nat": nat.detach(), "loss_rob": rob.detach(), **logs}
        if reg.active and reg.relu_bounds:
            penalty = warmup_regularizer(reg.input_radius, reg.relu_bounds, self.reg_tau)
            total = total + self.reg_lambda * (1 - state.ramp) * penalty
            logs["loss_reg"] = penalty.detach()
        return MethodOutput(total, logits.detach(),
                            None if margins is None else margins.detach(), logs)
