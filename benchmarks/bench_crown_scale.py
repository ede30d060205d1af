#!/usr/bin/env python
"""CROWN at the papers' scale: CNN7, side by side with auto_LiRPA's patches mode.

    python benchmarks/bench_crown_scale.py [--widths 16,64] [--shapes mnist,cifar]
                                           [--batches 1] [--threads 2] [--eps 0.02]
                                           [--iterations 20] [--dense] [--no-lirpa]
                                           [--no-lirpa-alpha] [--no-alpha]
                                           [--out FILE] [--quick]

For every (width, input shape, batch) one seeded CNN7 (``adcert.models.cnn7``, its Normalize the
identity so that auto_LiRPA can bound ``model[1:]``: its patches mode mishandles a Normalize in
front of a conv) is bounded on the margin specification at ``eps`` (default 0.02), eval mode,
under ``torch.no_grad``, with:

* ``ibp``; ``crown`` (receptive-field rows, the default); ``crown-sound`` (``sound=True``, the
  certifier's rigorous mode); ``alpha-crown`` (``--iterations`` Adam steps, default 20, every
  layer's slopes) and ``alpha-crown-last`` (the final layer's slopes alone); with
  ``--dense`` also ``crown-dense`` (``patches=False``, the whole-map rows of before);
* auto_LiRPA (when importable) ``CROWN`` and ``alpha-CROWN`` (same iterations) in
  ``conv_mode="patches"``, the reference point of issue 15's targets: adcert's CROWN and sound
  CROWN no slower than auto_LiRPA's patches CROWN, sound no more than 1.3x plain.

Each case runs once after a warm-up call on a smaller input (the machine is shared and the calls
take seconds to minutes, so a single timed call per case, all in one process, is what the table
shows; rerun for a second sample). Reported: seconds, the ratios ``crown-sound / crown`` and
``crown / auto_LiRPA CROWN``, the largest margin difference to adcert's ``crown``, and the margin
lower bounds summed over the non-label classes (the alpha-CROWN table: higher is tighter). Writes JSON
(``--out``, default ``benchmarks/results/crown_scale.json``). ``--quick``: width 4, MNIST shape,
2 iterations (a smoke run, not a measurement).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from typing import Dict, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from adcert.bounds import compute_bounds  # noqa: E402
from adcert.models.cnn import cnn7  # noqa: E402
from adcert.bounds.spec import margin_spec  # noqa: E402

SHAPES = {"mnist": (1, 28), "cifar": (3, 32)}


def _lirpa():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from auto_LiRPA import BoundedModule, BoundedTensor
            from auto_LiRPA.perturbations import PerturbationLpNorm
        return BoundedModule, BoundedTensor, PerturbationLpNorm
    except ImportError:
        return None


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run_case(width: int, shape: str, batch: int, eps: float, iterations: int, dense: bool,
             lirpa: bool, lirpa_alpha: bool = True, alpha: bool = True) -> Dict:
    channels, size = SHAPES[shape]
    torch.manual_seed(0)
    model = cnn7(width=width, in_channels=channels, input_size=size,
                 mean=(0.0,) * channels, std=(1.0,) * channels).eval()
    x = torch.rand(batch, channels, size, size)
    y = torch.randint(0, 10, (batch,))
    cases = {
        "ibp": lambda: compute_bounds(model, x, eps, method="ibp", y=y),
        "crown": lambda: compute_bounds(model, x, eps, method="crown", y=y),
        "crown-sound": lambda: compute_bounds(model, x, eps, method="crown", y=y, sound=True),
        "alpha-crown": lambda: compute_bounds(model, x, eps, method="alpha-crown", y=y,
                                              iterations=iterations),
        "alpha-crown-last": lambda: compute_bounds(model, x, eps, method="alpha-crown", y=y,
                                                   iterations=iterations, intermediate=False),
    }
    if dense:
        cases["crown-dense"] = lambda: compute_bounds(model, x, eps, method="crown", y=y,
                                                      patches=False)
    if not alpha:
        del cases["alpha-crown"], cases["alpha-crown-last"]
    lib = _lirpa() if lirpa else None
    if lib is not None:
        BoundedModule, BoundedTensor, Perturbation = lib
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = BoundedModule(model[1:], torch.zeros_like(x),
                                bound_opts={"conv_mode": "patches"}, device="cpu")
        box = Perturbation(norm=float("inf"), x_L=(x - eps).clamp(0, 1),
                           x_U=(x + eps).clamp(0, 1))
        spec = margin_spec(y, 10, x.dtype, x.device)

        def lirpa_bound(method: str):
            net.set_bound_opts({"optimize_bound_args": {"iteration": iterations}})
            bounded = BoundedTensor(x, box)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return net.compute_bounds(x=(bounded,), method=method, C=spec)[0]

        cases["auto_LiRPA CROWN"] = lambda: lirpa_bound("CROWN")
        if lirpa_alpha and alpha:
            cases["auto_LiRPA alpha-CROWN"] = lambda: lirpa_bound("alpha-CROWN")
    # warm-up (allocators, oneDNN primitive caches) on a 1-sample call
    with torch.no_grad():
        compute_bounds(model, x[:1], eps, method="crown", y=y[:1])
    row: Dict = {"width": width, "shape": shape, "batch": batch, "seconds": {}, "max_diff": {},
                 "margin_sum": {}}
    off = ~torch.nn.functional.one_hot(y, 10).bool()
    ref = None
    for name, fn in cases.items():
        grad = torch.enable_grad() if "alpha" in name else torch.no_grad()
        with grad:
            sec, out = _timed(fn)
        out = out.detach()
        row["seconds"][name] = sec
        row["margin_sum"][name] = float(out[off].sum())
        if name == "crown":
            ref = out
        if ref is not None and name != "ibp":
            row["max_diff"][name] = float((out - ref).abs().max())
        print(f"  {name:24s} {sec:8.2f} s   margins summed {row['margin_sum'][name]:10.4f}",
              flush=True)
    s = row["seconds"]
    row["sound_over_plain"] = s["crown-sound"] / s["crown"]
    if "auto_LiRPA CROWN" in s:
        row["crown_over_lirpa"] = s["crown"] / s["auto_LiRPA CROWN"]
        row["sound_over_lirpa"] = s["crown-sound"] / s["auto_LiRPA CROWN"]
    return row


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", default="16,64")
    p.add_argument("--shapes", default="mnist,cifar")
    p.add_argument("--batches", default="1")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eps", type=float, default=0.02)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--dense", action="store_true", help="also time the whole-map rows")
    p.add_argument("--no-lirpa", action="store_true", help="skip auto_LiRPA")
    p.add_argument("--no-lirpa-alpha", action="store_true",
                   help="skip auto_LiRPA's alpha-CROWN (it optimises every layer's slopes: "
                        "over 10 minutes at width 16 on 2 CPU cores)")
    p.add_argument("--no-alpha", action="store_true",
                   help="skip every alpha-CROWN case (e.g. at batch 16: minutes each on a CPU)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "crown_scale.json"))
    p.add_argument("--quick", action="store_true", help="width 4, MNIST, 2 iterations")
    a = p.parse_args(argv)
    if a.quick:
        a.widths, a.shapes, a.batches, a.iterations = "4", "mnist", "1", 2
    widths = [int(w) for w in a.widths.split(",")]
    batches = [int(b) for b in a.batches.split(",")]
    shapes = a.shapes.split(",")
    for s in shapes:
        if s not in SHAPES:
            p.error(f"--shapes: unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    torch.set_num_threads(a.threads)
    rows = []
    for width in widths:
        for shape in shapes:
            for batch in batches:
                print(f"CNN7 width {width}, {shape} shape, batch {batch}:", flush=True)
                rows.append(run_case(width, shape, batch, a.eps, a.iterations, a.dense,
                                     not a.no_lirpa, not a.no_lirpa_alpha, not a.no_alpha))
    result = {"device": {"name": platform.processor() or platform.machine(),
                         "threads": a.threads, "torch": torch.__version__},
              "eps": a.eps, "iterations": a.iterations, "results": rows}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print("\nwidth shape  batch   crown  sound  sound/crown  crown/auto_LiRPA  sound/auto_LiRPA")
    for r in rows:
        s = r["seconds"]
        lirpa = (f"{r['crown_over_lirpa']:16.2f}  {r['sound_over_lirpa']:16.2f}"
                 if "crown_over_lirpa" in r else f"{'-':>16s}  {'-':>16s}")
        print(f"{r['width']:5d} {r['shape']:6s} {r['batch']:5d} {s['crown']:7.2f} "
              f"{s['crown-sound']:6.2f} {r['sound_over_plain']:12.2f} {lirpa}")
    if any("alpha-crown" in r["margin_sum"] for r in rows):
        print("\nalpha-CROWN, margin lower bounds summed (higher is tighter) and seconds")
        print("width shape  batch       crown   every layer    last layer  auto_LiRPA alpha")
    for r in rows:
        m, s = r["margin_sum"], r["seconds"]
        if "alpha-crown" not in m:
            continue
        cells = [f"{m[k]:8.4f} {s[k]:5.1f}s" if k in m else f"{'-':>14s}"
                 for k in ("alpha-crown", "alpha-crown-last", "auto_LiRPA alpha-CROWN")]
        print(f"{r['width']:5d} {r['shape']:6s} {r['batch']:5d} {m['crown']:11.4f} "
              + " ".join(cells))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
