"""The two interfaces every operation implements, and the contexts they run in.

An operation type lives in ONE module of :mod:`adcert.bounds.layers` and provides:

* a :class:`Node` -- a step of a model's :class:`~adcert.bounds.plan.LayerPlan` (the graph). It
  knows the clean forward (:meth:`Node.forward`), interval propagation in centre-radius form
  (:meth:`Node.ibp`) and rounding-sound interval propagation in end-point form
  (:meth:`Node.sound_ibp`), and how it lowers to primitive pieces for back-substitution
  (:meth:`Node.lower`; shape inference happens there, by a probe forward);
* a :class:`Piece` -- a primitive operation of the lowered network. It knows its linear
  relaxation and transpose (:meth:`Piece.backward`, used by ONE walk for CROWN, CROWN-IBP,
  alpha/beta-CROWN and loss fusion, :func:`adcert.bounds.backward.backward_lower`), its rigorous
  box (:meth:`Piece.sound_box`) and the rounding error of its backward step
  (:meth:`Piece.rounding_error`, called only by the sound hook).

A node can be its own piece's factory for one-to-one operations; a fused node (conv/linear +
batch norm + ReLU, the training fast path) lowers to several pieces.

Boxes: ``(mu, r)`` centre-radius for IBP, ``(L, U)`` end points for sound passes; tensors
``[B, *shape]``. Linear bounds: ``A: [B, S, *shape]`` (``S`` specification rows), constants
``[B, S]``.
"""
from __future__ import annotations

import contextlib

from dataclasses import dataclass, field
from typing import Any, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

Tensor = torch.Tensor
Box = Tuple[Tensor, Tensor]
Stats = Mapping[nn.Module, Tuple[Tensor, Tensor]]


# ----------------------------------------------------------------------------- pass contexts


@dataclass
class IbpCtx:
    """One interval pass. ``stats``: resolved ``(mean, var)`` of every batch norm;
    ``relu_bounds``: a list receiving the input box of every activation, in order (IBP:
    ``(lb, ub)``; sound: ``(L, U)``), or ``None``; ``relu_shrink``: SABR's ReLU-output shrink
    (IBP only, 1 = plain)."""
    stats: Stats
    relu_bounds: Optional[List[Box]] = None
    relu_shrink: float = 1.0

    @property
    def split(self) -> bool:
        """Whether fused steps must run their ReLU separately (collecting or shrinking)."""
        return self.relu_bounds is not None or self.relu_shrink != 1.0


@dataclass
class ForwardCtx:
    """One clean forward: batch norms use ``given[bn]`` or their batch statistics (stored into
    ``collect``), see :func:`adcert.bounds.bn.pick_stats`."""
    given: Optional[Mapping] = None
    collect: Optional[dict] = None
    model_training: bool = True


# ----------------------------------------------------------------------------- graph nodes


class Node:
    """A step of a plan (see the module docstring). Subclasses override the rules; joins also
    have ``branches`` (nested step sequences, see :func:`branches_of`)."""

    def forward(self, h: Tensor, ctx: ForwardCtx) -> Tensor:
        raise NotImplementedError

    def ibp(self, mu: Tensor, r: Tensor, ctx: IbpCtx) -> Box:
        raise NotImplementedError

    def sound_ibp(self, L: Tensor, U: Tensor, ctx: IbpCtx) -> Box:
        raise NotImplementedError(f"sound: no sound interval rule for {type(self).__name__}")

    def lower(self, lw: "Lowerer") -> None:
        raise NotImplementedError(f"model: {type(self).__name__} cannot be lowered for "
                                  f"back-substitution")

    # -- structure queries (plan-level helpers) ----------------------------------------
    def batch_norms(self) -> List[nn.Module]:
        """The batch norms this step normalises with (their statistics must be resolved)."""
        return []

    def first_module(self):
        """The module that fixes the model's input rank if this step comes first; ``None`` if
        this step accepts any rank and says nothing; :data:`OPAQUE` if it hides it."""
        return OPAQUE


OPAQUE = object()  # see Node.first_module


