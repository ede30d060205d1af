"""Step-level checks of the rigorous rules of each operation (an end-to-end bound widens its
input box, which would hide a missing outward rounding inside one step): in float32, on values
whose exact result is not a float, the step's sound box must contain the exact rational result
STRICTLY inside (a box that is just the rounded result fails)."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from adcert.bounds.layers.affine_piece import ElementwisePiece
from adcert.bounds.layers.arith import ArithStep, Const
from adcert.bounds.layers.base import IbpCtx
from adcert.bounds.layers.s_shaped import SIGMOID, TANH, sound_image

F32 = torch.float32
XS = torch.tensor([[1 / 3, -2 / 7, 1e-3, 0.7]], dtype=F32)
C = torch.tensor([0.1, 1 / 3, -3.3, 0.71], dtype=F32)


def exact(op: str, x: float, c: float) -> Fraction:
    x, c = Fraction(x), Fraction(c)
    return {"add": x + c, "sub": x - c, "rsub": c - x, "mul": x * c, "div": x / c}[op]


def strictly_contains(lo, hi, values):
    for l_, h_, v in zip(lo.flatten().tolist(), hi.flatten().tolist(), values):
        assert Fraction(l_) < v < Fraction(h_), (l_, v, h_)


@pytest.mark.parametrize("op", ["add", "sub", "rsub", "mul", "div"])
def test_arith_sound_ibp_contains_exact_result(op):
    step = ArithStep(op, Const(lambda: C, "c"))
    want = [exact(op, x, c) for x, c in zip(XS[0].tolist(), C.tolist())]
    inexact = [v for v in want if Fraction(float(torch.tensor(float(v), dtype=F32))) != v]
    assert inexact  # some results are not float32 numbers
    lo, hi = step.sound_ibp(XS, XS, IbpCtx({}))
    idx = [i for i, v in enumerate(want) if v in inexact]
    strictly_contains(lo[0, idx], hi[0, idx], [want[i] for i in idx])


@pytest.mark.parametrize("weight, bias", [(C, None), (None, C), (torch.tensor(-1.0), C)])
def test_elementwise_piece_sound_box_contains_exact_result(weight, bias):
    piece = ElementwisePiece(weight, bias)
    lo, hi = piece.sound_box([(XS, XS)])
    xs, cs = XS[0].tolist(), C.tolist()
    if bias is None:
        want = [Fraction(x) * Fraction(c) for x, c in zip(xs, cs)]
    elif weight is None:
        want = [Fraction(x) + Fraction(c) for x, c in zip(xs, cs)]
    else:
        want = [Fraction(c) - Fraction(x) for x, c in zip(xs, cs)]
    for l_, h_, v in zip(lo[0].tolist(), hi[0].tolist(), want):
        assert Fraction(l_) <= v <= Fraction(h_)
        if Fraction(float(torch.tensor(float(v), dtype=F32))) != v:
            assert Fraction(l_) < v < Fraction(h_)


@pytest.mark.parametrize("fn", [SIGMOID, TANH], ids=["sigmoid", "tanh"])
def test_s_shaped_sound_image_contains_fp64_values(fn):
    x = torch.linspace(-30, 30, 2001, dtype=F32)
    lo, hi = sound_image(fn, x, x)
    ref = fn.f(x.double())
    assert bool((lo.double() < ref).all()) and bool((ref < hi.double()).all())
