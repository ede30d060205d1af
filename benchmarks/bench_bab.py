#!/usr/bin/env python
"""ReLU-split branch-and-bound (``bab-relu``): clamp-only split bounds versus beta-CROWN split
multipliers, cold- and warm-started, on a fixed set of small hard instances.

    python benchmarks/bench_bab.py [--instances 20] [--cnn 4] [--timeout 10] [--unsound]
                                   [--out FILE] [--branching babsr|fsb|width]
                                   [--variants clamp-only,beta,beta+warm,...]
                                   [--warm-iterations 15] [--quick]

Instances (deterministic, seeded), one random point each, labelled by the net itself, and a
radius ``eps = f * eps_alpha`` where ``eps_alpha`` is the largest radius alpha-CROWN (sound)
certifies (bisection) and ``f`` cycles through 1.05 ... 1.5: alpha-CROWN is inconclusive on every
instance kept.

* ``--instances`` MLPs: tiny fp64 ReLU MLPs ``d-h-h-3`` (``d`` in {2, 4}, ``h`` in {8, 10},
  weights ``2 N(0, 1/fan_in)``);
* ``--cnn`` CNNs: fp64 ``1x8x8 -> conv 4@3x3 stride 2 -> ReLU -> conv 4@3x3 stride 2 -> ReLU
  -> linear 3`` (80 ReLUs, weights ``2 N(0, 1/fan_in)``).

Every variant runs :class:`~adcert.certify.bab_relu.ReluSplitBaB` with ``method="alpha-crown"``,
the same bound options (:data:`BOUND_OPTIONS`, the root's and a cold domain's Adam steps), the
same per-sample ``--timeout`` and PGD schedule: ``clamp-only`` (``beta=False``), ``beta``
(split multipliers, every domain optimised from scratch) and ``beta+warm`` (every domain starts
from its parent's slopes and multipliers and runs ``--warm-iterations`` steps); each bounds a
domain with its parent's ReLU boxes (``boxes="reuse"``) except ``beta+warm+refine`` (the
parent's boxes tightened by CROWN under the domain's splits) and ``beta+warm+recompute`` (CROWN's
from scratch). The table gives,
per instance set and variant, the instances solved (certified + attacked), unknown, and the
median domains and seconds per instance (over all instances; an unknown counts with its budget).
Two variants that disagree (one certifies what another attacks) would be a soundness bug: the
script reports it and exits with status 1.

``--quick`` (2 MLP + 1 CNN instances, 1 s timeout, a coarser bisection) is a smoke run
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
# variant -> (beta, warm_start, boxes)
VARIANTS = {"clamp-only": (False, False, "reuse"), "beta": (True, False, "reuse"),
            "beta+warm": (True, True, "reuse"), "beta+warm+refine": (True, True, "refine"),
            "beta+warm+recompute": (True, True, "recompute")}


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


def tiny_cnn(seed: int, c: int = 3) -> nn.Module:
    """fp64 ``[B, 1, 8, 8] -> conv 4@3x3/2 -> ReLU -> conv 4@3x3/2 -> ReLU -> linear c``."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(16, c)).double()
    with torch.no_grad():
        for m in net:
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=torch.float64) * 2
                               / fan_in ** 0.5)
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


