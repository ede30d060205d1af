"""IBP certified training of a small CNN on scikit-learn's bundled 8x8 digits, end to end.

    adcert demo [--epochs 50] [--eps 0.1] [--seed 0]      (or: python -m adcert.demo ...)

Trains ``cnn3`` with the IBP loss ``(1 - k) CE(f(x), y) + k CE(-margins, y)`` (``margins`` are the
IBP lower bounds of ``z_y - z_i`` from :func:`adcert.bounds.compute_bounds`, ``k = eps_t / eps``)
under an eps ramp (one warm-up epoch at eps 0, then power-4 growth for the first quarter of the ramp
and linear after it), then reports on the held-out split: clean accuracy, accuracy under a 10-step
L-inf PGD attack and IBP-certified accuracy, all at radius ``eps`` in pixel space ``[0, 1]``.
Batch norms use the clean-batch statistics of each step, computed once and reused (DESIGN.md
section 5). Needs scikit-learn (``pip install -c constraints.txt scikit-learn``) and tqdm.
``train`` returns the test metrics as a dict.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from adcert.bounds import clean_bn_stats, compute_bounds
from adcert.models import cnn3, ibp_init

Tensor = torch.Tensor


def load_digits_split(test_fraction: float = 0.2):
    """8x8 digits as ``[N, 1, 8, 8]`` floats in ``[0, 1]`` and int64 labels; a fixed split
    (independent of ``--seed``) into train and test."""
    from adcert._deps import require

    data = require("sklearn.datasets", "scikit-learn", "the digits demo").load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    n_test = int(round(test_fraction * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def eps_ramp(step: int, warmup: int, ramp: int, eps: float, mid: float = 0.25) -> float:
    """0 during ``warmup`` steps, then ``eps * s(t)`` over ``ramp`` steps, ``t`` in [0, 1]: power-4
    growth up to ``t = mid``, linear after it, continuous with a continuous slope."""
    if step < warmup:
        return 0.0
    t = min(1.0, (step - warmup) / max(1, ramp))
    a = 1.0 / (mid ** 4 + 4 * mid ** 3 * (1 - mid))
    s = a * t ** 4 if t < mid else a * mid ** 4 + 4 * a * mid ** 3 * (t - mid)
    return eps * min(1.0, s)


def pgd_attack(model, x: Tensor, y: Tensor, eps: float, steps: int = 10) -> Tensor:
    """L-inf PGD (random start, ``steps`` signed-gradient steps of ``eps / 4``) on CE, kept in
    ``[x - eps, x + eps]`` and ``[0, 1]``. Gradients are taken w.r.t. the input only."""
    alpha = eps / 4
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(lo, hi).detach()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), lo), hi)
    return x_adv.detach()


@torch.no_grad()
def certified(model, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """``[B]`` bool: every IBP margin lower bound ``z_y - z_i``, ``i != y``, is > 0."""
    margins = compute_bounds(model, x, eps, y=y)
    margins = margins.scatter(1, y[:, None], float("inf"))
    return margins.min(dim=1).values > 0


def evaluate(model, x: Tensor, y: Tensor, eps: float, batch: int = 256):
    """Clean, PGD-10 and IBP-certified accuracy (eval mode, running BN statistics)."""
    model.eval()
    clean = adv = cert = 0
    for i in range(0, len(y), batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        with torch.no_grad():
            clean += int((model(xb).argmax(1) == yb).sum())
        x_adv = pgd_attack(model, xb, yb, eps)
        with torch.no_grad():
            robust = model(x_adv).argmax(1) == yb
        is_cert = certified(model, xb, yb, eps)
        if bool((is_cert & ~robust).any()):  # a certificate must never be broken by an attack
            raise RuntimeError("soundness bug: PGD found an adversarial example for a "
                               "certified sample")
        adv += int(robust.sum())
        cert += int(is_cert.sum())
    n = len(y)
    return clean / n, adv / n, cert / n


def train(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = load_digits_split()
    mean, std = float(x_train.mean()), float(x_train.std())
    model = cnn3(in_channels=1, num_classes=10, input_size=8, mean=mean, std=std)
    ibp_init(model)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    # batch starts; a last batch of one sample is dropped (training-mode batch norm needs two)
    starts = [i for i in range(0, len(y_train), args.batch_size) if len(y_train) - i >= 2]
    steps_per_epoch = len(starts)
    total = args.epochs * steps_per_epoch
    warmup = steps_per_epoch  # one epoch of clean training
    ramp = max(1, int(args.ramp_fraction * args.epochs) * steps_per_epoch)
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=[int(0.8 * total), int(0.9 * total)], gamma=0.2)
    print(f"digits: {len(y_train)} train / {len(y_test)} test, eps={args.eps}, "
          f"{args.epochs} epochs x {steps_per_epoch} steps")
    start = time.perf_counter()
    step = 0
    bar = tqdm(total=total, desc="IBP training", unit="step")
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(y_train))
        for i in starts:
            idx = perm[i:i + args.batch_size]
            xb, yb = x_train[idx], y_train[idx]
            eps_t = eps_ramp(step, warmup, ramp, args.eps)
            k = args.robust_weight * eps_t / args.eps if args.eps > 0 else 0.0
            stats = clean_bn_stats(model, xb)  # frozen clean-batch BN statistics of this step
            loss = F.cross_entropy(model(xb), yb)
            if k > 0:
                margins = compute_bounds(model, xb, eps_t, y=yb, bn_stats=stats)
                loss = (1 - k) * loss + k * F.cross_entropy(-margins, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(epoch=epoch + 1, eps=f"{eps_t:.3f}", loss=f"{loss.item():.3f}")
    bar.close()
    train_time = time.perf_counter() - start
    clean, adv, cert = evaluate(model, x_test, y_test, args.eps)
    total_time = time.perf_counter() - start
    print(f"test clean accuracy:     {100 * clean:5.1f}%")
    print(f"test PGD-10 accuracy:    {100 * adv:5.1f}%  (eps={args.eps})")
    print(f"test IBP-certified acc.: {100 * cert:5.1f}%  (eps={args.eps})")
    print(f"time: {train_time:.1f} s training, {total_time:.1f} s total")
    return {"clean": clean, "pgd": adv, "certified": cert, "train_seconds": train_time}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--eps", type=_number, default=0.1,
                   help="L-inf radius in pixel space [0, 1] (a number or a fraction like 2/255)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--ramp-fraction", type=float, default=0.6,
                   help="fraction of the epochs over which eps grows to its final value")
    p.add_argument("--robust-weight", type=float, default=1.0,
                   help="final weight k of the IBP loss (k grows with eps_t / eps)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (the model is tiny: one thread avoids OpenMP overheads)")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error("--epochs: expected >= 1")
    if args.eps < 0:
        p.error("--eps: expected >= 0")
    from adcert._deps import MissingDependency

    try:
        train(args)
    except MissingDependency as err:
        print(f"adcert demo: {err}", file=sys.stderr)
        return 2
    return 0


def _number(text: str) -> float:
    """``--eps``: a number or a fraction like ``2/255`` (the config syntax)."""
    from adcert.train.config import number_arg

    return number_arg(text)


if __name__ == "__main__":
    raise SystemExit(main())
