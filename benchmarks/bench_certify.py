"""Samples per second of each certification stage on a CNN7-sized model (smoke-run on CPU).

Each stage of :mod:`adcert.certify.stages` runs on the same batch of ``--batch`` random CIFAR-sized
images (labels: the model's own predictions, so nothing is decided by ``clean``), ``--repeats``
times; the table gives the median time per batch and samples per second. Stages that cannot run
(e.g. a bounding method whose sound mode is not implemented yet) are listed with the reason, not
timed. Results also go to a JSON file.

    python benchmarks/bench_certify.py [--batch 4] [--repeats 3] [--width 64]
                                       [--stages clean,autoattack,ibp]
                                       [--aa-components apgd-ce] [--unsound] [--out FILE]

The model is randomly initialised (``adcert.models.cnn7``, eval mode), so bounds are loose and
the numbers measure cost, not certification rates. AutoAttack defaults to its first component
(APGD-CE) to keep the smoke run short; ``--aa-components apgd-ce,apgd-t,fab-t,square`` times
the standard version. ``--unsound`` times the bounds without the floating-point widening.
``crown`` and ``alpha-crown`` are not in the default list: on a busy 2-core CPU one sound CROWN
pass of CNN7 took more than 100 s even at width 8 and batch 1 (first smoke run), so time them on a
GPU or a small ``--width``.
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

try:
    import adcert  # noqa: F401
except ImportError:  # source checkout that is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adcert.certify.stages import make_stage  # noqa: E402
from adcert.models import CIFAR10_MEAN, CIFAR10_STD, cnn7  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--eps", type=float, default=2 / 255)
    p.add_argument("--stages", default="clean,autoattack,ibp")
    p.add_argument("--aa-components", default="apgd-ce")
    p.add_argument("--alpha-iterations", type=int, default=5)
    p.add_argument("--unsound", action="store_true")
    p.add_argument("--out", default="bench_certify.json")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model = cnn7(mean=CIFAR10_MEAN, std=CIFAR10_STD, width=args.width).eval()
    x = torch.rand(args.batch, 3, 32, 32)
    with torch.no_grad():
        y = model(x).argmax(1)
    options = {"autoattack": {"components": tuple(args.aa_components.split(",")),
                              "square_queries": 100},
               "alpha-crown": {"iterations": args.alpha_iterations}}
    print(f"CNN7 (width {args.width}) on CPU, batch {args.batch}, eps {args.eps:.5f}, "
          f"{'UNSOUND' if args.unsound else 'sound'} bounds; smoke run, not a measurement")
    print(f"{'stage':<12}{'s/batch':>12}{'samples/s':>12}", flush=True)
    rows, skipped = [], {}
    for name in [s for s in args.stages.split(",") if s]:
        stage = make_stage(name, num_classes=10, sound=not args.unsound, options=options)
        reason = stage.unavailable(model, x, y, args.eps)
        if reason is not None:
            skipped[name] = reason
            print(f"{name:<12}  unavailable: {reason}", flush=True)
            continue
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            stage.run(model, x, y, args.eps)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        rows.append({"stage": name, "median_s_per_batch": med, "samples_per_s": args.batch / med,
                     "times_s": times})
        print(f"{name:<12}{med:>12.4f}{args.batch / med:>12.2f}", flush=True)
    result = {"device": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "config": vars(args), "stages": rows,
              "unavailable": skipped}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
