"""TAPS and STAPS (Mao, Müller, Fischer & Vechev, NeurIPS 2023; CTBench section 3, Tables 3-7).

The model is split into a feature extractor ``h`` (everything up to the last ``classifier_relus``
ReLU layers) and a classifier ``g``. IBP bounds the features over the input box, ``[l, u] = IBP_h``;
then, for every class ``k``, a PGD search inside ``[l, u]`` finds a "pivotal point" ``p_k``
minimising the margin ``g(p)_y - g(p)_k``, and the TAPS margin estimate is

    m_TAPS[k] = g(p_k)_y - g(p_k)_k            (an under-approximation of the worst case),

which is neither an upper nor a lower bound of the true margin, but lies above the IBP bound.
The robust loss is

    L_rob = GradScale(CE(-m_TAPS, y), c) * CE(-m_IBP, y)      (``ibp_multiplier=True``)
    L_rob = GradScale(CE(-m_TAPS, y), c)                     (``ibp_multiplier=False``)

with ``m_IBP`` the IBP margins of ``g`` on ``[l, u]`` (= the whole model's IBP margins) and
``GradScale`` the identity whose backward multiplies the gradient by ``c = grad_scale``.
Gradients reach ``h`` through the *rectified linear gradient link*: a pivotal point coordinate
within ``soft_thre * (u - l)`` of ``u`` passes the fraction ``(p - (u - s)) / s`` of its gradient
to ``u`` (1 at ``u``, 0 at ``u - s``), and symmetrically for ``l``; a coordinate of a degenerate
interval (``u = l``) passes half to each. The point itself is not differentiated.

STAPS runs the same on SABR's small box (:func:`adcert.methods.sabr.sabr_box`: half-width
``lambda_ratio * (ub - lb) / 2`` of the clipped eps-box around the projected PGD point) instead of
the eps-box, with SABR's optional ReLU-output shrink in both IBP passes (``relu_shrink``, CTBench
Table 5: 0.8 on CIFAR-10 2/255 only; 1 = off).

During the eps ramp (``state.warmup``) both train with plain IBP on their box, ``L_rob =
CE(-m_IBP, y)``, and switch to the TAPS loss once eps reaches its target (``ibp_warmup=True``;
CTBench's ``mix_train.py`` disables TAPS while annealing eps, ``--no-ibp-anneal`` keeps it).

Defaults: CTBench Table 3 (MNIST 0.1): gradient scale 4, STAPS shrink 0.4, one ReLU layer in the
classifier for STAPS; CTBench B.4: 10 attack steps, 3 restarts (the latent search and STAPS's
input attack); soft threshold 0.5.
"""
from __future__ import annotations

import weakref
from typing import Tuple

import torch
from torch import nn

from adcert.attacks.bn import frozen_bn, shared_bn
from adcert.bounds import compute_bounds
from adcert.methods._split import split_by_relus
from adcert.methods.base import register
from adcert.methods.ibp_family import IBPFamily, check_attack_hparams
from adcert.methods.regularizers import first_layer_radius
from adcert.methods.sabr import check_shrinks, sabr_box

Tensor = torch.Tensor


