"""Step 4b: branch-and-bound over ReLU SPLITS, one sample at a time (a complete verifier for small
ReLU networks of any input dimension; exponential in the number of unstable neurons).

A *domain* is a split assignment ``{relu_index: [*relu shape] in {-1, 0, +1}}`` (``+1``: neuron
forced active, ``-1``: forced inactive, see ``splits`` in :mod:`adcert.bounds.crown`); the root
is all zeros and the two children of a domain fix one more neuron to ``+1`` and to ``-1``, so
they cover it. Each round bounds up to ``batch`` queued domains at once (``batch`` copies of the
sample, each with its own split tensors) with ``compute_bounds(..., method=method, y=y,
sound=sound, splits=..., relu_bounds=...)``:

* closed (verified) when every ``i != y`` margin lower bound is > 0, or when the domain is
  EMPTY: some ReLU input box has ``lower > upper`` after the split clamps (the bounds over-
  approximate the neuron on the sub-domain, so a forced sign it cannot take leaves no point);
* otherwise split on the unstable (``lower < 0 < upper``), not yet split neuron of highest score
  over all ReLU layers. ``branching="width"``: ``-lower * upper / (upper - lower)``, the height of
  the triangle relaxation's upper line at 0. ``branching="babsr"`` (default): a BaBSR-style
  score, that height times the (negative part of the) coefficient with which the domain's worst
  margin row reaches the neuron in one CROWN backward pass, i.e. what the chord's intercept
  costs the bound, plus ``1e-3`` x the height as a tie-break (on the 20 instances of
  ``benchmarks/bench_bab.py`` it needed 80 domains in all where the height alone needed 296, on
  the 12 instances both certified). ``branching="fsb"``: filtered smart branching, the
  ``FSB_CANDIDATES`` best BaBSR candidates of each domain looked ahead by one batched CROWN pass
  over both children of each, the one whose worse child bounds best wins
  (:mod:`adcert.certify.branching`). A domain with no neuron left to split and still not
  verified is, with ``beta``, bounded once more with a longer multiplier optimisation
  (``max(4 iterations, 100)`` steps, ``lr_beta`` ``max(4x, 0.2)``): every ReLU is then stable,
  the network affine on the domain, and the bound the Lagrangian dual of an LP whose optimum is
  the exact minimum, so enough steps close a robust domain. One that stays open stops the
  sample: ``attacked`` if one more PGD attack succeeds, else ``unknown``.

Warm start (``warm_start``, default on with alpha-crown; alpha,beta-CROWN does the same): every
queued domain carries the optimised slopes and multipliers of the domain it was split from
(``alpha_out`` / ``init_alphas`` / ``init_betas`` of :mod:`adcert.bounds.alpha_crown`; both
children get a copy; an unsplit neuron's multiplier gets no gradient, so a new split's starts at
0), and is bounded with only ``warm_iterations`` Adam steps (the root, which starts from CROWN's
slopes, gets the full ``iterations``; so does the longer re-optimisation of fully split domains,
which starts from the domain's own optimum). The warm start is evaluated as iteration 0 and kept if
nothing beats it, and any projected start is a valid relaxation, so soundness does not depend on
it. Slopes of neurons that a split (or tighter intermediate bounds) made stable are simply unused.
Memory: per queued domain ``S x u`` slopes for the ``S`` margin rows, ``u`` the neurons loose
at the root (:mod:`adcert.certify.domains` keeps only those; all of them with
``boxes="recompute"``), and ``S`` multipliers per split neuron. Domains are bounded ``batch`` at
a time (default ``"auto"``: from the free memory, see
:func:`~adcert.certify.domains.auto_batch`); a bound that runs out of memory is retried with
half the batch.

With ``method="alpha-crown"`` the domains are bounded beta-CROWN style by default (``beta``):
besides clamping the split neurons' input bounds, the final bound optimises one Lagrange
multiplier per split constraint ``s_j z_j >= 0`` jointly with the slopes (see
:mod:`adcert.bounds.alpha_crown`), which couples the splits through the input and closes domains
the clamps alone leave open.

Every ``attack_every`` rounds (and before the first) a PGD attack (margin loss, ``restarts``
random starts, ``pgd_steps`` steps) runs on the ORIGINAL sample's box; a candidate counts only
when :func:`~adcert.attacks.autoattack.verify_counterexamples` confirms it by a forward pass
inside the box -> ``attacked``. Certified when the queue empties; ``unknown`` (returned as an
undecided ``None`` verdict) on ``timeout`` seconds per sample or after ``max_domains`` bounded
domains. After :meth:`ReluSplitBaB.run`, ``last_stats`` holds one dict per sample:
``domains`` (bounded, the root included), ``rounds``, ``seconds``, ``verdict``, and for a
search past the root ``batch`` (the last in use), ``queue_peak`` (the most domains queued at once)
and ``queue_mb`` (their memory).
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from adcert.certify import branching
from adcert.certify.domains import Domains, DomainQueue, Warm, auto_batch

from adcert.attacks.autoattack import verify_counterexamples
from adcert.certify.bab import _limit
from adcert.certify.stages import Outcome, worst_margin

Tensor = torch.Tensor

BAB_METHODS = ("crown", "alpha-crown")
BRANCHING = ("babsr", "fsb", "width")
BOXES = ("reuse", "refine", "recompute")
FSB_CANDIDATES = 3  # candidates looked ahead per domain with branching="fsb"
# bound options used with ``beta`` unless ``bound_options`` overrides them: a cold-started domain
# (the root, or every domain with ``warm_start=False``) starts its multipliers at 0, so they need
# a larger step and more steps than the slopes alone (on the tiny nets of
# tests/test_beta_crown.py, 20 steps at lr_beta 0.05 left fully split domains open that 50 steps
# at 0.2 close); warm-started domains run ``warm_iterations`` steps instead
BETA_BOUND_DEFAULTS = {"iterations": 50, "lr": 0.2, "lr_beta": 0.2}
# alpha-crown options of every domain unless ``bound_options`` overrides them: only the final
# layer's slopes are re-optimised (alpha,beta-CROWN's BaB does the same; the intermediate bounds
# come from CROWN and the split clamps), with a short early stop: a domain is one of many
BAB_ALPHA_DEFAULTS = {"intermediate": False, "lr": 0.1, "patience": 5, "tol": 1e-4}
# Adam steps of the root's alpha-CROWN over every layer (the alpha-crown stage's default)
ROOT_ITERATIONS = 20
# Adam steps for a warm-started (non-root) domain
WARM_ITERATIONS = 15


class ReluSplitBaB:
    """The ``bab-relu`` stage (see the module docstring).

    Args:
        sound: bound with ``sound=True`` (floating-point rigorous); the pipeline passes its own.
        timeout: seconds per sample (``None``: no limit).
        method: ``"crown"`` or ``"alpha-crown"``.
        beta: optimise beta-CROWN split multipliers (alpha-crown only; default: True with
            alpha-crown, False with crown).
        bound_options: extra options for ``compute_bounds`` (e.g. ``{"iterations": 10}``); with
            ``beta`` they update :data:`BETA_BOUND_DEFAULTS`.
        branching: ``"babsr"``, ``"fsb"`` or ``"width"`` (the neuron choice, see the module
            docstring).
        warm_start: start every non-root domain from its parent's optimised slopes and
            multipliers (alpha-crown only; default: True with alpha-crown).
        warm_iterations: Adam steps for a warm-started domain (int >= 0; the root uses
            ``iterations`` of ``bound_options``).
        boxes: the ReLU input boxes a domain is bounded with. ``"reuse"`` (default): its
            parent's, clamped by its splits (one backward walk per domain); ``"refine"``: its
            parent's tightened by CROWN under its splits (one walk per layer and domain: tighter,
            fewer domains, each far dearer on a large net); ``"recompute"``: CROWN's from IBP's
            boxes, ignoring the parent's (the behaviour before reuse; looser than ``refine``).
        max_domains: the most domains bounded per sample before giving up.
        batch: domains bounded per ``compute_bounds`` call: an int, or ``"auto"`` (default):
            as many as half the free memory holds, at most 64 on a CPU and 2048 on a GPU
            (:func:`adcert.certify.domains.auto_batch`). Either way a call that runs out of
            memory is retried with half as many.
        attack_every, pgd_steps, restarts: the PGD schedule (``attack_every=0``: never attack).

    ``run(..., time_limits=...)``: per-sample limits (s) on top of ``timeout`` (the pipeline's
    remaining whole-sample budgets); the outcome's ``times`` are each sample's own seconds.
    """
    name = "bab-relu"

    def __init__(self, sound: bool = True, timeout: Optional[float] = None, method: str = "crown",
                 max_domains: int = 20_000, batch: Union[int, str] = "auto",
                 attack_every: int = 10,
                 pgd_steps: int = 20, restarts: int = 8, beta: Optional[bool] = None,
                 bound_options: Optional[Dict[str, Any]] = None, branching: str = "babsr",
                 warm_start: Optional[bool] = None, warm_iterations: int = WARM_ITERATIONS,
                 boxes: str = "reuse"):
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout: expected seconds > 0 or None, got {timeout}")
        if method not in BAB_METHODS:
            raise ValueError(f"method: expected one of {BAB_METHODS}, got {method!r}")
        if max_domains < 1:
            raise ValueError(f"max_domains: expected >= 1, got {max_domains}")
        if batch != "auto" and (isinstance(batch, bool) or not isinstance(batch, int) or
                                batch < 1):
            raise ValueError(f"batch: expected 'auto' or an int >= 1, got {batch!r}")
        if attack_every < 0 or pgd_steps < 0 or restarts < 1:
            raise ValueError(f"attack_every, pgd_steps, restarts: expected >= 0, >= 0, >= 1, got "
                             f"{attack_every}, {pgd_steps}, {restarts}")
        if beta is None:
            beta = method == "alpha-crown"
        if not isinstance(beta, bool) or (beta and method != "alpha-crown"):
            raise ValueError(f"beta: expected a bool, True only with method 'alpha-crown', got "
                             f"{beta!r} with method {method!r}")
        if bound_options is not None and not isinstance(bound_options, dict):
            raise ValueError(f"bound_options: expected a dict or None, got "
                             f"{type(bound_options).__name__}")
        if branching not in BRANCHING:
            raise ValueError(f"branching: expected one of {BRANCHING}, got {branching!r}")
        if warm_start is None:
            warm_start = method == "alpha-crown"
        if not isinstance(warm_start, bool) or (warm_start and method != "alpha-crown"):
            raise ValueError(f"warm_start: expected a bool, True only with method 'alpha-crown', "
                             f"got {warm_start!r} with method {method!r}")
        if isinstance(warm_iterations, bool) or not isinstance(warm_iterations, int) or \
                warm_iterations < 0:
            raise ValueError(f"warm_iterations: expected an int >= 0, got {warm_iterations!r}")
        if boxes not in BOXES:
            raise ValueError(f"boxes: expected one of {BOXES}, got {boxes!r}")
        self.boxes = boxes
        self.warm_start, self.warm_iterations = warm_start, warm_iterations
        self.beta, self.branching = beta, branching
        defaults = dict(BAB_ALPHA_DEFAULTS if method == "alpha-crown" else {},
                        **(BETA_BOUND_DEFAULTS if beta else {}))
        self.bound_options = dict(defaults, **(bound_options or {}))
        self.user_options = dict(bound_options or {})
        self.last_stats: List[Dict[str, Any]] = []
        self.sound, self.timeout, self.method = bool(sound), timeout, method
        self.max_domains, self.batch = int(max_domains), batch
        self._chunk = 1 if batch == "auto" else batch  # the batch in use (see _bound_domains)
        self.attack_every, self.pgd_steps, self.restarts = int(attack_every), int(pgd_steps), \
            int(restarts)

    # ------------------------------------------------------------------ bounding

    def _bound(self, model: nn.Module, x: Tensor, y: Tensor, eps: float,
               splits: Optional[Dict[int, Tensor]], warm: Optional[Warm] = None,
               parent: Optional[List[Tuple[Tensor, Tensor]]] = None, **extra: Any
               ) -> Tuple[Tensor, List[Tuple[Tensor, Tensor]], Optional[Warm]]:
        """``x: [n, *in]`` copies of one sample, ``splits[k]: [n, *shape_k]`` -> (worst margin
        lower bound ``[n]``, every ReLU's input box ``[(lo, up)]`` each ``[n, *shape_k]``, and
        with ``warm_start`` the optimised slopes and multipliers (:data:`Warm`), else ``None``).
        ``warm``: slopes and multipliers to start from; ``parent``: ReLU input boxes
        ``[(lo, up)]`` (each ``[n, *shape_k]``) valid over each domain, used instead of CROWN's
        intermediate pass (``boxes="reuse"``) or as its start (``"refine"``); ``extra``: bound
        options overriding
        ``bound_options``."""
        from adcert.bounds import compute_bounds

        boxes: List[Tuple[Tensor, Tensor]] = []
        kw = dict(self.bound_options, **extra)
        if parent is not None:
            kw["interm_boxes"] = parent
            kw["refine_interm"] = self.boxes == "refine"
        if splits is not None:
            kw["splits"] = splits
            if self.beta:
                kw["beta"] = True
        out: Optional[dict] = {} if self.warm_start else None
        if out is not None:
            kw["alpha_out"] = out
            if warm is not None:
                kw["init_alphas"] = {k: a for k, a in enumerate(warm[0]) if a is not None}
                kw["init_betas"] = {k: b for k, b in enumerate(warm[1]) if b is not None}
        with torch.no_grad():
            m = compute_bounds(model, x, eps, method=self.method, y=y, sound=self.sound,
                               relu_bounds=boxes, **kw)
        if out is None:
            return worst_margin(m, y), boxes, None
        # activations without optimisable relaxations (max pooling) have no slopes
        alphas = [out["alphas"].get(k) for k in range(len(boxes))]
        # a layer without any split in this batch returns no multipliers: keep the start (or 0)
        betas = [out["betas"][k] if k in out["betas"] else
                 (warm[1][k] if warm is not None else
                  None if alphas[k] is None else torch.zeros_like(alphas[k]))
                 for k in range(len(boxes))]
        return worst_margin(m, y), boxes, (alphas, betas)

    def unavailable(self, model, x, y, eps) -> Optional[str]:
        try:
            self._bound(model, x[:1], y[:1], eps, None)
        except (NotImplementedError, ImportError) as err:
            return f"{type(err).__name__}: {err}"
        return None

    # ------------------------------------------------------------------ branching

    @staticmethod
    def _lowered(model: nn.Module, x: Tensor):
        """``model`` lowered to primitive ops for ``x: [1, *in]`` (for :meth:`_scores`)."""
        from adcert.bounds.forward import resolve_bn_stats
        from adcert.bounds.linear_relax import lower_plan
        from adcert.bounds.plan import get_plan

        plan = get_plan(model)
        stats = resolve_bn_stats(plan, x, None, model.training)
        return lower_plan(plan, stats, tuple(x.shape[1:]), x.dtype, x.device, "crown",
                          detach=True)

    def _scores(self, low, x: Tensor, y: Tensor, eps: float, boxes: List[Tuple[Tensor, Tensor]]
                ) -> List[Tensor]:
        """Branching scores ``[n, *shape_k]`` of every neuron of ``n`` domains (ReLU input boxes
        ``boxes[k]: [n, *shape_k]``, none empty); only the unstable ones are used. ``width``
        without ``low`` (the lowered model), BaBSR with it (:mod:`adcert.certify.branching`)."""
        if low is None:
            return branching.heights(boxes)
        return branching.babsr_scores(low, x, y, eps, boxes)

    # ------------------------------------------------------------------ attacking

    def _attack(self, model: nn.Module, x: Tensor, y: Tensor, eps: float
                ) -> Optional[Tuple[float, Tensor]]:
        """PGD from ``restarts`` random starts in the box of ``x: [1, *in]``; a counterexample
        verified by a forward pass -> ``(margin, point [*in])``, else ``None``."""
        from adcert.attacks.pgd import pgd_attack

        xs, ys = x.expand(self.restarts, *x.shape[1:]), y.expand(self.restarts)
        cand = pgd_attack(model, xs, ys, eps, steps=self.pgd_steps, loss="margin")
        broken, proj, m = verify_counterexamples(model, xs, cand, ys, eps)
        if not bool(broken.any()):
            return None
        i = int(broken.nonzero()[0, 0])
        return float(m[i]), proj[i].detach().cpu()

    # ------------------------------------------------------------------ the search

    def _one(self, model: nn.Module, x: Tensor, y: Tensor, eps: float,
             limit: Optional[float] = None) -> Tuple[str, Optional[float], Optional[Tensor]]:
        """``x: [1, *in]``, ``y: [1]`` -> (verdict, value, counterexample or None); ``limit``:
        seconds, on top of ``timeout``."""
        start = time.monotonic()
        limit = _limit(self.timeout, limit)
        prog = self._progress = {"domains": 1, "rounds": 0}
        # the root with every layer's slopes optimised (alpha-CROWN's own step count: it has no
        # split multipliers to learn): its boxes are every domain's start
        root_kw = {}
        if self.method == "alpha-crown" and "intermediate" not in self.user_options:
            root_kw = {"intermediate": True,
                       "iterations": self.user_options.get("iterations", ROOT_ITERATIONS)}
        worst, boxes, warm = self._bound(model, x, y, eps, None, **root_kw)
        if bool(worst[0] > 0):
            return "certified", float(worst[0]), None
        low = self._lowered(model, x)
        # only ReLU neurons are split (Sigmoid/Tanh/max-pooling inputs are bounded, not split)
        splittable = [low.activation(k).splittable for k in range(len(boxes))]
        # S: the margin rows i != y
        self._chunk = self.batch if self.batch != "auto" else \
            auto_batch(low, max(1, low.out_shape[0] - 1), x.element_size(), x.device)
        queue = self._queue(low, boxes)
        queue.push(Domains([torch.zeros_like(lo, dtype=torch.int8) for lo, _ in boxes],
                           None if self.boxes == "recompute" else
                           [(lo.detach(), up.detach()) for lo, up in boxes], warm))
        if self.branching == "width":
            low = None
        warm_kw = {"iterations": self.warm_iterations} if warm is not None else {}
        seen, rounds, closed_min = 0, 0, float("inf")
        while len(queue):
            if self.attack_every and rounds % self.attack_every == 0:
                hit = self._attack(model, x, y, eps)
                if hit is not None:
                    return "attacked", hit[0], hit[1]
            if limit is not None and time.monotonic() - start > limit:
                return "unknown", None, None
            if seen >= self.max_domains:
                return "unknown", None, None
            rounds += 1
            dom = queue.pop(self._chunk)
            seen += len(dom)
            prog.update(domains=seen + 1, rounds=rounds)
            worst, dom = self._bound_domains(model, x, y, eps, dom, splittable, **warm_kw)
            prog.update(batch=self._chunk, queue_peak=queue.peak,
                        queue_mb=round(queue.peak_bytes / 2 ** 20, 1))
            empty = torch.zeros(len(dom), dtype=torch.bool, device=x.device)
            for lo, up in dom.boxes:
                empty |= (lo > up).flatten(1).any(1)
            verified = worst > 0  # NaN compares False: never verified by its bound
            if bool((verified & ~empty).any()):
                closed_min = min(closed_min, float(worst[verified & ~empty].min()))
            keep = ~(verified | empty)
            if not bool(keep.any()):
                continue
            dom = dom.take(keep)
            best_score, best = self._choose(low, x, y, eps, dom, splittable)
            done = best_score < 0  # nothing left to split, still not verified
            if bool(done.any()) and self.beta:  # an LP: its dual needs more multiplier steps
                it = int(self.bound_options.get("iterations", 20))
                lr_b = float(self.bound_options.get("lr_beta", 0.05))
                w, _ = self._bound_domains(model, x, y, eps, dom.take(done), splittable,
                                           iterations=max(4 * it, 100), patience=25,
                                           lr_decay=0.99, lr_beta=max(4 * lr_b, 0.2))
                closed = torch.zeros_like(done)
                closed[done] = w > 0
                if bool(closed.any()):
                    closed_min = min(closed_min, float(w[w > 0].min()))
                seen += int(done.sum())
                prog["domains"] = seen + 1
                keep = ~closed
                dom, best, done = dom.take(keep), best[keep], done[keep]
            if bool(done.any()):
                hit = self._attack(model, x, y, eps) if self.attack_every else None
                if hit is not None:
                    return "attacked", hit[0], hit[1]
                return "unknown", None, None
            if not len(dom):
                continue
            kids = dom.children(best)  # both start from the parent's boxes and optimum
            if self.boxes == "recompute":
                kids.boxes = None
            queue.push(kids)
        return "certified", (closed_min if closed_min < float("inf") else None), None

    def _queue(self, low, boxes: List[Tuple[Tensor, Tensor]]) -> DomainQueue:
        """An empty queue for this search: only the root's loose neurons are stored when every
        domain's boxes lie inside the root's (``reuse``, ``refine``; see
        :mod:`adcert.certify.domains`)."""
        if self.boxes == "recompute":
            keep = [torch.ones_like(lo[0], dtype=torch.bool) for lo, _ in boxes]
        else:
            keep = [low.activation(k).loose(lo, up)[0] for k, (lo, up) in enumerate(boxes)]
        return DomainQueue(boxes, keep, {"reuse": "compact", "refine": "full",
                                         "recompute": None}[self.boxes])

    def _choose(self, low, x: Tensor, y: Tensor, eps: float, dom: Domains,
                splittable: List[bool]) -> Tuple[Tensor, Tensor]:
        """The neuron every domain of ``dom`` (bounded: its own boxes) is split on: (best score
        ``[n]``, ``< 0`` where no unstable neuron is left to split; its flat index over all
        layers ``[n]``)."""
        scores = []
        for s, (lo, up), sc, ok in zip(dom.splits, dom.boxes,
                                       self._scores(low, x, y, eps, dom.boxes), splittable):
            unstable = (lo < 0) & (up > 0) & (s == 0) & ok
            scores.append(torch.where(unstable, sc, torch.full_like(sc, -1.0)).flatten(1))
        flat_scores = torch.cat(scores, 1)
        best_score, best = flat_scores.max(1)
        if self.branching == "fsb" and bool((best_score >= 0).any()):
            with torch.no_grad():
                best = branching.fsb_choice(low, x, y, eps, dom.boxes, flat_scores,
                                            FSB_CANDIDATES)
        return best_score, best

    def _bound_domains(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, dom: Domains,
                       splittable: List[bool], **extra: Any) -> Tuple[Tensor, Domains]:
        """Bound the domains ``dom`` (``x: [1, *in]``), at most ``self._chunk`` per call; a call
        that runs out of memory halves ``self._chunk`` and starts again. Returns (worst margin
        lower bound ``[n]``, ``dom`` with each domain's own boxes and optimised warm start)."""
        while True:
            try:
                parts = []
                for i in range(0, len(dom), self._chunk):
                    d = dom.take(slice(i, i + self._chunk))
                    n = len(d)
                    parts.append(self._bound(model, x.expand(n, *x.shape[1:]), y.expand(n), eps,
                                             _relu_splits(d.splits, splittable), d.warm,
                                             None if self.boxes == "recompute" else d.boxes,
                                             **extra))
                break
            except RuntimeError as err:  # torch.OutOfMemoryError is one
                if not _out_of_memory(err) or self._chunk == 1:
                    raise
                parts = None
                self._chunk = max(1, min(self._chunk, len(dom)) // 2)
                if x.device.type == "cuda":
                    torch.cuda.empty_cache()
        worst = torch.cat([p[0] for p in parts])
        boxes = [(torch.cat([p[1][k][0] for p in parts]), torch.cat([p[1][k][1] for p in parts]))
                 for k in range(len(parts[0][1]))]
        warm = None
        if parts[0][2] is not None:
            warm = tuple([None if ts[0] is None else torch.cat(ts)
                          for ts in zip(*[p[2][j] for p in parts])] for j in range(2))
        return worst, Domains(dom.splits, boxes, warm)

    def run(self, model: nn.Module, x: Tensor, y: Tensor, eps: float,
            time_limits: Optional[Sequence[Optional[float]]] = None) -> Outcome:
        res, self.last_stats = [], []
        for i in range(x.shape[0]):
            t0 = time.monotonic()
            res.append(self._one(model, x[i:i + 1], y[i:i + 1], eps,
                                 None if time_limits is None else time_limits[i]))
            self.last_stats.append(dict(self._progress, seconds=time.monotonic() - t0,
                                        verdict=res[-1][0]))
        return Outcome([None if v == "unknown" else v for v, _, _ in res],
                       [val for _, val, _ in res], [a for _, _, a in res],
                       [st["seconds"] for st in self.last_stats])


def _relu_splits(dom: List[Tensor], splittable: List[bool]) -> Dict[int, Tensor]:
    """The ``splits`` option: the split tensors of the splittable (ReLU) layers."""
    return {k: s for k, (s, ok) in enumerate(zip(dom, splittable)) if ok}


def _out_of_memory(err: RuntimeError) -> bool:
    """Whether ``err`` is an allocation failure (CUDA's ``OutOfMemoryError`` or the CPU
    allocator's)."""
    msg = str(err)
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in msg or \
        "can't allocate memory" in msg


__all__ = ["ReluSplitBaB", "BAB_METHODS", "BETA_BOUND_DEFAULTS", "WARM_ITERATIONS"]
