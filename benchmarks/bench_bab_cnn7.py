#!/usr/bin/env python
"""Branch-and-bound at CNN7 scale: ``bab-relu`` on a CNN7 trained with IBP on MNIST at eps 0.1.

    python benchmarks/bench_bab_cnn7.py [--width 8] [--epochs 6] [--train-subset 5000]
                                        [--samples 30] [--eps 0.1] [--cert-eps E]
                                        [--timeout 60]
                                        [--variants reuse,refine] [--threads 2]
                                        [--work DIR] [--data-dir DIR] [--out FILE] [--quick]

1. Train (or load from ``--work``, default ``benchmarks/results/bab_cnn7``, git-ignored) a CNN7
   (``adcert.models.cnn7`` at ``--width``, linear layer ``8 x width``) with ``method: ibp`` at
   eps 0.1 through :class:`adcert.train.Trainer`: the first ``--train-subset`` MNIST training
   images, ``--epochs`` epochs (1 clean, a ramp over half the rest), Adam lr 1e-3, seed 0.
   A short budget on purpose: the model is robust on some images and not on others, and
   alpha-CROWN leaves some undecided -- the cases branch-and-bound is for.
2. On the first ``--samples`` test images, at ``--cert-eps`` (default ``--eps``; a larger radius
   leaves more samples to the search): the pipeline ``ibp, crown, alpha-crown`` (sound,
   one run, shared by the variants), then ``bab-relu`` (sound, ``method="alpha-crown"``,
   beta-CROWN multipliers, warm starts, BaBSR, ``--timeout`` seconds per sample) on the samples
   alpha-CROWN left unknown, once per variant:

   * ``reuse``: every domain is bounded with its parent's ReLU input boxes, clamped by its
     splits (one backward walk per domain; the root's boxes come from alpha-CROWN over every
     layer), the default;
   * ``refine``: the parent's boxes tightened by CROWN under the domain's splits (one backward
     walk per layer and per domain);
   * ``recompute`` (not run by default): CROWN's boxes from scratch, ignoring the parent's.

Reported per variant: certified / attacked / unknown among the BaB samples, domains bounded,
seconds (total and median per sample) and the largest queue's memory (MB). A sample one variant
certifies and another attacks would be a soundness bug: the script says so and exits 1.
``--quick``: width 4, 1 epoch on 500 images, 3 samples, 3 alpha-CROWN steps, 5 s timeout (a smoke
run; measures nothing). Needs the MNIST files of ``../shared/data`` (``--data-dir`` or
``$ADCERT_DATA``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Dict, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from adcert.certify import certify  # noqa: E402
from adcert.certify.bab_relu import ReluSplitBaB  # noqa: E402
from adcert.data.registry import load_dataset  # noqa: E402
from adcert.models import build_model  # noqa: E402
from adcert.train import Trainer, from_dict  # noqa: E402

VARIANTS = {"reuse": {"boxes": "reuse"}, "refine": {"boxes": "refine"},
            "recompute": {"boxes": "recompute"}}


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The arguments :func:`trained_model` and the sample choice read (shared with
    ``bench_vs_abcrown.py``, which certifies the same model)."""
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--train-subset", type=int, default=5000)
    p.add_argument("--samples", type=int, default=30)
    p.add_argument("--eps", type=float, default=0.1, help="training radius")
    p.add_argument("--cert-eps", type=float, default=None,
                   help="certification radius (default: --eps)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=os.path.join(HERE, "results", "bab_cnn7"))
    p.add_argument("--data-dir", default=None)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--timeout", type=float, default=60.0, help="BaB seconds per sample")
    p.add_argument("--variants", default="reuse,refine")
    p.add_argument("--iterations", type=int, default=None,
                   help="alpha-CROWN steps of the alpha-crown stage and of every BaB domain "
                        "(default: each one's own default)")
    p.add_argument("--out", default=None, help="JSON (default: WORK/bab_cnn7.json)")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.width, a.epochs, a.train_subset, a.samples, a.timeout = 4, 1, 500, 3, 5.0
        a.iterations = 3
        a.work = os.path.join(a.work, "quick")
    if a.cert_eps is None:
        a.cert_eps = a.eps
    for v in a.variants.split(","):
        if v not in VARIANTS:
            p.error(f"--variants: unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    return a


def data_dir(arg) -> str:
    if arg:
        return os.path.abspath(arg)
    env = os.environ.get("ADCERT_DATA")
    return os.path.abspath(env) if env else os.path.join(os.path.dirname(REPO), "shared", "data")


def trained_model(a) -> torch.nn.Module:
    """The CNN7 of step 1, trained once and cached in ``a.work``."""
    out_dir = os.path.join(a.work, f"w{a.width}_e{a.epochs}_n{a.train_subset}")
    cfg = {
        "seed": 0, "output_dir": out_dir,
        "data": {"dataset": "mnist", "data_dir": data_dir(a.data_dir), "batch_size": 100,
                 "train_subset": a.train_subset, "test_subset": max(a.samples, 100),
                 "augment": False},
        "model": {"name": "cnn7", "init": "ibp",
                  "kwargs": {"width": a.width, "linear_size": 8 * a.width, "in_channels": 1,
                             "input_size": 28}},
        "method": {"name": "ibp", "hparams": {}},
        "train": {"epochs": a.epochs, "lr": 1e-3, "lr_milestones": [], "lr_decay": 0.2,
                  "eps": a.eps, "clean_epochs": min(1, a.epochs - 1),
                  "ramp_epochs": max(1, (a.epochs - 1) // 2), "grad_clip": 10.0,
                  "threads": a.threads},
        "swa": {"enabled": False},
        "eval": {"eps": a.eps, "subset": 100, "final_subset": None, "pgd_steps": 10,
                 "pgd_restarts": 1, "every": a.epochs},
        "log": {"progress": False},
    }
    spec = {"name": "cnn7", "dataset": "mnist", **cfg["model"]["kwargs"]}
    cached = os.path.join(out_dir, "model_state.pt")
    model = build_model(**spec)
    if os.path.isfile(cached):
        model.load_state_dict(torch.load(cached, weights_only=True))
        return model.eval()
    trainer = Trainer(from_dict(cfg))
    t0 = time.perf_counter()
    rec = trainer.fit()
    print(f"trained CNN7 width {a.width} in {time.perf_counter() - t0:.0f} s: "
          f"clean {rec['clean_acc']:.3f}, PGD {rec['pgd_acc']:.3f}, "
          f"IBP-certified {rec['cert_acc']:.3f}", flush=True)
    model.load_state_dict(trainer.final_model().state_dict())
    tmp = cached + ".tmp"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, cached)
    return model.eval()


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    model = trained_model(a)
    xt, yt = load_dataset("mnist", "test", data_dir(a.data_dir))
    x, y = xt[:a.samples].float() / (255.0 if xt.dtype == torch.uint8 else 1.0), yt[:a.samples]
    steps = {} if a.iterations is None else {"iterations": a.iterations}
    t0 = time.perf_counter()
    first = certify(model, x, y, a.cert_eps, stages=("ibp", "crown", "alpha-crown"), timeout=None,
                    sample_timeout=None,
                    stage_options=steps and {"alpha-crown": steps})
    pre_s = time.perf_counter() - t0
    status = [first.records[i]["verdict"] for i in range(a.samples)]
    open_idx = [i for i, s in enumerate(status) if s == "unknown"]
    print(f"{a.samples} samples: " + ", ".join(f"{s} {status.count(s)}" for s in sorted(set(status)))
          + f" after ibp, crown, alpha-crown ({pre_s:.1f} s); BaB on {len(open_idx)}", flush=True)
    rows: Dict[str, Any] = {}
    verdicts: Dict[str, List] = {}
    for v in a.variants.split(","):
        stage = ReluSplitBaB(sound=True, timeout=a.timeout, method="alpha-crown",
                             bound_options=steps or None, **VARIANTS[v])
        xs, ys = x[open_idx], y[open_idx]
        t0 = time.perf_counter()
        out = stage.run(model, xs, ys, a.cert_eps) if open_idx else None
        wall = time.perf_counter() - t0
        stats = stage.last_stats
        vs = [st["verdict"] for st in stats]
        verdicts[v] = vs
        rows[v] = {"certified": vs.count("certified"), "attacked": vs.count("attacked"),
                   "unknown": vs.count("unknown"), "seconds": wall,
                   "domains": sum(st["domains"] for st in stats),
                   "median_seconds": statistics.median([st["seconds"] for st in stats])
                   if stats else 0.0,
                   "queue_mb": max([st.get("queue_mb", 0.0) for st in stats], default=0.0),
                   "per_sample": stats}
        print(f"  {v:10s} certified {rows[v]['certified']:3d}  attacked {rows[v]['attacked']:3d}"
              f"  unknown {rows[v]['unknown']:3d}  domains {rows[v]['domains']:6d}  "
              f"{wall:7.1f} s (median {rows[v]['median_seconds']:.1f} s/sample, largest queue "
              f"{rows[v]['queue_mb']:.0f} MB)", flush=True)
        del out
    bad = []
    names = list(verdicts)
    for i in range(len(open_idx)):
        got = {verdicts[n][i] for n in names} - {"unknown"}
        if len(got) > 1:
            bad.append(open_idx[i])
    if bad:
        print(f"SOUNDNESS: variants disagree (certified vs attacked) on samples {bad}")
    write_json(a.out or os.path.join(a.work, "bab_cnn7.json"), a,
               {"before_bab": {s: status.count(s) for s in set(status)},
                "before_bab_seconds": pre_s, "bab_samples": open_idx, "variants": rows})
    return 1 if bad else 0


def write_json(path: str, a, results: Dict[str, Any]) -> None:
    """``results`` with the arguments and the machine, to ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"args": vars(a), "device": {"name": platform.processor() or
                                               platform.machine(), "threads": a.threads,
                                               "torch": torch.__version__}, **results},
                  f, indent=1, default=str)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