def branches_of(step: Node) -> Tuple[Tuple[Node, ...], ...]:
    """The nested step sequences of a join step (``()`` for any other step)."""
    return getattr(step, "branches", ())


# ----------------------------------------------------------------------------- pieces


class Back(NamedTuple):
    """The result of :meth:`Piece.backward`: coefficients on each source (one per ``srcs``
    entry), the constant term ``[B, S]`` (or ``None``) and piece-private data for
    :meth:`Piece.rounding_error`."""
    As: Tuple[Tensor, ...]
    const: Optional[Tensor] = None
    aux: Any = None


class Piece:
    """A primitive operation of the lowered network (see the module docstring).

    ``srcs``: indices of the pieces whose outputs it reads (``-1``: the network input);
    ``in_shape`` / ``out_shape``: one sample's; ``dense``: one output mixes several inputs (so IBP
    is not exact through it); ``act_index``: for activations (pieces whose relaxation needs
    their input bounds), the position among the network's activations, else ``None``."""

    srcs: Tuple[int, ...] = (-1,)
    in_shape: Tuple[int, ...] = ()
    out_shape: Tuple[int, ...] = ()
    dense: bool = False
    act_index: Optional[int] = None
    splittable: bool = False  # branch-and-bound may split its neurons (ReLU)

    @property
    def src(self) -> int:
        return self.srcs[0]

    def forward(self, h: Tensor, weight: Optional[Tensor] = None, bias: bool = True) -> Tensor:
        """The operation on ``h: [N, *in_shape]`` (``weight``/``bias``: see affine pieces)."""
        raise NotImplementedError

    def probe(self, h: Tensor) -> Tensor:
        """Shape inference: the output of a zero probe ``h: [1, *in_shape]``."""
        return self.forward(h, bias=False)

    def backward(self, A: Tensor, walk: "Walk") -> Back:
        """``A . out >= sum_j As[j] . src_j + const`` for every point of the boxes
        (``A: [B, S, *out_shape]``, or :class:`~adcert.bounds.patches.Patches` where
        :meth:`takes_patches` says so)."""
        raise NotImplementedError

    def takes_patches(self, walk: "Walk") -> bool:
        """Whether :meth:`backward` (and :meth:`rounding_error`) accept receptive-field
        coefficients (:class:`~adcert.bounds.patches.Patches`) in this walk; else the walk
        hands it dense ones."""
        return False

    def sound_box(self, boxes: Sequence[Box]) -> Box:
        """A rigorous box of the output from rigorous boxes of the sources (end points)."""
        raise NotImplementedError(f"sound: no rigorous box rule for {type(self).__name__}")

    def rounding_error(self, A: Tensor, back: Back, walk: "Walk") -> Optional[Tensor]:
        """An upper bound ``[B, S]`` of how far the floating-point ``back`` may be from the exact
        relaxation step (the sound hook; ``None`` = exact)."""
        return None

    # -- folded rounding errors (sound walks, see adcert.bounds.backward.folded_source_error) --
    #: a consumer that adds its source chain's rounding errors to its own weighted sum (ReLU)
    folds_source_error: bool = False
    #: ``A_in = A_out * w`` per entry, rows keep their geometry (:meth:`pull_error_weights`)
    diagonal: bool = False

    def folded_error(self, walk: "Walk") -> Optional[Tuple[Tensor, float]]:
        """This piece's backward rounding error in the form ``|A| . Q + floor`` for the rows
        ``A`` reaching it: ``(Q [B, *out_shape], floor)``, or ``None`` when it is not of that
        form. The piece whose backward step made ``A`` can then add ``Q`` to its own error
        weights: one pass over the rows instead of two."""
        return None

    def pull_error_weights(self, Q: Tensor) -> Optional[Tensor]:
        """Diagonal pieces (``A_in = A_out * w`` per entry, same row geometry): error weights
        ``Q`` on the input map turned into weights on the output map, rounded up so that
        ``|fl(A_out w)| . Q <= |A_out| . result``; ``None`` for any other piece."""
        return None

    def loose(self, lower: Tensor, upper: Tensor) -> Tensor:
        """Activations: the neurons ``[B, *shape]`` whose relaxation gains from tighter input
        bounds (CROWN tightens only those)."""
        return lower < upper

    def init_alpha(self, lower: Tensor, upper: Tensor) -> Optional[Tensor]:
        """Activations with optimisable relaxations: the initial ``alpha: [B, *shape]`` in
        ``[0, 1]`` that reproduces the CROWN relaxation, else ``None``."""
        return None


