#!/usr/bin/env python
"""ReLU-split branch-and-bound (``bab-relu``): clamp-only split bounds versus beta-CROWN split
multipliers, on a fixed set of small hard instances.

    python benchmarks/bench_bab.py [--instances 20] [--timeout 10] [--unsound] [--out FILE]
                                   [--branching babsr|width] [--variants clamp-only,beta]
                                   [--quick]

Instances (deterministic, seeded): tiny fp64 ReLU MLPs ``d-h-h-3`` (``d`` in {2, 4}, ``h`` in
{8, 10}, weights ``2 N(0, 1/fan_in)``), one random point each, labelled by the net itself, and
a radius ``eps = f * eps_alpha`` where ``eps_alpha`` is the largest radius alpha-CROWN (sound)
certifies (bisection) and ``f`` cycles through 1.05 ... 1.5: alpha-CROWN is inconclusive on every
instance kept. Both variants run :class:`~adcert.certify.bab_relu.ReluSplitBaB` with
``method="alpha-crown"``, the same bound options (:data:`BOUND_OPTIONS`), the same per-sample
``--timeout`` and PGD schedule; only ``beta`` differs. The table gives, per variant, the
instances solved (certified + attacked), unknown, and the median domains and seconds per
instance (over all instances; an unknown counts with its budget). Two variants that disagree
(one certifies what the other attacks) would be a soundness bug: the script reports it and exits
with status 1.

``--quick`` (2 instances, 1 s timeout, a coarser bisection) is a smoke run
(tests/test_benchmarks_smoke.py); timings on a shared CPU are not a measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Dict, List

import torch
from torch import nn

try:
    import adcert  # noqa: F401
except ImportError:  # source checkout that is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adcert.bounds import compute_bounds  # noqa: E402
from adcert.certify.bab_relu import ReluSplitBaB  # noqa: E402
from adcert.certify.stages import worst_margin  # noqa: E402

BOUND_OPTIONS = {"iterations": 50, "lr": 0.2, "lr_beta": 0.2}
FACTORS = (1.05, 1.15, 1.3, 1.5)


def tiny_mlp(seed: int, d: int, h: int, c: int = 3) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                        nn.Linear(h, c)).double()
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=torch.float64) * 2
                               / m.weight.shape[1] ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=torch.float64) * 0.3)
    return net.eval()


def alpha_radius(net: nn.Module, x, y, hi: float = 0.5, steps: int = 10,
                 iterations: int = 20) -> float:
    """The largest eps in ``[0, hi]`` (bisection, ``steps`` halvings) alpha-CROWN (``iterations``
    Adam steps) certifies."""
    lo = 0.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        m = compute_bounds(net, x, mid, method="alpha-crown", y=y, sound=True,
                           iterations=iterations)
        lo, hi = (mid, hi) if bool(worst_margin(m, y)[0] > 0) else (lo, mid)
    return lo


def instances(n: int, steps: int = 10, iterations: int = 20) -> List[dict]:
    """``n`` deterministic instances where sound alpha-CROWN (default options) is inconclusive
    (``steps``, ``iterations``: of the radius bisection)."""
    out, seed = [], 0
    while len(out) < n and seed < 50 * n:
        d, h = (2, 4)[seed % 2], (8, 10)[(seed // 2) % 2]
        net = tiny_mlp(seed, d, h)
        x = torch.rand(1, d, generator=torch.Generator().manual_seed(1000 + seed),
                       dtype=torch.float64)
        y = net(x).argmax(1)
        r = alpha_radius(net, x, y, steps=steps, iterations=iterations)
        eps = r * FACTORS[len(out) % len(FACTORS)]
        seed += 1
        if r <= 0 or r >= 0.49:  # never certified, or certified on the whole input cube
            continue
        if bool(worst_margin(compute_bounds(net, x, eps, method="alpha-crown", y=y,
                                            sound=True), y)[0] > 0):
            continue
        out.append({"seed": seed - 1, "d": d, "h": h, "eps": eps, "net": net, "x": x, "y": y})
    return out


def run_variant(inst: List[dict], beta: bool, timeout: float, sound: bool,
                branching: str = "babsr") -> Dict:
    rows = []
    for it in inst:
        st = ReluSplitBaB(sound=sound, timeout=timeout, method="alpha-crown", beta=beta,
                          bound_options=BOUND_OPTIONS, attack_every=10, branching=branching)
        st.run(it["net"], it["x"], it["y"], it["eps"])
        rows.append(st.last_stats[0])
    verdicts = [r["verdict"] for r in rows]
    return {"beta": beta, "per_instance": rows,
            "certified": verdicts.count("certified"), "attacked": verdicts.count("attacked"),
            "solved": verdicts.count("certified") + verdicts.count("attacked"),
            "unknown": verdicts.count("unknown"),
            "median_domains": statistics.median(r["domains"] for r in rows),
            "median_seconds": statistics.median(r["seconds"] for r in rows)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per instance")
    ap.add_argument("--unsound", action="store_true", help="bound without fp widening")
    ap.add_argument("--branching", default="babsr", choices=("babsr", "width"),
                    help="the branching score of both variants")
    ap.add_argument("--variants", default="clamp-only,beta",
                    help="comma-separated subset of clamp-only,beta")
    ap.add_argument("--quick", action="store_true", help="2 instances, 1 s timeout (smoke)")
    ap.add_argument("--out", default=None, help="JSON results file")
    a = ap.parse_args(argv)
    if a.quick:
        a.instances, a.timeout = 2, 1.0
    if a.instances < 1 or not a.timeout > 0:
        ap.error("--instances must be >= 1 and --timeout > 0")
    torch.manual_seed(0)  # PGD's random starts
    t0 = time.perf_counter()
    inst = instances(a.instances, *((4, 3) if a.quick else (10, 20)))
    print(f"{len(inst)} instances where alpha-CROWN is inconclusive "
          f"(selected in {time.perf_counter() - t0:.1f} s); timeout {a.timeout} s each")
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    if not names or not set(names) <= {"clamp-only", "beta"}:
        ap.error(f"--variants: expected a subset of clamp-only,beta, got {a.variants!r}")
    results = [run_variant(inst, name == "beta", a.timeout, not a.unsound, a.branching)
               for name in ("clamp-only", "beta") if name in names]
    print(f"{'variant':<12}{'solved':>8}{'cert':>6}{'attk':>6}{'unknown':>9}"
          f"{'med dom':>9}{'med s':>8}")
    for r in results:
        name = "beta" if r["beta"] else "clamp-only"
        print(f"{name:<12}{r['solved']:>8}{r['certified']:>6}{r['attacked']:>6}"
              f"{r['unknown']:>9}{r['median_domains']:>9.0f}{r['median_seconds']:>8.2f}")
    conflicts = [i for i, (p, q) in enumerate(zip(results[0]["per_instance"],
                                                  results[-1]["per_instance"]))
                 if {p["verdict"], q["verdict"]} == {"certified", "attacked"}]
    if conflicts:
        print(f"SOUNDNESS BUG: the variants disagree (certified vs attacked) on {conflicts}")
    if a.out:
        meta = [{k: v for k, v in it.items() if k in ("seed", "d", "h", "eps")} for it in inst]
        with open(a.out, "w") as f:
            json.dump({"config": {"instances": len(inst), "timeout": a.timeout,
                                  "sound": not a.unsound, "quick": a.quick,
                                  "branching": a.branching,
                                  "bound_options": BOUND_OPTIONS},
                       "platform": {"python": platform.python_version(),
                                    "torch": torch.__version__,
                                    "threads": torch.get_num_threads()},
                       "instances": meta,
                       "variants": {("beta" if r["beta"] else "clamp-only"): r
                                    for r in results},
                       "conflicts": conflicts}, f, indent=1)
    return 1 if conflicts else 0


if __name__ == "__main__":
    sys.exit(main())
