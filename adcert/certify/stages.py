"""Certification stages: each one decides some samples of a batch and leaves the rest undecided.

A stage is an object with a ``name``, ``unavailable(model, x, y, eps) -> Optional[str]`` (``None``
when it can run, else the reason, e.g. a bounding method or ``sound=True`` not implemented yet)
and ``run(model, x, y, eps) -> Outcome``. ``x: [B, *in]`` in [0, 1] in the model's dtype,
``y: [B]`` int64, ``eps`` a float. New stages (an external alpha,beta-CROWN adapter, ...) plug in
by implementing these two methods; :func:`make_stage` builds the standard ones by name.

Optional parts of the interface, used by the pipeline when present:

* ``run(model, x, y, eps, time_limits=[...])``: a stage whose ``run`` takes this keyword gets
  one limit per sample (seconds, or ``None``: only the stage's own limit), the rest of each sample's
  whole-sample budget (``sample_timeout`` of :func:`~adcert.certify.pipeline.certify`); the stage
  gives up on a sample (undecided) once its own time on it passes the limit. ``bab``,
  ``bab-relu`` (per sample) and ``abcrown`` (per batch: its largest limit) take them.
* ``Outcome.times``: the seconds the stage spent on each sample, measured by the stage itself
  (``bab``, ``bab-relu``: each sample's search; ``abcrown``: each instance's seconds as
  abcrown reports them). Without them the pipeline splits the stage's wall time equally over
  the samples it ran on.
* ``fingerprint() -> dict``: the settings that decide verdicts (journaled; a resumed run must
  have the same).

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

from adcert.attacks.autoattack import (
    SQUARE_P_INIT, SQUARE_QUERIES, STANDARD, STEPS, TARGET_CLASSES, autoattack, margins, n_targets,
    verify_counterexamples,
)

Tensor = torch.Tensor

BOUND_METHODS = ("ibp", "crown", "alpha-crown")


@dataclass
class Outcome:
    """Per-sample results of one stage on a batch of ``B`` samples.

    verdicts: ``B`` entries, a verdict string or ``None`` (undecided, go on to the next stage).
    values:   ``B`` floats or ``None``: the stage's margin (clean: ``z_y - max z_i``; attack: the
              same at the best candidate; bound stages: the worst lower bound of ``z_y - z_i``).
    adv:      ``B`` entries, a verified counterexample ``[*in]`` or ``None``.
    times:    empty, or ``B`` entries: the seconds the stage spent on each sample by its own
              measurement (see the module docstring; the pipeline adds any overhead outside
              them, shared equally).
    """
    verdicts: List[Optional[str]]
    values: List[Optional[float]]
    adv: List[Optional[Tensor]] = field(default_factory=list)
    times: List[Optional[float]] = field(default_factory=list)


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
    by :func:`~adcert.attacks.autoattack.verify_counterexamples` and returned in ``adv``.

    The settings default to the reference ``autoattack`` package's standard version: APGD-CE,
    APGD-T and FAB-T with ``steps`` = 100 iterations (per target for the targeted ones),
    ``target_classes`` = 9 targets (``min(9, C - 1)`` used), Square with ``square_queries`` = 5000
    queries and ``square_p_init`` = 0.8, one restart each (see
    :func:`~adcert.attacks.autoattack.autoattack`)."""
    name = "autoattack"

    def __init__(self, num_classes: int, components: Sequence[str] = STANDARD, seed: int = 0,
                 square_queries: int = SQUARE_QUERIES, steps: int = STEPS,
                 target_classes: int = TARGET_CLASSES, square_p_init: float = SQUARE_P_INIT,
                 square_rescale_schedule: bool = False):
        self.num_classes, self.components = int(num_classes), tuple(components)
        self.seed, self.square_queries = seed, square_queries
        self.steps, self.target_classes = steps, target_classes
        self.square_p_init, self.square_rescale_schedule = square_p_init, square_rescale_schedule

    def fingerprint(self) -> Dict[str, Any]:
        """The settings that decide its verdicts (part of the journal's fingerprint)."""
        return {"components": list(self.components), "seed": self.seed, "steps": self.steps,
                "target_classes": n_targets(self.num_classes, self.target_classes),
                "square_queries": self.square_queries, "square_p_init": self.square_p_init,
                "square_rescale_schedule": self.square_rescale_schedule}

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
                          self.square_queries, steps=self.steps,
                          target_classes=self.target_classes, square_p_init=self.square_p_init,
                          square_rescale_schedule=self.square_rescale_schedule)
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
    """A stage by name: ``clean``, ``autoattack``, ``ibp``, ``crown``, ``alpha-crown``, ``bab``,
    ``bab-relu``, ``abcrown``. ``options[name]`` are keyword arguments for that stage (bound
    options for bound stages; :class:`~adcert.certify.abcrown.AbcrownStage`'s for ``abcrown``,
    whose verifier is found by its ``abcrown`` option or ``$ADCERT_ABCROWN``). ``timeout``:
    seconds per sample of the branch-and-bound stages (``bab``, ``bab-relu``, ``abcrown``)."""
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

        # the papers' verifier is alpha,beta-CROWN: optimised slopes, split multipliers, warm
        # starts (method "crown" is the cheaper clamp-only search)
        opts.setdefault("method", "alpha-crown")
        return ReluSplitBaB(sound=sound, timeout=timeout, **opts)
    if name == "abcrown":  # the external alpha,beta-CROWN (its float certificate, not sound)
        from adcert.certify.abcrown import AbcrownStage

        if timeout is not None:
            opts.setdefault("timeout", timeout)
        return AbcrownStage(**opts)
    raise ValueError(f"stages: unknown stage {name!r}; known: clean, autoattack, "
                     f"{', '.join(BOUND_METHODS)}, bab, bab-relu, abcrown")


STAGE_NAMES = ("clean", "autoattack") + BOUND_METHODS + ("bab", "bab-relu", "abcrown")
#: The papers' pipeline (AD-CERT F.4, CTBench B.5): AutoAttack, then ever stronger verifiers, each
#: on what the previous ones left undecided, ending in branch-and-bound over ReLU splits.
DEFAULT_STAGES = ("autoattack", "ibp", "crown", "alpha-crown", "bab-relu")
#: Seconds per sample of the branch-and-bound stage, and for the whole sample (all stages), as in
#: AD-CERT F.4 ("a timeout of 400 seconds for the alpha,beta-CROWN branch-and-bound stage and an
#: overall timeout of 1000 seconds per example").
DEFAULT_TIMEOUT, DEFAULT_SAMPLE_TIMEOUT = 400.0, 1000.0
#: The stages that take ``timeout`` (seconds per sample of their search).
TIMEOUT_STAGES = ("bab", "bab-relu", "abcrown")

__all__ = ["Outcome", "CleanStage", "AutoAttackStage", "BoundStage", "RadiusStage", "make_stage",
           "worst_margin", "STAGE_NAMES", "DEFAULT_STAGES", "BOUND_METHODS", "DEFAULT_TIMEOUT",
           "DEFAULT_SAMPLE_TIMEOUT", "TIMEOUT_STAGES"]
