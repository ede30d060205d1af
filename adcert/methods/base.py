"""The interface every training objective implements, and the method registry.

A method turns one batch into a scalar loss. The trainer (:mod:`adcert.train`) owns the
schedules, the optimiser, L1, checkpoints and logging; a method owns its formula (DESIGN.md
section 6), including its natural/robust mixing and its warm-up regularisers.

    method = get_method("ibp", **hparams)       # unknown hyper-parameters raise, naming them
    out = method.loss(model, x, y, state)       # MethodOutput
    out.loss.backward()

Data flow: methods use :mod:`adcert.ops`, :mod:`adcert.bounds` and :mod:`adcert.attacks`; they
never import :mod:`adcert.train`.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple, Type

import torch
from torch import nn

Tensor = torch.Tensor
BNStats = Mapping[nn.Module, Tuple[Tensor, Tensor]]


@dataclass
class StepState:
    """What the trainer tells a method about the current optimisation step.

    eps:         the scheduled radius ``eps_t`` of this step (pixel space, >= 0).
    eps_target:  the final training radius ``eps`` (> 0).
    epoch, step: 0-based epoch and global step.
    bn_stats:    the clean-batch statistics ``{bn: (mean, var)}`` of the training-mode batch
                 norms for this step (the trainer's, or :func:`adcert.bounds.clean_bn_stats`),
                 reused by every attack and bound pass of the step, differentiable (DESIGN.md
                 section 5); ``None``: the method computes them from ``x`` once
                 (:func:`with_bn_stats`).
    coef:        the method-coefficient ramp value in [0, 1] for methods that ramp a coefficient
                 with eps (CROWN-IBP's beta goes ``1 - coef``); defaults to ``eps / eps_target``.
    index:       ``[B]`` int64 dataset indices of the batch's samples (the trainer fills it;
                 ``None`` when unknown), for methods that keep per-sample state across epochs
                 (ACERT's warm-started radius search).
    """
    eps: float
    eps_target: float
    epoch: int = 0
    step: int = 0
    bn_stats: Optional[BNStats] = None
    coef: Optional[float] = None
    index: Optional[Tensor] = None

    @property
    def ramp(self) -> float:
        """``eps_t / eps`` in [0, 1]; warm-up regularisers are weighted ``lambda (1 - ramp)``."""
        if self.eps_target <= 0:
            return 1.0
        return min(1.0, max(0.0, self.eps / self.eps_target))

    @property
    def warmup(self) -> bool:
        """True while the scheduled eps has not reached its target."""
        return self.ramp < 1.0


def with_bn_stats(model: nn.Module, x: Tensor, state: StepState) -> StepState:
    """``state`` itself when it carries batch-norm statistics or ``model`` has no training-mode
    batch norm; else a copy with the clean-batch statistics of ``x: [B, *in]``
    (:func:`adcert.bounds.clean_bn_stats`, differentiable), so a method called outside the
    trainer still reuses one set of statistics for all its passes."""
    if state.bn_stats is not None:
        return state
    from adcert.bounds import clean_bn_stats
    from adcert.bounds.bn import uses_batch_stats

    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
               and uses_batch_stats(m, model.training) for m in model.modules()):
        return state
    return dataclasses.replace(state, bn_stats=clean_bn_stats(model, x))


@dataclass
class MethodOutput:
    """loss:    scalar tensor the optimiser minimises (the method's whole objective except the
                trainer's L1 term).
    logits:     clean logits ``[B, C]`` of this batch (detached is fine) for training accuracy.
    margins:    IBP-style margin lower bounds ``[B, C]`` at ``state.eps`` when the method computed
                them (``y`` entry 0), for training certified accuracy; else ``None``.
    logs:       scalars for the metrics log (floats or 0-dim tensors; the trainer converts them
                once per logging interval, so methods never force a host sync)."""
    loss: Tensor
    logits: Optional[Tensor] = None
    margins: Optional[Tensor] = None
    logs: Dict[str, Any] = field(default_factory=dict)


class Method:
    """Base class. Subclasses set ``name`` and declare their hyper-parameters as keyword
    arguments of ``__init__`` with defaults (the papers' values); :func:`get_method` rejects
    unknown keys with the key's name and the accepted ones.

    ``needs_teacher``: the trainer passes ``teacher=<frozen nn.Module in eval mode>``.
    """
    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = False

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, state: StepState) -> MethodOutput:
        """``x: [B, *in]`` pixels in [0, 1], ``y: [B]`` int64 -> :class:`MethodOutput`."""
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        """State the method carries across steps (saved in resumable checkpoints so a resumed run
        continues bit for bit); stateless methods return ``{}``."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; a stateless method accepts only ``{}``."""
        if state:
            raise ValueError(f"state: method {self.name!r} keeps no state, got keys "
                             f"{sorted(state)}")

    @classmethod
    def hyperparameters(cls) -> Dict[str, Any]:
        """``{name: default}`` of the constructor's keyword arguments."""
        sig = inspect.signature(cls.__init__)
        return {k: p.default for k, p in sig.parameters.items()
                if k != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


METHODS: Dict[str, Type[Method]] = {}


def register(cls: Type[Method]) -> Type[Method]:
    """Class decorator: add a method to :data:`METHODS` under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__}: set a non-empty `name`")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, **hparams: Any) -> Method:
    """Instantiate a registered method; raises ``KeyError`` for an unknown method and
    ``TypeError`` naming any unknown hyper-parameter."""
    key = str(name).lower().replace("_", "-")
    if key not in METHODS:
        raise KeyError(f"method: unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    cls = METHODS[key]
    known = cls.hyperparameters()
    unknown = [k for k in hparams if k not in known]
    if unknown:
        raise TypeError(f"method {key!r}: unknown hyper-parameter(s) {', '.join(unknown)}; "
                        f"accepted: {', '.join(sorted(known))}")
    return cls(**hparams)


__all__ = ["StepState", "with_bn_stats", "MethodOutput", "Method", "METHODS", "register",
           "get_method"]
