"""``sound=True`` for the CROWN family: back-substitution that is rigorous in floating point.

The bound returned contains the bound of the REAL-arithmetic network (the model's parameters
taken as exact numbers; batch-norm and Normalize coefficients, which the model itself computes
with rounding, are given an interval of relative width ``gamma_c``; for batch norm ``c`` is
:data:`adcert.ops.bn_fold.EXACT_FOLD_ROUNDINGS`) over the real input box.

This module holds the rigorous driver pieces (:func:`sound_op_boxes`, :func:`sound_backward`,
:func:`widened_input`); every operation's own rigorous rules live with the operation
(:meth:`~adcert.bounds.layers.base.Piece.sound_box`,
:meth:`~adcert.bounds.layers.base.Piece.rounding_error`), and the backward walk is the exact one
with a :class:`~adcert.bounds.backward.SoundHook`. :func:`adcert.bounds.crown.run_sound` runs
them in the CROWN family's driver sequence.

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
* Other operations (pooling, max pooling, Sigmoid/Tanh, arithmetic with constants, cat,
  reshapes): see each one's module in :mod:`adcert.bounds.layers`.
* Concretisation over the input box: ``fl(A+ . L + A- . U) - gamma_{n+1} |A| . max(|L|, |U|)``.

The kernels run under :func:`adcert.bounds.sound.strict_float_mode` (no TF32, no Winograd/FFT
convolutions, oneDNN's direct kernels in IEEE fp32): each sums products in some order, which
``gamma_k`` covers. The error term of an affine step is computed by the forward association
``(|A||W|) . m_h = |A| . (|W| m_h)``: one forward product of the box magnitude per piece (batch
``B``), reused by every specification row, instead of a second transposed product per row. A
ReLU adds the error weights of the convolution and batch norm feeding it to its own
(:func:`adcert.bounds.backward.folded_source_error`): one weighted sum over its rows for the
three pieces. The magnitudes ``m_h`` come from IBP's boxes intersected with CROWN's intermediate
ones as those become known (:class:`SoundBoxes`). The final bound is also intersected with the
IBP bound of the specification folded into the last linear layer (:func:`final_layer_ibp`), as
the plain mode's is. Only float32 and float64 are accepted.
alpha-CROWN optimises its slopes (and, with ``beta``, its split multipliers) without the error
terms, then evaluates the best ones soundly.
The sound result is detached from the parameters for every method (certification only).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from adcert.bounds.backward import SoundHook, backward_lower, sound_concretize  # noqa: F401
from adcert.bounds.layers.base import Box, Lowered
from adcert.ops._rounding import down, unit_roundoff

Tensor = torch.Tensor


def sound_op_boxes(low: Lowered, L: Tensor, U: Tensor) -> Dict[int, Box]:
    """Rigorous boxes ``{j: (l, u)}`` of the output of every piece ``j`` of ``low`` (``-1``: the
    input box ``(L, U)``), each from its sources' boxes by the piece's own rule."""
    outs: Dict[int, Box] = {-1: (L, U)}
    for i, op in enumerate(low.ops):
        outs[i] = op.sound_box([outs[j] for j in op.srcs])
    return outs


class SoundBoxes:
    """The rigorous output boxes ``outs`` of :func:`sound_op_boxes`, tightened as activation
    input boxes become known (CROWN's sound bounds, or boxes clamped by a domain's splits, both
    valid wherever the walk's bound must hold): the box of activation ``k``'s input is
    intersected with them and every later piece's box with its :meth:`sound_box` from the
    tightened sources. The rounding-error terms of the sound walks weigh these boxes'
    magnitudes, so after the intermediate bounds they are those of CROWN's boxes, not of IBP's
    (which grow with depth: on a random CNN7 they are thousands of times wider). Only the
    magnitudes use them: the relaxations read the walk's own boxes, and the final bound is
    intersected with IBP's output box, so a sound bound never beats the exact CROWN bound
    (which tests use as an oracle)."""

    def __init__(self, low: Lowered, outs: Dict[int, Box]):
        self.low, self.outs = low, outs

    def tighten(self, k: int, box: Box) -> None:
        """Intersect activation ``k``'s input box with ``box`` and carry it forward."""
        self._carry({self.low.ops[self.low.relu_at[k]].src: box})

    def tighten_all(self, boxes: List[Box]) -> None:
        """:meth:`tighten` with every activation's box (``boxes[k]``), in one forward pass."""
        if boxes:
            low = self.low
            self._carry({low.ops[low.relu_at[k]].src: box for k, box in enumerate(boxes)})

    def _carry(self, boxes: Dict[int, Box]) -> None:
        """Intersect piece ``j``'s output box with ``boxes[j]`` for each given ``j``, and every
        later piece's box with its :meth:`sound_box` from the tightened sources (in order)."""
        low, outs = self.low, self.outs
        first = min(boxes)
        outs[first] = _meet(outs[first], boxes[first])
        for j in range(first + 1, len(low.ops)):
            op = low.ops[j]
            outs[j] = _meet(outs[j], op.sound_box([outs[i] for i in op.srcs]))
            if j in boxes:
                outs[j] = _meet(outs[j], boxes[j])


def _meet(a: Box, b: Box) -> Box:
    return torch.maximum(a[0], b[0]), torch.minimum(a[1], b[1])


def sound_backward(low: Lowered, end: int, A: Tensor, mu, r, relu_box: List[Box],
                   alphas=None, betas=None, *, out_boxes: Dict[int, Box]) -> Tensor:
    """The rigorous back-substitution: :func:`adcert.bounds.backward.backward_lower` with a
    :class:`~adcert.bounds.backward.SoundHook` over ``out_boxes`` (from :func:`sound_op_boxes`;
    the input box is ``out_boxes[-1]``, ``mu, r`` unused)."""
    return backward_lower(low, end, A, mu, r, relu_box, alphas, betas,
                          hook=SoundHook(out_boxes))


def final_layer_ibp(low: Lowered, spec: Tensor, outs: Dict[int, Box]) -> Optional[Tensor]:
    """The sound counterpart of the plain mode's IBP bound of the specification folded into
    the last linear layer (:func:`adcert.bounds.crown.ibp_spec_lower`): ``spec: [B, S, *out]``
    walked back through the network's final linear piece (and the batch norm after it), then
    concretised over the rigorous box of that layer's input. ``None`` when the network does not
    end in a linear layer. ``outs`` as from :func:`sound_op_boxes` (IBP's boxes: tightened ones
    could beat the exact CROWN bound, see :class:`SoundBoxes`)."""
    from adcert.bounds.layers.affine_piece import ChannelPiece, LinearPiece

    j = len(low.ops) - 1
    while j >= 0 and isinstance(low.ops[j], ChannelPiece) and len(low.ops[j].in_shape) == 1:
        j -= 1
    if j < 0 or not isinstance(low.ops[j], LinearPiece) or low.ops[j].src < 0:
        return None
    return backward_lower(low, len(low.ops), spec, None, None, [None] * len(low.relu_at),
                          hook=SoundHook(outs), stop=low.ops[j].src)


def widened_input(mu: Tensor, r: Tensor) -> Box:
    """End points containing the exact input box that ``(mu, r)`` was rounded from (the
    centre-radius form's rounding, ``4u (|mu| + r)``)."""
    u_r = unit_roundoff(mu.dtype)
    slack = 4 * u_r * (mu.abs() + r) + torch.finfo(mu.dtype).tiny
    L = down(down(mu - r) - slack)
    U = -down(down(-(mu + r)) - slack)
    return L, U
