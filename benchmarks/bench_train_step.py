"""Training-step cost of the certified-training methods relative to a standard step, against
CTBench's cost model.

    python benchmarks/bench_train_step.py [--batch 32] [--repeats 5] [--width 64] [--device cpu]
                                          [--json out.json]

One :class:`adcert.train.Trainer`-equivalent step (the step's clean-batch BN statistics,
differentiable unless ``--bn-mode frozen``, the method's loss,
backward, L1, clipping, Adam) is timed on CNN7 / CIFAR-10-shaped inputs for ``standard`` (clean
CE; the time ``T``), ``ibp``, ``mtl-ibp``, ``sabr``, ``pgd`` and ``adcert`` (whichever are
registered), with the method's attack steps ``M``. The model (CTBench's table, AD-CERT Table 8):
IBP ``2 T``, PGD / SABR / MTL-IBP ``(M + 2) T`` (PGD ``(M + 1) T``), AD-CERT ``(M + 2) T + F``
with ``F`` one teacher forward (~``T / 3``). Reports the median step time (p20/p80), the ratio to
``T``, the model's ratio and the relative deviation (target: within 10 %). Variants are
interleaved round-robin so load drifts hit all alike. Timings on a shared machine are smoke
numbers only.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

try:
    import adcert  # noqa: F401
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adcert.methods import METHODS, MethodOutput, StepState, get_method
from adcert.models import build_model, ibp_init
from adcert.train.bn import StepBatchNorm, update_running_stats
from adcert.train.trainer import l1_term

M_STEPS = 8


def _standard_loss(model, x, y, state):
    logits = model(x)
    return MethodOutput(F.cross_entropy(logits, y), logits.detach())


def _cases(teacher):
    """``{name: (loss_fn, model_ratio)}``; the ratio in units of T (F ~ T / 3)."""
    cases = {"standard": (_standard_loss, 1.0)}
    table = {"ibp": ({}, 2.0), "pgd": ({"steps": M_STEPS}, M_STEPS + 1.0),
             "mtl-ibp": ({"steps": M_STEPS, "alpha": 0.5}, M_STEPS + 2.0),
             "sabr": ({"steps": M_STEPS}, M_STEPS + 2.0),
             "adcert": ({"steps": M_STEPS, "alpha": 0.5, "teacher": teacher},
                        M_STEPS + 2.0 + 1.0 / 3.0)}
    for name, (hp, ratio) in table.items():
        if name in METHODS:
            cases[name] = (get_method(name, **hp).loss, ratio)
    return cases


def _step(model, opt, loss_fn, x, y, eps, detach_bn=False):
    step_bn = StepBatchNorm(model, detach=detach_bn)
    opt.zero_grad(set_to_none=True)
    with step_bn:
        state = StepState(eps=eps, eps_target=eps, bn_stats=step_bn.view, coef=1.0)
        out = loss_fn(model, x, y, state)
        (out.loss + 1e-6 * l1_term(model)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
    opt.step()
    update_running_stats(step_bn.detached(), step_bn.counts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    p.add_argument("--bn-mode", choices=("batch", "frozen"), default="batch",
                   help="the trainer's train.bn_mode: differentiable (batch, default) or "
                        "detached (frozen) clean-batch statistics")
    args = p.parse_args(argv)
    detach = args.bn_mode == "frozen"
    torch.manual_seed(0)
    dev = torch.device(args.device)
    spec = dict(name="cnn7", dataset="cifar10", width=args.width)
    model = ibp_init(build_model(**spec)).to(dev).train()
    teacher = build_model(**spec).to(dev).eval()
    for q in teacher.parameters():
        q.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(args.batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    cases = _cases(teacher)
    times = {k: [] for k in cases}
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for name, (fn, _) in cases.items():  # warm-up
        _step(model, opt, fn, x, y, 2 / 255, detach)
    for _ in range(args.repeats):
        for name, (fn, _) in cases.items():
            sync()
            t0 = time.perf_counter()
            _step(model, opt, fn, x, y, 2 / 255, detach)
            sync()
            times[name].append(time.perf_counter() - t0)
    T = statistics.median(times["standard"])
    rows = []
    print(f"CNN7 (width {args.width}) batch {args.batch} on {dev} "
          f"({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else platform.processor()}), "
          f"torch {torch.__version__}, M = {M_STEPS}")
    print(f"{'method':10s} {'median ms':>10s} {'p20':>8s} {'p80':>8s} {'x T':>6s} "
          f"{'model':>6s} {'dev %':>6s}")
    for name, (_, ratio) in cases.items():
        ts = sorted(times[name])
        med = statistics.median(ts)
        q = statistics.quantiles(ts, n=5) if len(ts) > 1 else [med] * 4
        rel = med / T
        dev_pct = 100 * (rel - ratio) / ratio
        rows.append(dict(method=name, median_s=med, p20_s=q[0], p80_s=q[-1], ratio=rel,
                         model_ratio=ratio, deviation_pct=dev_pct))
        print(f"{name:10s} {1e3 * med:10.1f} {1e3 * q[0]:8.1f} {1e3 * q[-1]:8.1f} {rel:6.2f} "
              f"{ratio:6.2f} {dev_pct:+6.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(dev), "torch": torch.__version__, "batch": args.batch,
                       "bn_mode": args.bn_mode,
                       "width": args.width, "M": M_STEPS, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
