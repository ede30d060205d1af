"""Running any model with one training step's batch-norm statistics (DESIGN.md section 5).

* :func:`shared_bn`: every batch norm found in the given statistics normalises with them,
  *differentiably* -- the gradient of a loss computed inside the block flows through the
  statistics into whatever produced them (the clean forward's parameters). For the robust
  forwards of a loss (the adversarial logits of PGD/MTL-IBP/AD-CERT training, the TAPS head).
* :func:`frozen_bn`: the same with *detached* copies of the statistics, for the inner steps of an
  attack, which only need input gradients.

In both, no batch norm updates its running statistics, and batch norms missing from the
statistics keep their mode (training-mode ones normalise with the batch statistics of their own
input, running statistics untouched). Both override the modules' ``forward`` and restore what was
there before on exit, also after an exception, so they nest with the trainer's own step override
(:class:`adcert.train.bn.StepBatchNorm`).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from adcert.bounds.bn import normalise

Tensor = torch.Tensor
_BN = nn.modules.batchnorm._BatchNorm
_MISSING = object()


@contextlib.contextmanager
def override_bn_forward(model: nn.Module, make: Callable[[nn.Module], Optional[Callable]]
                        ) -> Iterator[nn.Module]:
    """Inside the block, each batch norm ``bn`` of ``model`` for which ``make(bn)`` returns a
    function runs that function as its ``forward``. Whatever instance-level ``forward`` was
    there before (an enclosing override) is put back on exit."""
    saved = []
    try:
        for m in model.modules():
            if isinstance(m, _BN):
                fwd = make(m)
                if fwd is not None:
                    saved.append((m, m.__dict__.get("forward", _MISSING)))
                    m.forward = fwd
        yield model
    finally:
        for m, previous in reversed(saved):
            if previous is _MISSING:
                del m.forward
            else:
                m.forward = previous


def _stats_forward(bn: nn.Module, mean: Tensor, var: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda h: normalise(bn, h, mean, var)


def _batch_forward(bn: nn.Module) -> Callable[[Tensor], Tensor]:
    """Batch statistics of the input, with gradients, running statistics untouched."""
    return lambda h: F.batch_norm(h, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)


def _with_stats(model: nn.Module, bn_stats: Optional[Mapping], detach: bool):
    def make(m: nn.Module):
        if bn_stats is not None and m in bn_stats:
            mean, var = bn_stats[m]
            if detach:
                mean, var = mean.detach(), var.detach()
            return _stats_forward(m, mean, var)
        if m.training and m.running_mean is not None:
            return _batch_forward(m)
        return None  # eval mode (running statistics) or no running statistics: unchanged
    return override_bn_forward(model, make)


def shared_bn(model: nn.Module,
              bn_stats: Optional[Mapping[nn.Module, Tuple[Tensor, Tensor]]]):
    """Context: batch norms in ``bn_stats`` (``{bn: (mean, var)}``, ``[C]`` each) normalise with
    those statistics, gradients flowing through them; no running-statistics update (module
    docstring). The robust forwards of a training loss."""
    return _with_stats(model, bn_stats, detach=False)


def frozen_bn(model: nn.Module,
              bn_stats: Optional[Mapping[nn.Module, Tuple[Tensor, Tensor]]]):
    """Context: as :func:`shared_bn` with detached statistics: the inner steps of an attack,
    which need gradients with respect to the input only."""
    return _with_stats(model, bn_stats, detach=True)


__all__ = ["shared_bn", "frozen_bn", "override_bn_forward"]
