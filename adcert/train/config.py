"""The training configuration: a typed schema with defaults, read from YAML with dotted overrides.

    cfg = load_config("configs/mnist_0.1_ibp.yaml", ["train.epochs=5", "method.hparams.w_rob=0.9"])

Sections (every field is documented on its dataclass): ``data``, ``model``, ``method``, ``train``,
``swa``, ``eval``, ``log``, plus the top-level ``seed``, ``output_dir``, ``resume``, ``overwrite``
and ``device``. Unknown keys, wrong types and bad values raise :class:`ConfigError` naming the
dotted key. Float fields also accept a fraction string such as ``2/255`` (radii are written that
way in the papers). The free-form ``model.kwargs`` and ``method.hparams`` are checked by
:func:`adcert.models.build_model` and :func:`adcert.methods.get_method`, which name unknown keys
themselves.
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message starts with the dotted key at fault."""


@dataclass
class DataConfig:
    """dataset: a name from :data:`adcert.data.DATASETS`. data_dir: None = ``$ADCERT_DATA`` or the
    default cache. train_subset / test_subset: use only the first N samples (None = all).
    batch_size: the GLOBAL batch (summed over processes and accumulation micro-batches).
    augment: the dataset's standard augmentation (random crop + flip) where it has one."""
    dataset: str = "digits"
    data_dir: Optional[str] = None
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    batch_size: int = 128
    augment: bool = True


@dataclass
class ModelConfig:
    """name: a model of :data:`adcert.models.MODELS`; kwargs: its extra arguments (``width``...);
    init: ``ibp`` (certified training), ``kaiming`` (adversarial teachers) or ``default``."""
    name: str = "cnn7"
    kwargs: Dict[str, Any] = field(default_factory=dict)
    init: str = "ibp"


@dataclass
class MethodConfig:
    """name: a registered method (``ibp``, ``pgd``, ``mtl-ibp``, ``sabr``, ``adcert`` ...);
    hparams: its hyper-parameters; teacher: checkpoint file of a trained teacher (methods with
    ``needs_teacher``)."""
    name: str = "ibp"
    hparams: Dict[str, Any] = field(default_factory=dict)
    teacher: Optional[str] = None


