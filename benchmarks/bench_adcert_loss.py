"""Times the fused ``adcert.ops.adcert_loss`` against the plain-torch composite
(``adcert.ops.reference.adcert_loss``: log_softmax / kl_div / logsumexp), forward + backward
(gradients w.r.t. student logits and margins; ``reduction="mean"``, ``alpha = 0.5``, ``tau = 1``).
Variants run interleaved in one process; the table shows median milliseconds and the speedup.

    python benchmarks/bench_adcert_loss.py [--repeats 50] [--clean] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

try:
    import adcert  # noqa: F401
except ImportError:  # source checkout that is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import adcert.ops as adops  # noqa: E402
from adcert.ops import reference as refops  # noqa: E402


def _case(fn, B, C, device, clean):
    g = torch.Generator().manual_seed(0)
    mk = lambda: torch.randn(B, C, generator=g).mul_(3).to(device)  # noqa: E731
    s, t, m = mk().requires_grad_(), mk(), mk().requires_grad_()
    c = mk().requires_grad_() if clean else None
    leaves = [s, m] + ([c] if clean else [])

    def run():
        loss = fn(s, t, m, 0.5, 1.0, "mean", clean_logits=c)
        torch.autograd.grad(loss, leaves)

    return run


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def bench(device: str, repeats: int, clean: bool):
    rows = []
    for C in (10, 200, 1000):
        for B in (128, 1024):
            runs = {"fused": _case(adops.adcert_loss, B, C, device, clean),
                    "composite": _case(refops.adcert_loss, B, C, device, clean)}
            times = {k: [] for k in runs}
            for f in runs.values():  # warm-up
                for _ in range(3):
                    f()
            for _ in range(repeats):
                for k, f in runs.items():  # interleaved
                    _sync(device)
                    t0 = time.perf_counter()
                    f()
                    _sync(device)
                    times[k].append((time.perf_counter() - t0) * 1e3)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append((device, B, C, med["fused"], med["composite"],
                         med["composite"] / med["fused"]))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--clean", action="store_true", help="RSLAD-CERT form (clean logits too)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cpu, and cuda when available")
    args = p.parse_args(argv)
    devices = [args.device] if args.device else ["cpu"] + (
        ["cuda"] if torch.cuda.is_available() else [])
    print(f"adcert_loss fwd+bwd, {'RSLAD-CERT' if args.clean else 'AD-CERT'}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'device':<7}{'B':>6}{'C':>6}{'fused ms':>11}{'composite ms':>14}{'speedup':>9}")
    for device in devices:
        for d, B, C, f, c, sp in bench(device, args.repeats, args.clean):
            print(f"{d:<7}{B:>6}{C:>6}{f:>11.3f}{c:>14.3f}{sp:>8.2f}x")


if __name__ == "__main__":
    main()
