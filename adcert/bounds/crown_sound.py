"""``sound=True`` for the CROWN family: back-substitution that is rigorous in floating point.

The bound returned contains the bound of the REAL-arithmetic network (the model's parameters
taken as exact numbers; batch-norm and Normalize coefficients, which the model itself computes
with rounding, are given an interval of relative width ``gamma_c``; for batch norm ``c`` is
:data:`adcert.ops.bn_fold.EXACT_FOLD_ROUNDINGS`) over the real input box.

This module holds the rigorous pieces (:func:`sound_op_boxes`, :func:`sound_backward`,
:func:`sound_concretize`, :func:`widened_input`); :func:`adcert.bounds.crown.run_sound` runs them
in the CROWN family's driver sequence.

Scheme. ``u`` is the unit roundoff of the dtype, ``gamma_k = k u / (1 - k u)``; every error term
below is computed in floating point, doubled (which covers its own rounding, as long as
``gamma < 1/2``) and increased by ``k * tiny`` (``tiny`` = smallest normal number: underflow);
every update of the running constant is rounded down with ``nextafter(., -inf)``.

* Boxes. A sound IBP pass (lower/upper form) gives a box ``[l_h, u_h]`` at the input of every
  primitive op: ``W+ l + W- u + b`` minus ``gamma_{k+2+c} (|W| m + |b|)``, ``m = max(|l|, |u|)``
  (``c``: roundings in the op's coefficients); ReLU and reshapes are exact. The input box is
  ``(mu, r)`` widened by ``4u (|mu| + r)`` (the rounding of the centre-radius form).
* Affine op ``z = W h + b`` (``k``-term dot products): the computed ``A' = fl(A W)`` differs from
  the exact product by ``|E| <= gamma_{k+c} |A| |W|``, and ``h`` lies in its box, so
  ``A . z >= A' . h + fl(A . b) - gamma_{k+c} (|A||W|) . m_h - gamma_{n+c} |A| . |b|``
  (``n`` = terms in ``A . b``; ``|b|`` is an upper bound of the magnitudes summed into ``b``).
* ReLU: the chord slope and intercept are rounded UP (``(1 + 4u)`` factors: any larger slope
  through ``(l, 0)`` and any larger intercept is still an upper line on ``[l, u]``); lower slopes
  are in ``[0, 1]``, exactly valid. One rounding per entry of ``A'``:
  ``A . relu(z) >= A' . z + fl(c) - gamma_2 |A'| . m_z - gamma_{n+1} |c terms|``.
* Residual joins (traced graphs). IBP: the box of a join is the sum of its sources' boxes, one
  addition at a time, each partial sum rounded outward (``nextafter``). Back-substitution: ``A``
  passes unchanged into every branch (exact); where coefficients meet at a fork, each rounded
  addition ``S = fl(A1 + A2)`` differs from the exact sum by ``|E| <= gamma_1 |S|``, so
  ``A1 . h + A2 . h >= S . h - gamma_1 |S| . m_h`` (``m_h`` from the fork's box).
* Average pooling (``AvgPool2d``, ``AdaptiveAvgPool2d``: weights ``1/count >= 0``, ``k`` inputs
  per output at most). IBP: ``[P l, P u]`` minus/plus ``gamma_{k+2} P m`` (a ``k``-term sum and
  the division, or a rounded reciprocal and a product). Back-substitution: ``A' = fl(A P)`` (the
  adjoint, ``t``-term sums, ``t`` = windows covering one input) with ``|E| <= gamma_{t+2} |A| P``:
  ``A . P h >= A' . h - gamma_{t+2} (|A| P) . m_h``.
* Concretisation over the input box: ``fl(A+ . L + A- . U) - gamma_{n+1} |A| . max(|L|, |U|)``.

TF32 (CUDA matmul and cuDNN), reduced-precision fp32 matmul and oneDNN (mkldnn, which may use
Winograd convolutions) are disabled while a sound bound is computed; the remaining kernels sum
products in some order, which ``gamma_k`` covers. Only float32 and float64 are accepted.
alpha-CROWN optimises its slopes (and, with ``beta``, its split multipliers) without the error
terms, then evaluates the best ones soundly.
The sound result is detached from the parameters for every method (certification only).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch

from torch import nn

from adcert.bounds.sound import down, gamma, unit_roundoff
from adcert.bounds.linear_relax import AddOp, AffineOp, Lowered, ReluOp, relu_lines

Tensor = torch.Tensor
Box = Tuple[Tensor, Tensor]


def _bias_map(op: AffineOp, t: Tensor, ndim: int) -> Tensor:
    """A per-output bias vector reshaped to broadcast over ``[N, *out_shape]``."""
    if op.kind == "linear":
        return t
    return t.reshape((1, -1) + (1,) * (ndim - 2))


def _bias_mag(op: AffineOp) -> Optional[Tensor]:
    if op.bias is None:
        return None
    return op.bias_mag if op.bias_mag is not None else op.bias.abs()


def _up_add(a: Tensor, b: Tensor) -> Tensor:
    """An upper bound of the exact ``a + b`` (one rounded addition, then one step up)."""
    return -down(-(a + b))


def _pair(v) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def pool_terms(op: AffineOp) -> Tuple[int, int]:
    """``(k, t)`` for a ``pool`` op: ``k`` bounds the inputs averaged into one output, ``t`` the
    outputs one input is averaged into (the terms of one entry of ``A P``)."""
    mod = op.pool
    out_hw = math.prod(op.out_shape[1:])
    if isinstance(mod, nn.AvgPool2d):
        kh, kw = _pair(mod.kernel_size)
        sh, sw = _pair(mod.stride if mod.stride else mod.kernel_size)
        t = min(out_hw, -(-kh // sh) * -(-kw // sw))
        return kh * kw, max(1, t)
    if isinstance(mod, nn.AdaptiveAvgPool2d):
        return math.prod(op.in_shape[1:]), max(1, out_hw)
    raise NotImplementedError(f"sound: pooling module {type(mod).__name__} is not supported with "
                              "sound=True (supported: AvgPool2d, AdaptiveAvgPool2d)")


def sound_op_boxes(low: Lowered, L: Tensor, U: Tensor) -> Dict[int, Box]:
    """Rigorous boxes ``{j: (l, u)}`` of the output of every op ``j`` of ``low`` (``-1``: the
    input box ``(L, U)``); op ``i`` reads box ``op.src`` (an :class:`AddOp` sums ``op.srcs``)."""
    outs: Dict[int, Box] = {-1: (L, U)}
    tiny = torch.finfo(L.dtype).tiny
    for i, op in enumerate(low.ops):
        if isinstance(op, AddOp):
            L, U = outs[op.srcs[0]]
            for j in op.srcs[1:]:
                L, U = down(L + outs[j][0]), _up_add(U, outs[j][1])
            outs[i] = (L, U)
            continue
        L, U = outs[op.src]
        if isinstance(op, ReluOp):
            L, U = L.clamp(min=0), U.clamp(min=0)
        elif op.kind == "reshape":
            L, U = op.forward(L), op.forward(U)
        elif op.kind == "pool":  # non-negative weights: monotone
            k, _ = pool_terms(op)
            lo, hi = op.forward(L), op.forward(U)
            size = op.forward(torch.maximum(L.abs(), U.abs()))
            err = 2 * gamma(k + 2, L.dtype) * size + (k + 2) * tiny
            L = down(down(lo) - err)
            U = -down(down(-hi) - err)
        else:
            w = op.weight
            wp, wn = w.clamp(min=0), w.clamp(max=0)
            lo = op.forward(L, wp, bias=False) + op.forward(U, wn, bias=False)
            hi = op.forward(U, wp, bias=False) + op.forward(L, wn, bias=False)
            m = torch.maximum(L.abs(), U.abs())
            k = op.dot_length + 2 + op.coef_rel_err
            size = op.forward(m, w.abs(), bias=False)
            if op.bias is not None:
                b = _bias_map(op, op.bias, lo.dim())
                lo, hi = lo + b, hi + b
                size = size + _bias_map(op, _bias_mag(op), lo.dim())
            err = 2 * gamma(k, L.dtype) * size + k * tiny
            L = down(down(lo) - err)
            U = -down(down(-hi) - err)
        outs[i] = (L, U)
    return outs


def _abs_sum(t: Tensor) -> Tensor:
    return t.flatten(2).sum(-1)


def sound_concretize(A: Tensor, L: Tensor, U: Tensor) -> Tensor:
    """A rigorous lower bound ``[B, S]`` of ``A . x`` over ``L <= x <= U``."""
    Af = A.flatten(2)
    val = (torch.einsum("bsk,bk->bs", Af.clamp(min=0), L.flatten(1))
           + torch.einsum("bsk,bk->bs", Af.clamp(max=0), U.flatten(1)))
    m = torch.maximum(L.abs(), U.abs()).flatten(1)
    n = Af.shape[-1]
    err = 2 * gamma(2 * n + 1, A.dtype) * torch.einsum("bsk,bk->bs", Af.abs(), m)
    return down(down(val) - (err + n * torch.finfo(A.dtype).tiny))


def _mag(box: Box) -> Tensor:
    """``max(|l|, |u|)`` with a spec dimension: ``[B, 1, *shape]``."""
    return torch.maximum(box[0].abs(), box[1].abs()).unsqueeze(1)


def sound_backward(low: Lowered, end: int, A: Tensor, mu, r, relu_box: List[Box],
                   alphas=None, betas=None, *, out_boxes: Dict[int, Box]) -> Tensor:
    """The rigorous twin of :func:`adcert.bounds.linear_relax.backward_lower` (same arguments;
    ``out_boxes`` from :func:`sound_op_boxes`; the input box is ``out_boxes[-1]``, ``mu, r``
    unused).

    Coefficients meeting at a fork are summed with one rounded addition each, charged
    ``gamma_1 |sum| . m`` (``m`` from the fork's box). The split multipliers ``betas`` (signed,
    ``beta_j s_j``; the exact term of the bounded Lagrangian) are subtracted from a ReLU's input
    coefficients with one rounded subtraction per entry, ``T = fl(A' - beta s)``, charged the
    same way: ``gamma_1 |T| . m_z`` (``m_z`` from the ReLU's input box)."""
    dtype = A.dtype
    tiny = torch.finfo(dtype).tiny
    u_r = unit_roundoff(dtype)
    const = A.new_zeros(A.shape[:2])
    pending = {end - 1: A}

    def accumulate(j: int, A_new: Tensor) -> None:
        nonlocal const
        if j not in pending:
            pending[j] = A_new
            return
        total = pending[j] + A_new
        n = math.prod(total.shape[2:])
        err = 2 * gamma(1, dtype) * _abs_sum(total.abs() * _mag(out_boxes[j])) + 2 * n * tiny
        const = down(const - err)
        pending[j] = total

    for i in range(end - 1, -1, -1):
        A = pending.pop(i, None)
        if A is None:  # an op the bounded value does not depend on
            continue
        op = low.ops[i]
        if isinstance(op, AddOp):  # exact: A goes unchanged into every branch
            for j in op.srcs:
                accumulate(j, A)
            continue
        if isinstance(op, ReluOp):
            lo, up = relu_box[op.index]
            m_h = torch.maximum(lo.abs(), up.abs()).unsqueeze(1)
            active, unstable, slope, icpt = relu_lines(lo, up)
            slope = torch.where(unstable, slope * (1 + 4 * u_r), slope)
            icpt = torch.where(unstable, (-lo * slope) * (1 + 4 * u_r), icpt)
            alpha = None if alphas is None else alphas.get(op.index)
            if alpha is None:
                alpha = (up >= -lo).to(dtype).unsqueeze(1)
            lo_slope = torch.where(unstable.unsqueeze(1), alpha.clamp(0, 1),
                                   active.unsqueeze(1).to(dtype))
            neg = A.clamp(max=0)
            A_new = A.clamp(min=0) * lo_slope + neg * slope.unsqueeze(1)
            terms = neg * icpt.unsqueeze(1)
            n = math.prod(op.shape)
            c = _abs_sum(terms)
            err = 2 * (gamma(2, dtype) * _abs_sum(A_new.abs() * m_h)
                       + gamma(n + 1, dtype) * _abs_sum(terms.abs())) + 2 * n * tiny
            beta = None if betas is None else betas.get(op.index)
            if beta is not None:  # one rounding per entry: |E| <= gamma_1 |T|
                A_new = A_new - beta
                err = err + 2 * gamma(1, dtype) * _abs_sum(A_new.abs() * m_h) + 2 * n * tiny
        elif op.kind == "reshape":
            A_new, c, err = op.backward(A), None, None
        elif op.kind == "pool":  # A P: t-term sums of A * (1 / count), P >= 0
            _, t = pool_terms(op)
            A_new, c = op.backward(A), None
            m_h = _mag(out_boxes[op.src])
            err = (2 * gamma(t + 2, dtype) * _abs_sum(op.backward(A.abs()) * m_h)
                   + 2 * (math.prod(op.in_shape) + math.prod(op.out_shape)) * (t + 2) * tiny)
        else:
            A_new = op.backward(A)
            m_h = _mag(out_boxes[op.src])
            absA = A.abs()
            k = op.dot_length + op.coef_rel_err + 1
            err = 2 * gamma(k, dtype) * _abs_sum(op.backward(absA, op.weight.abs()) * m_h)
            c = op.bias_term(A)
            n_in = math.prod(op.in_shape)
            if c is not None:
                n = math.prod(op.out_shape) + op.coef_rel_err + 1
                err = err + 2 * gamma(n, dtype) * op.bias_term(absA, magnitude=True)
            err = err + 2 * (n_in + math.prod(op.out_shape)) * tiny
        if c is not None:
            const = down(const + c)
        if err is not None:
            const = down(const - err)
        accumulate(op.src, A_new)
    A = pending.pop(-1, None)
    if A is None:  # the bounded value does not depend on the input
        return const
    L, U = out_boxes[-1]
    return down(sound_concretize(A, L, U) + const)


def widened_input(mu: Tensor, r: Tensor) -> Box:
    """End points containing the exact input box that ``(mu, r)`` was rounded from (the
    centre-radius form's rounding, ``4u (|mu| + r)``)."""
    u_r = unit_roundoff(mu.dtype)
    slack = 4 * u_r * (mu.abs() + r) + torch.finfo(mu.dtype).tiny
    L = down(down(mu - r) - slack)
    U = -down(down(-(mu + r)) - slack)
    return L, U
