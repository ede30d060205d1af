"""``frozen_bn``: run any model with given batch-norm statistics and no running-stat updates."""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Optional, Tuple

import torch
from torch import nn

Tensor = torch.Tensor
_BN = nn.modules.batchnorm._BatchNorm


@contextlib.contextmanager
def frozen_bn(model: nn.Module, bn_stats: Optional[Mapping[nn.Module, Tuple[Tensor, Tensor]]]
              ) -> Iterator[nn.Module]:
    """Inside the block, every batch norm of ``model`` found in ``bn_stats`` (``{bn: (mean, var)}``,
    e.g. from :func:`adcert.bounds.clean_bn_stats`) normalises with that ``(mean, var)``, and no
    batch norm of ``model`` updates its running statistics (DESIGN.md section 5: one step's attack
    and bound passes reuse the clean batch's statistics). Batch norms not in ``bn_stats`` keep
    their mode; training-mode ones then use their batch statistics, but their running statistics
    are still left untouched. Everything is restored on exit, also after an exception."""
    saved = []
    try:
        for m in model.modules():
            if not isinstance(m, _BN):
                continue
            saved.append((m, m.training, m.running_mean, m.running_var, m.momentum,
                          m.num_batches_tracked))
            if bn_stats is not None and m in bn_stats:
                mean, var = bn_stats[m]
                m.running_mean, m.running_var = mean.detach(), var.detach()
                m.training = False
            elif m.training and m.running_mean is not None:
                # batch statistics without touching the running ones
                m.running_mean, m.running_var = None, None
        yield model
    finally:
        for m, training, mean, var, momentum, tracked in saved:
            m.training, m.running_mean, m.running_var = training, mean, var
            m.momentum, m.num_batches_tracked = momentum, tracked
