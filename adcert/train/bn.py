"""Batch-norm statistics for training (DESIGN.md section 5, the CTBench convention).

* :class:`StepBatchNorm`: one optimiser step's clean-batch statistics. The first forward of the
  step through a training-mode batch norm -- the method's clean forward ``model(x)`` -- computes
  the per-channel mean and biased variance of its input (all-reduced over processes when
  distributed) and normalises with them; every later forward and bound pass of the step reuses
  the same tensors. They stay differentiable, so the robust loss's gradient flows through the
  clean batch's statistics into the parameters, exactly as in the clean forward (CTBench stores
  ``x.mean/var`` without ``.detach()``). Under gradient accumulation the statistics of the whole
  global batch are computed once, up front, and each micro-batch's gradient with respect to them
  is pushed through their graph once at the end of the step. ``detach=True`` is the ablation
  that treats them as constants (``bn_mode: frozen``; it trains markedly worse).
* :func:`global_batch_stats`: the same statistics, detached, from one forward of a batch.
* :func:`update_running_stats`: the momentum (or cumulative) update of the running statistics
  with the step's statistics, once per step -- what ``nn.BatchNorm`` does in training mode.
* :func:`population_stats`: recompute the running statistics over a whole data set as a
  cumulative average (``momentum=None``), for evaluation.
"""
from __future__ import annotations

import warnings
from typing import Dict, Iterable, Mapping, Set, Tuple

import torch
import torch.distributed as dist
from torch import nn

from adcert.attacks.bn import override_bn_forward
from adcert.bounds.bn import batch_stats, normalise

Tensor = torch.Tensor
BNStats = Dict[nn.Module, Tuple[Tensor, Tensor]]
_BN = nn.modules.batchnorm._BatchNorm


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def training_bns(model: nn.Module):
    """Batch norms that normalise with batch statistics in ``model``'s current mode."""
    return [m for m in model.modules() if isinstance(m, _BN)
            and (m.running_mean is None or (model.training and m.training))]


def _all_reduce(t: Tensor) -> Tensor:
    """Differentiable sum over processes (identity in one process)."""
    if not _distributed():
        return t
    with warnings.catch_warnings():  # deprecated in favour of a non-autograd API
        warnings.simplefilter("ignore", FutureWarning)
        from torch.distributed.nn.functional import all_reduce
        return all_reduce(t)


def batch_statistics(h: Tensor) -> Tuple[Tensor, Tensor, int]:
    """``(mean [C], biased var [C], n)`` of ``h: [B, C, *]`` per channel over the batch and
    spatial dimensions of every process (``n`` elements per channel in all), differentiable.
    Two-pass: the mean, then the centred sum of squares."""
    n_local = h.numel() // h.shape[1]
    if not _distributed():
        mean, var = batch_stats(h)
        return mean, var, n_local
    dims = [0] + list(range(2, h.dim()))
    shape = [1, -1] + [1] * (h.dim() - 2)
    total = _all_reduce(torch.cat([h.sum(dims), h.new_tensor([n_local])]))
    count = total[-1].detach()
    mean = total[:-1] / count
    var = _all_reduce((h - mean.view(shape)).pow(2).sum(dims)) / count
    return mean, var, int(round(float(count)))


class StepStats(Mapping):
    """The read-only view ``{bn: (mean, var)}`` of a step's statistics that methods receive as
    ``StepState.bn_stats``. Asking for a training-mode batch norm whose statistics the step's
    clean forward has not computed yet is an error: a method must run ``model(x)`` first."""

    def __init__(self, owner: "StepBatchNorm"):
        self._owner = owner

    def __getitem__(self, bn):
        stats = self._owner.stats
        if bn not in stats:
            if bn in self._owner.bns:
                raise RuntimeError(
                    f"bn_stats: the step's statistics of {bn} were requested before the clean "
                    f"forward model(x) computed them; run the clean forward first (DESIGN.md "
                    f"section 5)")
            raise KeyError(bn)
        return stats[bn]

    def __contains__(self, bn) -> bool:
        if bn in self._owner.bns and bn not in self._owner.stats:
            self[bn]  # raises the ordering error
        return bn in self._owner.stats

    def __iter__(self):
        return iter(self._owner.stats)

    def __len__(self) -> int:
        return len(self._owner.stats)