_FRESH = [0]  # > 0 inside fresh_relaxations()


@contextlib.contextmanager
def fresh_relaxations():
    """Within this context the relaxation memos (ReLU lines, max-pooling and S-shaped
    relaxations, error weights) neither serve nor keep results: every walk computes its own.
    Gradient checkpointing needs it (a recomputed walk must run the ops the first one ran,
    whatever the memo held in between)."""
    _FRESH[0] += 1
    try:
        yield
    finally:
        _FRESH[0] -= 1


def memo_enabled() -> bool:
    """Whether the relaxation memos may be used (see :func:`fresh_relaxations`)."""
    return _FRESH[0] == 0


@dataclass
class Walk:
    """State of one backward walk: ``boxes[k]`` = input box of activation ``k``; ``alphas`` /
    ``betas``: ``{k: [B, S, *shape]}``; ``relu_coefs``: receives the coefficients reaching each
    ReLU's output; ``hook``: the soundness hook (``None`` = exact arithmetic assumed)."""
    boxes: Sequence[Optional[Box]]
    alphas: Optional[dict] = None
    betas: Optional[dict] = None
    relu_coefs: Optional[dict] = None
    hook: Any = None
    # sound walks: (Q, floor) of the current piece's source chain, whose rounding errors it
    # adds to its own (set by the walk for a piece with ``folds_source_error``)
    fold: Any = None

    @property
    def sound(self) -> bool:
        return self.hook is not None

    def alpha(self, piece: "Piece", A) -> Optional[Tensor]:
        """The relaxation parameters of activation ``piece`` for the rows ``A`` of this walk:
        ``alphas[k]`` (``[B, S, *shape]``) from a plain dict, or, from a slope bank (an object
        with ``rows_alpha``, :class:`adcert.bounds.alpha_intermediate.SlopeBank`), parameters in
        ``A``'s own form (dense rows or receptive-field windows); ``None`` = CROWN's."""
        if self.alphas is None:
            return None
        rows_alpha = getattr(self.alphas, "rows_alpha", None)
        if rows_alpha is not None:
            return rows_alpha(piece, A, self.boxes[piece.act_index])
        return self.alphas.get(piece.act_index)

    def has_dense_alpha(self, k: int) -> bool:
        """Whether activation ``k`` has parameters ``[B, S, *shape]`` from a plain dict (a slope
        bank makes its own in any row form)."""
        return self.alphas is not None and not hasattr(self.alphas, "rows_alpha") and \
            k in self.alphas

    def magnitude(self, j: int) -> Tensor:
        """``max(|l|, |u|)`` of piece ``j``'s output box, ``[B, 1, *shape]`` (sound only)."""
        return self.hook.magnitude(j)


def feature_sum(t: Tensor) -> Tensor:
    """``[B, S, *] -> [B, S]`` sum over the feature dimensions."""
    return t.flatten(2).sum(-1)


# ----------------------------------------------------------------------------- lowering


@dataclass(eq=False)
class Lowered:
    """The network as pieces in topological order, plus ``relu_at[k]``: the piece index of
    activation ``k`` (ReLUs, and Sigmoid/Tanh/MaxPool where present). A plan without joins
    lowers to a chain (``src = index - 1``); the network output is the last piece's."""
    ops: List[Piece]
    relu_at: List[int] = field(default_factory=list)
    in_shape: Tuple[int, ...] = ()

    @property
    def out_shape(self) -> Tuple[int, ...]:
        return self.ops[-1].out_shape if self.ops else self.in_shape

    def relu_input_end(self, k: int) -> int:
        """The ``end`` (see :func:`adcert.bounds.backward.backward_lower`) of activation
        ``k``'s input."""
        return self.ops[self.relu_at[k]].src + 1

    def activation(self, k: int) -> Piece:
        return self.ops[self.relu_at[k]]

    def readers(self) -> List[int]:
        """How many pieces read each piece's output (cached; pieces are not added after
        lowering)."""
        cached = getattr(self, "_readers", None)
        if cached is None or len(cached) != len(self.ops):
            cached = [0] * len(self.ops)
            for op in self.ops:
                for j in op.srcs:
                    if j >= 0:
                        cached[j] += 1
            self._readers = cached
        return cached


