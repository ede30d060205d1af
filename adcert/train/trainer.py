"""The training loop: one :class:`Trainer` for every method of :mod:`adcert.methods`.

    from adcert.train import Trainer, load_config
    result = Trainer(load_config("configs/digits_adcert.yaml")).fit()   # final test metrics

Per step (global batch ``data.batch_size``, split over processes and ``train.grad_accum``
micro-batches): the scheduled ``eps_t`` and method coefficient; the clean statistics of every
training-mode batch norm, computed once per step by the method's clean forward (of the whole
global batch under ``grad_accum``; synchronised over processes) and reused, differentiable, by
every forward and bound pass of the step (:class:`adcert.train.bn.StepBatchNorm`, DESIGN.md
section 5), then folded into the running statistics once; the method's loss on each micro-batch
(scaled by its share of the batch) backpropagated; the L1 penalty on conv/linear weights; a mean
all-reduce of the gradients across processes; gradient-norm clipping; an optimiser step (Adam or
SGD, ``train.optimizer``); a per-step learning-rate schedule's step (``onecycle``, ``cyclic``).
Per epoch: the milestone learning-rate decay (``milestones``), SWA averaging, evaluation on a test
subset, a JSON-lines record and an atomic checkpoint. The final model is the SWA average when one
was taken, else the trained weights. Resuming from the checkpoint reproduces the uninterrupted run
exactly (CPU): the batches are a function of ``(seed, epoch, index)`` and every RNG state is saved.

The run directory (``output_dir``) holds one run: a start in a directory that already holds one
(a metrics log, ``last.pt`` or ``final.pt``) is refused unless it resumes (``resume``: the metrics
log is cut back to the checkpoint's epoch -- records written after it before a kill go; without
a checkpoint the run starts over with a clean log) or replaces it (``overwrite``). Temporary files
of checkpoint writes killed midway are removed at every start. ``output_dir`` is not compared on
resume, so a run directory copied elsewhere resumes there.

Multi-process: launch with ``torchrun`` (``adcert train`` initialises the process group from the
environment) or initialise ``torch.distributed`` yourself before building the Trainer. Gradients
are all-reduced by hand rather than through ``DistributedDataParallel``, because methods run
bound passes (:func:`adcert.bounds.compute_bounds`) on the plain module, which DDP's forward-driven
reducer would not see. Rank 0 evaluates, logs and writes checkpoints.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import pathlib
import random
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from adcert.data import Batches, dataset_info, load_dataset
from adcert.methods import StepState, get_method
from adcert.models import build_model, ibp_init, kaiming_init
from adcert.train import bn as bnlib
from adcert.train.checkpoint import (
    CheckpointError, atomic_save, load_checkpoint, model_from_checkpoint, rng_state,
    set_rng_state, FORMAT, VERSION,
)
from adcert.train.config import Config, ConfigError
from adcert.train.evaluate import evaluate, is_certified
from adcert.train.schedules import build_lr_scheduler, build_optimizer, coef_at, eps_at

Tensor = torch.Tensor
Callback = Callable[..., None]

#: the fields of every per-epoch metrics record (final records add ``final: true``)
RECORD_FIELDS = ("epoch", "step", "eps", "coef", "lr", "train_loss", "train_acc",
                 "train_cert_acc", "clean_acc", "pgd_acc", "cert_acc", "unstable_relu",
                 "eval_eps", "epoch_time", "elapsed")
# not part of what a resumed run must share with the stored config: how this start was asked for,
# the progress bar, and where the run directory is (a run copied elsewhere resumes)
_IGNORED_ON_RESUME = ("resume", "overwrite", "output_dir", "log.progress")


class MetricsLogError(ValueError):
    """The metrics log of a run is corrupt (the message names the file and line)."""


def read_metrics(path: Union[str, os.PathLike], repair: bool = False) -> List[Dict[str, Any]]:
    """The records of the metrics log at ``path`` (none if it does not exist). A last line
    without its newline (the run was killed while writing it) is left out with a warning naming
    the file and line -- and with ``repair`` cut from the file. Any other bad line raises
    :class:`MetricsLogError` naming the file and the 1-based line number."""
    path = pathlib.Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    if tail:
        action = "removed" if repair else "ignored"
        warnings.warn(f"metrics log {path}:{len(lines) + 1}: truncated last line {action} "
                      f"(the run was killed while writing it)", RuntimeWarning, stacklevel=2)
        if repair:
            with open(path, "r+b") as f:
                f.truncate(len(data) - len(tail))
                f.flush()
                os.fsync(f.fileno())
    records = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise MetricsLogError(f"metrics log {where}: corrupt line ({err}): "
                                  f"{raw[:80]!r}") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("epoch"), int):
            raise MetricsLogError(f"metrics log {where}: not a metrics record (a JSON object "
                                  f"with an integer epoch): {raw[:80]!r}")
        records.append(rec)
    return records


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("kwargs", "hparams"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None


def _to_float(x: Tensor) -> Tensor:
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def l1_term(model: nn.Module) -> Tensor:
    """Sum of ``|W|`` over the weights of every conv and linear layer (0-dim tensor)."""
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return sum(w.abs().sum() for w in weights)


class Trainer:
    """Trains ``cfg``'s model with ``cfg``'s method; see the module docstring.

    callbacks: objects with optional methods ``on_step(trainer, step)`` (after each optimiser
    step) and ``on_epoch_end(trainer, epoch, record)`` (after the epoch's checkpoint) -- an
    exception raised there stops training like a kill would.
    """

    def __init__(self, cfg: Config, callbacks: Sequence[Any] = ()):
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.rank = dist.get_rank() if _distributed() else 0
        self.world = dist.get_world_size() if _distributed() else 1
        self.device = _resolve_device(cfg.device)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.out_dir = pathlib.Path(cfg.output_dir)
        self.ckpt_path = self.out_dir / cfg.log.checkpoint_file
        self.final_path = self.out_dir / cfg.log.final_file
        self.metrics_path = self.out_dir / cfg.log.metrics_file
        self._metrics_tmp = self.metrics_path.with_name(f".{self.metrics_path.name}.tmp")
        self._check_output_dir()
        self._check_batch_split()
        self._seed(cfg.seed)
        self._build_data()
        self._build_model()
        self._build_method()
        # per-process RNG stream from here on (PGD random starts, dropout...)
        self._seed(cfg.seed * 1_000_003 + self.rank + 1)
        self.opt = build_optimizer(self.model.parameters(), cfg.train)
        # sched_per_step: step the schedule after every optimiser step (onecycle, cyclic) or
        # after every epoch (milestones); adcert.train.schedules
        self.sched, self.sched_per_step = build_lr_scheduler(self.opt, cfg.train,
                                                             len(self.batches))
        self._bind_optimizer()
        self.swa = (torch.optim.swa_utils.AveragedModel(self.model) if cfg.swa.enabled else None)
        self.steps_per_epoch = len(self.batches)
        self.clean_steps = cfg.train.clean_epochs * self.steps_per_epoch
        self.ramp_steps = cfg.train.ramp_epochs * self.steps_per_epoch
        self.epoch = 0  # completed epochs
        self.step = 0   # completed optimiser steps
        self.start_time = time.perf_counter()
        if cfg.resume and self.ckpt_path.is_file():
            self._resume()
        self._prepare_output_dir()

    # -- setup ---------------------------------------------------------------------------------
    @staticmethod
    def _seed(seed: int) -> None:
        torch.manual_seed(seed)
        np.random.seed(seed % (2 ** 32))
        random.seed(seed)

    def _check_batch_split(self) -> None:
        b, k = self.cfg.data.batch_size, self.cfg.train.grad_accum
        if b % (self.world * k):
            raise ConfigError(f"data.batch_size: {b} is not divisible by {self.world} processes "
                              f"x train.grad_accum={k}")
        self.local_batch = b // self.world
        self.micro_batch = self.local_batch // k
        if b < 2:
            raise ConfigError("data.batch_size: batch norm needs batches of at least 2 samples, "
                              f"got {b}")

    def _build_data(self) -> None:
        cfg = self.cfg.data
        try:
            self.info = dataset_info(cfg.dataset)
        except KeyError as err:
            raise ConfigError(f"data.dataset: {err.args[0]}") from None
        x, y = load_dataset(cfg.dataset, "train", cfg.data_dir)
        xt, yt = load_dataset(cfg.dataset, "test", cfg.data_dir)
        if cfg.train_subset is not None:
            x, y = x[:cfg.train_subset], y[:cfg.train_subset]
        if cfg.test_subset is not None:
            xt, yt = xt[:cfg.test_subset], yt[:cfg.test_subset]
        if len(y) // self.world < self.local_batch:
            raise ConfigError(f"data.batch_size: {self.cfg.data.batch_size} is larger than the "
                              f"training set ({len(y)} samples)")
        self.x_train, self.y_train = x, y
        self.x_test, self.y_test = _to_float(xt).to(self.device), yt.to(self.device)
        augment = self.info.augment if cfg.augment else None
        self.batches = Batches(x, y, self.local_batch, shuffle=True, augment=augment,
                               seed=self.cfg.seed, drop_last=True, rank=self.rank,
                               world_size=self.world, device=self.device)

    def _build_model(self) -> None:
        m = self.cfg.model
        self.model_spec = {"name": m.name, "dataset": self.cfg.data.dataset, **m.kwargs}
        try:
            model = build_model(**self.model_spec)
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"model: {err.args[0] if err.args else err}") from None
        if m.init == "ibp":
            ibp_init(model)
        elif m.init == "kaiming":
            kaiming_init(model)
        self.model = model.to(self.device)

    def _build_method(self) -> None:
        m = self.cfg.method
        hparams = dict(m.hparams)
        from adcert.methods import METHODS
        key = str(m.name).lower().replace("_", "-")
        cls = METHODS.get(key)
        if cls is None:
            raise ConfigError(f"method.name: unknown method {m.name!r}; known: "
                              f"{', '.join(sorted(METHODS))}")
        self.teacher = None
        if cls.needs_teacher:
            if m.teacher is None:
                raise ConfigError(f"method.teacher: method {key!r} needs a teacher checkpoint "
                                  f"(train one, e.g. with method pgd, and give its final.pt)")
            try:
                teacher = model_from_checkpoint(m.teacher, self.device)
            except CheckpointError as err:
                raise ConfigError(f"method.teacher: {err}") from None
            for p in teacher.parameters():
                p.requires_grad_(False)
            self.teacher = teacher
            hparams["teacher"] = teacher
        elif m.teacher is not None:
            raise ConfigError(f"method.teacher: method {key!r} does not use a teacher")
        try:
            self.method = get_method(key, **hparams)
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"method.hparams: {err.args[0] if err.args else err}") from None

    def _bind_optimizer(self) -> None:
        """A method that takes optimiser steps of its own -- EDAC's look-ahead, a real step of
        the training optimiser as in CTBench -- exposes ``bind_optimizer(optimizer)`` and gets
        the trainer's optimiser (its state and scheduled rate included) here. It steps once per
        ``loss`` call, i.e. once per micro-batch, so it needs ``train.grad_accum: 1``."""
        bind = getattr(self.method, "bind_optimizer", None)
        if bind is None:
            return
        if getattr(self.method, "uses_optimizer", True) and self.cfg.train.grad_accum > 1:
            raise ConfigError(f"train.grad_accum: method {self.method.name!r} steps the "
                              f"optimiser inside its loss (once per micro-batch); use "
                              f"grad_accum 1 (got {self.cfg.train.grad_accum})")
        bind(self.opt)

    # -- the run directory ---------------------------------------------------------------------
    def _run_files(self) -> List[pathlib.Path]:
        """The files of a run in ``output_dir`` that exist: metrics log, ``last.pt``,
        ``final.pt``."""
        return [p for p in (self.metrics_path, self.ckpt_path, self.final_path) if p.exists()]

    def _orphan_files(self) -> List[pathlib.Path]:
        """Temporary files that a kill mid-write left behind: :func:`atomic_save`'s
        ``.last.pt.<random>.tmp`` and ``.final.pt.<random>.tmp``, and the rewritten metrics log
        of :meth:`_truncate_metrics`."""
        found = [p for path in (self.ckpt_path, self.final_path) if path.parent.is_dir()
                 for p in path.parent.glob(f".{path.name}.*.tmp")]
        found.append(self._metrics_tmp)
        return sorted(p for p in found if p.is_file())

    def _check_output_dir(self) -> None:
        """A fresh start (neither ``resume`` nor ``overwrite``) in a directory that already holds
        a run would mix two runs in one metrics log: refuse it (nothing is touched)."""
        cfg = self.cfg
        if cfg.resume or cfg.overwrite:
            return
        found = self._run_files()
        if found:
            raise ConfigError(f"output_dir: {self.out_dir} already holds a run "
                              f"({', '.join(p.name for p in found)}); continue it with --resume "
                              f"(resume: true), replace it with --overwrite (overwrite: true), "
                              f"or choose another output_dir")

    def _prepare_output_dir(self) -> None:
        """Rank 0, once the config is known to be good: remove orphaned temporary checkpoint
        files; ``overwrite``: remove the old run's files; ``resume``: cut the metrics log back to
        the checkpoint's epoch (no checkpoint: start a clean log)."""
        if self.rank != 0:
            return
        old = self._orphan_files()
        if self.cfg.overwrite:
            old += self._run_files()
        for path in old:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if self.cfg.resume:
            self._truncate_metrics(self.epoch)

    def _truncate_metrics(self, epoch: int) -> None:
        """Keep the per-epoch records up to ``epoch`` (those a kill left after the checkpoint
        go, and so does the final record): the log then continues where the checkpoint does."""
        if epoch == 0:  # starting over: nothing of an old log belongs to this run
            with contextlib.suppress(FileNotFoundError):
                self.metrics_path.unlink()
            return
        records = read_metrics(self.metrics_path, repair=True)
        keep = [r for r in records if not r.get("final") and r["epoch"] <= epoch]
        if len(keep) == len(records):
            return
        text = "".join(json.dumps(r) + "\n" for r in keep)
        tmp = self._metrics_tmp
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.metrics_path)

    # -- checkpoints ---------------------------------------------------------------------------
    def _gather_rng(self) -> List[Dict[str, Any]]:
        state = rng_state()
        if not _distributed():
            return [state]
        states: List[Any] = [None] * self.world
        dist.all_gather_object(states, state)
        return states

    def state_dict(self) -> Dict[str, Any]:
        """The resumable training state (what ``last.pt`` holds)."""
        return {"format": FORMAT, "version": VERSION, "kind": "last", "epoch": self.epoch,
                "step": self.step, "world_size": self.world, "config": self.cfg.to_dict(),
                "model_spec": self.model_spec, "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "swa": None if self.swa is None else self.swa.state_dict(),
                "rng": self._gather_rng(), "method": self._gather_method_state()}

    def _gather_method_state(self) -> List[Dict[str, Any]]:
        """Every rank's :meth:`Method.state_dict` (per-rank, like the RNG states: ACERT's radius
        cache holds the samples that rank has seen)."""
        state = self.method.state_dict()
        if not _distributed():
            return [state]
        states: List[Any] = [None] * self.world
        dist.all_gather_object(states, state)
        return states

    def _resume(self) -> None:
        ckpt = load_checkpoint(self.ckpt_path, self.device)
        if ckpt["kind"] != "last":
            raise CheckpointError(f"checkpoint {self.ckpt_path}: a {ckpt['kind']!r} checkpoint "
                                  f"cannot be resumed")
        old = _flatten(ckpt["config"])
        new = _flatten(self.cfg.to_dict())
        # a key the stored config predates (e.g. train.lr_schedule) matches at its default
        default = _flatten(Config().to_dict())
        diff = sorted(k for k in set(old) | set(new)
                      if k not in _IGNORED_ON_RESUME and old.get(k) != new.get(k)
                      and not (k not in old and new.get(k) == default.get(k)))
        if diff:
            raise ConfigError(f"{diff[0]}: differs from the config stored in {self.ckpt_path} "
                              f"({old.get(diff[0])!r} there, {new.get(diff[0])!r} now); "
                              f"resume with the same config or use another output_dir")
        if ckpt.get("world_size", 1) != self.world:
            raise CheckpointError(f"checkpoint {self.ckpt_path}: written by "
                                  f"{ckpt.get('world_size')} processes, resumed with "
                                  f"{self.world}; resume with the same process count")
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        if self.swa is not None:
            self.swa.load_state_dict(ckpt["swa"])
        set_rng_state(ckpt["rng"][self.rank])
        if ckpt.get("method") is not None:  # older checkpoints carry no method state
            self.method.load_state_dict(ckpt["method"][self.rank])
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])

    def _save_checkpoint(self) -> None:
        state = self.state_dict()  # every rank joins the RNG gather
        if self.rank == 0:
            atomic_save(state, self.ckpt_path)
        if _distributed():
            dist.barrier()

    # -- one step ------------------------------------------------------------------------------
    def _allreduce_grads(self) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p))
            offset += n

    def train_step(self, x: Tensor, y: Tensor, sums: Dict[str, Tensor],
                   index: Optional[Tensor] = None) -> Tensor:
        """One optimiser step on this process's share ``x: [b, *in]``, ``y: [b]`` of the global
        batch (``index: [b]`` int64 dataset indices, passed to the method as
        ``StepState.index``); adds detached statistics to ``sums``; returns the loss (0-dim,
        detached)."""
        cfg = self.cfg.train
        eps_t = eps_at(self.step, self.clean_steps, self.ramp_steps, cfg.eps, cfg.ramp_mid)
        coef = coef_at(cfg.coef_ramp, self.step, self.clean_steps, self.ramp_steps, eps_t,
                       cfg.eps)
        self.model.train()
        step_bn = bnlib.StepBatchNorm(self.model, detach=cfg.bn_mode == "frozen")
        micro = list(zip(x.split(self.micro_batch), y.split(self.micro_batch),
                         [None] * len(y) if index is None else index.split(self.micro_batch)))
        if len(micro) > 1:  # full-batch statistics for every micro-batch (DESIGN.md section 5)
            step_bn.precompute(x)
        self.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=x.device)
        with step_bn:
            for xm, ym, im in micro:
                state = StepState(eps=eps_t, eps_target=cfg.eps, epoch=self.epoch,
                                  step=self.step, bn_stats=step_bn.view, coef=coef, index=im)
                out = self.method.loss(self.model, xm, ym, state)
                share = len(ym) / len(y)
                (out.loss * share).backward()
                total += out.loss.detach() * share
                self._accumulate(sums, out, ym)
        step_bn.backward()
        if cfg.l1 > 0:
            (cfg.l1 * l1_term(self.model)).backward()
        if self.world > 1:
            self._allreduce_grads()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        bnlib.update_running_stats(step_bn.detached(), step_bn.counts)
        self.step += 1
        self.last_eps, self.last_coef = eps_t, coef
        return total

    @staticmethod
    def _accumulate(sums: Dict[str, Tensor], out, y: Tensor) -> None:
        n = len(y)

        def add(key: str, value) -> None:
            v = (value.detach().double() if torch.is_tensor(value)
                 else torch.tensor(float(value), dtype=torch.float64))
            sums[key] = sums.get(key, 0) + v * n

        add("train_loss", out.loss)
        if out.logits is not None:
            sums["train_correct"] = sums.get("train_correct", 0) + \
                (out.logits.argmax(1) == y).sum().double()
        if out.margins is not None:
            sums["train_cert"] = sums.get("train_cert", 0) + \
                is_certified(out.margins, y).sum().double()
        for k, v in out.logs.items():
            add(k, v)
        sums["n"] = sums.get("n", 0) + n

    def _epoch_stats(self, sums: Dict[str, Any]) -> Dict[str, float]:
        keys = sorted(k for k in sums if k != "n")
        if self.world > 1:  # sum the per-process statistics (same keys on every rank)
            vec = torch.tensor([float(sums.get(k, 0)) for k in keys + ["n"]],
                               dtype=torch.float64)
            dist.all_reduce(vec)
            vals = dict(zip(keys + ["n"], vec.tolist()))
        else:
            vals = {k: float(sums[k]) for k in keys + ["n"]}
        n = max(vals.pop("n"), 1)
        out = {"train_acc": vals.pop("train_correct", float("nan")) / n,
               "train_cert_acc": vals.pop("train_cert", float("nan")) / n}
        out.update({k: v / n for k, v in vals.items()})
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}

    # -- evaluation and logging ----------------------------------------------------------------
    def evaluate(self, model: nn.Module, subset: Optional[int]) -> Dict[str, float]:
        """Test metrics of ``model`` on the first ``subset`` test samples; the attack's random
        starts come from a forked RNG so evaluation never changes the training stream."""
        e = self.cfg.eval
        x, y = self.x_test, self.y_test
        if subset is not None:
            x, y = x[:subset], y[:subset]
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.cfg.seed + 7919 * (self.epoch + 1))
            return evaluate(model, x, y, self.cfg.eval_eps, e.pgd_steps, e.pgd_restarts,
                            e.batch_size)

    def _log(self, record: Dict[str, Any]) -> None:
        if self.rank != 0:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _callback(self, name: str, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, name, None)
            if fn is not None:
                fn(self, *args)

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> Dict[str, Any]:
        """Train the remaining epochs, then build, evaluate and save the final model (SWA
        average or the trained weights, with population BN statistics if configured). Returns
        the final record (test metrics at ``eval.eps``)."""
        cfg = self.cfg
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        show = cfg.log.progress and self.rank == 0
        self.last_eps = self.last_coef = 0.0
        while self.epoch < cfg.train.epochs:
            t0 = time.perf_counter()
            sums: Dict[str, Any] = {}
            bar = tqdm(self.batches.epoch(self.epoch, with_index=True),
                       total=self.steps_per_epoch,
                       desc=f"epoch {self.epoch + 1}/{cfg.train.epochs}", unit="step",
                       disable=not show, leave=False)
            lr = self.opt.param_groups[0]["lr"]
            for i, (xb, yb, ib) in enumerate(bar):
                loss = self.train_step(xb, yb, sums, ib)
                if self.sched_per_step:
                    self.sched.step()
                if show and (i % 20 == 0 or i + 1 == self.steps_per_epoch):
                    bar.set_postfix(eps=f"{self.last_eps:.4f}", loss=f"{float(loss):.3f}")
                self._callback("on_step", self.step)
            bar.close()
            if not self.sched_per_step:
                self.sched.step()
            if self.swa is not None and self.epoch >= cfg.swa.start_epoch:
                self.swa.update_parameters(self.model)
            self.epoch += 1
            record = {"epoch": self.epoch, "step": self.step, "eps": self.last_eps,
                      "coef": self.last_coef, "lr": lr, **self._epoch_stats(sums)}
            evaluate_now = self.epoch % cfg.eval.every == 0 or self.epoch == cfg.train.epochs
            metrics = (self.evaluate(self.model, cfg.eval.subset)
                       if evaluate_now and self.rank == 0 else {})
            record.update({k: metrics.get(k) for k in ("clean_acc", "pgd_acc", "cert_acc",
                                                        "unstable_relu")})
            record.update(eval_eps=cfg.eval_eps, epoch_time=time.perf_counter() - t0,
                          elapsed=time.perf_counter() - self.start_time)
            self._log(record)
            if show:
                tqdm.write(self._summary(record))
            self._save_checkpoint()
            self._callback("on_epoch_end", self.epoch, record)
        return self.finish()

    @staticmethod
    def _summary(r: Dict[str, Any]) -> str:
        def pct(v):
            return "  -  " if v is None else f"{100 * v:5.1f}%"
        return (f"epoch {r['epoch']:3d}  eps {r['eps']:.4f}  loss {r['train_loss']:.4f}  "
                f"clean {pct(r['clean_acc'])}  pgd {pct(r['pgd_acc'])}  "
                f"cert {pct(r['cert_acc'])}  ({r['epoch_time']:.1f} s)")

    @property
    def swa_used(self) -> bool:
        """Whether the final model is the SWA average: SWA is enabled and at least one model was
        averaged (a run that ends before ``swa.start_epoch`` never averages, and the average
        would then still be the initial weights)."""
        return self.swa is not None and int(self.swa.n_averaged) > 0

    def final_model(self) -> nn.Module:
        """The model to keep: the SWA average (BN statistics recomputed over the training set)
        when one was taken (:attr:`swa_used`), else a copy of the trained weights (population BN
        statistics if ``train.pop_bn``)."""
        if self.swa_used:
            model = copy.deepcopy(self.swa.module)
        else:
            model = copy.deepcopy(self.model)
        if self.swa_used or self.cfg.train.pop_bn:
            loader = Batches(self.x_train, self.y_train, self.local_batch, shuffle=False,
                             drop_last=True, device=self.device)
            bnlib.population_stats(model, (xb for xb, _ in loader.epoch(0)))
        return model.eval()

    def finish(self) -> Dict[str, Any]:
        model = self.final_model()
        record: Dict[str, Any] = {"final": True, "epoch": self.epoch, "step": self.step,
                                  "eval_eps": self.cfg.eval_eps}
        if self.swa is not None:  # models averaged (0: the final model is the trained one)
            record["swa_averaged"] = int(self.swa.n_averaged)
        if self.rank == 0:
            t0 = time.perf_counter()
            record.update(self.evaluate(model, self.cfg.eval.final_subset))
            record.update(eval_time=time.perf_counter() - t0,
                          elapsed=time.perf_counter() - self.start_time,
                          eval_samples=len(self.y_test) if self.cfg.eval.final_subset is None
                          else min(len(self.y_test), self.cfg.eval.final_subset))
            self._log(record)
            atomic_save({"format": FORMAT, "version": VERSION, "kind": "final",
                         "epoch": self.epoch, "config": self.cfg.to_dict(),
                         "model_spec": self.model_spec, "model": model.state_dict(),
                         "metrics": record}, self.final_path)
        if _distributed():
            dist.barrier()
        self.final = model
        return record


def train(cfg: Config, callbacks: Sequence[Any] = ()) -> Dict[str, Any]:
    """``Trainer(cfg, callbacks).fit()``."""
    return Trainer(cfg, callbacks).fit()


__all__ = ["Trainer", "train", "l1_term", "RECORD_FIELDS", "MetricsLogError", "read_metrics"]
