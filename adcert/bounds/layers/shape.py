"""Operations that only move entries, keeping the batch dimension: ``nn.Flatten``,
``torch.flatten``/``.flatten``/``.view``/``.reshape``, ``.squeeze``/``.unsqueeze`` (reshapes) and
``.permute``/``.transpose`` (permutations).

Every rule is exact: boxes map entry by entry (centre-radius and end points alike), and
back-substitution applies the inverse move to the coefficients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from adcert.bounds.layers.base import Back, Box, ForwardCtx, IbpCtx, Lowerer, Node, Piece, \
    Tensor, Walk
from adcert.bounds.registry import BATCH, register_call, register_module, unsupported_call


class ReshapePiece(Piece):
    """A batch-keeping reshape (same entries, same order); ``move`` is the step's reshape."""

    def __init__(self, move):
        self.move = move

    def forward(self, h, weight=None, bias=True):
        return h.reshape((h.shape[0],) + self.out_shape)

    def probe(self, h):
        return self.move(h)

    def backward(self, A: Tensor, walk: Walk) -> Back:
        return Back((A.reshape(A.shape[:2] + self.in_shape),))

    def sound_box(self, boxes: Sequence[Box]) -> Box:
        L, U = boxes[0]
        return self.forward(L), self.forward(U)


class PermutePiece(Piece):
    """``t.permute(perm)`` with ``perm[0] == 0`` (the batch dimension stays first)."""

    def __init__(self, perm: Tuple[int, ...]):
        self.perm = tuple(perm)
        inv = [0] * len(perm)
        for j, p in enumerate(perm):
            inv[p] = j
        self.back_perm = (0, 1) + tuple(inv[i] + 1 for i in range(1, len(perm)))

    def forward(self, h, weight=None, bias=True):
        return h.permute(self.perm)

    def backward(self, A: Tensor, walk: Walk) -> Back:
        return Back((A.permute(self.back_perm),))

    def sound_box(self, boxes: Sequence[Box]) -> Box:
        L, U = boxes[0]
        return self.forward(L), self.forward(U)


class _MoveStep(Node):
    """Shared rules of the entry-moving steps: subclasses define :meth:`apply` (on
    ``[B, *]``) and :meth:`piece`."""

    def apply(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, h: Tensor, ctx: ForwardCtx) -> Tensor:
        return self.apply(h)

    def ibp(self, mu: Tensor, r: Tensor, ctx: IbpCtx) -> Box:
        return self.apply(mu), self.apply(r)

    def sound_ibp(self, L: Tensor, U: Tensor, ctx: IbpCtx) -> Box:
        return self.apply(L), self.apply(U)

    def lower(self, lw: Lowerer) -> None:
        lw.add(ReshapePiece(self.apply))


@dataclass(frozen=True, eq=False)
class FlattenStep(_MoveStep):
    """``nn.Flatten(start_dim, end_dim)``; the batch dimension is never merged."""
    module: nn.Flatten

    @property
    def modules(self):
        return (self.module,)

    def first_module(self):
        return self.module

    def apply(self, t: Tensor) -> Tensor:
        if self.module.start_dim % t.dim() == 0:
            raise NotImplementedError("model: an nn.Flatten that merges the batch dimension "
                                      "(start_dim=0) is not supported")
        return self.module(t)


@dataclass(frozen=True, eq=False)
class ReshapeStep(_MoveStep):
    """A reshape that keeps the batch dimension (``view``/``reshape``/``torch.flatten``/
    ``squeeze``/``unsqueeze`` in a traced model). ``shape`` given:
    ``t.reshape(t.shape[0], *shape)`` (``shape`` is the per-sample target, at most one ``-1``);
    ``shape`` None: ``torch.flatten(t, start_dim, end_dim)`` with ``start_dim`` not the batch
    dimension."""
    shape: Optional[Tuple[int, ...]] = None
    start_dim: int = 1
    end_dim: int = -1

    def apply(self, t):
        """The reshape of ``t: [B, *]`` (raises if it would merge or split the batch)."""
        if self.shape is not None:
            try:
                return t.reshape((t.shape[0],) + tuple(self.shape))
            except RuntimeError as exc:
                raise ValueError(f"x: the model reshapes a [B, *] = {tuple(t.shape)} tensor to "
                                 f"per-sample shape {tuple(self.shape)}, which does not keep the "
                                 f"batch dimension ({exc})") from exc
        if self.start_dim % t.dim() == 0:
            raise NotImplementedError("model: a flatten that merges the batch dimension "
                                      "(start_dim=0) is not supported")
        return t.flatten(self.start_dim, self.end_dim)


