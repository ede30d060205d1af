"""Floating-point rounding-error constants for the rigorous (``sound``) computations.

``u`` is the unit roundoff of a dtype (``finfo.eps / 2``) and ``gamma_k = k u / (1 - k u)``
(Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., Lemma 3.1 and eq. (3.5)): a
quantity computed with ``k`` roundings has relative error at most ``gamma_k``, and a ``k``-term dot
product computed in any order satisfies ``|fl(w.x) - w.x| <= gamma_k |w|.|x|``.

Used by the sound batch-norm fold (:mod:`adcert.ops.bn_fold`) and the sound bound passes
(:mod:`adcert.bounds.sound`, which re-exports both, and :mod:`adcert.bounds.crown_sound`). A leaf
module (torch only), so that :mod:`adcert.ops` can use it without importing :mod:`adcert.bounds`.
"""
from __future__ import annotations

import torch


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def gamma(k: int, dtype: torch.dtype) -> float:
    """``gamma_k = k u / (1 - k u)`` for the dtype's unit roundoff ``u``."""
    ku = k * unit_roundoff(dtype)
    if ku >= 0.5:
        raise ValueError(f"sound: a dot product of {k} terms is too long for {dtype} (k u >= 1/2)")
    return ku / (1 - ku)


def down(t: torch.Tensor) -> torch.Tensor:
    """The next float below ``t`` (a lower bound of the exact result of one rounded op)."""
    return torch.nextafter(t, t.new_full((), -float("inf")))


def up(t: torch.Tensor) -> torch.Tensor:
    """The next float above ``t``."""
    return torch.nextafter(t, t.new_full((), float("inf")))
