"""alpha-CROWN: optimised relaxations of the activations for the final linear bound.

Every ReLU ``k`` gets lower slopes ``alpha_k: [B, S, *shape_k]`` -- one per neuron AND per
specification row (each row, including the ``-C`` rows that give upper bounds, picks its own
relaxation) -- initialised to CROWN's adaptive slopes, so iteration 0 is exactly CROWN; a
Sigmoid/Tanh gets its tangent points the same way (``d = l + alpha (u - l)``, initialised to
CROWN's chord-parallel tangent; see :mod:`adcert.bounds.layers.s_shaped`); max pooling keeps its
fixed relaxation. Adam maximises the sum of the lower bounds; parameters are clipped to
``[0, 1]`` after every step (any value in ``[0, 1]`` gives a valid bound, so every iterate is
sound). The best bound of every
``(sample, row)`` over the iterations is kept ("keep-best"), with the slopes that produced it.

beta-CROWN (option ``beta=True``, only meaningful with ``splits``): a domain of branch-and-bound
fixes the signs of some ReLU inputs, ``s_j z_j >= 0`` (``s_j = +1`` active, ``-1`` inactive). For
any ``beta_j >= 0``, ``min c.f(x)`` over the box points satisfying the splits is at least the min
of the Lagrangian ``c.f(x) - sum_j beta_j s_j z_j(x)``, which the backward relaxation bounds with
``-beta_j s_j`` added to the coefficient of ``z_j`` (:func:`backward_lower`'s ``betas``). One
multiplier per split neuron AND per specification row, ``[B, S, *shape_k]``, initialised to 0 (so
iteration 0 is the clamp-only bound), optimised jointly with the slopes by the same Adam
(learning rate ``lr_beta``) and projected to ``>= 0`` after every step; keep-best keeps the
multipliers with the slopes. The split clamps of the intermediate boxes stay (still valid).

The intermediate (ReLU input) bounds are given and fixed, unless an
:class:`~adcert.bounds.alpha_intermediate.IntermediateRows` is passed: then they are recomputed at
every step with slopes of their own, optimised together with these (alpha-CROWN over every
layer, :mod:`adcert.bounds.alpha_intermediate`). The optimisation runs under ``enable_grad`` for
the slopes only (the parameters and reference boxes are detached), and the result is detached.

Options: ``iterations`` (int >= 0, default 20: Adam steps), ``lr`` (float > 0, default 0.3),
``lr_decay`` (in ``(0, 1]``, default 0.98: the learning rate is multiplied by it after every step),
``patience`` (int >= 1, default 10) and ``tol`` (float >= 0, default 0): stop early once the
summed best bound has improved by at most ``tol * (1 + |sum|)`` for ``patience`` consecutive
iterations. Early stopping reads one scalar per iteration (a host synchronisation; this is a
certification tool, not a training hot loop). ``beta`` (bool, default False) and ``lr_beta``
(float > 0, default 0.05): the split multipliers above.

Warm start (branch-and-bound children start from their parent's optimum): ``init_alphas`` and
``init_betas`` (``{relu_index: [B, S, *shape_k]}``, the dtype and device of the bounds; missing
keys, and ``NaN`` entries, keep the default start) replace the initial slopes / multipliers.
They are projected first (slopes clamped to ``[0, 1]``, multipliers to ``>= 0``: every such value
gives a valid bound, so a warm start can never make a bound unsound), and iteration 0 evaluates
them, so keep-best returns a bound at least as good as the warm start's. A slope only matters
on a neuron unstable in THIS call's boxes (a neuron that became stable ignores it) and a
multiplier only on a split neuron (``init_betas`` is ignored without ``beta``, and for layers
without any split). ``S`` is the
number of specification rows: with ``y`` the ``C - 1`` margin rows of the classes ``i != y``, in
ascending order (the ``y`` row is identically zero and not walked; ``1`` when ``C == 1``), with
``C: [B, S', C_out]`` the ``2 S'`` rows ``[C; -C]``, else ``2 x`` the output size.
``alpha_out`` (a dict) receives ``{"alphas": ..., "betas": ...}``: the best slopes and (unsigned)
multipliers, detached, in the same format (``betas`` only for layers with a split).
"""
from __future__ import annotations

import numbers
from typing import Dict, List, Optional, Tuple

import torch

from adcert.bounds.linear_relax import Lowered, backward_lower

Tensor = torch.Tensor
Box = Tuple[Tensor, Tensor]

#: dtypes the fused Adam kernel takes (see :func:`slope_adam`)
FUSED_ADAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# lr 0.3 and early stop only after 10 steps without any gain: on CNN7 (width 8, CIFAR shape,
# eps 0.05, 20 steps, every layer's slopes) the summed margin bound went from -5.741 (lr 0.1,
# patience 5, tol 1e-4) to -5.723, in less time; auto_LiRPA's alpha-CROWN (lr 0.5, patience 10)
# reached -6.150
DEFAULTS = dict(iterations=20, lr=0.3, lr_decay=0.98, patience=10, tol=0.0, beta=False,
                lr_beta=0.05)


