"""AutoAttack (Croce & Hein 2020), standard L-inf version, through ``torchattacks``, with every
counterexample verified by our own forward pass.

The settings are those of the reference ``autoattack`` package's standard version (APGD-CE,
APGD-T and FAB-T 100 iterations, 9 target classes, Square 5000 queries; see :func:`autoattack`),
passed explicitly: torchattacks' own defaults (10 iterations, every other class a target) differ.

``torchattacks`` (3.5.1) imports without torchvision: ``import torchattacks`` works here and does
not pull torchvision in, so only :mod:`torchattacks.attacks` classes are used (imported lazily, so
adcert imports without torchattacks; install it with ``pip install --no-deps torchattacks``).
Its attacks assume image batches ``[B, C, H, W]`` of float32 and logits of float32, so
:func:`autoattack` runs them on a float32 view ``[B, D, 1, 1]`` of any input shape through a
wrapper that reshapes back and calls the model in its own dtype. The targeted DLR loss of APGD-T
needs at least 4 classes.

The attack's output is never trusted: :func:`verify_counterexamples` projects each candidate into
the exact box the certifier uses, ``[clamp(x - eps, 0, 1), clamp(x + eps, 0, 1)]`` in the model's
dtype, re-runs the model and accepts it only if some ``i != y`` has ``z_i >= z_y`` (the exact
complement of a certificate ``z_y - z_i > 0`` for all ``i != y``).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import nn

Tensor = torch.Tensor

#: The components of AutoAttack's standard version, in its order.
STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
#: The standard version's settings (the reference ``autoattack`` package, ``version='standard'``):
#: iterations of APGD-CE, of APGD-T and FAB-T per target; targets of APGD-T and FAB-T; Square's
#: queries and initial square fraction.
STEPS, TARGET_CLASSES, SQUARE_QUERIES, SQUARE_P_INIT = 100, 9, 5000, 0.8


def n_targets(num_classes: int, target_classes: int = TARGET_CLASSES) -> int:
    """The number of target classes of APGD-T and FAB-T: ``min(target_classes, C - 1)``."""
    return max(1, min(int(target_classes), int(num_classes) - 1))


def _torchattacks():
    try:
        from torchattacks.attacks.apgd import APGD
        from torchattacks.attacks.apgdt import APGDT
        from torchattacks.attacks.fab import FAB
        from torchattacks.attacks.square import Square
    except ImportError as err:
        from adcert._deps import MissingDependency, missing_message

        raise MissingDependency(missing_message("torchattacks", "AutoAttack",
                                                "--no-deps torchattacks")) from err
    return APGD, APGDT, FAB, Square


class _AsImages(nn.Module):
    """``model`` seen by torchattacks: float32 ``[B, D, 1, 1]`` in, float32 logits out."""

    def __init__(self, model: nn.Module, in_shape: Tuple[int, ...], dtype: torch.dtype):
        super().__init__()
        self.model, self.in_shape, self.dtype = model, tuple(in_shape), dtype

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.reshape(x.shape[0], *self.in_shape).to(self.dtype)).float()


def margins(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``z_y - max_{i != y} z_i`` per sample, ``[B]`` (> 0: correctly classified, strictly)."""
    with torch.no_grad():
        z = model(x)
    z_y = z.gather(1, y[:, None]).squeeze(1)
    return z_y - z.scatter(1, y[:, None], float("-inf")).max(dim=1).values


def project(x: Tensor, x_adv: Tensor, eps: float) -> Tensor:
    """``x_adv`` clamped into ``[clamp(x - eps, 0, 1), clamp(x + eps, 0, 1)]`` (x's dtype)."""
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    return torch.min(torch.max(x_adv.to(x.dtype), lo), hi)


def verify_counterexamples(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, eps: float
                           ) -> Tuple[Tensor, Tensor, Tensor]:
    """Which candidates are real counterexamples.

    Args: ``x, x_adv: [B, *in]`` (``x_adv`` any float dtype), ``y: [B]``, ``eps`` the L-inf radius.
    Returns ``(broken: bool [B], x_proj: [B, *in] in x's dtype, margin: [B])``: ``x_proj`` is
    ``x_adv`` projected into the box, ``margin`` the model's ``z_y - max_{i != y} z_i`` at it and
    ``broken = margin <= 0``.
    """
    if x_adv.shape != x.shape:
        raise ValueError(f"x_adv: expected shape {tuple(x.shape)}, got {tuple(x_adv.shape)}")
    x_proj = project(x, x_adv, eps)
    m = margins(model, x_proj, y)
    return m <= 0, x_proj, m


