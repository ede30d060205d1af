"""Certification stages: each one decides some samples of a batch and leaves the rest undecided.

A stage is an object with a ``name``, ``unavailable(model, x, y, eps) -> Optional[str]`` (``None``
when it can run, else the reason, e.g. a bounding method or ``sound=True`` not implemented yet)
and ``run(model, x, y, eps) -> Outcome``. ``x: [B, *in]`` in [0, 1] in the model's dtype,
``y: [B]`` int64, ``eps`` a float. New stages (an external alpha,beta-CROWN adapter, ...) plug in
by implementing these two methods; :func:`make_stage` builds the standard ones by name.

Soundness rules every stage obeys: "certified" only from margin lower bounds computed with
``sound=True`` (unless the caller explicitly asked for an unsound run, which the journal records),
strictly positive for every ``i != y``; "attacked"/"misclassified" only with a point inside the
box at which the model's own forward pass gives ``z_i >= z_y`` for some ``i != y``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from adcert.attacks.autoattack import STANDARD, autoattack, margins, verify_counterexamples

Tensor = torch.Tensor

BOUND_METHODS = ("ibp", "crown", "alpha-crown")


@dataclass
class Outcome:
    """Per-sample results of one stage on a batch of ``B`` samples.

    verdicts: ``B`` entries, a verdict string or ``None`` (undecided, go on to the next stage).
    values:   ``B`` floats or ``None``: the stage's margin (clean: ``z_y - max z_i``; attack: the
              same at the best candidate; bound stages: the worst lower bound of ``z_y - z_i``).
    adv:      ``B`` entries, a verified counterexample ``[*in]`` or ``None``.
    """
    verdicts: List[Optional[str]]
    values: List[Optional[float]]
    adv: List[Optional[Tensor]] = field(default_factory=list)


def _floats(t: Tensor) -> List[Optional[float]]:
    return [v if math.isfinite(v) else None for v in t.detach().double().cpu().tolist()]


def worst_margin(margin_lb: Tensor, y: Tensor) -> Tensor:
    """``min_{i != y} margin_lb[:, i]``: ``[B]`` from ``[B, C]`` (``+inf`` for one class)."""
    return margin_lb.scatter(1, y[:, None], float("inf")).min(dim=1).values


class CleanStage:
    """Step 1: a sample the model misclassifies (``z_i >= z_y`` for some ``i != y``) is not
    robust; ``x`` itself is the counterexample (not saved)."""
    name = "clean"

    def unavailable(self, model, x, y, eps) -> Optional[str]:
        return None

    def run(self, model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Outcome:
        m = margins(model, x, y)
        wrong = (m <= 0).tolist()
        return Outcome(["misclassified" if w else None for w in wrong], _floats(m),
                       [None] * len(wrong))


class AutoAttackStage:
    """Step 2: AutoAttack (standard L-inf) through torchattacks; every counterexample is verified
    by :func:`~adcert.attacks.autoattack.verify_counterexamples` and returned in ``adv``."""
    name = "autoattack"

    def __init__(self, num_classes: int, components: Sequence[str] = STANDARD, seed: int = 0,
                 square_queries: int = 5000):
        self.num_classes, self.components = int(num_classes), tuple(components)
        self.seed, self.square_queries = seed, square_queries

    def unavailable(self, model, x, y, eps) -> Optional[str]:
        try:
            import torchattacks.attacks.apgd  # noqa: F401
        except ImportError as err:
            return f"torchattacks is not installed ({err}); pip install --no-deps torchattacks"
        if self.num_classes < 4 and any(c in ("apgd-t", "fab-t") for c in self.components):
            return (f"AutoAttack's targeted attacks need >= 4 classes, the model has "
                    f"{self.num_classes}")
        if not eps > 0:
            return f"eps = {eps}: nothing to attack"
        return None

    def run(self, model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Outcome:
        cand = autoattack(model, x, y, eps, self.num_classes, self.components, self.seed,
                          self.square_queries)
        broken, x_proj, m = verify_counterexamples(model, x, cand, y, eps)
        flags = broken.tolist()
        return Outcome(["attacked" if b else None for b in flags], _floats(m),
                       [x_proj[i].detach().cpu() if b else None for i, b in enumerate(flags)])


class BoundStage:
    """Step 3: certified iff every ``i != y`` margin lower bound of
    ``compute_bounds(model, x, eps, method, y=y, sound=sound)`` is > 0."""

    def __init__(self, method: str, sound: bool = True, options: Optional[Dict[str, Any]] = None):
        self.name, self.sound, self.options = method, bool(sound), dict(options or {})

    def margins(self, model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
        from adcert.bounds import compute_bounds

        with torch.no_grad():
            return compute_bounds(model, x, eps, method=self.name, y=y, sound=self.sound,
                                  **self.options)

    def unavailable(self, model, x, y, eps) -> Optional[str]:
        try:
            self.margins(model, x[:1], y[:1], eps)
        except (NotImplementedError, ImportError) as err:
            return f"{type(err).__name__}: {err}"
        return None

    def run(self, model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Outcome:
        worst = worst_margin(self.margins(model, x, y, eps), y)
        ok = (worst > 0).tolist()  # NaN compares False: never certified
        return Outcome(["certified" if c else None for c in ok], _floats(worst),
                       [None] * len(ok))


class RadiusStage:
    """Not a deciding stage: the certified radius of every sample of a batch in ``[0, eps_max]``
    by :func:`adcert.radius.certified_radius` (batched Brent; the returned radius is a verified
    point), with bound method ``method`` in sound mode unless ``sound=False``. Its records feed
    the report's ACR (``mean radius / eps_max``). The search synchronises after every pass
    (``sync_every=1``: converged samples leave the batch and the loop stops when all have
    converged; ~4 bound passes instead of ``maxiter``) unless ``options`` say otherwise."""
    name = "radius"

    def __init__(self, eps_max: float, method: str = "ibp", sound: bool = True, **options: Any):
        if not (isinstance(eps_max, (int, float)) and math.isfinite(eps_max) and eps_max > 0):
            raise ValueError(f"eps_max: expected a finite float > 0, got {eps_max!r}")
        self.eps_max, self.method, self.sound = float(eps_max), method, bool(sound)
        self.options = {"sync_every": 1, **options}

    def radii(self, model: nn.Module, x: Tensor, y: Tensor) -> List[Optional[float]]:
        from adcert.radius import certified_radius

        res = certified_radius(model, x, y, self.eps_max, method=self.method, sound=self.sound,
                               **self.options)
        return _floats(res.radius)

    def unavailable(self, model, x, y, eps) -> Optional[str]:
        try:
            self.radii(model, x[:1], y[:1])
        except (NotImplementedError, ImportError) as err:
            return f"{type(err).__name__}: {err}"
        return None


def make_stage(name: str, num_classes: int, sound: bool = True, timeout: Optional[float] = None,
               options: Optional[Dict[str, Dict[str, Any]]] = None):
    """A stage by name: ``clean``, ``autoattack``, ``ibp``, ``crown``, ``alpha-crown``, ``bab``.
    ``options[name]`` are keyword arguments for that stage (bound options for bound stages)."""
    opts = dict((options or {}).get(name, {}))
    if name == "clean":
        return CleanStage()
    if name == "autoattack":
        return AutoAttackStage(num_classes, **opts)
    if name in BOUND_METHODS:
        return BoundStage(name, sound=sound, options=opts)
    if name == "bab":
        from adcert.certify.bab import InputSplitBaB

        return InputSplitBaB(sound=sound, timeout=timeout, **opts)
    if name == "bab-relu":
        from adcert.certify.bab_relu import ReluSplitBaB

        return ReluSplitBaB(sound=sound, timeout=timeout, **opts)
    raise ValueError(f"stages: unknown stage {name!r}; known: clean, autoattack, "
                     f"{', '.join(BOUND_METHODS)}, bab, bab-relu")


STAGE_NAMES = ("clean", "autoattack") + BOUND_METHODS + ("bab", "bab-relu")
DEFAULT_STAGES = ("autoattack", "ibp", "crown", "alpha-crown")

__all__ = ["Outcome", "CleanStage", "AutoAttackStage", "BoundStage", "RadiusStage", "make_stage", "worst_margin",
           "STAGE_NAMES", "DEFAULT_STAGES", "BOUND_METHODS"]
