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
  ``-lower * upper / (upper - lower)`` over all ReLU layers: the height of the triangle
  relaxation's upper line at 0, i.e. the relaxation error a split removes (a simplified BaBSR
  score that ignores the backward coefficients). A domain with no neuron left to split and still
  not verified stops the sample as ``unknown``.

Every ``attack_every`` rounds (and before the first) a PGD attack (margin loss, ``restarts``
random starts, ``pgd_steps`` steps) runs on the ORIGINAL sample's box; a candidate counts only
when :func:`~adcert.attacks.autoattack.verify_counterexamples` confirms it by a forward pass
inside the box -> ``attacked``. Certified when the queue empties; ``unknown`` (returned as an
undecided ``None`` verdict) on ``timeout`` seconds per sample or after ``max_domains`` bounded
domains.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from adcert.attacks.autoattack import verify_counterexamples
from adcert.certify.stages import Outcome, worst_margin

Tensor = torch.Tensor

BAB_METHODS = ("crown", "alpha-crown")


class ReluSplitBaB:
    """The ``bab-relu`` stage (see the module docstring).

    Args:
        sound: bound with ``sound=True`` (floating-point rigorous); the pipeline passes its own.
        timeout: seconds per sample (``None``: no limit).
        method: ``"crown"`` or ``"alpha-crown"``.
        max_domains: the most domains bounded per sample before giving up.
        batch: domains bounded per ``compute_bounds`` call.
        attack_every, pgd_steps, restarts: the PGD schedule (``attack_every=0``: never attack).
    """
    name = "bab-relu"

    def __init__(self, sound: bool = True, timeout: Optional[float] = None, method: str = "crown",
                 max_domains: int = 20_000, batch: int = 64, attack_every: int = 10,
                 pgd_steps: int = 20, restarts: int = 8):
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout: expected seconds > 0 or None, got {timeout}")
        if method not in BAB_METHODS:
            raise ValueError(f"method: expected one of {BAB_METHODS}, got {method!r}")
        if max_domains < 1 or batch < 1:
            raise ValueError(f"max_domains, batch: expected >= 1, got {max_domains}, {batch}")
        if attack_every < 0 or pgd_steps < 0 or restarts < 1:
            raise ValueError(f"attack_every, pgd_steps, restarts: expected >= 0, >= 0, >= 1, got "
                             f"{attack_every}, {pgd_steps}, {restarts}")
        self.sound, self.timeout, self.method = bool(sound), timeout, method
        self.max_domains, self.batch = int(max_domains), int(batch)
        self.attack_every, self.pgd_steps, self.restarts = int(attack_every), int(pgd_steps), \
            int(restarts)

    # ------------------------------------------------------------------ bounding

    def _bound(self, model: nn.Module, x: Tensor, y: Tensor, eps: float,
               splits: Optional[Dict[int, Tensor]]) -> Tuple[Tensor, List[Tuple[Tensor, Tensor]]]:
        """``x: [n, *in]`` copies of one sample, ``splits[k]: [n, *shape_k]`` -> (worst margin
        lower bound ``[n]``, every ReLU's input box ``[(lo, up)]`` each ``[n, *shape_k]``)."""
        from adcert.bounds import compute_bounds

        boxes: List[Tuple[Tensor, Tensor]] = []
        kw = {} if splits is None else {"splits": splits}
        with torch.no_grad():
            m = compute_bounds(model, x, eps, method=self.method, y=y, sound=self.sound,
                               relu_bounds=boxes, **kw)
        return worst_margin(m, y), boxes

    def unavailable(self, model, x, y, eps) -> Optional[str]:
        try:
            self._bound(model, x[:1], y[:1], eps, None)
        except (NotImplementedError, ImportError) as err:
            return f"{type(err).__name__}: {err}"
        return None

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

    def _one(self, model: nn.Module, x: Tensor, y: Tensor, eps: float
             ) -> Tuple[str, Optional[float], Optional[Tensor]]:
        """``x: [1, *in]``, ``y: [1]`` -> (verdict, value, counterexample or None)."""
        start = time.monotonic()
        worst, boxes = self._bound(model, x, y, eps, None)
        if bool(worst[0] > 0):
            return "certified", float(worst[0]), None
        # the queue: one stacked split tensor [N, *shape_k] per ReLU layer
        queue = [torch.zeros_like(lo, dtype=torch.int8) for lo, _ in boxes]
        seen, rounds, closed_min = 0, 0, float("inf")
        while queue[0].shape[0]:
            if self.attack_every and rounds % self.attack_every == 0:
                hit = self._attack(model, x, y, eps)
                if hit is not None:
                    return "attacked", hit[0], hit[1]
            if self.timeout is not None and time.monotonic() - start > self.timeout:
                return "unknown", None, None
            if seen >= self.max_domains:
                return "unknown", None, None
            rounds += 1
            dom = [q[:self.batch] for q in queue]
            queue = [q[self.batch:] for q in queue]
            n = dom[0].shape[0]
            seen += n
            worst, boxes = self._bound(model, x.expand(n, *x.shape[1:]), y.expand(n), eps,
                                       {k: s for k, s in enumerate(dom)})
            empty = torch.zeros(n, dtype=torch.bool, device=x.device)
            for lo, up in boxes:
                empty |= (lo > up).flatten(1).any(1)
            verified = worst > 0  # NaN compares False: never verified by its bound
            if bool((verified & ~empty).any()):
                closed_min = min(closed_min, float(worst[verified & ~empty].min()))
            keep = ~(verified | empty)
            if not bool(keep.any()):
                continue
            dom = [s[keep] for s in dom]
            boxes = [(lo[keep], up[keep]) for lo, up in boxes]
            # BaBSR-like score of every unstable, unsplit neuron, all layers flattened
            scores = []
            for s, (lo, up) in zip(dom, boxes):
                unstable = (lo < 0) & (up > 0) & (s == 0)
                sc = (-lo * up / (up - lo).clamp(min=torch.finfo(lo.dtype).tiny)).nan_to_num(0.0)
                scores.append(torch.where(unstable, sc, torch.full_like(sc, -1.0)).flatten(1))
            best_score, best = torch.cat(scores, 1).max(1)
            if not bool((best_score >= 0).all()):
                return "unknown", None, None  # nothing left to split and still not verified
            children = []
            offset = 0
            for s in dom:
                m_ = s[0].numel()
                flat = s.flatten(1)
                local = best - offset
                hit = (local >= 0) & (local < m_)
                idx = local.clamp(0, m_ - 1)[:, None]
                pos = flat.scatter(1, idx, torch.where(hit[:, None], 1, flat.gather(1, idx))
                                   .to(flat.dtype))
                neg = flat.scatter(1, idx, torch.where(hit[:, None], -1, flat.gather(1, idx))
                                   .to(flat.dtype))
                children.append(torch.cat([pos, neg]).reshape((-1,) + tuple(s.shape[1:])))
                offset += m_
            queue = [torch.cat([q, c]) for q, c in zip(queue, children)]
        return "certified", (closed_min if closed_min < float("inf") else None), None

    def run(self, model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Outcome:
        res = [self._one(model, x[i:i + 1], y[i:i + 1], eps) for i in range(x.shape[0])]
        return Outcome([None if v == "unknown" else v for v, _, _ in res],
                       [val for _, val, _ in res], [a for _, _, a in res])


__all__ = ["ReluSplitBaB", "BAB_METHODS"]
