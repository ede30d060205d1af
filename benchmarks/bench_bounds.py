#!/usr/bin/env python
"""Time and peak memory of every ``compute_bounds`` method on CNN7 with CIFAR-shaped inputs.

    python benchmarks/bench_bounds.py [--device cpu|cuda] [--batches 1,16] [--width 64]
                                      [--methods ibp,crown-ibp,crown,alpha-crown]
                                      [--repeats N] [--iterations 20] [--out FILE] [--quick]

Per (method, batch): median and p20/p80 of the per-call time (``run.time_interleaved``: the
variants of a case interleaved, after a warm-up), peak memory growth during one call, and --
where a plain-torch reference path exists -- the speedup ``reference / adcert``:

* ``ibp``: reference = IBP through ``adcert.ops.reference`` one op at a time
  (``bench_common.ibp_forward_reference``);
* ``crown-ibp``: reference = IBP through the reference ops, then the same backward relaxation
  with every layer transposed by autograd (``torch.autograd.grad`` of the layer's forward: a
  vector-Jacobian product per layer) instead of explicit ``conv_transpose2d``/``matmul``;
* ``crown`` and ``alpha-crown`` (``--iterations`` Adam steps): no reference (a dense CROWN is
  infeasible at CNN7 size).

All bounds are margin lower bounds (``y`` given) in eval mode under ``torch.no_grad`` (the
certification cost); ``crown-ibp/fwdbwd`` also times forward + backward of the CROWN-IBP loss in
train mode with frozen statistics (the training cost). Memory: CUDA ``max_memory_allocated``
growth; CPU: the peak of torch's CPU allocator during one call (``run.allocator_peak_growth``).
``--quick`` (a smoke run, measures nothing): width 4, linear 32, batch 1, 2 repeats, 2 alpha
iterations. Full-width CROWN on CPU takes minutes per call (thousands of unstable neurons, each
a backward pass); use ``--methods`` to choose.
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
from adcert.bounds import clean_bn_stats, compute_bounds  # noqa: E402
from adcert.models import cnn7  # noqa: E402
from adcert.ops import reference as refops  # noqa: E402

METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")
EPS = 2.0 / 255.0


def _blocks(model):
    """``[(layer, bn_or_None, relu)]`` of a flat cnn7 (Normalize first)."""
    mods = list(model) + [None]
    out = []
    for i, m in enumerate(mods[:-1]):
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            bn = mods[i + 1] if isinstance(mods[i + 1], torch.nn.modules.batchnorm._BatchNorm) \
                else None
            out.append((m, bn, bn is not None))
    return out


def _layer_fn(layer, bn, stats):
    """The block's affine part (conv/linear + BN with fixed statistics) as a function."""
    def f(h):
        if isinstance(layer, torch.nn.Linear):
            h = F.linear(h.flatten(1), layer.weight, layer.bias)
        else:
            h = F.conv2d(h, layer.weight, layer.bias, layer.stride, layer.padding)
        if bn is not None:
            mean, var = stats[bn]
            h = F.batch_norm(h, mean, var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return h
    return f


def crown_ibp_reference(model, stats, x, y, eps):
    """CROWN-IBP margins through plain torch: reference-op IBP, autograd-transposed layers."""
    mu, r = bc.input_box(x, eps)  # the model's Normalize is the identity here
    mu_x, r_x = mu, r
    fns, boxes, inputs = [], [], []
    for layer, bn, relu in _blocks(model):
        f = _layer_fn(layer, bn, stats)
        fns.append(f)
        inputs.append(mu.shape[1:])
        m2, r2 = (mu.flatten(1), r.flatten(1)) if isinstance(layer, torch.nn.Linear) else (mu, r)
        if isinstance(layer, torch.nn.Linear):
            mu, r = refops.interval_linear(m2, r2, layer.weight, layer.bias)
        else:
            mu, r = refops.interval_conv2d(m2, r2, layer.weight, layer.bias, layer.stride,
                                           layer.padding)
        if bn is not None:
            mean, var = stats[bn]
            mu, r = refops.interval_batch_norm(mu, r, mean, var, bn.weight, bn.bias, bn.eps)
        if relu:
            boxes.append((mu - r, mu + r))
            mu, r = refops.interval_relu(mu, r)
    n = mu.shape[1]
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    A = eye[y].unsqueeze(1) - eye.unsqueeze(0)  # [B, C, C]
    const = torch.zeros(A.shape[:2], dtype=x.dtype, device=x.device)
    B, S = A.shape[:2]
    for i in range(len(fns) - 1, -1, -1):
        if i < len(boxes):  # ReLU after block i
            l, u = boxes[i]
            uns = (l < 0) & (u > 0)
            slope = torch.where(uns, u / (u - l).clamp(min=1e-30), (l >= 0).to(l.dtype))
            lo_s = torch.where(uns, (u >= -l).to(l.dtype), (l >= 0).to(l.dtype))
            pos, neg = A.clamp(min=0), A.clamp(max=0)
            const = const + (neg * torch.where(uns, -l * slope, 0 * l).unsqueeze(1)).flatten(
                2).sum(-1)
            A = pos * lo_s.unsqueeze(1) + neg * slope.unsqueeze(1)
        with torch.enable_grad():
            h = torch.zeros((B * S,) + tuple(inputs[i]), dtype=x.dtype, device=x.device,
                            requires_grad=True)
            out = fns[i](h)
            (A_in,) = torch.autograd.grad(out, h, A.reshape(out.shape))
        const = const + (A.reshape(out.shape) * fns[i](torch.zeros_like(h[:1]))).reshape(
            B, S, -1).sum(-1)
        A = A_in.reshape((B, S) + tuple(inputs[i]))
    Af = A.flatten(2)
    return (torch.einsum("bsk,bk->bs", Af, mu_x.flatten(1))
            - torch.einsum("bsk,bk->bs", Af.abs(), r_x.flatten(1)) + const)


def build_cases(method, device, batch, width, linear, iterations, seed=0):
    """``{variant: fn}`` for one (method, batch); ``fn()`` runs one bound call."""
    torch.manual_seed(seed)
    model = cnn7(width=width, linear_size=linear).to(device).eval()  # identity Normalize
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    stats = {bn: (bn.running_mean, bn.running_var) for bn in model.modules()
             if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm)}
    opts = dict(iterations=iterations) if method == "alpha-crown" else {}

    def ours():
        with torch.no_grad():
            return compute_bounds(model, x, EPS, method=method, y=y, **opts)
    cases = {"adcert": ours}
    if method == "ibp":
        def ref_ibp():
            with torch.no_grad():
                return bc.ibp_forward_reference(model[1:], list(stats.values()), x, EPS)
        cases["reference"] = ref_ibp
    elif method == "crown-ibp":
        def ref_crown_ibp():
            with torch.no_grad():
                return crown_ibp_reference(model, stats, x, y, EPS)
        cases["reference"] = ref_crown_ibp
    return cases, (model, x, y, stats)


