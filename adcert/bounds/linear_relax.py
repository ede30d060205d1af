"""Backward propagation of linear bounds (the CROWN family's back-substitution).

A :class:`~adcert.bounds.plan.LayerPlan` is lowered once per call to a flat list of primitive ops
(:func:`lower_plan`):

* :class:`AffineOp` -- ``z = W h + c`` for one of ``linear``, ``conv`` (``Conv2d``), ``channel``
  (a per-channel scale and shift: batch norm with resolved statistics, ``Normalize``) or
  ``reshape`` (``Flatten``). A batch norm after a conv/linear is folded into it (exact in real
  arithmetic) unless ``fold_bn=False`` (the sound mode keeps it separate, see
  :mod:`adcert.bounds.crown_sound`).
* :class:`ReluOp` -- a ReLU; ``index`` counts the ReLUs in order (the order of
  ``relu_bounds`` and of IBP's collected ReLU-input boxes).

A linear bound is held as ``(A, const)`` with ``A: [B, S, *shape]`` (``S`` specification rows per
sample) and ``const: [B, S]``, meaning ``A . h + const`` where ``h: [B, *shape]`` is the value at
that point of the network. Only LOWER bounds are propagated; an upper bound of ``a . z`` is minus
the lower bound of ``(-a) . z``, so callers that need both stack ``[A; -A]`` along ``S``.

Back through an affine op: ``A . (W h + c) = (A W) . h + A . c``; convolutions go back with
``conv_transpose2d`` (with the ``output_padding`` that restores the input size).
Back through a ReLU with input bounds ``l <= z <= u``: stable-active neurons pass ``A`` through,
stable-inactive ones drop it; for an unstable one (``l < 0 < u``) a positive coefficient takes the
lower line ``alpha z`` (``0 <= alpha <= 1``) and a negative one the upper (chord) line
``u (z - l) / (u - l)``. At the input, ``A . x`` is minimised over the box ``(mu, r)``:
``A . mu - |A| . r``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from adcert.bounds.ibp import conv_padding
from adcert.bounds.plan import (
    AffineStep, AvgPoolStep, BatchNormStep, FlattenStep, LayerPlan, NormalizeStep, ReluStep,
    ReshapeStep, ResidualStep,
)
from adcert.ops.bn_fold import EXACT_FOLD_ROUNDINGS, exact_shift_magnitude, fold_batch_norm

Tensor = torch.Tensor


@dataclass(eq=False)
class AffineOp:
    """``z = W h + c`` on one sample's tensor ``h: [*in_shape]`` -> ``z: [*out_shape]``.

    kind ``linear``: ``weight [out, in]``, ``bias [out]``; ``conv``: a ``Conv2d`` weight and bias
    plus ``stride/padding/dilation/groups``; ``channel``: ``weight`` and ``bias`` are per-channel
    ``[C]`` (dimension 1 of ``[B, C, *]``); ``reshape``: no parameters.
    ``bias_mag``: ``[C]``/``[out]`` upper bounds of the magnitudes of the terms summed into
    ``bias`` (used by the sound mode's error bounds), ``None`` = ``|bias|``.
    ``dense``: whether one output mixes several inputs (linear/conv), i.e. IBP is not exact."""
    kind: str
    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    in_shape: Tuple[int, ...] = ()
    out_shape: Tuple[int, ...] = ()
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)
    groups: int = 1
    bias_mag: Optional[Tensor] = None
    coef_rel_err: int = 0  # roundings in computing weight/bias from the model (sound mode)
    src: int = -1  # index of the op whose output is this op's input (-1: the network input)
    pool: Optional[nn.Module] = None  # kind ``pool``: the AvgPool2d/AdaptiveAvgPool2d module

    @property
    def dense(self) -> bool:
        return self.kind in ("linear", "conv", "pool")

    @property
    def dot_length(self) -> int:
        """Terms in one entry of ``A W`` (the k of ``gamma_k``)."""
        if self.kind == "linear":
            return int(self.weight.shape[0])
        if self.kind == "conv":
            w = self.weight
            return int(w.shape[0] // self.groups * w.shape[2] * w.shape[3])
        return 1

    def _chan(self, t: Tensor, ndim: int) -> Tensor:
        return t.reshape((1, -1) + (1,) * (ndim - 2))

    def forward(self, h: Tensor, weight: Optional[Tensor] = None, bias: bool = True) -> Tensor:
        """``W h (+ c)`` for a batch ``h: [N, *in_shape]`` (``weight`` overrides ``W``, e.g.
        with ``|W|``)."""
        w = self.weight if weight is None else weight
        b = self.bias if bias else None
        if self.kind == "linear":
            return F.linear(h, w, b)
        if self.kind == "conv":
            return F.conv2d(h, w, b, self.stride, self.padding, self.dilation, self.groups)
        if self.kind == "channel":
            z = h * self._chan(w, h.dim())
            return z + self._chan(b, h.dim()) if b is not None else z
        if self.kind == "pool":
            return self.pool(h)
        return h.reshape((h.shape[0],) + self.out_shape)

    def backward(self, A: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        """``A W``: ``A: [B, S, *out_shape]`` -> ``[B, S, *in_shape]``."""
        w = self.weight if weight is None else weight
        lead = A.shape[:2]
        if self.kind == "linear":
            return A.matmul(w)
        if self.kind == "conv":
            flat = A.reshape((-1,) + self.out_shape)
            out_hw = []
            for i in range(2):
                k = w.shape[2 + i]
                full = ((self.out_shape[1 + i] - 1) * self.stride[i] - 2 * self.padding[i]
                        + self.dilation[i] * (k - 1) + 1)
                out_hw.append(self.in_shape[1 + i] - full)
            back = F.conv_transpose2d(flat, w, None, self.stride, self.padding,
                                      tuple(out_hw), self.groups, self.dilation)
            return back.reshape(lead + self.in_shape)
        if self.kind == "channel":
            return A * w.reshape((1, 1, -1) + (1,) * (A.dim() - 3))
        if self.kind == "pool":
            return self._pool_adjoint(A)
        return A.reshape(lead + self.in_shape)

    def _pool_adjoint(self, A: Tensor) -> Tensor:
        """``A P`` for the (linear) pooling ``P``: the vector-Jacobian product of the pooling
        with ``A`` (exact: the adjoint of a linear map; differentiable in ``A``)."""
        lead = A.shape[:2]
        flat = A.reshape((-1,) + self.out_shape)
        with torch.enable_grad():
            dummy = torch.zeros((flat.shape[0],) + self.in_shape, dtype=A.dtype,
                                device=A.device, requires_grad=True)
            (back,) = torch.autograd.grad(self.pool(dummy), dummy, grad_outputs=flat,
                                          create_graph=A.requires_grad)
        return back.reshape(lead + self.in_shape)

    def bias_term(self, A: Tensor, magnitude: bool = False) -> Optional[Tensor]:
        """``A . c`` summed over the op's output: ``[B, S]`` (``None`` without a bias); with
        ``magnitude``, ``A . bias_mag`` (callers pass ``|A|``)."""
        c = self.bias
        if c is None:
            return None
        if magnitude:
            c = self.bias_mag if self.bias_mag is not None else c.abs()
        if self.kind == "linear":
            return A.matmul(c)
        if self.kind in ("conv", "channel"):
            per_channel = A.sum(dim=tuple(range(3, A.dim()))) if A.dim() > 3 else A
            return per_channel.matmul(c)
        return None


@dataclass(eq=False)
class ReluOp:
    """A ReLU; ``index``: its position among the network's ReLUs; ``shape``: one sample's."""
    index: int
    shape: Tuple[int, ...] = ()
    src: int = -1


@dataclass(eq=False)
class AddOp:
    """A residual join: the sum of the outputs of the ops ``srcs`` (``-1``: the network
    input; an index may repeat), all of one-sample shape ``shape``. Back-substitution passes
    ``A`` unchanged to every source."""
    srcs: Tuple[int, ...]
    shape: Tuple[int, ...] = ()

    @property
    def in_shape(self) -> Tuple[int, ...]:
        return self.shape

    @property
    def out_shape(self) -> Tuple[int, ...]:
        return self.shape

    dense = True  # IBP is not exact through a sum of correlated branches


Op = Union[AffineOp, ReluOp, AddOp]


@dataclass(eq=False)
class Lowered:
    """The network as primitive ops, plus ``relu_at[k]``: the op index of ReLU ``k``.

    The ops form a DAG in topological order: every op reads the output of ``op.src`` (an
    :class:`AddOp` of ``op.srcs``; ``-1`` is the network input); the network output is the
    last op's. A plan without residual steps lowers to a chain (``src = index - 1``)."""
    ops: List[Op]
    relu_at: List[int] = field(default_factory=list)
    in_shape: Tuple[int, ...] = ()

    @property
    def out_shape(self) -> Tuple[int, ...]:
        for op in reversed(self.ops):
            return op.out_shape if isinstance(op, AffineOp) else op.shape
        return self.in_shape

    @property
    def is_chain(self) -> bool:
        """Whether every op reads the previous op's output (no residual join)."""
        return all(not isinstance(o, AddOp) and o.src == i - 1 for i, o in enumerate(self.ops))

    def relu_input_end(self, k: int) -> int:
        """The ``end`` (see :func:`backward_lower`) of ReLU ``k``'s input."""
        return self.ops[self.relu_at[k]].src + 1


def _unsupported(step, method: str) -> NotImplementedError:
    return NotImplementedError(f"model: the plan step {type(step).__name__} is not supported by "
                               f"method {method!r} (supported: Normalize, Conv2d/Linear "
                               f"(+BatchNorm)(+ReLU), BatchNorm, ReLU, Flatten, AvgPool, "
                               f"Reshape, Residual)")


def _detach(t: Optional[Tensor], detach: bool) -> Optional[Tensor]:
    return t.detach() if (detach and t is not None) else t


def lower_plan(plan: LayerPlan, stats, in_shape: Tuple[int, ...], dtype, device, method: str,
               fold_bn: bool = True, detach: bool = False) -> Lowered:
    """Lower ``plan`` to primitive ops for inputs of one-sample shape ``in_shape``.

    ``stats``: resolved batch-norm statistics (as for IBP); ``detach``: cut the parameters out of
    the autograd graph (certification). Raises ``NotImplementedError`` naming an unknown step
    type and ``method``."""
    ops: List[Op] = []
    relu_at: List[int] = []
    shape = tuple(in_shape)
    probe = torch.zeros((1,) + shape, dtype=dtype, device=device)
    cur = -1  # the op whose output the next op reads

    def append(op) -> None:
        nonlocal cur
        ops.append(op)
        cur = len(ops) - 1

    def add_affine(op: AffineOp) -> None:
        nonlocal shape, probe
        op.in_shape = shape
        op.src = cur
        with torch.no_grad():
            probe = op.forward(probe, bias=False)
        op.out_shape = tuple(probe.shape[1:])
        shape = op.out_shape
        append(op)

    def add_relu() -> None:
        relu_at.append(len(ops))
        append(ReluOp(len(relu_at) - 1, shape, src=cur))

    def bn_op(bn) -> AffineOp:
        # exact-mode coefficients; the sound mode (fold_bn=False) charges their rounding as
        # EXACT_FOLD_ROUNDINGS (see adcert.ops.bn_fold)
        mean, var = stats[bn]
        fold = fold_batch_norm(mean, var, bn.weight, bn.bias, bn.eps)
        mag = exact_shift_magnitude(mean, fold.scale, bn.bias)
        return AffineOp("channel", _detach(fold.scale, detach), _detach(fold.shift, detach),
                        bias_mag=_detach(mag, detach), coef_rel_err=EXACT_FOLD_ROUNDINGS)

    def add_residual(step: ResidualStep) -> None:
        nonlocal shape, probe, cur
        fork = (cur, shape, probe)
        ends = []
        for branch in step.branches:
            cur, shape, probe = fork
            lower(branch)
            ends.append((cur, shape, probe))
        if not ends:
            raise ValueError("model: a residual join with no branches")
        shapes = {e[1] for e in ends}
        if len(shapes) != 1:
            raise ValueError(f"model: the branches of a residual join have different shapes "
                             f"{sorted(shapes)}")
        shape, probe = ends[0][1], ends[0][2]
        append(AddOp(tuple(e[0] for e in ends), shape))
        if step.relu:
            add_relu()

    def lower(steps) -> None:
        for step in steps:
            lower_step(step)

    def lower_step(step) -> None:
        if isinstance(step, NormalizeStep):
            m = step.module
            std = m.std.to(dtype=dtype, device=device)
            mean = m.mean.to(dtype=dtype, device=device)
            C = shape[0] if len(shape) >= 1 else 1
            scale, shift = (1.0 / std).expand(C), (-mean / std).expand(C)
            add_affine(AffineOp("channel", scale.detach(), shift.detach(),
                                bias_mag=shift.abs().detach(), coef_rel_err=4))
        elif isinstance(step, AffineStep):
            layer = step.layer
            w = _detach(layer.weight, detach)
            b = _detach(layer.bias, detach)
            if isinstance(layer, nn.Linear):
                if len(shape) != 1:
                    raise ValueError(f"x: {layer} expects a [B, {layer.in_features}] input, got "
                                     f"one-sample shape {shape} (add an nn.Flatten before it)")
                op = AffineOp("linear", w, b)
            else:
                op = AffineOp("conv", w, b, stride=tuple(layer.stride),
                              padding=conv_padding(layer), dilation=tuple(layer.dilation),
                              groups=layer.groups)
            if step.bn is not None and fold_bn:
                bn = step.bn
                mean, var = stats[bn]
                fold = fold_batch_norm(mean, var, bn.weight, bn.bias, bn.eps, layer_weight=w,
                                       layer_bias=b)
                op.weight, op.bias = _detach(fold.weight, detach), _detach(fold.shift, detach)
                add_affine(op)
            else:
                add_affine(op)
                if step.bn is not None:
                    add_affine(bn_op(step.bn))
            if step.relu:
                add_relu()
        elif isinstance(step, BatchNormStep):
            add_affine(bn_op(step.bn))
            if step.relu:
                add_relu()
        elif isinstance(step, ReluStep):
            add_relu()
        elif isinstance(step, ResidualStep):
            add_residual(step)
        elif isinstance(step, AvgPoolStep):
            add_affine(AffineOp("pool", pool=step.module))
        elif isinstance(step, ReshapeStep):
            add_affine(AffineOp("reshape", out_shape=tuple(step.apply(probe).shape[1:])))
        elif isinstance(step, FlattenStep):
            start = step.module.start_dim % (len(shape) + 1)
            if start == 0:
                raise NotImplementedError("model: an nn.Flatten that merges the batch dimension "
                                          "(start_dim=0) is not supported")
            add_affine(AffineOp("reshape", out_shape=tuple(step.module(probe).shape[1:])))
        else:
            raise _unsupported(step, method)

    lower(plan.steps)
    return Lowered(ops, relu_at, tuple(in_shape))


# --------------------------------------------------------------------------- ReLU relaxation


def relu_lines(lower: Tensor, upper: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Masks and the upper (chord) line of ReLU on ``[lower, upper]`` (any shape).

    Returns ``(active, unstable, up_slope, up_icpt)``: ``active`` = ``lower >= 0``,
    ``unstable`` = ``lower < 0 < upper``; for unstable neurons the chord
    ``up_slope * z + up_icpt`` with ``up_slope = u / (u - l)``, ``up_icpt = -l u / (u - l)``;
    for stable ones ``up_slope`` is 1 (active) or 0 and ``up_icpt`` 0."""
    active = lower >= 0
    unstable = (lower < 0) & (upper > 0)
    denom = torch.where(unstable, upper - lower, torch.ones_like(upper))
    slope = torch.where(unstable, upper / denom, active.to(upper.dtype))
    icpt = torch.where(unstable, -lower * slope, torch.zeros_like(upper))
    return active, unstable, slope, icpt


def adaptive_alpha(lower: Tensor, upper: Tensor) -> Tensor:
    """CROWN's adaptive lower slope: 1 where ``u >= -l`` else 0 (same shape as the bounds)."""
    return (upper >= -lower).to(upper.dtype)


def relu_backward(A: Tensor, lower: Tensor, upper: Tensor, alpha: Optional[Tensor] = None
                  ) -> Tuple[Tensor, Tensor, Tensor]:
    """Lower-bound back-substitution through a ReLU.

    ``A: [B, S, *shape]``; ``lower, upper: [B, *shape]`` bounds of the ReLU input; ``alpha``:
    lower slopes for unstable neurons, broadcastable to ``A`` (default: adaptive).
    Returns ``(A_new, const, lower_slope)``: ``A . relu(z) >= A_new . z + const`` for every
    ``z`` in the box; ``const: [B, S]``; ``lower_slope`` as used (for the sound mode)."""
    active, unstable, up_slope, up_icpt = relu_lines(lower, upper)
    if alpha is None:
        alpha = adaptive_alpha(lower, upper).unsqueeze(1)
    lo_slope = torch.where(unstable.unsqueeze(1), alpha, active.unsqueeze(1).to(A.dtype))
    pos, neg = A.clamp(min=0), A.clamp(max=0)
    A_new = pos * lo_slope + neg * up_slope.unsqueeze(1)
    const = (neg * up_icpt.unsqueeze(1)).flatten(2).sum(-1)
    return A_new, const, lo_slope


def concretize_lower(A: Tensor, mu: Tensor, r: Tensor) -> Tensor:
    """``min over the box (mu, r) of A . x``: ``A: [B, S, *in]``, ``mu, r: [B, *in]`` ->
    ``[B, S]``."""
    Af = A.flatten(2)
    return (torch.einsum("bsk,bk->bs", Af, mu.flatten(1))
            - torch.einsum("bsk,bk->bs", Af.abs(), r.flatten(1)))


def _accumulate(pending: dict, j: int, A: Tensor) -> None:
    """Add coefficients ``A`` on the output of op ``j`` to ``pending``."""
    pending[j] = A if j not in pending else pending[j] + A


def backward_lower(low: Lowered, end: int, A: Tensor, mu: Tensor, r: Tensor,
                   relu_box: Sequence[Optional[Tuple[Tensor, Tensor]]],
                   alphas: Optional[dict] = None, betas: Optional[dict] = None,
                   relu_coefs: Optional[dict] = None) -> Tensor:
    """Lower bounds ``[B, S]`` of ``A . h_end`` over the input box, where ``h_end`` is the output
    of ``low.ops[end - 1]`` (``end = 0``: the input) and ``A: [B, S, *shape of h_end]``.

    ``relu_box[k]``: ``(lower, upper)`` of ReLU ``k``'s input (``[B, *shape]``); ``alphas``:
    optional ``{k: [B, S, *shape]}`` lower slopes (default: adaptive). ``betas``: optional
    split multipliers ``{k: [B, S, *shape]}`` holding ``beta_j s_j`` (``beta_j >= 0``, ``s_j``
    the split sign of ReLU ``k``'s neuron ``j``, 0 where not split, see
    :func:`adcert.bounds.alpha_crown.signed_betas`): ``-beta_j s_j`` is added to the coefficient
    of the ReLU's input ``z_j``, so the result bounds ``A . h_end - sum_j beta_j s_j z_j``, which
    is <= ``A . h_end`` wherever every split holds (``s_j z_j >= 0``; beta-CROWN).
    ``relu_coefs``: a dict that receives ``{k: [B, S, *shape]}``, the coefficients reaching
    every ReLU's OUTPUT (for branching heuristics). The ops are visited in
    reverse topological order; at a residual join (:class:`AddOp`) ``A`` goes unchanged into
    every branch and the coefficients meeting at a fork are summed. Exact in real arithmetic;
    :mod:`adcert.bounds.crown_sound` has the floating-point-rigorous twin."""
    const = A.new_zeros(A.shape[:2])
    pending = {end - 1: A}  # op index -> coefficients on that op's output
    for i in range(end - 1, -1, -1):
        A = pending.pop(i, None)
        if A is None:  # an op the bounded value does not depend on
            continue
        op = low.ops[i]
        if isinstance(op, AddOp):  # residual join: A goes unchanged into every branch
            for j in op.srcs:
                _accumulate(pending, j, A)
            continue
        if isinstance(op, ReluOp):
            lo, up = relu_box[op.index]
            if relu_coefs is not None:
                relu_coefs[op.index] = A
            alpha = None if alphas is None else alphas.get(op.index)
            A_new, c, _ = relu_backward(A, lo, up, alpha)
            beta = None if betas is None else betas.get(op.index)
            if beta is not None:
                A_new = A_new - beta
        else:
            A_new = op.backward(A)
            c = op.bias_term(A)
        if c is not None:
            const = const + c
        _accumulate(pending, op.src, A_new)
    A = pending.pop(-1, None)
    if A is None:  # the bounded value does not depend on the input
        return const
    return concretize_lower(A, mu, r) + const
