"""The one backward walk of the CROWN family (CROWN, CROWN-IBP, alpha/beta-CROWN, loss fusion)
and of their sound twins.

A linear bound is held as ``(A, const)`` with ``A: [B, S, *shape]`` (``S`` specification rows per
sample) and ``const: [B, S]``, meaning ``A . h + const`` where ``h: [B, *shape]`` is the value at
that point of the network. Only LOWER bounds are propagated; an upper bound of ``a . z`` is minus
the lower bound of ``(-a) . z``, so callers that need both stack ``[A; -A]`` along ``S``.

The pieces of a :class:`~adcert.bounds.layers.base.Lowered` network are visited in reverse
topological order; each piece's :meth:`~adcert.bounds.layers.base.Piece.backward` gives the
coefficients on its sources and a constant. Coefficients meeting at a fork are summed. At the
input, ``A . x`` is minimised over the box ``(mu, r)``: ``A . mu - |A| . r``.

Soundness is a hook. ``hook=None`` assumes exact arithmetic. A :class:`SoundHook` (see
:mod:`adcert.bounds.crown_sound` for the scheme) asks every piece for the rounding error of its
step (:meth:`~adcert.bounds.layers.base.Piece.rounding_error`), charges the fork sums, rounds
every update of the constant down and concretises rigorously over its input box.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch

from adcert.bounds.layers.base import Box, Lowered, Walk
from adcert.bounds.patches import Patches
from adcert.ops._rounding import down, gamma, up

Tensor = torch.Tensor


def concretize_lower(A: Tensor, mu: Tensor, r: Tensor) -> Tensor:
    """``min over the box (mu, r) of A . x``: ``A: [B, S, *in]``, ``mu, r: [B, *in]`` ->
    ``[B, S]``."""
    Af = A.flatten(2)
    return (torch.einsum("bsk,bk->bs", Af, mu.flatten(1))
            - torch.einsum("bsk,bk->bs", Af.abs(), r.flatten(1)))


def concretize_patches(A: Patches, mu: Tensor, r: Tensor) -> Tensor:
    """:func:`concretize_lower` for receptive-field coefficients."""
    mu_w, r_w = A.gather(torch.cat([mu, r], 1)).chunk(2, dim=2)
    return (A.data * mu_w - A.data.abs() * r_w).flatten(2).sum(-1)


def sound_concretize(A, L: Tensor, U: Tensor) -> Tensor:
    """A rigorous lower bound ``[B, S]`` of ``A . x`` over ``L <= x <= U``:
    ``fl(A+ . L + A- . U) - gamma_{2n+1} |A| . max(|L|, |U|)`` (doubled, plus underflow);
    ``A`` dense or :class:`~adcert.bounds.patches.Patches` (``n`` = entries per row)."""
    if isinstance(A, Patches):
        d = A.data
        L_w, U_w = A.gather(torch.cat([L, U], 1)).chunk(2, dim=2)
        val = (d.clamp(min=0) * L_w + d.clamp(max=0) * U_w).flatten(2).sum(-1)
        m = torch.maximum(L_w.abs(), U_w.abs())
        n = math.prod(d.shape[2:])
        err = 2 * gamma(2 * n + 1, d.dtype) * (d.abs() * m).flatten(2).sum(-1)
        return down(down(val) - (err + n * torch.finfo(d.dtype).tiny))
    Af = A.flatten(2)
    val = (torch.einsum("bsk,bk->bs", Af.clamp(min=0), L.flatten(1))
           + torch.einsum("bsk,bk->bs", Af.clamp(max=0), U.flatten(1)))
    m = torch.maximum(L.abs(), U.abs()).flatten(1)
    n = Af.shape[-1]
    err = 2 * gamma(2 * n + 1, A.dtype) * torch.einsum("bsk,bk->bs", Af.abs(), m)
    return down(down(val) - (err + n * torch.finfo(A.dtype).tiny))


class SoundHook:
    """The soundness hook of :func:`backward_lower`. ``out_boxes``: rigorous boxes ``{j: (L, U)}``
    of every piece's output (``-1``: the input), from
    :func:`adcert.bounds.crown_sound.sound_op_boxes`."""

    def __init__(self, out_boxes: Dict[int, Box]):
        self.out_boxes = out_boxes

    def magnitude(self, j: int) -> Tensor:
        lo, up = self.out_boxes[j]
        return torch.maximum(lo.abs(), up.abs()).unsqueeze(1)

    def fork_error(self, total: Tensor, j: int) -> Tensor:
        """One rounded addition per entry of ``total = fl(A1 + A2)``: ``gamma_1 |S| . m_h``."""
        n = math.prod(total.shape[2:])
        return (2 * gamma(1, total.dtype) * (total.abs() * self.magnitude(j)).flatten(2).sum(-1)
                + 2 * n * torch.finfo(total.dtype).tiny)

    def concretize(self, A, j: int = -1) -> Tensor:
        """A rigorous lower bound of ``A . h_j`` over piece ``j``'s box (``-1``: the input)."""
        return sound_concretize(A, *self.out_boxes[j])


