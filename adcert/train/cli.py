"""``adcert train``: train from a YAML config.

    adcert train --config configs/digits_pgd_teacher.yaml
    adcert train --config configs/digits_adcert.yaml --set train.epochs=10 --set seed=1
    adcert train --config FILE --resume                    # continue after a kill
    adcert train --config FILE --overwrite                 # replace the run in output_dir
    torchrun --nproc_per_node 2 -m adcert.train.cli --config FILE     # multi-process

``--set`` takes dotted keys with values parsed as YAML scalars (``train.eps=2/255`` works for
radii). Unknown keys, wrong types and bad values are rejected naming the key (exit status 2).
Prints one line per epoch and the final clean, PGD and IBP-certified test accuracy; the metrics
log (JSON lines), ``last.pt`` and ``final.pt`` go to ``output_dir``. A directory that already
holds a run is refused unless ``--resume`` continues it (the metrics log is cut back to the
checkpoint's epoch) or ``--overwrite`` replaces it.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, dotted key (repeatable)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--resume", action="store_true",
                     help="continue from output_dir's last checkpoint if there is one (else "
                          "start over with a clean metrics log)")
    how.add_argument("--overwrite", action="store_true",
                     help="replace the run already in output_dir (its metrics log, last.pt and "
                          "final.pt are removed)")
    p.add_argument("--output-dir", default=None, help="shorthand for --set output_dir=DIR")
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``train`` on an ``argparse`` sub-parser collection."""
    p = subparsers.add_parser("train", help="train a model from a YAML config",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(fn=run)
    return p


def _init_distributed() -> None:
    """Initialise ``torch.distributed`` from torchrun's environment (``WORLD_SIZE > 1``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)


def run(args: argparse.Namespace) -> int:
    from adcert._deps import MissingDependency
    from adcert.train.checkpoint import CheckpointError
    from adcert.train.config import ConfigError, load_config
    from adcert.train.trainer import MetricsLogError, Trainer

    overrides = list(args.overrides)
    if args.output_dir is not None:
        overrides.append(f"output_dir={args.output_dir}")
    if args.resume:
        overrides.append("resume=true")
    if args.overwrite:
        overrides.append("overwrite=true")
    try:
        cfg = load_config(args.config, overrides)
        _init_distributed()
        trainer = Trainer(cfg)
    except (ConfigError, CheckpointError, MetricsLogError, MissingDependency) as err:
        print(f"adcert train: {err}", file=sys.stderr)
        return 2
    if trainer.epoch:
        print(f"resuming {cfg.output_dir} after epoch {trainer.epoch}")
    record = trainer.fit()
    if trainer.rank == 0:
        eps = record["eval_eps"]
        print(f"{cfg.method.name} on {cfg.data.dataset}: {record['eval_samples']} test samples, "
              f"eps={eps:g}")
        print(f"test clean accuracy:     {100 * record['clean_acc']:5.1f}%")
        print(f"test PGD accuracy:       {100 * record['pgd_acc']:5.1f}%  "
              f"({cfg.eval.pgd_steps} steps, {cfg.eval.pgd_restarts} restart(s))")
        print(f"test IBP-certified acc.: {100 * record['cert_acc']:5.1f}%")
        print(f"final model: {trainer.final_path}  (metrics: {trainer.metrics_path}, "
              f"{record['elapsed']:.1f} s)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="adcert train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
