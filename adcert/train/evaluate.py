"""Clean, PGD and IBP-certified accuracy and the unstable-ReLU ratio of a model on a test set."""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from adcert.attacks import pgd_attack
from adcert.bounds import compute_bounds

Tensor = torch.Tensor


def is_certified(margins: Tensor, y: Tensor) -> Tensor:
    """``[B]`` bool from IBP margin lower bounds ``margins: [B, C]`` (``y`` entry ignored): every
    lower bound of ``z_y - z_i``, ``i != y``, is > 0."""
    others = margins.scatter(1, y[:, None], float("inf"))
    return others.min(dim=1).values > 0


def evaluate(model: nn.Module, x: Tensor, y: Tensor, eps: float, pgd_steps: int = 10,
             pgd_restarts: int = 1, batch_size: int = 256) -> Dict[str, float]:
    """Metrics over ``x: [N, *in]`` (floats in [0, 1]) and ``y: [N]`` in eval mode (running BN
    statistics): ``clean_acc``, ``pgd_acc`` (CE-PGD at ``eps``, robust = correct on the clean
    point and on the attack), ``cert_acc`` (IBP-certified and correct) and ``unstable_relu``
    (fraction of ReLU inputs whose IBP bounds at ``eps`` straddle 0), each in [0, 1].

    A certified sample that PGD breaks is a soundness bug: ``RuntimeError``. One host sync per
    batch (the counts), none per attack step. Restores the model's mode."""
    was_training = model.training
    model.eval()
    n = len(y)
    counts = torch.zeros(5, dtype=torch.float64)
    try:
        for i in range(0, n, batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            with torch.no_grad():
                correct = model(xb).argmax(1) == yb
                relu_bounds = []
                margins = compute_bounds(model, xb, eps, y=yb, relu_bounds=relu_bounds)
            certified = is_certified(margins, yb) & correct
            if pgd_steps > 0 and eps > 0:
                x_adv = pgd_attack(model, xb, yb, eps, steps=pgd_steps, restarts=pgd_restarts)
                with torch.no_grad():
                    robust = (model(x_adv).argmax(1) == yb) & correct
            else:
                robust = correct
            unstable = sum(((lb < 0) & (ub > 0)).sum() for lb, ub in relu_bounds)
            total = sum(lb.numel() for lb, _ in relu_bounds)
            row = torch.stack([correct.sum(), robust.sum(), certified.sum(),
                               (certified & ~robust).sum(),
                               torch.as_tensor(unstable)]).double().cpu()
            counts[:4] += row[:4]
            counts[4] += float(row[4]) / max(total, 1) * len(yb)
            if row[3] > 0:
                raise RuntimeError("soundness bug: PGD found an adversarial example for an "
                                   "IBP-certified sample")
    finally:
        model.train(was_training)
    m = max(n, 1)
    return {"clean_acc": float(counts[0]) / m, "pgd_acc": float(counts[1]) / m,
            "cert_acc": float(counts[2]) / m, "unstable_relu": float(counts[4]) / m}


__all__ = ["evaluate", "is_certified"]
