"""Accuracy regression record: what each training method reaches on one fixed small budget.

    python benchmarks/bench_accuracy.py [--methods pgd,ibp,...] [--quick] [--out FILE]
                                        [--plot FILE | --no-plot] [--work DIR] [--data-dir DIR]

Every method is trained through the library's own :class:`adcert.train.Trainer` (the loop,
schedules, batch-norm handling, final population statistics and evaluation that users get) on
the same budget, then its final model is evaluated on the same test images:

* data: the first ``--train-subset`` (default 5000) MNIST training images, batch 50, no
  augmentation (MNIST has none); the first ``--test-subset`` (default 1000) test images;
* model: ``cnn3`` (conv 16, conv 32, linear 100, BN + ReLU), Shi et al.'s IBP init for the
  certified methods, Kaiming for the PGD teacher;
* schedule: 15 epochs = 1 clean epoch + a 6-epoch eps ramp (the library's power-4-then-linear
  ramp) + 8 at full eps; Adam lr 3e-3, x0.2 after epochs 12 and 14; grad clip 10; seed 0;
  train eps = test eps = 0.1; 1 CPU thread;
* methods (default): ``pgd`` (the teacher), ``ibp``, ``crown-ibp``, ``mtl-ibp``, ``sabr``,
  ``adcert`` (the student of the ``pgd`` model trained in the same run: its ``final.pt`` is
  ``method.teacher``; selecting ``adcert`` alone still trains ``pgd`` first) and ``acert``;
  ``--methods all`` adds ``cc-ibp``, ``exp-ibp``, ``taps`` and ``staps``. The method
  coefficients are fixed in :data:`METHODS` below (the digits quick start's for AD-CERT, CTBench
  Table 3's L1 weights, 5 PGD steps where a method attacks) and identical before and after a
  change, so a difference in the table is a difference in the library.

Reported per method, on the test subset at eps 0.1: clean accuracy, PGD accuracy (CE-PGD, 10
steps, 1 restart; robust = correct on the clean point and on the attack), IBP-certified accuracy
(the Trainer's final evaluation, :func:`adcert.train.evaluate`), the final unstable-ReLU ratio,
and the training time in seconds (optimiser steps only: per-epoch evaluation, checkpoints,
population statistics and the final evaluation are excluded; those are in ``wall_s``). Writes
JSON (``--out``, default ``benchmarks/results/accuracy.json``, git-ignored) and a grouped bar
chart PNG (``--plot``, default the JSON's name with ``.png``; skipped with one line when
matplotlib is not installed). The run directories go to a temporary directory (``--work DIR`` to
keep them). The whole default run takes about 10-15 minutes on 2 CPU cores.

What the defaults leave out: the papers' budgets (CNN7, 70 epochs, the full training set, train
eps 0.2 for MNIST 0.1 in CTBench Table 3) -- these numbers are far below the papers' and only
meaningful relative to each other and to earlier runs of this script; SWA (off for every method:
it would average the short run's clean and ramp epochs); certification stronger than IBP (CROWN,
branch-and-bound: ``adcert certify``); more than one seed (differences of a few points between
methods, or between runs on different torch builds, are within seed noise at this size); GPU
runs (``--device cuda`` works but the budget is sized for CPU). Exit status 1 when a method
failed (its error is in the table and in the JSON's ``errors``).

``--quick`` (smoke test): 300 training images, 100 test images, 2 epochs (no clean epoch, a
1-epoch ramp), ``pgd`` and ``ibp``; well under a minute; measures nothing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
try:
    import adcert  # noqa: F401
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, REPO)

import torch  # noqa: E402

import run as runner  # noqa: E402
from adcert.methods import METHODS as REGISTERED  # noqa: E402
from adcert.train import Trainer, from_dict  # noqa: E402

SCHEMA_VERSION = 1

# name -> model init, L1 weight (CTBench Table 3, MNIST 0.1), method.hparams. Fixed on purpose:
# change them only together with a note in the results, or old and new numbers stop comparing.
METHODS: Dict[str, Dict[str, Any]] = {
    "pgd": {"init": "kaiming", "l1": 1e-5, "hparams": {"steps": 5, "restarts": 1}},
    "ibp": {"init": "ibp", "l1": 2e-6, "hparams": {"w_rob": 1.0}},
    "crown-ibp": {"init": "ibp", "l1": 2e-6, "hparams": {"w_rob": 1.0}},
    "mtl-ibp": {"init": "ibp", "l1": 1e-6, "hparams": {"alpha": 0.5, "steps": 1, "w_rob": 1.0}},
    "sabr": {"init": "ibp", "l1": 1e-6,
             "hparams": {"lambda_ratio": 0.4, "steps": 5, "w_rob": 1.0}},
    # the digits quick start's student (configs/digits_adcert.yaml)
    "adcert": {"init": "ibp", "l1": 1e-6,
               "hparams": {"alpha": 0.8, "steps": 5, "attack_range_scale": 1.0, "w_rob": 1.0}},
    "acert": {"init": "ibp", "l1": 0.0, "hparams": {"kappa": 0.0, "maxiter": 2}},
    "cc-ibp": {"init": "ibp", "l1": 1e-6, "hparams": {"alpha": 0.5, "steps": 1, "w_rob": 1.0}},
    "exp-ibp": {"init": "ibp", "l1": 1e-6, "hparams": {"alpha": 0.5, "steps": 1, "w_rob": 1.0}},
    "taps": {"init": "ibp", "l1": 1e-6, "hparams": {"steps": 5, "restarts": 1, "w_rob": 1.0}},
    "staps": {"init": "ibp", "l1": 1e-6,
              "hparams": {"lambda_ratio": 0.4, "steps": 5, "input_steps": 5, "restarts": 1,
                          "w_rob": 1.0}},
}
DEFAULT_METHODS = ("pgd", "ibp", "crown-ibp", "mtl-ibp", "sabr", "adcert", "acert")
OPTIONAL_METHODS = ("cc-ibp", "exp-ibp", "taps", "staps")
QUICK_METHODS = ("pgd", "ibp")
TEACHER = "pgd"

DEFAULTS = dict(train_subset=5000, test_subset=1000, epochs=15, clean_epochs=1, ramp_epochs=6,
                batch=50, lr=3e-3, lr_milestones=[12, 14])
QUICK = dict(train_subset=300, test_subset=100, epochs=2, clean_epochs=0, ramp_epochs=1,
             batch=50, lr=3e-3, lr_milestones=[])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=None,
                   help=f"comma-separated methods (default {','.join(DEFAULT_METHODS)}; "
                        f"--quick: {','.join(QUICK_METHODS)}; 'all' adds "
                        f"{','.join(OPTIONAL_METHODS)}). Methods that need a teacher train "
                        f"'{TEACHER}' first")
    p.add_argument("--quick", action="store_true",
                   help="tiny budget for a smoke test (300 / 100 images, 2 epochs)")
    p.add_argument("--train-subset", type=int, default=None, help="training images (5000)")
    p.add_argument("--test-subset", type=int, default=None, help="test images (1000)")
    p.add_argument("--epochs", type=int, default=None,
                   help="total epochs (15; with --ramp-epochs/--clean-epochs and the milestones "
                        "left at their defaults, they are scaled along)")
    p.add_argument("--batch", type=int, default=None, help="batch size (50)")
    p.add_argument("--eps", type=float, default=0.1, help="test eps (0.1)")
    p.add_argument("--train-eps", type=float, default=None, help="training eps (= --eps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--data-dir", default=None,
                   help="directory holding mnist/ (default $ADCERT_DATA, else "
                        "<repo>/../shared/data)")
    p.add_argument("--work", default=None,
                   help="keep the run directories here (default: a temporary directory, removed)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "accuracy.json"),
                   help="JSON output (default benchmarks/results/accuracy.json)")
    p.add_argument("--plot", default=None, help="PNG bar chart (default: --out with .png)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--verbose", action="store_true", help="the Trainer's progress and epoch lines")
    return p.parse_args(argv)


def _methods(arg: Optional[str], quick: bool) -> List[str]:
    if arg is None:
        names = list(QUICK_METHODS if quick else DEFAULT_METHODS)
    else:
        names = []
        for item in arg.split(","):
            item = item.strip().lower().replace("_", "-")
            if item == "all":
                names += list(DEFAULT_METHODS) + list(OPTIONAL_METHODS)
            elif item:
                names.append(item)
    unknown = [n for n in names if n not in REGISTERED]
    if unknown:
        raise SystemExit(f"bench_accuracy: unknown method(s) {', '.join(unknown)}; registered: "
                         f"{', '.join(sorted(REGISTERED))}")
    names = list(dict.fromkeys(names))
    if any(REGISTERED[n].needs_teacher for n in names) and TEACHER not in names:
        names.insert(0, TEACHER)
    if TEACHER in names:  # the teacher first
        names.remove(TEACHER)
        names.insert(0, TEACHER)
    return names


def _budget(a) -> Dict[str, Any]:
    base = dict(QUICK if a.quick else DEFAULTS)
    if a.epochs is not None and a.epochs != base["epochs"]:
        scale = a.epochs / base["epochs"]
        base["clean_epochs"] = min(int(round(base["clean_epochs"] * scale)), a.epochs - 1)
        base["ramp_epochs"] = min(max(1, int(round(base["ramp_epochs"] * scale))),
                                  a.epochs - base["clean_epochs"])
        base["lr_milestones"] = sorted({m for m in (int(round(x * scale))
                                                    for x in base["lr_milestones"])
                                        if 1 <= m < a.epochs})
        base["epochs"] = a.epochs
    for key in ("train_subset", "test_subset", "batch"):
        if getattr(a, key) is not None:
            base[key] = getattr(a, key)
    base.update(eps=a.eps, train_eps=a.eps if a.train_eps is None else a.train_eps,
                seed=a.seed, threads=a.threads, device=a.device)
    return base


def _data_dir(arg: Optional[str]) -> str:
    if arg:
        return os.path.abspath(arg)
    env = os.environ.get("ADCERT_DATA")
    return os.path.abspath(env) if env else os.path.join(os.path.dirname(REPO), "shared", "data")


def method_config(name: str, budget: Dict[str, Any], data_dir: str, out_dir: str,
                  teacher: Optional[str], verbose: bool) -> Dict[str, Any]:
    """The Trainer config (a nested dict for :func:`adcert.train.from_dict`) of one method."""
    spec = METHODS.get(name, {"init": "ibp", "l1": 0.0, "hparams": {}})
    method = {"name": name, "hparams": dict(spec["hparams"])}
    if teacher is not None:
        method["teacher"] = teacher
    return {
        "seed": budget["seed"], "output_dir": out_dir, "device": budget["device"],
        "data": {"dataset": "mnist", "data_dir": data_dir, "batch_size": budget["batch"],
                 "train_subset": budget["train_subset"], "test_subset": budget["test_subset"],
                 "augment": False},
        "model": {"name": "cnn3", "init": spec["init"]},
        "method": method,
        "train": {"epochs": budget["epochs"], "lr": budget["lr"],
                  "lr_milestones": list(budget["lr_milestones"]), "lr_decay": 0.2,
                  "eps": budget["train_eps"], "clean_epochs": budget["clean_epochs"],
                  "ramp_epochs": budget["ramp_epochs"], "l1": spec["l1"], "grad_clip": 10.0,
                  "threads": budget["threads"]},
        "swa": {"enabled": False},
        # per-epoch evaluation only after the last epoch, on a few images (not reported);
        # the reported numbers are the final evaluation on the whole test subset
        "eval": {"eps": budget["eps"], "subset": min(100, budget["test_subset"]),
                 "final_subset": None, "pgd_steps": 10, "pgd_restarts": 1,
                 "every": budget["epochs"]},
        "log": {"progress": verbose},
    }


class _StepClock:
    """Trainer callback: the time spent in optimiser steps (from an epoch's start to its last
    step), excluding the per-epoch evaluation and checkpoint."""

    def __init__(self):
        self.train_s = 0.0
        self.mark = self.last = time.perf_counter()

    def on_step(self, trainer, step):
        self.last = time.perf_counter()

    def on_epoch_end(self, trainer, epoch, record):
        self.train_s += self.last - self.mark
        self.mark = self.last = time.perf_counter()


def train_one(name: str, budget, data_dir: str, work: str, teacher: Optional[str],
              verbose: bool) -> Dict[str, Any]:
    out_dir = os.path.join(work, name)
    cfg_dict = method_config(name, budget, data_dir, out_dir, teacher, verbose)
    row: Dict[str, Any] = {"method": name, "config": cfg_dict}
    t0 = time.perf_counter()
    cfg = from_dict(cfg_dict)
    clock = _StepClock()
    trainer = Trainer(cfg, callbacks=[clock])
    clock.mark = clock.last = time.perf_counter()
    rec = trainer.fit()
    row.update(clean_acc=rec["clean_acc"], pgd_acc=rec["pgd_acc"], cert_acc=rec["cert_acc"],
               unstable_relu=rec.get("unstable_relu"), train_s=clock.train_s,
               eval_s=rec.get("eval_time"), wall_s=time.perf_counter() - t0,
               epochs=rec["epoch"], steps=rec["step"], eval_samples=rec.get("eval_samples"),
               final=os.path.join(out_dir, cfg.log.final_file))
    history = []
    metrics = os.path.join(out_dir, cfg.log.metrics_file)
    if os.path.isfile(metrics):
        with open(metrics) as f:
            for line in f:
                r = json.loads(line)
                if not r.get("final"):
                    history.append({k: r.get(k) for k in ("epoch", "eps", "lr", "train_loss",
                                                          "epoch_time")})
    row["history"] = history
    return row


def _pct(v) -> str:
    return "    -" if v is None else f"{100 * v:5.1f}"


def print_table(res: Dict[str, Any]) -> None:
    b = res["config"]["budget"]
    print(f"\nMNIST, {b['train_subset']} train / {b['test_subset']} test images, cnn3, "
          f"{b['epochs']} epochs (clean {b['clean_epochs']}, ramp {b['ramp_epochs']}), batch "
          f"{b['batch']}, train eps {b['train_eps']:g}, test eps {b['eps']:g}, seed {b['seed']}, "
          f"{b['threads']} thread(s); {res['device']['name']}, torch {res['versions']['torch']}")
    head = f"{'method':<10} {'clean %':>8} {'PGD %':>8} {'IBP-cert %':>11} {'train s':>8} " \
           f"{'eval s':>7}"
    print(head)
    print("-" * len(head))
    for r in res["results"]:
        if r.get("error"):
            print(f"{r['method']:<10} FAILED: {r['error']}")
            continue
        print(f"{r['method']:<10} {_pct(r['clean_acc']):>8} {_pct(r['pgd_acc']):>8} "
              f"{_pct(r['cert_acc']):>11} {r['train_s']:8.1f} {r['eval_s'] or 0:7.1f}")
    print(f"total {res['wall_s']:.0f} s")


def plot(res: Dict[str, Any], path: str) -> Optional[str]:
    """Grouped bars (clean / PGD / IBP-certified, %) per method; ``None`` when matplotlib is
    missing (the reason is printed)."""
    try:
        import matplotlib
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install matplotlib)")
        return None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = [r for r in res["results"] if not r.get("error")]
    names = [r["method"] for r in rows]
    series = (("clean", "clean_acc"), ("PGD", "pgd_acc"), ("IBP-certified", "cert_acc"))
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names) + 2), 4.0))
    for i, (label, key) in enumerate(series):
        xs = [j + (i - 1) * width for j in range(len(names))]
        vals = [100 * r[key] for r in rows]
        bars = ax.bar(xs, vals, width, label=label)
        for bar, v in zip(bars, vals):
            ax.text(bar.get_x() + bar.get_width() / 2, v + 0.8, f"{v:.0f}", ha="center",
                    va="bottom", fontsize=6)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names)
    ax.set_ylim(0, 115)
    ax.set_ylabel(f"test accuracy at eps {res['config']['budget']['eps']:g} (%)")
    b = res["config"]["budget"]
    ax.set_title(f"MNIST {b['train_subset']}/{b['test_subset']}, cnn3, {b['epochs']} epochs, "
                 f"seed {b['seed']} (adcert {(res['versions'].get('adcert_git') or '?')[:12]}, "
                 f"torch {res['versions']['torch']})",
                 fontsize=8)
    ax.legend(fontsize=8, loc="upper center", ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    a = parse_args(argv)
    t_start = time.perf_counter()
    names = _methods(a.methods, a.quick)
    budget = _budget(a)
    data_dir = _data_dir(a.data_dir)
    if not os.path.isdir(os.path.join(data_dir, "mnist")):
        print(f"bench_accuracy: MNIST not found: {os.path.join(data_dir, 'mnist')} is absent "
              f"(pass --data-dir or set ADCERT_DATA to the directory holding mnist/)",
              file=sys.stderr)
        return 2
    if budget["threads"]:
        torch.set_num_threads(budget["threads"])
    work = a.work or tempfile.mkdtemp(prefix="adcert_bench_accuracy_")
    os.makedirs(work, exist_ok=True)
    print(f"bench_accuracy: methods {','.join(names)}; runs in {work}")
    results, errors = [], []
    teacher_final: Optional[str] = None
    try:
        for name in names:
            teacher = None
            if REGISTERED[name].needs_teacher:
                teacher = teacher_final
            print(f"== {name}" + (f" (teacher: {TEACHER})" if teacher else ""), flush=True)
            try:
                if REGISTERED[name].needs_teacher and teacher is None:
                    raise RuntimeError(f"no teacher: training '{TEACHER}' failed")
                if os.path.exists(os.path.join(work, name)):
                    shutil.rmtree(os.path.join(work, name))  # never resume a stale run
                row = train_one(name, budget, data_dir, work, teacher, a.verbose)
                if name == TEACHER:
                    teacher_final = row["final"]
                print(f"   clean {_pct(row['clean_acc'])} %  PGD {_pct(row['pgd_acc'])} %  "
                      f"IBP-cert {_pct(row['cert_acc'])} %  train {row['train_s']:.1f} s  "
                      f"(wall {row['wall_s']:.1f} s)", flush=True)
            except Exception as err:  # noqa: BLE001  (record and go on with the next method)
                msg = f"{type(err).__name__}: {err}".splitlines()[0][:300]
                print(f"   FAILED: {msg}", flush=True)
                row = {"method": name, "error": msg}
                errors.append({"where": name, "error": msg, "traceback": traceback.format_exc()})
            if not a.work:
                row.pop("final", None)
            results.append(row)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    res = {
        "schema_version": SCHEMA_VERSION,
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "command": " ".join([os.path.basename(sys.argv[0])] + list(sys.argv[1:] if argv is None
                                                                  else argv)),
        "wall_s": time.perf_counter() - t_start,
        "device": runner.device_info("cuda" if budget["device"].startswith("cuda") else "cpu"),
        "versions": runner.versions(),
        "config": {"budget": budget, "dataset": "mnist", "model": "cnn3", "quick": a.quick,
                   "methods": {n: METHODS.get(n, {"init": "ibp", "l1": 0.0, "hparams": {}})
                               for n in names},
                   "eval": {"eps": budget["eps"], "pgd_steps": 10, "pgd_restarts": 1,
                            "certification": "ibp", "bn": "population statistics"}},
        "results": results,
        "errors": errors,
    }
    print_table(res)
    out = os.path.abspath(a.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {out}")
    if not a.no_plot:
        png = a.plot or os.path.splitext(out)[0] + ".png"
        os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
        if plot(res, png):
            print(f"wrote {png}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