@dataclass
class TrainConfig:
    """epochs: total epochs. optimizer: ``adam`` (CTBench App. B.3) or ``sgd`` (with
    ``momentum``; the short-cycle teachers of AD-CERT App. D / F.3). lr_schedule: the learning
    rate over the run (:mod:`adcert.train.schedules`):

    * ``milestones`` (default, CTBench App. B.3): ``lr``, multiplied by ``lr_decay`` at each of
      the ``lr_milestones`` epochs (stepped per epoch).
    * ``onecycle`` (ACERT App. B, Table 4): ``torch.optim.lr_scheduler.OneCycleLR`` over every
      optimiser step of the run with peak ``max_lr``: from ``max_lr / lr_div_factor`` up to
      ``max_lr`` over the first ``lr_pct_start`` (default 0.3) of the steps, then down to
      ``max_lr / (lr_div_factor * lr_final_div_factor)``, annealing ``lr_anneal`` (``linear``
      or ``cos``); ``lr_cycle_momentum`` also cycles Adam's beta1 / SGD's momentum between 0.95
      and 0.85 as torch does by default.
    * ``cyclic`` (AD-CERT App. D, the 30-epoch short-cycle teacher): one triangle over the run,
      stepped per optimiser step: linear from 0 up to ``max_lr`` at the ``lr_pct_start``
      fraction of the run (default 0.5), then linearly back to 0 at the end (the rate of step
      ``s`` of ``S`` is the triangle at ``(s + 1) / S``).

    ``lr`` is used by ``milestones`` only; ``max_lr`` and the ``lr_*`` shape keys by
    ``onecycle`` / ``cyclic`` only. eps: the training radius (pixel space).
    clean_epochs: epochs at eps 0 first. ramp_epochs: epochs over which eps grows smoothly to
    ``eps`` (power 4 up to ``ramp_mid`` of the ramp, then linear; 0 = no ramp).
    coef_ramp: the method coefficient ``StepState.coef``: ``eps`` (= eps_t / eps), ``linear``
    (linear over the ramp) or ``none`` (always 1). l1: weight of the L1 penalty on conv/linear
    weights. grad_clip: max L2 gradient norm (0 disables). grad_accum: micro-batches per step.
    bn_mode: how the step's clean-batch statistics enter the loss (DESIGN.md section 5). They
    are computed once per step by the clean forward (over the whole global batch: all processes,
    all micro-batches) and reused by every forward and bound pass of the step; the running
    statistics move once per step with them. ``batch`` (default, CTBench): they stay
    differentiable, so the robust loss's gradient flows through them. ``frozen``: an ablation
    that detaches them (batch norm is a constant affine map for the gradient), which trains
    markedly worse (IBP on 10k MNIST images, 12 epochs: 50 % vs 93 % clean accuracy).
    pop_bn: recompute the running statistics over the training set (cumulative average) before
    the final evaluation.
    threads: torch CPU threads (0 = leave torch's default)."""
    epochs: int = 70
    optimizer: str = "adam"
    momentum: float = 0.9
    lr_schedule: str = "milestones"
    lr: float = 5e-4
    lr_milestones: List[int] = field(default_factory=list)
    lr_decay: float = 0.2
    max_lr: Optional[float] = None
    lr_pct_start: Optional[float] = None
    lr_anneal: str = "linear"
    lr_div_factor: float = 25.0
    lr_final_div_factor: float = 1e4
    lr_cycle_momentum: bool = True
    eps: float = 0.1
    clean_epochs: int = 1
    ramp_epochs: int = 20
    ramp_mid: float = 0.25
    coef_ramp: str = "eps"
    l1: float = 0.0
    grad_clip: float = 10.0
    grad_accum: int = 1
    bn_mode: str = "batch"
    pop_bn: bool = True
    threads: int = 0


@dataclass
class SWAConfig:
    """Stochastic weight averaging of the weights at the end of every epoch from ``start_epoch``
    (0-based) on; the averaged model's BN statistics are recomputed over the training set. A run
    that ends before ``start_epoch`` takes no average: its final model is the trained one."""
    enabled: bool = False
    start_epoch: int = 0


@dataclass
class EvalConfig:
    """eps: the test radius (None = ``train.eps``). subset: test samples evaluated after each
    epoch (None = all). final_subset: for the final evaluation. pgd_steps / pgd_restarts: the PGD
    attack. every: evaluate every N epochs (and always after the last). batch_size: eval batch."""
    eps: Optional[float] = None
    subset: Optional[int] = 500
    final_subset: Optional[int] = None
    pgd_steps: int = 10
    pgd_restarts: int = 1
    every: int = 1
    batch_size: int = 256


@dataclass
class LogConfig:
    """progress: a tqdm bar on rank 0. metrics_file / checkpoint_file / final_file: names inside
    ``output_dir``."""
    progress: bool = True
    metrics_file: str = "metrics.jsonl"
    checkpoint_file: str = "last.pt"
    final_file: str = "final.pt"