def instances(n: int, steps: int = 10, iterations: int = 20, kind: str = "mlp") -> List[dict]:
    """``n`` deterministic instances (``kind``: ``"mlp"`` or ``"cnn"``) where sound alpha-CROWN
    (default options) is inconclusive (``steps``, ``iterations``: of the radius bisection)."""
    out, seed = [], 0
    while len(out) < n and seed < 50 * n:
        if kind == "cnn":
            d, h = (1, 8, 8), 4
            net = tiny_cnn(seed)
            hi = 0.2
        else:
            d, h = (2, 4)[seed % 2], (8, 10)[(seed // 2) % 2]
            net = tiny_mlp(seed, d, h)
            hi = 0.5
        shape = (1,) + (d if isinstance(d, tuple) else (d,))
        x = torch.rand(shape, generator=torch.Generator().manual_seed(1000 + seed),
                       dtype=torch.float64)
        with torch.no_grad():
            y = net(x).argmax(1)
        r = alpha_radius(net, x, y, hi=hi, steps=steps, iterations=iterations)
        eps = r * FACTORS[len(out) % len(FACTORS)]
        seed += 1
        if r <= 0 or r >= 0.98 * hi:  # never certified, or certified up to the search's cap
            continue
        if bool(worst_margin(compute_bounds(net, x, eps, method="alpha-crown", y=y,
                                            sound=True), y)[0] > 0):
            continue
        out.append({"kind": kind, "seed": seed - 1, "d": d, "h": h, "eps": eps, "net": net,
                    "x": x, "y": y})
    return out


def summarize(rows: List[dict]) -> Dict:
    """Counts and medians of per-instance stats rows (``verdict``, ``domains``, ``seconds``)."""
    verdicts = [r["verdict"] for r in rows]
    return {"certified": verdicts.count("certified"), "attacked": verdicts.count("attacked"),
            "solved": verdicts.count("certified") + verdicts.count("attacked"),
            "unknown": verdicts.count("unknown"),
            "median_domains": statistics.median(r["domains"] for r in rows) if rows else 0,
            "median_seconds": statistics.median(r["seconds"] for r in rows) if rows else 0.0}


def run_variant(inst: List[dict], name: str, timeout: float, sound: bool,
                branching: str = "babsr", warm_iterations: int = 15) -> Dict:
    """Run the variant ``name`` (a key of :data:`VARIANTS`) on every instance; the summary over
    all instances plus one per instance kind (``by_kind``)."""
    beta, warm, boxes = VARIANTS[name]
    rows = []
    for it in inst:
        st = ReluSplitBaB(sound=sound, timeout=timeout, method="alpha-crown", beta=beta,
                          bound_options=BOUND_OPTIONS, attack_every=10, branching=branching,
                          warm_start=warm, warm_iterations=warm_iterations,
                          boxes=boxes)
        st.run(it["net"], it["x"], it["y"], it["eps"])
        rows.append(dict(st.last_stats[0], kind=it["kind"]))
    kinds = sorted({r["kind"] for r in rows})
    return dict(summarize(rows), name=name, beta=beta, warm_start=warm, boxes=boxes,
                per_instance=rows,
                by_kind={k: summarize([r for r in rows if r["kind"] == k]) for k in kinds})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=20, help="MLP instances")
    ap.add_argument("--cnn", type=int, default=4, help="CNN instances")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per instance")
    ap.add_argument("--unsound", action="store_true", help="bound without fp widening")
    ap.add_argument("--branching", default="babsr", choices=("babsr", "fsb", "width"),
                    help="the branching score of both variants")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated subset of {','.join(VARIANTS)}")
    ap.add_argument("--warm-iterations", type=int, default=15,
                    help="Adam steps of a warm-started domain (beta+warm)")
    ap.add_argument("--quick", action="store_true",
                    help="2 MLP + 1 CNN instances, 1 s timeout (smoke)")
    ap.add_argument("--out", default=None, help="JSON results file")
    a = ap.parse_args(argv)
    if a.quick:
        a.instances, a.cnn, a.timeout = 2, 1, 1.0
    if a.instances < 0 or a.cnn < 0 or a.instances + a.cnn < 1 or not a.timeout > 0:
        ap.error("--instances and --cnn must be >= 0 with at least one instance, --timeout > 0")
    if a.warm_iterations < 0:
        ap.error("--warm-iterations must be >= 0")
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    if not names or not set(names) <= set(VARIANTS):
        ap.error(f"--variants: expected a subset of {','.join(VARIANTS)}, got {a.variants!r}")
    torch.manual_seed(0)  # PGD's random starts
    t0 = time.perf_counter()
    bisect = (4, 3) if a.quick else (10, 20)
    inst = instances(a.instances, *bisect) + instances(a.cnn, *bisect, kind="cnn")
    print(f"{len(inst)} instances where alpha-CROWN is inconclusive "
          f"(selected in {time.perf_counter() - t0:.1f} s); timeout {a.timeout} s each")
    results = [run_variant(inst, name, a.timeout, not a.unsound, a.branching,
                           a.warm_iterations) for name in VARIANTS if name in names]
    print(f"{'set':<5}{'n':>4} {'variant':<11}{'solved':>7}{'cert':>6}{'attk':>6}{'unknown':>9}"
          f"{'med dom':>9}{'med s':>8}")
    for kind in sorted(results[0]["by_kind"]):
        for r in results:
            k = r["by_kind"][kind]
            n = k["solved"] + k["unknown"]
            print(f"{kind:<5}{n:>4} {r['name']:<11}{k['solved']:>7}{k['certified']:>6}"
                  f"{k['attacked']:>6}{k['unknown']:>9}{k['median_domains']:>9.0f}"
                  f"{k['median_seconds']:>8.2f}")
    conflicts = sorted({i for p in results for q in results
                        for i, (u, v) in enumerate(zip(p["per_instance"], q["per_instance"]))
                        if {u["verdict"], v["verdict"]} == {"certified", "attacked"}})
    if conflicts:
        print(f"SOUNDNESS BUG: the variants disagree (certified vs attacked) on {conflicts}")
    if a.out:
        meta = [{k: v for k, v in it.items() if k in ("kind", "seed", "d", "h", "eps")}
                for it in inst]
        with open(a.out, "w") as f:
            json.dump({"config": {"instances": len(inst), "mlp": a.instances, "cnn": a.cnn,
                                  "timeout": a.timeout,
                                  "sound": not a.unsound, "quick": a.quick,
                                  "branching": a.branching,
                                  "warm_iterations": a.warm_iterations,
                                  "bound_options": BOUND_OPTIONS},
                       "platform": {"python": platform.python_version(),
                                    "torch": torch.__version__,
                                    "threads": torch.get_num_threads()},
                       "instances": meta,
                       "variants": {r["name"]: r for r in results},
                       "conflicts": conflicts}, f, indent=1)
    return 1 if conflicts else 0


if __name__ == "__main__":
    sys.exit(main())