class GradScale(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


class RectifiedLink(torch.autograd.Function):
    """``pts`` forward (``[B, K, *f]``, values unchanged); backward sends the TAPS rectified
    linear share of the points' gradient to the box ``lb, ub: [B, *f]`` (module docstring),
    summed over the ``K`` points of each sample. ``pts`` gets no gradient."""

    @staticmethod
    def forward(ctx, lb: Tensor, ub: Tensor, pts: Tensor, soft_thre: float) -> Tensor:
        ctx.save_for_backward(lb, ub, pts)
        ctx.soft_thre = soft_thre
        return pts.detach().clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        lb, ub, pts = ctx.saved_tensors
        lo, hi = lb.unsqueeze(1), ub.unsqueeze(1)
        slack = ctx.soft_thre * (hi - lo)
        flat = slack <= 0
        safe = torch.where(flat, torch.ones_like(slack), slack)
        share_u = ((pts - (hi - slack)) / safe).clamp(0, 1)
        share_l = ((lo + slack - pts) / safe).clamp(0, 1)
        half = torch.full_like(share_u, 0.5)
        share_u, share_l = torch.where(flat, half, share_u), torch.where(flat, half, share_l)
        return (grad * share_l).sum(1), (grad * share_u).sum(1), None, None


def class_margins(head: nn.Module, pts: Tensor, y: Tensor) -> Tensor:
    """``m[b, k] = g(p)_y - g(p)_k`` at ``p = pts[b, k]``: ``pts [B, K, *f]`` -> ``[B, K]``."""
    B, K = pts.shape[:2]
    z = head(pts.reshape(B * K, *pts.shape[2:])).view(B, K, -1)
    if z.shape[2] != K:
        raise ValueError(f"pts: expected one point per class ({z.shape[2]}), got {K}")
    z_y = z.gather(2, y.view(B, 1, 1).expand(B, K, 1)).squeeze(2)
    return z_y - torch.diagonal(z, dim1=1, dim2=2)


def _milestones(steps: int) -> Tuple[int, ...]:
    """Step-size decay points (x0.2 each) of the TAPS latent search."""
    if 10 <= steps <= 50:
        return (int(0.7 * steps),)
    if 50 < steps <= 80:
        return (int(0.4 * steps), int(0.7 * steps))
    if steps > 80:
        return (int(0.3 * steps), int(0.6 * steps), int(0.8 * steps))
    return ()


def pivotal_points(head: nn.Module, lb: Tensor, ub: Tensor, y: Tensor, num_classes: int,
                   steps: int = 10, restarts: int = 3) -> Tensor:
    """Per sample and class ``k``, the point of ``[lb, ub]`` (``[B, *f]``) with the smallest
    margin ``g(p)_y - g(p)_k`` found by signed-gradient descent (step ``lr * (ub - lb)``,
    ``lr = max(0.2, 2 / steps)``, decayed x0.2 at the milestones) from uniform random starts;
    every iterate counts. Returns ``[B, K, *f]``, detached. Input gradients only; run it under
    the step's frozen batch norms."""
    lo, hi = lb.detach().unsqueeze(1), ub.detach().unsqueeze(1)
    shape = (lb.shape[0], num_classes) + tuple(lb.shape[1:])
    width = hi - lo
    best = best_m = None
    decay = _milestones(steps)
    with torch.enable_grad():
        for _ in range(restarts):
            lr = max(0.2, 2.0 / max(steps, 1))
            pts = lo + width * torch.rand(shape, dtype=lb.dtype, device=lb.device)
            for it in range(steps + 1):
                pts.requires_grad_(it < steps)
                m = class_margins(head, pts, y)
                if best is None:
                    best, best_m = pts.detach(), m.detach()
                else:
                    better = m.detach() < best_m
                    best_m = torch.where(better, m.detach(), best_m)
                    best = torch.where(better.view(*better.shape, *([1] * (pts.dim() - 2))),
                                       pts.detach(), best)
                if it == steps:
                    break
                (grad,) = torch.autograd.grad(m.sum(), pts)
                pts = torch.min(torch.max(pts.detach() - lr * width * grad.sign(), lo), hi)
                if it + 1 in decay:
                    lr *= 0.2
    return best


@register
class TAPS(IBPFamily):
    name = "taps"

    def __init__(self, classifier_relus: int = 1, grad_scale: float = 4.0, steps: int = 10,
                 restarts: int = 3, soft_thre: float = 0.5, ibp_multiplier: bool = True,
                 w_rob: float = 1.0, reg_lambda: float = 0.5, reg_tau: float = 0.5,
                 ibp_warmup: bool = True):
        super().__init__(w_rob, reg_lambda, reg_tau)
        if not isinstance(ibp_warmup, bool):
            raise TypeError(f"{self.name}: ibp_warmup must be a bool, got {ibp_warmup!r}")
        self.ibp_warmup = ibp_warmup
        if isinstance(classifier_relus, bool) or not isinstance(classifier_relus, int) \
                or classifier_relus < 0:
            raise ValueError(f"{self.name}: classifier_relus must be an int >= 0, got "
                             f"{classifier_relus!r}")
        if not grad_scale > 0:
            raise ValueError(f"{self.name}: grad_scale must be > 0, got {grad_scale}")
        if int(steps) < 0 or int(restarts) < 1:
            raise ValueError(f"{self.name}: expected steps >= 0 and restarts >= 1, got "
                             f"{steps}, {restarts}")
        if not 0 < soft_thre <= 1:
            raise ValueError(f"{self.name}: soft_thre must be in (0, 1], got {soft_thre}")
        self.classifier_relus, self.grad_scale = int(classifier_relus), float(grad_scale)
        self.steps, self.restarts, self.soft_thre = int(steps), int(restarts), float(soft_thre)
        self.ibp_multiplier = bool(ibp_multiplier)
        self._splits = weakref.WeakKeyDictionary()

    def split(self, model: nn.Module) -> Tuple[nn.Sequential, nn.Sequential]:
        """``(extractor, classifier)``, built once per model (they share its modules)."""
        parts = self._splits.get(model)
        if parts is None:
            parts = split_by_relus(model, self.classifier_relus, "classifier_relus")
            self._splits[model] = parts
        return parts

    def input_box(self, model, x, y, state) -> Tuple[Tensor, Tensor]:
        """The box TAPS bounds: the eps-box (STAPS: SABR's small box)."""
        e = state.eps
        return (x - e).clamp(0, 1), (x + e).clamp(0, 1)

    def search(self, head, lb, ub, y, num_classes):
        """The pivotal points ``[B, K, *f]`` (a seam for tests)."""
        return pivotal_points(head, lb, ub, y, num_classes, self.steps, self.restarts)

    def robust_loss(self, model, x, y, state, logits, reg):
        extractor, head = self.split(model)
        stats = state.bn_stats
        x_L, x_U = self.input_box(model, x, y, state)
        relu_bounds = reg.relu_bounds if reg.active else None
        if relu_bounds is not None:
            reg.input_radius = first_layer_radius(model, x_L, x_U)
        lb, ub = compute_bounds(extractor, x, x_L=x_L, x_U=x_U, bn_stats=stats,
                                relu_bounds=relu_bounds, relu_shrink=self.relu_shrink)
        m_ibp = compute_bounds(head, (lb + ub) / 2, x_L=lb, x_U=ub, y=y, bn_stats=stats,
                               relu_bounds=relu_bounds, relu_shrink=self.relu_shrink)
        if self.ibp_warmup and state.warmup:  # plain IBP during the eps ramp (CTBench)
            ibp = self.ibp_loss(m_ibp, y)
            certified = m_ibp if self.reports_ibp_margins else None
            return ibp, certified, {"loss_ibp": ibp.detach()}
        with frozen_bn(head, stats):  # the search needs input gradients only
            pts = self.search(head, lb, ub, y, logits.shape[1])
        with shared_bn(head, stats):
            m_taps = class_margins(head, RectifiedLink.apply(lb, ub, pts, self.soft_thre), y)
        loss = GradScale.apply(self.ibp_loss(m_taps, y), self.grad_scale)
        ibp = self.ibp_loss(m_ibp, y)
        if self.ibp_multiplier:
            loss = loss * ibp
        certified = m_ibp if self.reports_ibp_margins else None
        return loss, certified, {"loss_taps": self.ibp_loss(m_taps, y).detach(),
                                 "loss_ibp": ibp.detach()}

    reports_ibp_margins = True
    relu_shrink = 1.0  # TAPS's IBP margins are certificates: never shrunk (STAPS: a parameter)


@register
class STAPS(TAPS):
    """TAPS on SABR's small box. Its own hyper-parameters: ``lambda_ratio``, ``relu_shrink``
    (see :mod:`adcert.methods.sabr`), and the input attack's ``input_steps``,
    ``input_restarts`` (3, CTBench App. B.4) and ``step_size`` (a fraction of the box
    half-width, default ``max(0.25, 2 / input_steps)``); ``steps``/``restarts`` are the latent
    search's, as in TAPS."""
    name = "staps"
    reports_ibp_margins = False  # IBP on the small box is not a certificate for the eps-ball

    def __init__(self, lambda_ratio: float = 0.4, classifier_relus: int = 1,
                 grad_scale: float = 4.0, steps: int = 10, restarts: int = 3,
                 soft_thre: float = 0.5, ibp_multiplier: bool = True, input_steps: int = 10,
                 step_size: float = None, w_rob: float = 1.0, reg_lambda: float = 0.5,
                 reg_tau: float = 0.5, input_restarts: int = 3, relu_shrink: float = 1.0,
                 ibp_warmup: bool = True):
        super().__init__(classifier_relus, grad_scale, steps, restarts, soft_thre,
                         ibp_multiplier, w_rob, reg_lambda, reg_tau, ibp_warmup)
        check_shrinks(self.name, lambda_ratio, relu_shrink)
        check_attack_hparams(self.name, input_steps, input_restarts, step_size,
                             restarts_name="input_restarts", steps_name="input_steps")
        self.lambda_ratio, self.input_steps = float(lambda_ratio), int(input_steps)
        self.input_restarts, self.relu_shrink = int(input_restarts), float(relu_shrink)
        self.step_size = step_size

    def input_box(self, model, x, y, state):
        """SABR's box (:func:`adcert.methods.sabr.sabr_box`) around the input attack's point."""
        x_adv = self.attack(model, x, y, state.eps, self.input_steps, state, self.step_size,
                            self.input_restarts)
        return sabr_box(x, x_adv, state.eps, self.lambda_ratio)