class StepBatchNorm:
    """One optimiser step's batch-norm statistics (module docstring).

        step_bn = StepBatchNorm(model)               # model in training mode
        if micro_batches > 1:
            step_bn.precompute(x_global_local_share)
        with step_bn:                                # the step's forwards and backwards
            loss = method.loss(model, x, y, StepState(..., bn_stats=step_bn.view))
            loss.backward()
        step_bn.backward()                           # only does work after precompute()
        update_running_stats(step_bn.detached(), step_bn.counts)
    """

    def __init__(self, model: nn.Module, detach: bool = False):
        self.model = model
        self.detach = bool(detach)
        self.bns: Set[nn.Module] = set(training_bns(model))
        self.stats: BNStats = {}
        self.counts: Dict[nn.Module, int] = {}
        self.view = StepStats(self)
        self._graph: BNStats = {}
        self._ctx = None

    def _forward(self, bn: nn.Module):
        def fwd(h: Tensor) -> Tensor:
            if bn not in self.stats:
                mean, var, n = batch_statistics(h.detach() if self.detach else h)
                self.stats[bn], self.counts[bn] = (mean, var), n
            mean, var = self.stats[bn]
            return normalise(bn, h, mean, var)
        return fwd

    def __enter__(self) -> "StepBatchNorm":
        self._ctx = override_bn_forward(self.model,
                                        lambda m: self._forward(m) if m in self.bns else None)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        ctx, self._ctx = self._ctx, None
        ctx.__exit__(*exc)

    def precompute(self, x: Tensor) -> None:
        """Compute the statistics of the whole local batch ``x: [b, *in]`` (all processes'
        batches when distributed) in one forward, keep their graph, and hand out leaf copies
        that collect each micro-batch's gradient for :meth:`backward`."""
        with self:
            self.model(x)
        if self.detach:
            return
        self._graph = self.stats
        self.stats = {bn: (m.detach().requires_grad_(), v.detach().requires_grad_())
                      for bn, (m, v) in self._graph.items()}

    def backward(self) -> None:
        """After :meth:`precompute`: backpropagate the gradients the micro-batches left on the
        statistics' leaf copies through the statistics' graph into the parameters."""
        outs, grads = [], []
        for bn, pair in self._graph.items():
            for graph_t, leaf in zip(pair, self.stats[bn]):
                if leaf.grad is not None:
                    outs.append(graph_t)
                    grads.append(leaf.grad)
        if _distributed() and self._graph:
            # every process must join the all-reduces in the statistics' backward
            outs = [t for pair in self._graph.values() for t in pair]
            grads = [torch.zeros_like(t) if leaf.grad is None else leaf.grad
                     for bn, pair in self._graph.items()
                     for t, leaf in zip(pair, self.stats[bn])]
        if outs:
            torch.autograd.backward(outs, grads)
        self._graph = {}

    def detached(self) -> BNStats:
        """The statistics, detached (for the running-statistics update)."""
        return {bn: (m.detach(), v.detach()) for bn, (m, v) in self.stats.items()}


def global_batch_stats(model: nn.Module, x: Tensor) -> Tuple[BNStats, Dict[nn.Module, int]]:
    """``({bn: (mean, var)}, {bn: n})`` for every training-mode batch norm: the per-channel mean
    and biased variance (``[C]``, detached) of the clean batch ``x: [B, *in]`` over all processes,
    each batch norm's computed on its input normalised with the statistics of the layers before
    it (what one process with the whole batch computes), and the element count ``n`` per
    channel. Running statistics are not touched."""
    step_bn = StepBatchNorm(model, detach=True)
    with torch.no_grad():
        step_bn.precompute(x)
    return step_bn.detached(), step_bn.counts


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


__all__ = ["training_bns", "batch_statistics", "StepStats", "StepBatchNorm", "global_batch_stats",
           "update_running_stats", "population_stats"]