@dataclass(frozen=True, eq=False)
class SqueezeStep(_MoveStep):
    """``t.squeeze(dim)`` / ``t.unsqueeze(dim)`` (``unsqueeze``) on a non-batch dimension."""
    dim: int
    unsqueeze: bool = False

    def apply(self, t: Tensor) -> Tensor:
        n = t.dim() + (1 if self.unsqueeze else 0)
        if self.dim % n == 0:
            what = "unsqueeze" if self.unsqueeze else "squeeze"
            raise NotImplementedError(f"model: {what}({self.dim}) acts on the batch dimension")
        return t.unsqueeze(self.dim) if self.unsqueeze else t.squeeze(self.dim)


@dataclass(frozen=True, eq=False)
class PermuteStep(_MoveStep):
    """``t.permute(*perm)`` (``perm`` over all dimensions, ``perm[0] == 0``) or
    ``t.transpose(*swap)`` (two non-batch dimensions), keeping the batch dimension first;
    negative entries allowed."""
    perm: Tuple[int, ...] = ()
    swap: Optional[Tuple[int, int]] = None

    def full_perm(self, ndim: int) -> Tuple[int, ...]:
        if self.swap is not None:
            a, b = (d % ndim for d in self.swap)
            perm = list(range(ndim))
            perm[a], perm[b] = b, a
            if 0 in (a, b) and a != b:
                raise NotImplementedError(f"model: transpose{self.swap} moves the batch dimension")
            return tuple(perm)
        perm = tuple(p % ndim for p in self.perm)
        if len(perm) != ndim or sorted(perm) != list(range(ndim)) or perm[0] != 0:
            raise NotImplementedError(f"model: permute{self.perm} of a {ndim}-d tensor must be a "
                                      f"permutation keeping the batch dimension first")
        return perm

    def apply(self, t: Tensor) -> Tensor:
        return t.permute(self.full_perm(t.dim()))

    def lower(self, lw: Lowerer) -> None:
        lw.add(PermutePiece(self.full_perm(len(lw.shape) + 1)))


# ----------------------------------------------------------------------------- registration

_SKIPPED = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
register_module(*_SKIPPED, build=lambda m: None)  # the identity for bounds
register_module(nn.Flatten, build=FlattenStep)


@register_call(".contiguous")
def _no_op(args, kwargs, what):
    return None


def _int(v, what: str, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise unsupported_call(what, f"{name} must be a constant int, got {v!r}")
    return v


@register_call(torch.flatten, ".flatten")
def _flatten_call(args, kwargs, what):
    start = args[0] if args else kwargs.get("start_dim", 0)
    end = args[1] if len(args) > 1 else kwargs.get("end_dim", -1)
    if not (isinstance(start, int) and isinstance(end, int)):
        raise unsupported_call(what, "start_dim/end_dim must be constants")
    if start == 0:
        raise unsupported_call(what, "start_dim=0 merges the batch dimension")
    return ReshapeStep(None, start, end)


@register_call(".view", ".reshape")
def _reshape_call(args, kwargs, what):
    if kwargs:
        raise unsupported_call(what, "keyword arguments")
    dims = list(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else list(args)
    if not dims:
        raise unsupported_call(what, "no target shape")
    first, rest = dims[0], dims[1:]
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in rest) or \
            not (first is BATCH or first == -1):
        raise unsupported_call(what, "the target shape must be (x.size(0), ints...) or "
                                     "(-1, ints...) so that the batch dimension is kept")
    if first == -1 and not rest:
        raise unsupported_call(what, "view(-1) merges the batch dimension")
    if first == -1 and -1 in rest:
        raise unsupported_call(what, "two inferred (-1) dimensions")
    return ReshapeStep(tuple(rest))


@register_call(torch.squeeze, ".squeeze", torch.unsqueeze, ".unsqueeze")
def _squeeze_call(args, kwargs, what):
    dim = args[0] if args else kwargs.get("dim")
    if dim is None:
        raise unsupported_call(what, "give the dimension: squeezing every size-1 dimension "
                                     "could drop the batch dimension")
    return SqueezeStep(_int(dim, what, "dim"), unsqueeze="unsqueeze" in what)


@register_call(torch.permute, ".permute")
def _permute_call(args, kwargs, what):
    dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else \
        kwargs.get("dims", args)
    return PermuteStep(tuple(_int(d, what, "dims") for d in dims))


@register_call(torch.transpose, ".transpose")
def _transpose_call(args, kwargs, what):
    if len(args) != 2:
        raise unsupported_call(what, "expected two dimensions")
    return PermuteStep(swap=(_int(args[0], what, "dim0"), _int(args[1], what, "dim1")))