def backward_lower(low: Lowered, end: int, A: Tensor, mu: Tensor, r: Tensor,
                   relu_box: Sequence[Optional[Tuple[Tensor, Tensor]]],
                   alphas: Optional[dict] = None, betas: Optional[dict] = None,
                   relu_coefs: Optional[dict] = None, hook: Optional[SoundHook] = None,
                   stop: int = -1) -> Tensor:
    """Lower bounds ``[B, S]`` of ``A . h_end`` over the input box, where ``h_end`` is the output
    of ``low.ops[end - 1]`` (``end = 0``: the input) and ``A: [B, S, *shape of h_end]``.

    ``relu_box[k]``: ``(lower, upper)`` of activation ``k``'s input (``[B, *shape]``);
    ``alphas``: optional ``{k: [B, S, *shape]}`` relaxation parameters (ReLU lower slopes,
    Sigmoid/Tanh tangent points; default: CROWN's). ``betas``: optional split multipliers
    ``{k: [B, S, *shape]}`` holding ``beta_j s_j`` (``beta_j >= 0``, ``s_j`` the split sign of
    ReLU ``k``'s neuron ``j``, 0 where not split, see
    :func:`adcert.bounds.alpha_crown.signed_betas`): ``-beta_j s_j`` is added to the coefficient
    of the ReLU's input ``z_j``, so the result bounds ``A . h_end - sum_j beta_j s_j z_j``, which
    is <= ``A . h_end`` wherever every split holds (beta-CROWN). ``relu_coefs``: a dict that
    receives ``{k: [B, S, *shape]}``, the coefficients reaching every ReLU's OUTPUT (branching
    heuristics). ``hook``: ``None`` (exact arithmetic) or a :class:`SoundHook` (then ``mu, r``
    are unused: the input box is the hook's). ``stop`` (sound only): end the walk at piece
    ``stop``'s output and concretise over the hook's box of it (``-1``: the input); every piece
    after ``stop`` must read only pieces ``>= stop``."""
    if stop != -1 and hook is None:
        raise ValueError("stop: a walk that ends before the input needs the sound hook's boxes")
    walk = Walk(relu_box, alphas, betas, relu_coefs, hook)
    const = (A.data if isinstance(A, Patches) else A).new_zeros(A.shape[:2])
    folded = set()  # pieces whose rounding error a consumer has added to its own
    pending = {end - 1: A}  # piece index -> coefficients on that piece's output

    def accumulate(j: int, A_new: Tensor) -> None:
        nonlocal const
        if j not in pending:
            pending[j] = A_new
            return
        total = _dense(pending[j]) + _dense(A_new)
        if hook is not None:
            const = down(const - hook.fork_error(total, j))
        pending[j] = total

    for i in range(end - 1, stop, -1):
        A = pending.pop(i, None)
        if A is None:  # a piece the bounded value does not depend on
            continue
        op = low.ops[i]
        if isinstance(A, Patches) and not op.takes_patches(walk):
            A = A.to_dense()
        if hook is not None and op.folds_source_error:
            walk.fold = folded_source_error(low, i, walk, folded)
        back = op.backward(A, walk)
        walk.fold = None
        if hook is None:
            if back.const is not None:
                const = const + back.const
        else:
            err = None if i in folded else op.rounding_error(A, back, walk)
            if back.const is not None:
                const = down(const + back.const)
            if err is not None:
                const = down(const - err)
        for j, A_j in zip(op.srcs, back.As):
            accumulate(j, A_j)
    A = pending.pop(stop, None)
    if pending:
        raise ValueError(f"stop: pieces {sorted(pending)} before piece {stop} are read after it")
    if A is None:  # the bounded value does not depend on the input
        return const
    if hook is None:
        if isinstance(A, Patches):
            return concretize_patches(A, mu, r) + const
        return concretize_lower(A, mu, r) + const
    return down(hook.concretize(A, stop) + const)


def folded_source_error(low: Lowered, i: int, walk: Walk, folded: set
                        ) -> Optional[Tuple[Tensor, float]]:
    """Sound walks: the rounding errors of the chain of pieces feeding piece ``i`` (e.g. a
    ReLU's batch norm and convolution), folded into one ``(Q, floor)`` on piece ``i``'s input
    map, so that piece ``i``'s rows ``A'`` (the coefficients it hands back) carry them as
    ``|A'| . Q + floor`` in its own error term (one pass over the rows, and for receptive-field
    rows one gather, instead of one per piece).

    A source is folded while it is read by no other piece (its rows are then exactly ``A'``,
    pulled through the diagonal pieces between), gives its error in that form
    (:meth:`~adcert.bounds.layers.base.Piece.folded_error`), and the pieces between it and ``i``
    are ``diagonal`` (their :meth:`~adcert.bounds.layers.base.Piece.pull_error_weights` carries
    the weights across). Sums of the non-negative weights are rounded up. The folded pieces are
    added to ``folded`` (their own rounding error is then not computed again); ``None`` when
    nothing folds."""
    readers = low.readers()
    total, floor, pulls = None, 0.0, []
    j = low.ops[i].src if len(low.ops[i].srcs) == 1 else -1
    while j >= 0 and readers[j] == 1:
        src = low.ops[j]
        got = src.folded_error(walk)
        if got is None:
            break
        q, f = got
        for diag in reversed(pulls):  # from the piece nearest to j outwards
            q = diag.pull_error_weights(q)
        total = q if total is None else up(total + q)
        floor += f
        folded.add(j)
        if len(src.srcs) != 1 or not src.diagonal:
            break
        pulls.append(src)
        j = src.src
    return None if total is None else (total, floor)


def _dense(A):
    return A.to_dense() if isinstance(A, Patches) else A
