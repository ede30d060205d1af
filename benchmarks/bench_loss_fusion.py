#!/usr/bin/env python
"""CROWN-IBP loss fusion versus the unfused CROWN-IBP loss: time and peak memory, side by side.

    python benchmarks/bench_loss_fusion.py [--device cpu|cuda] [--batches 16,128] [--width 64]
                                           [--linear 512] [--repeats N] [--out FILE] [--quick]

Model: CNN7 (``adcert.models.cnn7``, ``ibp_init`` as certified training starts) on CIFAR-shaped
inputs ``[B, 3, 32, 32]``, 10 classes, in train mode with frozen clean-batch BN statistics (a
training step's setting), eps = 2/255.
Two variants per (mode, batch), timed interleaved in one run (``run.time_interleaved``):

* ``unfused``: ``compute_bounds(method="crown-ibp", y=y)`` (one backward relaxation of C rows per
  sample) and ``F.cross_entropy(-margins, y)``;
* ``fused``: ``crown_ibp_ce_upper(...).mean()`` (one backward row per sample).

Modes: ``fwd`` (under ``torch.no_grad``) and ``fwdbwd`` (the loss and its gradient w.r.t. every
parameter). The table gives median and p20/p80 of the per-call time, the peak memory growth
during one call (CUDA ``max_memory_allocated``; CPU: torch's allocator peak from the profiler),
and ``ratio = unfused / fused`` of the medians (> 1: fusion is faster). The mean loss values of
both are recorded too (the bounds differ; neither is always smaller).
Defaults: batches 16,128 on CUDA, 16 on CPU. ``--quick`` (a smoke run, measures nothing):
width 4, linear 32, batch 2, 2 repeats.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bench_common as bc  # noqa: E402
import run as runner  # noqa: E402
from adcert.bounds import clean_bn_stats, compute_bounds, crown_ibp_ce_upper  # noqa: E402
from adcert.models import cnn7  # noqa: E402
from adcert.models.init import ibp_init  # noqa: E402

EPS = 2.0 / 255.0
MODES = ("fwd", "fwdbwd")
VARIANTS = ("unfused", "fused")


def build_cases(mode, device, batch, width, linear, seed=0):
    """``({variant: fn}, {variant: loss value})`` for one (mode, batch)."""
    torch.manual_seed(seed)
    model = ibp_init(cnn7(width=width, linear_size=linear)).to(device).train()
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    with torch.no_grad():  # constants for the repeated timed calls (outside them)
        stats = clean_bn_stats(model, x)
    params = list(model.parameters())

    def unfused_loss():
        m = compute_bounds(model, x, EPS, method="crown-ibp", y=y, bn_stats=stats)
        return F.cross_entropy(-m, y)

    def fused_loss():
        return crown_ibp_ce_upper(model, x, EPS, y, bn_stats=stats).mean()

    losses = {"unfused": unfused_loss, "fused": fused_loss}

    def wrap(loss_fn):
        if mode == "fwd":
            def fn():
                with torch.no_grad():
                    return loss_fn()
        else:
            def fn():
                return torch.autograd.grad(loss_fn(), params)
        return fn

    with torch.no_grad():
        values = {k: float(f()) for k, f in losses.items()}
    return {k: wrap(f) for k, f in losses.items()}, values


def peak_memory(fn, device) -> int:
    if device.startswith("cuda"):
        return runner.cuda_peak_growth(fn)
    return runner.allocator_peak_growth(fn)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=bc.default_device())
    p.add_argument("--batches", default=None, help="comma-separated (default 16,128 on cuda, "
                                                   "16 on cpu)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--linear", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    q = a.quick
    default_batches = "2" if q else ("16,128" if a.device.startswith("cuda") else "16")
    try:
        batches = [int(b) for b in (a.batches or default_batches).split(",") if b]
    except ValueError:
        p.error(f"--batches: expected comma-separated integers, got {a.batches!r}")
    if not batches or min(batches) < 1:
        p.error(f"--batches: expected positive integers, got {a.batches!r}")
    width, linear = a.width or (4 if q else 64), a.linear or (32 if q else 512)
    repeats = a.repeats or (2 if q else 10)
    sync = bc.synchronizer(a.device)
    results, errors = [], []
    for batch in batches:
        for mode in MODES:
            try:
                cases, values = build_cases(mode, a.device, batch, width, linear)
                t = runner.time_interleaved(cases, sync, repeats, 1, 0.0 if q else 0.2)
                t.pop("_samples", None)
                for k, fn in cases.items():
                    t[k]["peak_mem_bytes"] = peak_memory(fn, a.device)
                    t[k]["loss"] = values[k]
                results.append({"mode": mode, "batch": batch, "variants": t,
                                "ratio": t["unfused"]["median_ms"] / t["fused"]["median_ms"],
                                "mem_ratio": (t["unfused"]["peak_mem_bytes"]
                                              / max(1, t["fused"]["peak_mem_bytes"]))})
            except Exception as exc:  # keep going; report
                errors.append({"mode": mode, "batch": batch, "error": repr(exc),
                               "traceback": traceback.format_exc()})
    print(f"{'mode':<7} {'B':>4} {'variant':<8} {'median ms':>10} {'p20':>9} {'p80':>9} "
          f"{'peak MiB':>9} {'loss':>8} {'ratio':>6}")
    for row in results:
        for k, v in row["variants"].items():
            ratio = f"{row['ratio']:.2f}" if k == "fused" else ""
            print(f"{row['mode']:<7} {row['batch']:>4} {k:<8} {v['median_ms']:>10.2f} "
                  f"{v['p20_ms']:>9.2f} {v['p80_ms']:>9.2f} "
                  f"{v['peak_mem_bytes'] / 2 ** 20:>9.1f} {v['loss']:>8.4f} {ratio:>6}")
    for e in errors:
        print(f"ERROR {e['mode']} batch {e['batch']}: {e['error']}", file=sys.stderr)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = a.out or os.path.join(HERE, "results", f"loss_fusion-{a.device}-{stamp}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    device_name = (torch.cuda.get_device_name() if a.device.startswith("cuda")
                   else platform.processor() or platform.machine())
    with open(out, "w") as f:
        json.dump({"timestamp_utc": stamp, "device": {"type": a.device, "name": device_name,
                                                      "torch_num_threads": torch.get_num_threads()},
                   "versions": {"python": platform.python_version(), "torch": torch.__version__},
                   "config": {"quick": q, "batches": batches, "width": width, "linear": linear,
                              "repeats": repeats, "eps": EPS, "model": "cnn7", "classes": 10},
                   "memory_method": "cuda max_memory_allocated growth"
                   if a.device.startswith("cuda")
                   else "torch CPU allocator peak growth (torch.profiler)",
                   "ratio": "unfused median / fused median (> 1: fusion faster)",
                   "results": results, "errors": errors}, f, indent=2)
    print(f"wrote {out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