@dataclass
class Config:
    """seed: every random choice derives from it. output_dir: checkpoints and the metrics log.
    resume: continue from ``output_dir/<checkpoint_file>`` if it exists (the metrics log is cut
    back to the checkpoint's epoch; without a checkpoint the run starts over with a clean log).
    overwrite: replace a run already in ``output_dir`` (its metrics log, checkpoint and final
    model are removed); without ``resume`` or ``overwrite`` a start in a directory that holds
    a run is refused. device: ``auto`` (CUDA
    when available -- under torchrun the local rank's GPU -- else CPU), ``cpu``, ``cuda``..."""
    seed: int = 0
    output_dir: str = "runs/default"
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    swa: SWAConfig = field(default_factory=SWAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def eval_eps(self) -> float:
        return self.train.eps if self.eval.eps is None else self.eval.eps


_FRACTION = re.compile(r"^\s*([0-9.eE+-]+)\s*/\s*([0-9.eE+-]+)\s*$")
_CHOICES = {"train.coef_ramp": ("eps", "linear", "none"), "train.bn_mode": ("batch", "frozen"),
            "train.optimizer": ("adam", "sgd"),
            "train.lr_schedule": ("milestones", "onecycle", "cyclic"),
            "train.lr_anneal": ("linear", "cos"),
            "model.init": ("ibp", "kaiming", "default")}


def parse_number(text: str) -> float:
    """A float from ``text``: a number (``"0.1"``, ``"1e-3"``) or a fraction ``"a/b"`` such as
    ``"2/255"`` (how the papers write radii). The one parser of that syntax for config values and
    the command lines' radius options; ``ValueError`` for anything else (a zero denominator
    included)."""
    m = _FRACTION.match(text)
    try:
        return float(m.group(1)) / float(m.group(2)) if m else float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"expected a number or a fraction like 2/255, got {text!r}") from None