def alpha_options(opts: dict) -> dict:
    """``iterations, lr, patience, tol`` from ``opts`` with defaults; raise naming a bad one."""
    out = {k: opts.get(k, v) for k, v in DEFAULTS.items()}
    for name in ("iterations", "patience"):
        v = out[name]
        low = 0 if name == "iterations" else 1
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {v!r}")
    if not isinstance(out["beta"], bool):
        raise ValueError(f"beta: expected a bool, got {out['beta']!r}")
    for name, lo, hi in (("lr", 0.0, float("inf")), ("tol", None, float("inf")),
                         ("lr_decay", 0.0, 1.0), ("lr_beta", 0.0, float("inf"))):
        v = out[name]
        ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and \
            (v > lo if lo is not None else v >= 0) and v <= hi
        if not ok:
            want = {"lr": "> 0", "tol": ">= 0", "lr_decay": "in (0, 1]", "lr_beta": "> 0"}[name]
            raise ValueError(f"{name}: expected a float {want}, got {v!r}")
    return out


def init_alphas(low: Lowered, boxes: List[Box], S: int) -> Dict[int, Tensor]:
    """The CROWN relaxation's parameters ``[B, S, *shape]`` for every activation that has
    optimisable ones (ReLU: the adaptive lower slopes; Sigmoid/Tanh: the tangent points),
    from :meth:`~adcert.bounds.layers.base.Piece.init_alpha`."""
    alphas = {}
    for k, (lo, up) in enumerate(boxes):
        a = low.activation(k).init_alpha(lo, up)
        if a is None:
            continue
        a = a.unsqueeze(1)
        alphas[k] = a.expand((a.shape[0], S) + tuple(a.shape[2:])).clone()
    return alphas


def check_init(name: str, init, boxes: List[Box], S: int, dtype, device
               ) -> Dict[int, Tensor]:
    """Validate ``opts[name]`` (``init_alphas`` / ``init_betas``): ``None`` (-> ``{}``) or a
    dict ``{relu_index: tensor [B, S, *shape_k]}`` with the bounds' dtype and device."""
    if init is None:
        return {}
    if not isinstance(init, dict):
        raise TypeError(f"{name}: expected a dict {{relu_index: tensor [B, S, *relu shape]}}, "
                        f"got {type(init).__name__}")
    n = len(boxes)
    for k, t in init.items():
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < n:
            raise ValueError(f"{name}: keys must be ReLU indices in [0, {n}), got {k!r}")
        lo = boxes[k][0]
        shape = (lo.shape[0], S) + tuple(lo.shape[1:])
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: entry {k} must be a torch.Tensor of shape {shape}, got "
                            f"{type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: entry {k} must have shape [B, S, *relu shape] = {shape} "
                             f"(S = {S} specification rows), got {tuple(t.shape)}")
        if t.dtype != dtype or t.device != device:
            raise TypeError(f"{name}: entry {k} must have dtype {dtype} on {device} (those of the "
                            f"bounds), got {t.dtype} on {t.device}")
    return init


def init_betas(splits: Optional[Dict[int, Tensor]], S: int, dtype) -> Dict[int, Tensor]:
    """Zero multipliers ``[B, S, *shape]`` for every ReLU with a split neuron (``splits[k]:
    [B, *shape]`` of -1/0/+1)."""
    betas = {}
    for k, s in (splits or {}).items():
        if bool((s != 0).any()):
            betas[k] = torch.zeros((s.shape[0], S) + tuple(s.shape[1:]), dtype=dtype,
                                   device=s.device)
    return betas


def signed_betas(betas: Optional[Dict[int, Tensor]], splits: Optional[Dict[int, Tensor]]
                 ) -> Optional[Dict[int, Tensor]]:
    """``{k: max(beta, 0) * s}`` (``[B, S, *shape]``) for :func:`backward_lower`'s ``betas``: the
    projection to ``beta >= 0`` and the split signs ``s = sign(splits[k]): [B, *shape]`` (0
    where not split, so a multiplier on an unsplit neuron is dropped). ``None`` when there is
    nothing to add. Every value it returns is a valid multiplier (the sound path relies on it)."""
    if not betas or splits is None:
        return None
    out = {k: b.clamp(min=0) * splits[k].sign().to(b.dtype).unsqueeze(1)
           for k, b in betas.items() if k in splits}
    return out or None


def slope_adam(groups: List[dict]) -> torch.optim.Adam:
    """Adam over the slopes and multipliers: the fused kernel (one pass over each tensor, on
    CPU and CUDA) where every parameter allows it, else the per-tensor loop. On a
    branch-and-bound batch of CNN7 width 8 (16 domains, 3e6 slopes) a CPU step took 12.7 ms
    per-tensor and 1.4 ms fused, which was an eighth of a domain's bound time."""
    params = [p for g in groups for p in g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in FUSED_ADAM_DTYPES
                for p in params)
    return torch.optim.Adam(groups, fused=True) if fused else torch.optim.Adam(groups)


