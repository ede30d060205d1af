#!/usr/bin/env python
"""adcert's certifier against the official alpha,beta-CROWN, sample by sample, on a CNN7.

    python benchmarks/bench_vs_abcrown.py --abcrown PATH/complete_verifier/abcrown.py
                                          [--width 8] [--epochs 6] [--train-subset 5000]
                                          [--samples 30] [--eps 0.1] [--cert-eps E]
                                          [--timeout 30] [--threads 2] [--work DIR]
                                          [--data-dir DIR] [--out FILE] [--quick]

The model is :mod:`bench_bab_cnn7`'s (a CNN7 trained with IBP on MNIST at eps 0.1 for a short
budget, cached in ``--work``). On the first ``--samples`` test images at ``--cert-eps``:

* **adcert**: :func:`adcert.certify.certify` with the stages ``ibp, crown, alpha-crown,
  bab-relu`` (sound; ``bab-relu`` with ``--timeout`` seconds per sample);
* **abcrown**: the same function with the single stage ``abcrown`` (the official alpha,beta-CROWN
  through :class:`adcert.certify.abcrown.AbcrownStage`, ``--timeout`` seconds per sample, its
  PGD after the bounds: ``attack: {pgd_order: after}``, so its timeout covers its whole run).

Reported: verdict counts and total seconds of each; a table of the samples on which the two
differ; and CONTRADICTIONS (one certifies, the other attacks: a soundness bug in one of them --
exit status 1). abcrown's certificates are floating-point ones, ours are rounding-sound.
``--quick``: width 4, 1 epoch, 3 samples, 5 s timeout (a smoke run). Needs abcrown installed
(``--abcrown`` or ``$ADCERT_ABCROWN``) and the MNIST files of ``../shared/data``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from adcert.certify import certify  # noqa: E402
from adcert.certify.abcrown import AbcrownStage  # noqa: E402
from adcert.data.registry import load_dataset  # noqa: E402

import bench_bab_cnn7  # noqa: E402

OURS = ("ibp", "crown", "alpha-crown", "bab-relu")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--abcrown", default=os.environ.get("ADCERT_ABCROWN"))
    bench_bab_cnn7.add_model_args(p)
    p.add_argument("--timeout", type=float, default=30.0, help="BaB seconds per sample, both")
    p.add_argument("--out", default=None, help="JSON (default: WORK/vs_abcrown.json)")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if not a.abcrown:
        p.error("--abcrown: give the path of complete_verifier/abcrown.py (or $ADCERT_ABCROWN)")
    if a.quick:
        a.width, a.epochs, a.train_subset, a.samples, a.timeout = 4, 1, 500, 3, 5.0
        a.work = os.path.join(a.work, "quick")
    if a.cert_eps is None:
        a.cert_eps = a.eps
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    model = bench_bab_cnn7.trained_model(a)
    xt, yt = load_dataset("mnist", "test", bench_bab_cnn7.data_dir(a.data_dir))
    x, y = xt[:a.samples], yt[:a.samples]
    runs = {}
    for name, stages in (("adcert", OURS), ("abcrown", None)):
        if stages is None:
            stages = (AbcrownStage(abcrown=a.abcrown, timeout=a.timeout,
                                   workdir=os.path.join(a.work, "abcrown_runs"),
                                   config={"attack": {"pgd_order": "after"}}),)
        t0 = time.perf_counter()
        res = certify(model, x, y, a.cert_eps, stages=stages, timeout=a.timeout,
                      sample_timeout=None)
        wall = time.perf_counter() - t0
        verdicts = [res.records[i]["verdict"] for i in range(a.samples)]
        runs[name] = {"verdicts": verdicts, "seconds": wall,
                      "counts": {v: verdicts.count(v) for v in sorted(set(verdicts))},
                      "stages": [res.records[i].get("stage") for i in range(a.samples)]}
        print(f"{name:8s} " + ", ".join(f"{k} {n}" for k, n in runs[name]["counts"].items())
              + f"  ({wall:.1f} s)", flush=True)
    ours, theirs = runs["adcert"]["verdicts"], runs["abcrown"]["verdicts"]
    differ = [i for i in range(a.samples) if ours[i] != theirs[i]]
    bad = [i for i in differ if {ours[i], theirs[i]} == {"certified", "attacked"}]
    if differ:
        print("\nsample  adcert (stage)            abcrown")
        for i in differ:
            st = runs["adcert"]["stages"][i]
            print(f"{i:6d}  {ours[i]:10s} ({st or '-':12s})  {theirs[i]}")
    both = sum(1 for i in range(a.samples) if ours[i] == theirs[i])
    print(f"\nsame verdict on {both} of {a.samples}; contradictions: {bad or 'none'}")
    bench_bab_cnn7.write_json(a.out or os.path.join(a.work, "vs_abcrown.json"), a,
                              {"runs": runs, "differ": differ, "contradictions": bad})
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
