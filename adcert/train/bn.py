"""Batch-norm statistics for training (DESIGN.md section 5, the CTBench convention).

* :func:`global_batch_stats`: the frozen clean statistics of the whole global batch -- every
  process's local batch, all micro-batches -- computed once per step, layer by layer, so each
  batch norm's statistics are those of its input normalised with the global statistics of the
  layers before it (exactly what one process with the whole batch would compute). With
  ``torch.distributed`` initialised the sums are all-reduced (gloo or NCCL).
* :func:`synced_batch_norm`: the clean forward's batch norm in ``bn_mode: batch`` -- batch
  statistics with gradients through them, synchronised over processes (SyncBatchNorm's
  semantics on any backend, without replacing the modules, so bound passes still see them).
* :func:`update_running_stats`: the momentum (or cumulative) update of the running statistics
  with those global statistics, once per step -- what ``nn.BatchNorm`` does in training mode.
* :func:`population_stats`: recompute the running statistics over a whole data set as a
  cumulative average (``momentum=None``), for evaluation.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Dict, Iterable, Iterator, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor
BNStats = Dict[nn.Module, Tuple[Tensor, Tensor]]
_BN = nn.modules.batchnorm._BatchNorm


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def training_bns(model: nn.Module):
    """Batch norms that normalise with batch statistics in ``model``'s current mode."""
    return [m for m in model.modules() if isinstance(m, _BN)
            and (m.running_mean is None or (model.training and m.training))]


def global_batch_stats(model: nn.Module, x: Tensor) -> Tuple[BNStats, Dict[nn.Module, int]]:
    """``({bn: (mean, var)}, {bn: n})`` for every training-mode batch norm: per-channel mean and
    biased variance (``[C]``, detached, in the input's dtype) of the clean batch ``x: [B, *in]``
    summed over all processes, and the element count ``n`` per channel. Two-pass (mean, then
    centred sum of squares), accumulated in float64. Running statistics are not touched."""
    bns = training_bns(model)
    stats: BNStats = {}
    counts: Dict[nn.Module, int] = {}

    def forward(bn):
        def fwd(h: Tensor) -> Tensor:
            dims = [0] + list(range(2, h.dim()))
            n = h.numel() // h.shape[1]
            h64 = h.detach().double()
            total = torch.cat([h64.sum(dims), h64.new_tensor([n])])
            if _distributed():
                dist.all_reduce(total)
            count = total[-1]
            mean = total[:-1] / count
            shape = [1, -1] + [1] * (h.dim() - 2)
            sq = ((h64 - mean.view(shape)) ** 2).sum(dims)
            if _distributed():
                dist.all_reduce(sq)
            var = sq / count
            stats[bn] = (mean.to(h.dtype), var.to(h.dtype))
            counts[bn] = int(round(float(count)))
            return F.batch_norm(h, stats[bn][0], stats[bn][1], bn.weight, bn.bias, False, 0.0,
                                bn.eps)
        return fwd

    try:
        for bn in bns:
            bn.forward = forward(bn)
        with torch.no_grad():
            model(x)
    finally:
        for bn in bns:
            del bn.forward
    return stats, counts


def _sync_batch_forward(bn):
    """A replacement ``forward`` for ``bn``: in training mode, normalise with the batch
    statistics of the input -- summed over all processes through a differentiable all-reduce
    when distributed, so gradients flow through the statistics exactly as in one process with
    the whole batch (what ``SyncBatchNorm`` does) -- without touching the running statistics;
    in eval mode (as set by :func:`adcert.attacks.frozen_bn`), the running statistics."""
    def fwd(h: Tensor) -> Tensor:
        if not bn.training:
            return F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, False,
                                0.0, bn.eps)
        dims = [0] + list(range(2, h.dim()))
        shape = [1, -1] + [1] * (h.dim() - 2)
        n = h.numel() // h.shape[1]
        if _distributed():
            with warnings.catch_warnings():  # deprecated in favour of a non-autograd API
                warnings.simplefilter("ignore", FutureWarning)
                from torch.distributed.nn.functional import all_reduce as _all_reduce

            def all_reduce(t: Tensor) -> Tensor:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    return _all_reduce(t)

            total = all_reduce(torch.cat([h.sum(dims), h.new_tensor([n])]))
            count = total[-1].detach()
            mean = total[:-1] / count
            var = all_reduce((h - mean.view(shape)).pow(2).sum(dims)) / count
        else:
            var, mean = torch.var_mean(h, dim=dims, correction=0)
        out = (h - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
        if bn.weight is not None:
            out = out * bn.weight.view(shape) + bn.bias.view(shape)
        return out
    return fwd


@contextlib.contextmanager
def synced_batch_norm(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every training-mode batch norm of ``model`` uses
    :func:`_sync_batch_forward` (batch statistics with gradients, synchronised over processes,
    running statistics untouched). Restored on exit."""
    bns = training_bns(model)
    try:
        for bn in bns:
            bn.forward = _sync_batch_forward(bn)
        yield model
    finally:
        for bn in bns:
            del bn.forward


@torch.no_grad()
def update_running_stats(stats: BNStats, counts: Dict[nn.Module, int]) -> None:
    """One training-mode update of each batch norm's running statistics with ``stats`` (the
    unbiased variance ``var * n / (n - 1)``, as ``nn.BatchNorm`` does)."""
    for bn, (mean, var) in stats.items():
        if bn.running_mean is None or not bn.track_running_stats:
            continue
        bn.num_batches_tracked.add_(1)
        factor = (1.0 / float(bn.num_batches_tracked) if bn.momentum is None
                  else bn.momentum)
        n = counts[bn]
        unbiased = var * (n / (n - 1)) if n > 1 else var
        bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
        bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)


@torch.no_grad()
def population_stats(model: nn.Module, batches: Iterable[Tensor]) -> nn.Module:
    """Reset every batch norm's running statistics and recompute them as the cumulative average
    (``momentum=None``) over ``batches`` (an iterable of clean inputs ``[B, *in]``), in training
    mode; restores each module's momentum and the model's mode. Returns ``model``."""
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns:
        return model
    was_training = model.training
    momenta = [m.momentum for m in bns]
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        for xb in batches:
            model(xb)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
    return model


__all__ = ["training_bns", "global_batch_stats", "synced_batch_norm", "update_running_stats",
           "population_stats"]