def optimize_alpha_beta(low: Lowered, end: int, spec: Tensor, mu: Tensor, r: Tensor,
                        boxes: List[Box], opts: dict, interm=None, bank=None,
                        stop_above: Optional[float] = None,
                        ) -> Tuple[Tensor, Dict[int, Tensor], Dict[int, Tensor]]:
    """Best lower bounds ``[B, S]`` of ``spec . h_end`` (``spec: [B, S, *shape of h_end]``) over
    the slopes and, with ``opts["beta"]`` and ``opts["splits"]`` (``{k: [B, *shape_k]}``), the
    split multipliers; returns the best slopes and the best (unsigned, ``>= 0``) multipliers,
    each ``{relu_index: [B, S, *shape]}`` (the latter empty without ``beta``). Pass the
    multipliers through :func:`signed_betas` to evaluate them.

    ``interm`` / ``bank``: an :class:`~adcert.bounds.alpha_intermediate.IntermediateRows` and
    its :class:`~adcert.bounds.alpha_intermediate.SlopeBank`: the intermediate boxes are then
    recomputed at every iteration with the bank's slopes, which Adam optimises with the final
    ones (``boxes`` are the reference they are intersected with); ``interm.best_boxes`` receives
    the tightest box of every activation over the iterations.

    ``stop_above`` (margin specifications): stop as soon as the best lower bound of every row
    is > it (rows that are all zero, the label's own, excepted): every sample is then verified
    (0 for plain bounds; the sound mode passes a margin for the rounding terms its rigorous
    re-evaluation adds), and more steps would only tighten a bound that already decides."""
    o = alpha_options(opts)
    spec, mu, r = spec.detach(), mu.detach(), r.detach()
    boxes = [(lo.detach(), up.detach()) for lo, up in boxes]
    S = spec.shape[1]
    warm_a = check_init("init_alphas", opts.get("init_alphas"), boxes, S, spec.dtype,
                        spec.device)
    warm_b = check_init("init_betas", opts.get("init_betas"), boxes, S, spec.dtype, spec.device)
    out = opts.get("alpha_out")
    if out is not None and not isinstance(out, dict):
        raise TypeError(f"alpha_out: expected a dict to receive the best slopes and multipliers, "
                        f"got {type(out).__name__}")
    alphas = init_alphas(low, boxes, S)
    for k, a in warm_a.items():  # projected: any parameter in [0, 1] is valid; NaN: default
        if k in alphas:
            a = a.detach()
            alphas[k] = torch.where(a.isnan(), alphas[k], a.clamp(0.0, 1.0))
    splits = opts.get("splits") if o["beta"] else None
    betas = init_betas(splits, S, spec.dtype)
    for k, b in warm_b.items():  # projected: any multiplier >= 0 is valid; NaN: 0
        if k in betas:
            b = b.detach()
            betas[k] = torch.where(b.isnan(), betas[k], b.clamp(min=0.0))
    best_alpha = {k: a.clone() for k, a in alphas.items()}
    best_beta = {k: b.clone() for k, b in betas.items()}
    best: Optional[Tensor] = None
    best_boxes = list(boxes)
    dead = spec.flatten(2).abs().sum(-1) == 0  # [B, S]: rows bounding nothing
    stale, prev = 0, None
    opt = None
    with torch.enable_grad():
        params = [a.requires_grad_() for a in alphas.values()]
        beta_params = [b.requires_grad_() for b in betas.values()]
        for it in range(o["iterations"] + 1):
            cur = boxes if interm is None else \
                interm.boxes(mu, r, bank, backward_lower, optimising=True)
            lb = backward_lower(low, end, spec, mu, r, cur, alphas,
                                signed_betas(betas, splits))
            with torch.no_grad():
                if best is None:
                    best = lb.detach().clone()
                else:
                    better = lb > best
                    best = torch.where(better, lb.detach(), best)
                    for now, keep in ((alphas, best_alpha), (betas, best_beta)):
                        for k, a in now.items():
                            m = better.reshape(better.shape + (1,) * (a.dim() - 2))
                            keep[k] = torch.where(m, a.detach(), keep[k])
                if interm is not None:
                    best_boxes = [(torch.maximum(bl, lo.detach()), torch.minimum(bu, up.detach()))
                                  for (bl, bu), (lo, up) in zip(best_boxes, cur)]
            if it == 0:  # the bank's slopes exist once the first walks have made them
                slopes = params + (bank.params() if bank is not None else [])
                groups = ([{"params": slopes, "lr": o["lr"]}] if slopes else []) + \
                    ([{"params": beta_params, "lr": o["lr_beta"]}] if beta_params else [])
                opt = slope_adam(groups) if groups else None
            if it == o["iterations"] or opt is None or not lb.requires_grad:
                break
            if stop_above is not None and bool(((best > stop_above) | dead).all()):
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
                for b in beta_params:
                    b.clamp_(min=0.0)
                if bank is not None:
                    bank.project()
    if interm is not None:
        interm.best_boxes = best_boxes
    if out is not None:
        out["alphas"], out["betas"] = best_alpha, best_beta
    return best, best_alpha, best_beta
