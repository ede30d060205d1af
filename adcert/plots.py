"""Plots of certified robustness (PNG files): certified accuracy against eps from per-sample
radii, and the accuracy-robustness trade-off (Acc against ACR, with ART iso-lines) across runs
(papers/acert.txt Figs. 1 and 3). matplotlib is imported lazily (``pip install matplotlib``).
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence, Tuple

import torch

from adcert.metrics import acr as _acr
from adcert.metrics import certified_accuracy

Tensor = torch.Tensor


def _pyplot():
    from adcert._deps import require

    matplotlib = require("matplotlib", "matplotlib", "adcert.plots")
    matplotlib.use("Agg", force=False)
    return require("matplotlib.pyplot", "matplotlib", "adcert.plots")


def _check_path(path) -> str:
    path = os.fspath(path)
    if not path.lower().endswith(".png"):
        raise ValueError(f"path: expected a .png file name, got {path!r}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"path: the directory {parent!r} does not exist")
    return path


def _save(fig, ax, path: str, title: Optional[str]) -> None:
    """Legend, optional title, tight layout; write ``path`` (PNG, 120 dpi)."""
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_certified_accuracy(runs: Mapping[str, Tensor], eps_max: float, path,
                            correct: Optional[Mapping[str, Tensor]] = None,
                            points: int = 201, title: Optional[str] = None) -> str:
    """Certified accuracy against eps in ``[0, eps_max]`` for every run.

    Args:
        runs: ``{label: radius [N]}`` per-sample certified radii.
        eps_max: the right end of the eps axis.
        path: the PNG file to write.
        correct: optional ``{label: [N] bool}`` clean correctness (default ``radius > 0``).
        points: eps grid size.
    Returns the path written.
    """
    path = _check_path(path)
    if not runs:
        raise ValueError("runs: expected at least one {label: radius} entry")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    try:
        for label, radius in runs.items():
            grid = torch.linspace(0, eps_max, points, dtype=torch.float64)
            ok = None if correct is None else correct.get(label)
            acc = certified_accuracy(radius.detach().cpu().double(), grid,
                                     None if ok is None else ok.cpu())
            c = float(_acr(radius.detach().cpu().double(), eps_max))
            ax.step(grid.numpy(), acc.numpy(), where="post", label=f"{label} (ACR {c:.3f})")
        ax.set_xlabel("eps")
        ax.set_ylabel("certified accuracy")
        ax.set_xlim(0, eps_max)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        _save(fig, ax, path, title)
    finally:
        plt.close(fig)
    return path


def plot_tradeoff(runs: Mapping[str, Tuple[float, float]], path,
                  art_levels: Sequence[float] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
                  title: Optional[str] = None) -> str:
    """Accuracy against ACR for every run (``{label: (acc, acr)}``, both in [0, 1]), with
    iso-lines of ``ART = sqrt(acc * acr)``. Returns the path written."""
    path = _check_path(path)
    if not runs:
        raise ValueError("runs: expected at least one {label: (acc, acr)} entry")
    for label, (a, c) in runs.items():
        if not (0 <= a <= 1 and 0 <= c <= 1):
            raise ValueError(f"runs[{label!r}]: expected (acc, acr) in [0, 1], got {(a, c)}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    try:
        c = torch.linspace(1e-3, 1, 200, dtype=torch.float64)
        for level in art_levels:
            acc = level * level / c
            keep = acc <= 1
            ax.plot(c[keep].numpy(), acc[keep].numpy(), color="0.8", lw=0.8)
            ax.annotate(f"ART {level:g}", (float(c[keep][0]), 1.0), fontsize=6, color="0.5")
        for label, (a, r) in runs.items():
            ax.scatter([r], [a], label=f"{label} (ART {(a * r) ** 0.5:.3f})")
        ax.set_xlabel("ACR (normalised)")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        _save(fig, ax, path, title)
    finally:
        plt.close(fig)
    return path


def _pairs(items, what):
    out = {}
    for item in items or []:
        label, sep, value = item.partition("=")
        if not sep or not label:
            raise SystemExit(f"adcert plot: expected {what} as LABEL=VALUE, got {item!r}")
        out[label] = value
    return out


def _plot_cli(args) -> int:
    radii = _pairs(args.radii, "--radii")
    trade = _pairs(args.tradeoff, "--tradeoff")
    if not radii and not trade:
        raise SystemExit("adcert plot: give --radii LABEL=FILE.pt and/or --tradeoff LABEL=ACC,ACR")
    if radii:
        if args.eps_max is None:
            raise SystemExit("adcert plot: --radii needs --eps-max")
        runs = {k: torch.load(v, map_location="cpu").reshape(-1).double()
                for k, v in radii.items()}
        print(plot_certified_accuracy(runs, args.eps_max, args.out))
    if trade:
        points = {}
        for k, v in trade.items():
            try:
                a, c = (float(t) for t in v.split(","))
            except ValueError:
                raise SystemExit(f"adcert plot: --tradeoff {k}: expected ACC,ACR, got {v!r}")
            points[k] = (a, c)
        print(plot_tradeoff(points, args.out_tradeoff))
    return 0


def _number(text: str) -> float:
    """``--eps-max``: a number or a fraction like ``8/255`` (the config syntax)."""
    from adcert.train.config import number_arg

    return number_arg(text)


def add_parser(subparsers) -> None:
    """``adcert plot``: ``--radii LABEL=radii.pt`` (a saved ``[N]`` tensor of certified radii,
    e.g. ``torch.save(certified_radius(...).radius, path)``) with ``--eps-max`` -> certified
    accuracy over eps (``--out``); ``--tradeoff LABEL=ACC,ACR`` -> the trade-off plot
    (``--out-tradeoff``)."""
    p = subparsers.add_parser("plot", help="certified accuracy over eps / trade-off PNGs")
    p.add_argument("--radii", action="append", metavar="LABEL=FILE.pt")
    p.add_argument("--eps-max", type=_number, default=None,
                   help="the largest radius (a number or a fraction like 8/255)")
    p.add_argument("--out", default="certified_accuracy.png")
    p.add_argument("--tradeoff", action="append", metavar="LABEL=ACC,ACR")
    p.add_argument("--out-tradeoff", default="tradeoff.png")
    p.set_defaults(fn=_plot_cli)


__all__ = ["plot_certified_accuracy", "plot_tradeoff", "add_parser"]