def number_arg(text: str) -> float:
    """:func:`parse_number` as an ``argparse`` ``type=`` (its message becomes the usage error)."""
    import argparse

    try:
        return parse_number(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str) -> Any:
    """``value`` checked against the annotation ``tp``; ints are accepted for floats and
    ``'a/b'`` strings for floats."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin in (list, List, Sequence):
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                return parse_number(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number (or a fraction like 2/255), "
                                  f"got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")  # pragma: no cover


def _build(cls, values: Any, prefix: str):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key; known keys"
                          f"{' of ' + prefix if prefix else ''}: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in values:
            continue
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, values[name], key)
        else:
            kwargs[name] = _coerce(values[name], tp, key)
    return cls(**kwargs)


def validate(cfg: Config) -> Config:
    """Value checks (types are checked by :func:`from_dict`); raises :class:`ConfigError`."""
    def need(cond: bool, key: str, what: str, value: Any) -> None:
        if not cond:
            raise ConfigError(f"{key}: expected {what}, got {value!r}")

    for key, choices in _CHOICES.items():
        sec, name = key.split(".")
        value = getattr(getattr(cfg, sec), name)
        need(value in choices, key, "one of " + ", ".join(choices), value)
    t, d, e = cfg.train, cfg.data, cfg.eval
    need(t.epochs >= 1, "train.epochs", ">= 1", t.epochs)
    need(0 <= t.momentum < 1, "train.momentum", "a factor in [0, 1)", t.momentum)
    need(t.lr > 0, "train.lr", "> 0", t.lr)
    need(0 < t.lr_decay <= 1, "train.lr_decay", "a factor in (0, 1]", t.lr_decay)
    need(all(m >= 1 for m in t.lr_milestones), "train.lr_milestones", "epochs >= 1",
         t.lr_milestones)
    need(list(t.lr_milestones) == sorted(t.lr_milestones), "train.lr_milestones",
         "an increasing list", t.lr_milestones)
    if t.lr_schedule == "milestones":
        need(t.max_lr is None, "train.max_lr", "null with lr_schedule milestones (the rate is "
             "train.lr; max_lr is the peak of onecycle / cyclic)", t.max_lr)
        need(t.lr_pct_start is None, "train.lr_pct_start", "null with lr_schedule milestones "
             "(it shapes onecycle / cyclic)", t.lr_pct_start)
    else:
        need(t.max_lr is not None and t.max_lr > 0, "train.max_lr",
             f"a peak rate > 0 for lr_schedule {t.lr_schedule}", t.max_lr)
        need(not t.lr_milestones, "train.lr_milestones",
             f"an empty list with lr_schedule {t.lr_schedule} (milestones only apply to "
             f"lr_schedule milestones)", t.lr_milestones)
        need(t.lr_pct_start is None or 0 < t.lr_pct_start < 1, "train.lr_pct_start",
             "null or a fraction in (0, 1)", t.lr_pct_start)
    need(t.lr_div_factor >= 1, "train.lr_div_factor", ">= 1", t.lr_div_factor)
    need(t.lr_final_div_factor >= 1, "train.lr_final_div_factor", ">= 1",
         t.lr_final_div_factor)
    need(t.eps >= 0, "train.eps", ">= 0", t.eps)
    need(t.clean_epochs >= 0, "train.clean_epochs", ">= 0", t.clean_epochs)
    need(t.ramp_epochs >= 0, "train.ramp_epochs", ">= 0", t.ramp_epochs)
    need(0 < t.ramp_mid < 1, "train.ramp_mid", "a fraction in (0, 1)", t.ramp_mid)
    need(t.l1 >= 0, "train.l1", ">= 0", t.l1)
    need(t.grad_clip >= 0, "train.grad_clip", ">= 0 (0 disables clipping)", t.grad_clip)
    need(t.grad_accum >= 1, "train.grad_accum", ">= 1", t.grad_accum)
    need(t.threads >= 0, "train.threads", ">= 0", t.threads)
    need(d.batch_size >= 2, "data.batch_size", ">= 2 (training batch norm needs two samples)",
         d.batch_size)
    need(d.batch_size % t.grad_accum == 0, "data.batch_size",
         f"a multiple of train.grad_accum={t.grad_accum}", d.batch_size)
    for key, v in (("data.train_subset", d.train_subset), ("data.test_subset", d.test_subset),
                   ("eval.subset", e.subset), ("eval.final_subset", e.final_subset)):
        need(v is None or v >= 1, key, "None or >= 1", v)
    need(e.eps is None or e.eps >= 0, "eval.eps", "None or >= 0", e.eps)
    need(e.pgd_steps >= 0, "eval.pgd_steps", ">= 0", e.pgd_steps)
    need(e.pgd_restarts >= 1, "eval.pgd_restarts", ">= 1", e.pgd_restarts)
    need(e.every >= 1, "eval.every", ">= 1", e.every)
    need(e.batch_size >= 1, "eval.batch_size", ">= 1", e.batch_size)
    need(cfg.swa.start_epoch >= 0, "swa.start_epoch", ">= 0", cfg.swa.start_epoch)
    need(bool(cfg.output_dir), "output_dir", "a directory name", cfg.output_dir)
    need(not (cfg.resume and cfg.overwrite), "overwrite", "false with resume: true (resume "
         "continues the run in output_dir, overwrite replaces it)", cfg.overwrite)
    if cfg.method.teacher is not None:
        need(os.path.isfile(cfg.method.teacher), "method.teacher",
             "an existing checkpoint file (train the teacher first)", cfg.method.teacher)
    return cfg


def from_dict(values: Dict[str, Any]) -> Config:
    """A validated :class:`Config` from a (possibly partial) nested mapping."""
    return validate(_build(Config, values, ""))


def parse_override(item: str) -> tuple:
    """``'a.b.c=value'`` -> ``(['a', 'b', 'c'], value)``, the value parsed as a YAML scalar."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value (dotted key, e.g. train.epochs=5)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r} as YAML ({e})") from None
    return key.split("."), value


def apply_overrides(values: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """``values`` with each ``key=value`` of ``overrides`` set (intermediate mappings created)."""
    out = dict(values)
    for item in overrides:
        parts, value = parse_override(item)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[:i + 1])}: is not a section, cannot set "
                                  f"{'.'.join(parts)}")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return out


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Read the YAML file ``path`` (None: the defaults), apply ``overrides`` (``key=value``
    strings), build and validate the :class:`Config`. Relative ``method.teacher`` and
    ``output_dir`` paths are kept relative to the working directory."""
    values: Dict[str, Any] = {}
    if path is not None:
        try:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"--config: no such file {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    return from_dict(apply_overrides(values, overrides))


__all__ = ["Config", "ConfigError", "DataConfig", "ModelConfig", "MethodConfig", "TrainConfig",
           "SWAConfig", "EvalConfig", "LogConfig", "load_config", "from_dict", "validate",
           "apply_overrides", "parse_override", "parse_number", "number_arg"]
