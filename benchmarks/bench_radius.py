"""Cost of the batched certified-radius search and of an ACERT training step (DESIGN.md section 7).

Part 1 -- radius search (no gradient), in units of one IBP bound pass of the same batch
(``compute_bounds(model, x, eps_max, y=y)``), at ``xtol = 1e-4 * eps_max``, ``maxiter = 10``:

* ``adcert``          -- ``certified_radius`` (fused ``brent_step``, no host sync, every pass on
                         the whole batch);
* ``adcert-sync2``    -- the same with ``sync_every=2`` (stops early and evaluates only the
                         unconverged samples, one host sync every 2 iterations);
* ``adcert-logits-sync1`` -- ``sync_every=1`` and ``logits=`` (``R(0)`` from the clean logits a
                         training step already has: the fewest rows Brent can evaluate);
* ``warm+-1%``        -- the same with ``init`` = the converged radii perturbed by 1% (what
                         ACERT's cache gives across epochs when radii drift little), at
                         ``init_width`` 0.05 (default) and 0.01;
* ``naive``           -- the same Brent loop with the plain-torch reference step (about 60 small
                         ops per iteration instead of one kernel);
* ``bisection``       -- batched bisection to the same xtol (``ceil(log2(eps_max / xtol))``
                         passes);
* ``scipy``           -- ``scipy.optimize.brentq`` sample by sample on single-sample bound passes
                         (timed on a few samples, scaled to the batch).

Part 2 -- one training step (forward + backward): ACERT (``maxiter=2``, same xtol/rtol as the
paper) against IBP at the scheduled eps, both with frozen clean BN statistics.

    python benchmarks/bench_radius.py [--model cnn3|cnn7] [--batch 64] [--repeats 5]
                                      [--device cpu|cuda] [--quick]

The column ``rows/B`` is deterministic: the rows all bound passes of a variant evaluated, divided
by ``B`` (a compacted pass of ``k`` rows counts ``k / B``), i.e. the cost in IBP passes when a pass
costs in proportion to its rows. Brent's floor at this xtol: ``1`` (the ``eps_max`` pass; ``R(0)``
comes from the logits) ``+ 2`` (one verified point on each side of the root, ``xtol`` apart) ``+``
the evaluations needed to locate the root to ``xtol / 2`` first: ``R`` is piecewise linear with
one kink per ReLU crossing, so a chord or secant step is only as accurate as the slope is constant
(a few % over ``[0, eps_max]``, a fraction of ``xtol`` near the root), which leaves about 4-6.

The model is randomly initialised with ``ibp_init`` (Shi et al.'s initialisation, where certified
training starts; with the default init a CNN7's radii are ~1e-7, below what fp32 IBP resolves);
labels are its own predictions and ``eps_max`` is set to twice the median radius (printed), so
most samples have an interior root. Smoke-run only on a busy CPU.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

try:
    import adcert  # noqa: F401
except ImportError:  # source checkout that is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adcert.bounds import clean_bn_stats, compute_bounds  # noqa: E402
from adcert.methods.acert import ACERT  # noqa: E402
from adcert.methods.base import StepState  # noqa: E402
from adcert.models import cnn3, cnn7  # noqa: E402
from adcert.models.init import ibp_init  # noqa: E402
from adcert.ops.brent_step import brent_step_reference  # noqa: E402
from adcert.radius import certified_radius, margin_function  # noqa: E402
import adcert.radius as radius_mod  # noqa: E402


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, repeats, device):
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def _bisection(fn, n, eps_max, xtol, like):
    lo = torch.zeros(n, dtype=like.dtype, device=like.device)
    hi = torch.full_like(lo, eps_max)
    f0, f1 = fn(lo, None), fn(hi, None)
    for _ in range(max(0, math.ceil(math.log2(eps_max / xtol)))):
        mid = (lo + hi) / 2
        neg = fn(mid, None) < 0
        lo, hi = torch.where(neg, mid, lo), torch.where(neg, hi, mid)
    return torch.where(f0 >= 0, 0.0, torch.where(f1 < 0, eps_max, lo))


class _RowCounter:
    """Counts the rows of every bound pass ``certified_radius`` makes (wraps
    ``adcert.radius.margin_function`` while active)."""

    def __init__(self):
        self.rows = 0

    def __enter__(self):
        self.saved = radius_mod.margin_function

        def counted(*args, **kwargs):
            fn = self.saved(*args, **kwargs)

            def g(eps, rows):
                self.rows += eps.numel()
                return fn(eps, rows)
            return g

        radius_mod.margin_function = counted
        return self

    def __exit__(self, *exc):
        radius_mod.margin_function = self.saved


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("cnn3", "cnn7"), default="cnn3")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="batch 8, 1 repeat, 2 scipy samples")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.repeats = 8, 1
    dev = args.device
    torch.manual_seed(0)
    model = ibp_init((cnn7 if args.model == "cnn7" else cnn3)()).to(dev).eval()
    x = torch.rand(args.batch, 3, 32, 32, device=dev)
    with torch.no_grad():
        y = model(x).argmax(1)
        logits = model(x)
        probe = certified_radius(model, x, y, 0.5, xtol=1e-7, maxiter=60, sync_every=4).radius
    eps_max = max(2 * float(probe.median()), 1e-6)
    xtol, maxiter = 1e-4 * eps_max, 10
    fn = margin_function(model, x, y)
    print(f"{args.model} batch {args.batch} on {dev}: eps_max = {eps_max:.3g} (2 x median radius),"
          f" xtol = {xtol:.2g}, maxiter = {maxiter}")

    def unit():
        with torch.no_grad():
            compute_bounds(model, x, eps_max, y=y)

    def run(sync_every=None, **kw):
        def go():
            return certified_radius(model, x, y, eps_max, xtol=xtol, maxiter=maxiter,
                                    sync_every=sync_every, **kw)
        return go

    with torch.no_grad():
        ref = certified_radius(model, x, y, eps_max, xtol=xtol, maxiter=100, sync_every=1,
                               logits=logits).radius
    g = torch.Generator().manual_seed(1)
    drift = ref * (1 + 0.01 * torch.randn(args.batch, generator=g)).to(ref)

    def naive():
        saved = radius_mod.brent_step
        radius_mod.brent_step = brent_step_reference
        try:
            with torch.no_grad():
                return certified_radius(model, x, y, eps_max, xtol=xtol, maxiter=maxiter)
        finally:
            radius_mod.brent_step = saved

    def bisect():
        with torch.no_grad():
            return _bisection(fn, args.batch, eps_max, xtol, x)

    t_unit = _time(unit, args.repeats, dev)
    rows = [("ibp pass (unit)", t_unit, None, 1.0)]
    variants = (("adcert", run()), ("adcert-sync2", run(2)),
                ("adcert-logits-sync1", run(1, logits=logits)),
                ("warm+-1% w.05", run(1, logits=logits, init=drift)),
                ("warm+-1% w.01", run(1, logits=logits, init=drift, init_width=0.01)),
                ("naive", naive), ("bisection", bisect))
    for name, f in variants:
        with _RowCounter() as count:
            res = f()
        rows.append((name, _time(f, args.repeats, dev), res, count.rows / args.batch))
    rows[-1] = rows[-1][:3] + (2 + max(0, math.ceil(math.log2(eps_max / xtol))),)
    try:
        from scipy.optimize import brentq
        k = 2 if args.quick else min(8, args.batch)
        t0 = time.perf_counter()
        for i in range(k):
            def R(e, i=i):
                with torch.no_grad():
                    return float(fn(torch.tensor([e], device=dev), torch.tensor([i], device=dev)))
            if R(0.0) < 0 and R(eps_max) >= 0:
                brentq(R, 0.0, eps_max, xtol=xtol, maxiter=100)
        rows.append(("scipy per sample", (time.perf_counter() - t0) * args.batch / k, None,
                     None))
    except ImportError:
        print("scipy not installed: skipping the per-sample scipy loop")
    print(f"{'variant':20s} {'ms':>10s} {'x ibp pass':>11s} {'rows/B':>7s}  notes")
    for name, t, res, units in rows:
        note = ""
        if hasattr(res, "iterations"):
            note = (f"mean iters {float(res.iterations.double().mean()):.2f}, "
                    f"converged width <= xtol: "
                    f"{float(((res.upper - res.radius) <= xtol * 1.001).double().mean()):.2f}")
        units = "-" if units is None else f"{units:.2f}"
        print(f"{name:20s} {t * 1e3:10.2f} {t / t_unit:11.2f} {units:>7s}  {note}")

    # ---- training step: ACERT (maxiter 2) vs IBP
    model.train()
    state = StepState(eps=eps_max, eps_target=eps_max)
    method = ACERT(maxiter=2, reg_lambda=0.0)

    def ibp_step():
        model.zero_grad(set_to_none=True)
        st = clean_bn_stats(model, x)
        logits = model(x)
        m = compute_bounds(model, x, eps_max, y=y, bn_stats=st)
        (F.cross_entropy(logits, y) * 0 + F.cross_entropy(-m, y)).backward()

    def acert_step():
        model.zero_grad(set_to_none=True)
        state.bn_stats = clean_bn_stats(model, x)
        method.loss(model, x, y, state).loss.backward()

    t_ibp = _time(ibp_step, args.repeats, dev)
    t_acert = _time(acert_step, args.repeats, dev)
    print(f"training step: IBP {t_ibp * 1e3:.2f} ms, ACERT(maxiter=2) {t_acert * 1e3:.2f} ms, "
          f"ratio {t_acert / t_ibp:.2f} (paper: 3.3, target <= 1.6)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