def crown_ibp_train_case(device, batch, width, linear):
    torch.manual_seed(0)
    model = cnn7(width=width, linear_size=linear).to(device).train()
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    stats = clean_bn_stats(model, x)
    params = [p for p in model.parameters()]

    def step():
        m = compute_bounds(model, x, EPS, method="crown-ibp", y=y, bn_stats=stats)
        return torch.autograd.grad(F.cross_entropy(-m, y), params)
    return step


def peak_memory(fn, device) -> int:
    if device.startswith("cuda"):
        return runner.cuda_peak_growth(fn)
    return runner.allocator_peak_growth(fn)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=bc.default_device())
    p.add_argument("--batches", default=None, help="comma-separated (default 1,16)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--linear", type=int, default=None)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    q = a.quick
    batches = [int(b) for b in (a.batches or ("1" if q else "1,16")).split(",")]
    width, linear = a.width or (4 if q else 64), a.linear or (32 if q else 512)
    repeats = a.repeats or (2 if q else 10)
    iterations = a.iterations if a.iterations is not None else (2 if q else 20)
    methods = [m for m in a.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            p.error(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    sync = bc.synchronizer(a.device)
    results, errors = [], []
    for method in methods:
        for batch in batches:
            try:
                cases, _ = build_cases(method, a.device, batch, width, linear, iterations)
                t = runner.time_interleaved(cases, sync, repeats, 1, 0.0 if q else 0.2)
                t.pop("_samples", None)
                row = {"method": method, "mode": "fwd", "batch": batch, "variants": t}
                for k, fn in cases.items():
                    t[k]["peak_mem_bytes"] = peak_memory(fn, a.device)
                if "reference" in t:
                    row["speedup"] = t["reference"]["median_ms"] / t["adcert"]["median_ms"]
                results.append(row)
                if method == "crown-ibp":
                    fn = crown_ibp_train_case(a.device, batch, width, linear)
                    t = runner.time_interleaved({"adcert": fn}, sync, repeats, 1,
                                                0.0 if q else 0.2)
                    t.pop("_samples", None)
                    t["adcert"]["peak_mem_bytes"] = peak_memory(fn, a.device)
                    results.append({"method": method, "mode": "fwdbwd", "batch": batch,
                                    "variants": t})
            except Exception as exc:  # keep going; report
                errors.append({"method": method, "batch": batch, "error": repr(exc),
                               "traceback": traceback.format_exc()})
    print(f"{'method':<12} {'mode':<7} {'B':>3} {'variant':<10} {'median ms':>10} "
          f"{'p20':>9} {'p80':>9} {'peak MiB':>9} {'speedup':>8}")
    for row in results:
        for k, v in row["variants"].items():
            sp = f"{row['speedup']:.2f}" if k == "adcert" and "speedup" in row else ""
            print(f"{row['method']:<12} {row['mode']:<7} {row['batch']:>3} {k:<10} "
                  f"{v['median_ms']:>10.2f} {v['p20_ms']:>9.2f} {v['p80_ms']:>9.2f} "
                  f"{v['peak_mem_bytes'] / 2 ** 20:>9.1f} {sp:>8}")
    for e in errors:
        print(f"ERROR {e['method']} batch {e['batch']}: {e['error']}", file=sys.stderr)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = a.out or os.path.join(HERE, "results", f"bounds-{a.device}-{stamp}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    device_name = (torch.cuda.get_device_name() if a.device.startswith("cuda")
                   else platform.processor() or platform.machine())
    with open(out, "w") as f:
        json.dump({"timestamp_utc": stamp, "device": {"type": a.device, "name": device_name,
                                                      "torch_num_threads": torch.get_num_threads()},
                   "versions": {"python": platform.python_version(), "torch": torch.__version__},
                   "config": {"quick": q, "batches": batches, "width": width, "linear": linear,
                              "repeats": repeats, "alpha_iterations": iterations, "eps": EPS},
                   "memory_method": "cuda max_memory_allocated growth" if a.device != "cpu"
                   else "torch CPU allocator peak growth (torch.profiler)",
                   "results": results, "errors": errors}, f, indent=2)
    print(f"wrote {out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
