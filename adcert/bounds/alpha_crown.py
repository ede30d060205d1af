"""alpha-CROWN: optimised lower ReLU slopes for the final linear relaxation.

Every ReLU ``k`` gets slopes ``alpha_k: [B, S, *shape_k]`` -- one per neuron AND per
specification row (each row, including the ``-C`` rows that give upper bounds, picks its own
relaxation) -- initialised to CROWN's adaptive slopes, so iteration 0 is exactly CROWN. Adam
maximises the sum of the lower bounds; slopes are clipped to ``[0, 1]`` after every step (any
slope in ``[0, 1]`` gives a valid bound, so every iterate is sound). The best bound of every
``(sample, row)`` over the iterations is kept ("keep-best"), with the slopes that produced it.

The intermediate (ReLU input) bounds are given and fixed; the optimisation runs under
``enable_grad`` for the slopes only (the parameters and boxes must be detached), and the result
is detached.

Options: ``iterations`` (int >= 0, default 20: Adam steps), ``lr`` (float > 0, default 0.1),
``lr_decay`` (in ``(0, 1]``, default 0.98: the learning rate is multiplied by it after every step),
``patience`` (int >= 1, default 5) and ``tol`` (float >= 0, default 1e-4): stop early once the
summed best bound has improved by at most ``tol * (1 + |sum|)`` for ``patience`` consecutive
iterations. Early stopping reads one scalar per iteration (a host synchronisation; this is a
certification tool, not a training hot loop).
"""
from __future__ import annotations

import numbers
from typing import Dict, List, Optional, Tuple

import torch

from adcert.bounds.linear_relax import Lowered, adaptive_alpha, backward_lower

Tensor = torch.Tensor
Box = Tuple[Tensor, Tensor]

DEFAULTS = dict(iterations=20, lr=0.1, lr_decay=0.98, patience=5, tol=1e-4)


def alpha_options(opts: dict) -> dict:
    """``iterations, lr, patience, tol`` from ``opts`` with defaults; raise naming a bad one."""
    out = {k: opts.get(k, v) for k, v in DEFAULTS.items()}
    for name in ("iterations", "patience"):
        v = out[name]
        low = 0 if name == "iterations" else 1
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {v!r}")
    for name, lo, hi in (("lr", 0.0, float("inf")), ("tol", None, float("inf")),
                         ("lr_decay", 0.0, 1.0)):
        v = out[name]
        ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and \
            (v > lo if lo is not None else v >= 0) and v <= hi
        if not ok:
            want = {"lr": "> 0", "tol": ">= 0", "lr_decay": "in (0, 1]"}[name]
            raise ValueError(f"{name}: expected a float {want}, got {v!r}")
    return out


def init_alphas(boxes: List[Box], S: int) -> Dict[int, Tensor]:
    """CROWN's adaptive slopes ``[B, S, *shape]`` for every ReLU with an unstable neuron."""
    alphas = {}
    for k, (lo, up) in enumerate(boxes):
        a = adaptive_alpha(lo, up).unsqueeze(1)
        alphas[k] = a.expand((a.shape[0], S) + tuple(a.shape[2:])).clone()
    return alphas


def optimize_alpha(low: Lowered, end: int, spec: Tensor, mu: Tensor, r: Tensor,
                   boxes: List[Box], opts: dict,
                   ) -> Tuple[Tensor, Dict[int, Tensor]]:
    """Best lower bounds ``[B, S]`` of ``spec . h_end`` (``spec: [B, S, *shape of h_end]``) over
    the slopes, and the best slopes ``{relu_index: [B, S, *shape]}``."""
    o = alpha_options(opts)
    spec, mu, r = spec.detach(), mu.detach(), r.detach()
    boxes = [(lo.detach(), up.detach()) for lo, up in boxes]
    S = spec.shape[1]
    alphas = init_alphas(boxes, S)
    best_alpha = {k: a.clone() for k, a in alphas.items()}
    best: Optional[Tensor] = None
    stale, prev = 0, None
    with torch.enable_grad():
        params = [a.requires_grad_() for a in alphas.values()]
        opt = torch.optim.Adam(params, lr=o["lr"]) if params else None
        for it in range(o["iterations"] + 1):
            lb = backward_lower(low, end, spec, mu, r, boxes, alphas)
            with torch.no_grad():
                if best is None:
                    best = lb.detach().clone()
                else:
                    better = lb > best
                    best = torch.where(better, lb.detach(), best)
                    for k, a in alphas.items():
                        m = better.reshape(better.shape + (1,) * (a.dim() - 2))
                        best_alpha[k] = torch.where(m, a.detach(), best_alpha[k])
            if it == o["iterations"] or opt is None or not lb.requires_grad:
                break
            total = float(best.sum())
            if prev is not None and total - prev <= o["tol"] * (1.0 + abs(total)):
                stale += 1
                if stale >= o["patience"]:
                    break
            else:
                stale = 0
            prev = total
            opt.zero_grad(set_to_none=True)
            (-lb.sum()).backward()
            opt.step()
            for group in opt.param_groups:
                group["lr"] *= o["lr_decay"]
            with torch.no_grad():
                for a in params:
                    a.clamp_(0.0, 1.0)
    return best, best_alpha
