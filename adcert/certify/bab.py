"""Step 4, a first complete verifier: branch-and-bound over INPUT splits, for tiny networks with
low-dimensional inputs (it is exponential in the input dimension: use it for 2-D toy problems and
tests; an alpha,beta-CROWN ReLU-split adapter is the planned stage for real models).

Per sample, the box ``[clamp(x - eps, 0, 1), clamp(x + eps, 0, 1)]`` is a queue of sub-boxes. Each
round bounds up to ``batch`` sub-boxes with ``compute_bounds(..., x_L=lo, x_U=hi, y=y,
sound=sound)`` (method ``method``); a sub-box whose margin lower bounds are all > 0 is closed.
The centre of every open sub-box is tried as a counterexample (verified by a forward pass);
otherwise the sub-box is split in two at the midpoint of its widest input coordinate (the halves
``[lo, mid]`` and ``[mid, hi]`` cover it exactly). Certified when the queue empties, attacked when
a centre is misclassified, unknown on ``timeout`` seconds, ``max_domains`` sub-boxes, or a sub-box
that can no longer be split (zero width).
"""
from __future__ import annotations

import time
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from adcert.attacks.autoattack import verify_counterexamples
from adcert.certify.stages import Outcome, worst_margin

Tensor = torch.Tensor


class InputSplitBaB:
    """The ``bab`` stage (see the module docstring). ``run(..., time_limits=...)``: per-sample
    limits (s) on top of ``timeout`` (the pipeline's remaining whole-sample budgets); the
    outcome's ``times`` are each sample's own seconds."""
    name = "bab"

    def __init__(self, sound: bool = True, timeout: Optional[float] = None, method: str = "ibp",
                 max_domains: int = 100_000, batch: int = 1024):
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout: expected seconds > 0 or None, got {timeout}")
        if max_domains < 1 or batch < 1:
            raise ValueError(f"max_domains, batch: expected >= 1, got {max_domains}, {batch}")
        self.sound, self.timeout, self.method = bool(sound), timeout, method
        self.max_domains, self.batch = int(max_domains), int(batch)

    def _bounds(self, model: nn.Module, lo: Tensor, hi: Tensor, y: Tensor) -> Tensor:
        from adcert.bounds import compute_bounds

        with torch.no_grad():
            m = compute_bounds(model, (lo + hi) / 2, method=self.method, y=y, x_L=lo, x_U=hi,
                               sound=self.sound)
        return worst_margin(m, y)

    def unavailable(self, model, x, y, eps) -> Optional[str]:
        try:
            lo, hi = (x[:1] - eps).clamp(0, 1), (x[:1] + eps).clamp(0, 1)
            self._bounds(model, lo, hi, y[:1])
        except (NotImplementedError, ImportError) as err:
            return f"{type(err).__name__}: {err}"
        return None

    def _one(self, model: nn.Module, x: Tensor, y: Tensor, eps: float,
             limit: Optional[float] = None) -> Tuple[str, Optional[float], Optional[Tensor]]:
        """``x: [1, *in]``, ``y: [1]`` -> (verdict, value, counterexample or None); ``limit``:
        seconds, on top of ``timeout``."""
        start = time.monotonic()
        limit = _limit(self.timeout, limit)
        lo_q, hi_q = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
        seen, closed_min = 0, float("inf")
        while lo_q.shape[0]:
            if limit is not None and time.monotonic() - start > limit:
                return "unknown", None, None
            lo, hi = lo_q[:self.batch], hi_q[:self.batch]
            lo_q, hi_q = lo_q[self.batch:], hi_q[self.batch:]
            seen += lo.shape[0]
            worst = self._bounds(model, lo, hi, y.expand(lo.shape[0]))
            done = worst > 0
            if bool(done.any()):
                closed_min = min(closed_min, float(worst[done].min()))
            lo, hi = lo[~done], hi[~done]
            if lo.shape[0] == 0:
                continue
            n = lo.shape[0]
            centre = (lo + hi) / 2
            broken, proj, m = verify_counterexamples(model, x.expand_as(centre), centre,
                                                     y.expand(n), eps)
            if bool(broken.any()):
                i = int(broken.nonzero()[0, 0])
                return "attacked", float(m[i]), proj[i].detach().cpu()
            width = (hi - lo).reshape(n, -1)
            dim = width.argmax(dim=1)
            if not bool((width.gather(1, dim[:, None]) > 0).all()) or seen > self.max_domains:
                return "unknown", None, None
            flat_lo, flat_hi = lo.reshape(n, -1), hi.reshape(n, -1)
            mid = centre.reshape(n, -1).gather(1, dim[:, None])
            left_hi = flat_hi.scatter(1, dim[:, None], mid)
            right_lo = flat_lo.scatter(1, dim[:, None], mid)
            lo_q = torch.cat([lo_q, flat_lo.reshape(lo.shape), right_lo.reshape(lo.shape)])
            hi_q = torch.cat([hi_q, left_hi.reshape(lo.shape), flat_hi.reshape(lo.shape)])
        return "certified", closed_min, None

    def run(self, model: nn.Module, x: Tensor, y: Tensor, eps: float,
            time_limits: Optional[Sequence[Optional[float]]] = None) -> Outcome:
        res, times = [], []
        for i in range(x.shape[0]):
            t0 = time.monotonic()
            res.append(self._one(model, x[i:i + 1], y[i:i + 1], eps,
                                 None if time_limits is None else time_limits[i]))
            times.append(time.monotonic() - t0)
        return Outcome([None if v == "unknown" else v for v, _, _ in res],
                       [val for _, val, _ in res], [a for _, _, a in res], times)


def _limit(timeout: Optional[float], limit: Optional[float]) -> Optional[float]:
    """The smaller of two optional limits (``None``: no limit)."""
    given = [t for t in (timeout, limit) if t is not None]
    return min(given) if given else None


__all__ = ["InputSplitBaB"]
