"""Joins of branches that start from the same tensor: the residual add (``a + b``,
``torch.add``, ``a - b``) and ``torch.cat`` along a feature dimension.

* Add: IBP ``mu = sum mu_i``, ``r = sum r_i`` (DESIGN.md section 3); sound: ``down(L1 + L2)``,
  ``up(U1 + U2)`` after every pairwise addition; back-substitution passes ``A`` unchanged into
  every branch (exact). A ReLU right after the add is fused into the step.
* Cat: boxes concatenate; back-substitution hands each branch its slice of ``A`` (exact).

Where coefficients meet again at the fork, the backward walk sums them (its sound hook charges
that rounding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
from torch import nn

from adcert.bounds.layers.base import OPAQUE, Back, Box, ForwardCtx, IbpCtx, Lowerer, Node, \
    Piece, Tensor, Walk, forward_steps, ibp_steps_ctx, sound_steps_ctx
from adcert.bounds.layers.relu import ReluPiece, relu_out, sound_relu_out
from adcert.ops._rounding import down, up


def first_module_of(branches) -> object:
    for branch in branches:
        for node in branch:
            first = node.first_module()
            if first is None:
                continue
            if first is not OPAQUE:
                return first
            break
    return OPAQUE


class AddPiece(Piece):
    """The sum of the outputs of ``srcs`` (an index may repeat)."""
    dense = True  # IBP is not exact through a sum of correlated branches

    def join_probe(self, probes: List[Tensor]) -> Tensor:
        shapes = {tuple(p.shape[1:]) for p in probes}
        if len(shapes) != 1:
            raise ValueError(f"model: the branches of a residual join have different shapes "
                             f"{sorted(shapes)}")
        return probes[0]

    def backward(self, A: Tensor, walk: Walk) -> Back:
        return Back(tuple(A for _ in self.srcs))

    def sound_box(self, boxes: Sequence[Box]) -> Box:
        L, U = boxes[0]
        for lo, hi in boxes[1:]:
            L, U = down(L + lo), -down(-(U + hi))
        return L, U


class CatPiece(Piece):
    """``torch.cat`` of the outputs of ``srcs`` along dimension ``dim`` of ``[B, *]``."""
    dense = False

    def __init__(self, dim: int):
        self.dim = dim

    def join_probe(self, probes: List[Tensor]) -> Tensor:
        self.sizes = [p.shape[self.dim] for p in probes]
        return torch.cat(probes, self.dim)

    def backward(self, A: Tensor, walk: Walk) -> Back:
        d = self.dim % (len(self.out_shape) + 1)
        return Back(tuple(torch.split(A, self.sizes, dim=d + 1)))

    def sound_box(self, boxes: Sequence[Box]) -> Box:
        return (torch.cat([b[0] for b in boxes], self.dim),
                torch.cat([b[1] for b in boxes], self.dim))


def _check_cat_dim(dim: int, ndim: int) -> int:
    if dim % ndim == 0:
        raise NotImplementedError(f"model: torch.cat along dimension {dim} concatenates along the "
                                  "batch dimension; only feature dimensions are supported")
    return dim


@dataclass(frozen=True, eq=False)
class ResidualStep(Node):
    """A residual join: every branch (a step sequence; ``()`` is the identity shortcut) is applied
    to the SAME input, the results are summed, then optionally ReLU. ``modules``: the ReLU module
    fused after the add, if any (for error messages)."""
    branches: Tuple[Tuple[Node, ...], ...]
    relu: bool
    modules: Tuple[nn.Module, ...] = ()

    def first_module(self):
        return first_module_of(self.branches)

    def batch_norms(self):
        return []  # the plan visits the branches itself

    def forward(self, h: Tensor, ctx: ForwardCtx) -> Tensor:
        out = None
        for branch in self.branches:
            b = forward_steps(branch, h, ctx)
            out = b if out is None else out + b
        return torch.relu(out) if self.relu else out

    def ibp(self, mu: Tensor, r: Tensor, ctx: IbpCtx) -> Box:
        """Sum of the branches' boxes, then optionally ReLU. Activation inputs are collected
        branch by branch, in branch order, then the join's own ReLU."""
        out_mu = out_r = None
        for branch in self.branches:
            b_mu, b_r = ibp_steps_ctx(branch, mu, r, ctx)
            out_mu = b_mu if out_mu is None else out_mu + b_mu
            out_r = b_r if out_r is None else out_r + b_r
        if self.relu:
            out_mu, out_r = relu_out(out_mu, out_r, ctx)
        return out_mu, out_r

    def sound_ibp(self, L: Tensor, U: Tensor, ctx: IbpCtx) -> Box:
        lo = hi = None
        for branch in self.branches:
            bl, bu = sound_steps_ctx(branch, L, U, ctx)
            lo = bl if lo is None else down(lo + bl)
            hi = bu if hi is None else up(hi + bu)
        return sound_relu_out(lo, hi, ctx) if self.relu else (lo, hi)

    def lower(self, lw: Lowerer) -> None:
        lw.join(AddPiece(), self.branches)
        if self.relu:
            lw.add(ReluPiece())


@dataclass(frozen=True, eq=False)
class CatStep(Node):
    """``torch.cat([branch_1(x), branch_2(x), ...], dim)`` with ``dim`` a feature dimension."""
    branches: Tuple[Tuple[Node, ...], ...]
    dim: int
    modules: Tuple[nn.Module, ...] = ()

    def first_module(self):
        return first_module_of(self.branches)

    def forward(self, h: Tensor, ctx: ForwardCtx) -> Tensor:
        outs = [forward_steps(b, h, ctx) for b in self.branches]
        return torch.cat(outs, _check_cat_dim(self.dim, outs[0].dim()))

    def ibp(self, mu: Tensor, r: Tensor, ctx: IbpCtx) -> Box:
        outs = [ibp_steps_ctx(b, mu, r, ctx) for b in self.branches]
        d = _check_cat_dim(self.dim, outs[0][0].dim())
        return torch.cat([o[0] for o in outs], d), torch.cat([o[1] for o in outs], d)

    def sound_ibp(self, L: Tensor, U: Tensor, ctx: IbpCtx) -> Box:
        outs = [sound_steps_ctx(b, L, U, ctx) for b in self.branches]
        d = _check_cat_dim(self.dim, outs[0][0].dim())
        return torch.cat([o[0] for o in outs], d), torch.cat([o[1] for o in outs], d)

    def lower(self, lw: Lowerer) -> None:
        _check_cat_dim(self.dim, len(lw.shape) + 1)
        lw.join(CatPiece(self.dim), self.branches)