class Lowerer:
    """Builds a :class:`Lowered` from plan nodes (each calls :meth:`add` for its pieces).

    ``stats``: resolved batch-norm statistics; ``detach``: cut parameters out of the autograd
    graph (certification); ``fold_bn``: fold a batch norm into the conv/linear before it (the
    sound mode keeps it separate, its coefficients' rounding is charged instead)."""

    def __init__(self, stats: Stats, in_shape: Tuple[int, ...], dtype, device, method: str,
                 fold_bn: bool = True, detach: bool = False):
        self.stats, self.dtype, self.device, self.method = stats, dtype, device, method
        self.fold_bn, self.detach_params = fold_bn, detach
        self.in_shape = tuple(in_shape)
        self.shape = tuple(in_shape)
        self.probe = torch.zeros((1,) + self.shape, dtype=dtype, device=device)
        self.ops: List[Piece] = []
        self.relu_at: List[int] = []
        self.cur = -1

    def detach(self, t: Optional[Tensor]) -> Optional[Tensor]:
        return t.detach() if (self.detach_params and t is not None) else t

    def add(self, piece: Piece) -> Piece:
        """Append a one-source piece reading the current value; infers its output shape."""
        piece.srcs = (self.cur,)
        piece.in_shape = self.shape
        with torch.no_grad():
            self.probe = piece.probe(self.probe)
        piece.out_shape = tuple(self.probe.shape[1:])
        self.shape = piece.out_shape
        if piece.act_index is not None or getattr(piece, "is_activation", False):
            piece.act_index = len(self.relu_at)
            self.relu_at.append(len(self.ops))
        self.ops.append(piece)
        self.cur = len(self.ops) - 1
        return piece

    def join(self, piece: Piece, branches: Sequence[Sequence[Node]]) -> Piece:
        """Lower every branch from the current value, then append ``piece`` reading their
        ends; ``piece.join_probe(probes)`` gives the joined probe."""
        fork = (self.cur, self.shape, self.probe)
        ends = []
        for branch in branches:
            self.cur, self.shape, self.probe = fork
            for node in branch:
                node.lower(self)
            ends.append((self.cur, self.shape, self.probe))
        if not ends:
            raise ValueError("model: a join with no branches")
        piece.srcs = tuple(e[0] for e in ends)
        piece.in_shapes = tuple(e[1] for e in ends)
        with torch.no_grad():
            self.probe = piece.join_probe([e[2] for e in ends])
        piece.in_shape = ends[0][1]
        piece.out_shape = self.shape = tuple(self.probe.shape[1:])
        self.ops.append(piece)
        self.cur = len(self.ops) - 1
        return piece

    def result(self) -> Lowered:
        return Lowered(self.ops, self.relu_at, self.in_shape)


# ----------------------------------------------------------------------------- the drivers


def ibp_steps_ctx(steps: Sequence[Node], mu: Tensor, r: Tensor, ctx: IbpCtx) -> Box:
    """Interval propagation of ``(mu, r)`` through ``steps`` (each step's :meth:`Node.ibp`)."""
    for step in steps:
        mu, r = step.ibp(mu, r, ctx)
    return mu, r


def sound_steps_ctx(steps: Sequence[Node], L: Tensor, U: Tensor, ctx: IbpCtx) -> Box:
    """Rigorous interval propagation of ``[L, U]`` through ``steps``."""
    for step in steps:
        L, U = step.sound_ibp(L, U, ctx)
    return L, U


def forward_steps(steps: Sequence[Node], h: Tensor, ctx: ForwardCtx) -> Tensor:
    """The clean forward of ``h`` through ``steps``."""
    for step in steps:
        h = step.forward(h, ctx)
    return h