def autoattack(model: nn.Module, x: Tensor, y: Tensor, eps: float, num_classes: int,
               components: Sequence[str] = STANDARD, seed: int = 0,
               square_queries: int = SQUARE_QUERIES, steps: int = STEPS,
               target_classes: int = TARGET_CLASSES, square_p_init: float = SQUARE_P_INIT,
               square_rescale_schedule: bool = False) -> Tensor:
    """Candidate adversarial examples from AutoAttack's components, run in sequence, each on
    the samples still robust (torchattacks' ``MultiAttack`` semantics).

    The defaults are the settings of the reference ``autoattack`` package's standard version
    (``version='standard'``), which torchattacks' classes do not default to (they run 10
    iterations and target every other class):

    * ``apgd-ce``: APGD on the cross-entropy, ``steps`` = 100 iterations, 1 restart, rho 0.75;
    * ``apgd-t``: targeted APGD on the DLR loss, 100 iterations per target, ``target_classes``
      = 9 targets (the 9 highest-scoring other classes, each from 1 start);
    * ``fab-t``: targeted FAB, 100 iterations per target, 9 targets, 1 restart;
    * ``square``: Square, ``square_queries`` = 5000 queries, 1 restart, ``square_p_init`` = 0.8,
      schedule of the square size not rescaled to the query budget
      (``square_rescale_schedule=False``, as in the reference).

    The targeted attacks use ``min(target_classes, num_classes - 1)`` targets: with 10 classes
    that is every other class; with more (TinyImageNet's 200) the 9 most likely ones.

    Args:
        model: a classifier in eval mode, ``[B, *in] -> [B, num_classes]``.
        x: ``[B, *in]`` in [0, 1]; ``y``: ``[B]`` int64 labels; ``eps``: L-inf radius > 0.
        num_classes: the number of classes (>= 4 for APGD-T's targeted DLR loss).
        components: a subsequence of :data:`STANDARD` (default: all four, in order).
        seed: the attacks' random seed (fixed, so runs repeat).
        square_queries, steps, target_classes, square_p_init, square_rescale_schedule: see
            above (tests and quick runs may pass fewer ``steps``/queries).

    Returns ``x_adv: [B, *in]`` in x's dtype, UNVERIFIED: pass it to
    :func:`verify_counterexamples`. The model's train/eval mode is left as it was (and used by
    the attacks); batch-norm running statistics are not updated in eval mode.
    """
    unknown = [c for c in components if c not in STANDARD]
    if unknown or not components:
        raise ValueError(f"components: expected a non-empty subset of {STANDARD}, got "
                         f"{tuple(components)}")
    if not float(eps) > 0:
        raise ValueError(f"eps: expected > 0, got {eps}")
    for name, v in (("steps", steps), ("target_classes", target_classes),
                    ("square_queries", square_queries)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    if num_classes < 4 and any(c in ("apgd-t", "fab-t") for c in components):
        raise ValueError(f"num_classes: AutoAttack's targeted attacks (apgd-t, fab-t) need >= 4 "
                         f"classes, got {num_classes}; pass components without them")
    if x.shape[0] == 0:
        return x.clone()
    APGD, APGDT, FAB, Square = _torchattacks()
    # torchattacks restores the *wrapper's* mode after each attack: a fresh module is in
    # training mode, which would switch the model's batch norms to batch statistics.
    was_training = model.training
    wrapped = _AsImages(model, x.shape[1:], x.dtype).train(was_training)
    eps = float(eps)
    # torchattacks' APGDT and FAB target the n_classes - 1 classes ranked 2nd, 3rd, ... by the
    # model (``n_target_classes = n_classes - 1``; n_classes is used for nothing else), so
    # ``n_classes = targets + 1`` gives the reference's ``n_target_classes = targets``
    targets = n_targets(num_classes, target_classes)
    make = {
        "apgd-ce": lambda: APGD(wrapped, norm="Linf", eps=eps, steps=steps, n_restarts=1,
                                seed=seed, loss="ce", eot_iter=1, rho=0.75),
        "apgd-t": lambda: APGDT(wrapped, norm="Linf", eps=eps, steps=steps, n_restarts=1,
                                seed=seed, eot_iter=1, rho=0.75, n_classes=targets + 1),
        "fab-t": lambda: FAB(wrapped, norm="Linf", eps=eps, steps=steps, n_restarts=1,
                             seed=seed, multi_targeted=True, n_classes=targets + 1),
        "square": lambda: Square(wrapped, norm="Linf", eps=eps, n_queries=square_queries,
                                 n_restarts=1, p_init=square_p_init, loss="margin",
                                 resc_schedule=square_rescale_schedule, seed=seed),
    }
    flat = x.detach().reshape(x.shape[0], -1, 1, 1).float()
    best = flat.clone()
    todo = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    try:
        for name in components:
            idx = todo.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            cand = make[name]()(flat[idx], y[idx]).detach()
            model.train(was_training)
            broken, _, _ = verify_counterexamples(model, x[idx], cand.reshape(x[idx].shape),
                                                  y[idx], eps)
            best[idx[broken]] = cand[broken]
            todo[idx[broken]] = False
    finally:
        model.train(was_training)
    return best.reshape(x.shape).to(x.dtype)


__all__ = ["STANDARD", "STEPS", "TARGET_CLASSES", "SQUARE_QUERIES", "SQUARE_P_INIT",
           "n_targets", "autoattack", "verify_counterexamples", "project", "margins"]
