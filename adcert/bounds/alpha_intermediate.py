"""alpha-CROWN over every layer: the slopes of the intermediate bounds are optimised too.

CROWN bounds the input of every activation ``k`` by a backward walk of its own, with its own
relaxations of the activations ``j < k`` before it. alpha-CROWN as alpha,beta-CROWN runs it
gives every such walk its own slopes -- one set per bounded neuron (row) of layer ``k`` and per
earlier activation ``j`` -- and recomputes the intermediate bounds with them at every iteration,
so the gradient of the final bound reaches them through the boxes the final walk reads (a
tighter box of an unstable ReLU gives a tighter chord).

* :class:`IntermediateRows`: which neurons are re-bounded (those CROWN left loose, e.g. ReLU
  inputs with ``l < 0 < u``; fixed once, from the reference boxes) and in which row chunks.
  :meth:`IntermediateRows.boxes` recomputes their bounds (the final evaluation intersects them
  with the reference boxes, so it is never looser than CROWN).
* :class:`SlopeBank`: the slopes, created lazily on the first walk in the form the rows reach
  each activation with: receptive-field windows ``[B, 2n, C, ph, pw]`` while the rows are
  :class:`~adcert.bounds.patches.Patches`, dense ``[B, 2n, *shape_j]`` after. Per-row slopes
  take ``max_alpha_elements`` elements in all (memory ~6x that: gradients, two Adam moments, the
  best copy and the graph's; by default a quarter of the free memory,
  :func:`adcert.bounds.memory.alpha_budget`); past the budget a walk's slopes for activation
  ``j`` are SHARED by all rows of layer ``k`` that bound a lower end (one map
  ``[B, *shape_j]``) and by all that bound an upper end (a second map) -- looser, but the
  memory of one map.
* Memory of the optimisation itself: one iteration differentiates through every intermediate
  walk; past :data:`CHECKPOINT_ELEMENTS` the walks are checkpointed (recomputed in the backward
  pass, one walk's graph alive at a time).

Every slope in ``[0, 1]`` gives a valid bound, so every iterate is sound in exact arithmetic;
the bank keeps, per row, the slopes of the iteration that gave that row its best bound
(:meth:`SlopeBank.record`), and :meth:`SlopeBank.frozen` evaluates those (shared slopes: the
last iterate's), which the sound mode re-runs with its rigorous walk.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Dict, List, Optional, Tuple

import torch
from torch.utils.checkpoint import checkpoint

from adcert.bounds.layers.base import Box, Lowered, fresh_relaxations
from adcert.bounds.patches import Patches

Tensor = torch.Tensor

#: Past this estimate of one iteration's autograd graph (elements), the intermediate walks are
#: checkpointed: each is re-run in the backward pass instead of keeping its graph. CNN7 width 64,
#: MNIST shape (estimate 2.7e9): peak memory 23.7 GB -> 1.6 GB, and faster (less paging); width
#: 16 keeps its graphs (estimates 8.9e7 MNIST, 3.9e8 CIFAR): checkpointing cost 1.4x the time.
CHECKPOINT_ELEMENTS = 2 ** 29


class SlopeBank:
    """The slopes of the intermediate walks. Select a walk with :meth:`select` (layer ``k``,
    chunk ``c``) before running it with the bank as its ``alphas``."""

    def __init__(self, budget: int):
        self.budget = budget
        self.used = 0
        self.rows: Dict[Tuple[int, int, int], Tensor] = {}     # (k, c, j) -> per-row slopes
        self.shared: Dict[Tuple[int, int], Tensor] = {}        # (k, j) -> [B, 2, *shape_j]
        self.best: Dict[Tuple[int, int, int], Tensor] = {}     # best per-row slopes
        self.best_value: Dict[Tuple[int, int], Tensor] = {}    # (k, c) -> best row bounds
        self.key: Tuple[int, int] = (-1, -1)

    def select(self, k: int, c: int) -> "SlopeBank":
        self.key = (k, c)
        return self

    def params(self) -> List[Tensor]:
        return list(self.rows.values()) + list(self.shared.values())

    def rows_alpha(self, piece, A, box: Box) -> Optional[Tensor]:
        """The slopes of activation ``piece`` for the rows ``A`` of the selected walk (made on
        first use from ``piece.init_alpha``; ``None`` for activations without parameters)."""
        k, c = self.key
        j = piece.act_index
        key = (k, c, j)
        if key in self.rows:
            return self.rows[key]
        shared = self.shared.get((k, j))
        if shared is None:
            start = piece.init_alpha(box[0].detach(), box[1].detach())
            if start is None:
                return None
            size = math.prod(A.shape)
            if self.used + size <= self.budget:
                self.used += size
                rows = (A.gather(start) if isinstance(A, Patches)
                        else start.unsqueeze(1).expand(A.shape)).contiguous()
                self.rows[key] = rows.requires_grad_()
                self.best[key] = rows.detach().clone()
                return self.rows[key]
            shared = torch.stack([start, start], 1).requires_grad_()
            self.shared[(k, j)] = shared
        n = A.shape[1] // 2  # rows: [lower ends; upper ends]
        if isinstance(A, Patches):
            C = shared.shape[2]
            both = A.gather(shared.flatten(1, 2))  # [B, S, 2C, ph, pw]
            return torch.cat([both[:, :n, :C], both[:, n:, C:]], 1)
        return shared.repeat_interleave(n, dim=1)

    @torch.no_grad()
    def record(self, k: int, c: int, value: Tensor) -> None:
        """Keep-best: ``value: [B, 2n]`` the rows' bounds of walk ``(k, c)`` as lower bounds
        (``[lower; -upper]``); rows that improved keep their current slopes."""
        prev = self.best_value.get((k, c))
        if prev is None:
            self.best_value[(k, c)] = value.detach().clone()
            return
        better = value > prev
        self.best_value[(k, c)] = torch.where(better, value, prev)
        for (kk, cc, j), cur in self.rows.items():
            if (kk, cc) == (k, c):
                m = better.reshape(better.shape + (1,) * (cur.dim() - 2))
                self.best[(kk, cc, j)] = torch.where(m, cur.detach(), self.best[(kk, cc, j)])

    @torch.no_grad()
    def project(self) -> None:
        for p in self.params():
            p.clamp_(0.0, 1.0)

    def frozen(self) -> "SlopeBank":
        """This bank evaluating its kept (best) per-row slopes, detached."""
        out = SlopeBank(self.budget)
        out.rows = {key: t.detach() for key, t in self.best.items()}
        out.best = out.rows
        out.shared = {key: t.detach() for key, t in self.shared.items()}
        return out


class IntermediateRows:
    """The neurons of every activation's input that alpha-CROWN re-bounds, in row chunks.

    ``ref_boxes[k]``: the reference (CROWN) input boxes of activation ``k``, already clamped by
    ``splits``; the chunks are :func:`adcert.bounds.crown.row_chunks`'s, the plan
    :func:`adcert.bounds.crown.crown_intermediate` walks too (none where IBP is exact)."""

    def __init__(self, low: Lowered, ref_boxes: List[Box], splits, max_elems: int,
                 patches: bool):
        from adcert.bounds.crown import row_chunks

        self.low, self.ref, self.splits = low, ref_boxes, splits
        self.plans = [row_chunks(low, k, ref_boxes[k], max_elems, patches)
                      for k in range(len(low.relu_at))]
        # what one iteration's autograd graph keeps of the walks, roughly: every piece's
        # coefficients at their widest
        self.graph_elements = sum(2 * ref_boxes[k][0].shape[0] * p.n_max * p.widest *
                                  low.relu_at[k] for k, p in enumerate(self.plans) if p is not None)

    def __bool__(self) -> bool:
        return any(p is not None for p in self.plans)

    def boxes(self, mu: Tensor, r: Tensor, bank: SlopeBank, backward,
              optimising: bool = False) -> List[Box]:
        """Every activation's input box, the loose neurons re-bounded by walks with the bank's
        slopes (in layer order: each walk reads the boxes recomputed before it). Differentiable
        w.r.t. the bank's slopes.

        The boxes are intersected with the reference, so they are never looser than CROWN's.
        ``optimising``: an iterate of the optimisation: the bank records every row's bound
        (keep-best), and the intersection passes the walk's own gradient on (straight through):
        through the max, a neuron whose bound fell behind the reference would stop moving its
        slopes (measured: the plain max ended looser than auto_LiRPA's alpha-CROWN, which does
        not intersect)."""
        from adcert.bounds.crown import apply_split, neuron_bounds

        boxes: List[Box] = []
        for k, plan in enumerate(self.plans):
            if plan is None:
                boxes.append(self.ref[k])
                continue
            end, shape, windows, parts = plan[:4]
            lo, up = self.ref[k]
            lo_f, up_f = lo.flatten(1), up.flatten(1)
            for c, part in enumerate(parts):
                walk = partial(_walk, neuron_bounds, self.low, end, part, shape, mu, r,
                               backward, windows, bank, k, c)
                if optimising and torch.is_grad_enabled() and \
                        self.graph_elements > CHECKPOINT_ELEMENTS:
                    # checkpointed: only the chunk's inputs and bounds stay for the backward
                    # pass, which re-runs the walk (one chunk's graph at a time)
                    c_lo, c_up = checkpoint(walk, *_box_tensors(boxes), use_reentrant=False)
                else:
                    c_lo, c_up = walk(*_box_tensors(boxes))
                if optimising:
                    bank.record(k, c, torch.cat([c_lo, -c_up], 1))
                i_lo = torch.maximum(lo_f.gather(1, part), c_lo)
                i_up = torch.minimum(up_f.gather(1, part), c_up)
                if optimising:  # the intersected values, the walks' own gradients
                    i_lo = c_lo + (i_lo - c_lo).detach()
                    i_up = c_up + (i_up - c_up).detach()
                lo_f, up_f = lo_f.scatter(1, part, i_lo), up_f.scatter(1, part, i_up)
            box = (lo_f.reshape(lo.shape), up_f.reshape(up.shape))
            boxes.append(apply_split(box, None if self.splits is None else self.splits.get(k)))
        return boxes


def _box_tensors(boxes: List[Box]) -> List[Tensor]:
    return [t for box in boxes for t in box]


def _walk(neuron_bounds, low, end, part, shape, mu, r, backward, windows, bank, k, c,
          *flat: Tensor) -> Box:
    """One intermediate walk (chunk ``c`` of layer ``k``) over the boxes ``flat`` (``lo, up``
    of every activation before it, flattened: explicit inputs for the checkpoint), with fresh
    relaxations (see :func:`adcert.bounds.layers.base.fresh_relaxations`)."""
    boxes = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
    with fresh_relaxations():
        return neuron_bounds(low=low, end=end, idx=part, shape=shape, mu=mu, r=r, boxes=boxes,
                             backward=backward, patches=windows, alphas=bank.select(k, c))
