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


def test_affine_backward_rounding_error_is_charged():
    """The sound backward step of a wide linear piece on a cancelling row: ``A W`` sums 4096
    products of which almost everything cancels, so its rounding error (~ sqrt(k) u |A||W|)
    dwarfs the result and the concretisation's own error term; the bound must still be below
    the exact rational value on every row (dropping the step's error term fails this)."""
    from adcert.bounds.backward import SoundHook, backward_lower
    from adcert.bounds.crown_sound import sound_op_boxes
    from adcert.bounds.layers.affine_piece import LinearPiece
    from adcert.bounds.layers.base import Lowered

    g = torch.Generator().manual_seed(0)
    k, S = 4096, 24
    W = torch.randn(k, 1, generator=g, dtype=F32)
    A = torch.randn(1, S, k, generator=g, dtype=torch.float64)
    # the last coefficient cancels the row's sum (in fp64), then everything is rounded to fp32
    A[0, :, -1] = -(A[0, :, :-1] @ W[:-1, 0].double()) / W[-1, 0].double()
    A = A.to(F32)
    h = torch.tensor([[0.7]], dtype=F32)
    piece = LinearPiece(W, None)
    piece.srcs, piece.in_shape, piece.out_shape = (-1,), (1,), (k,)
    low = Lowered([piece], [], (1,))
    lb = backward_lower(low, 1, A, h, torch.zeros_like(h), [],
                        hook=SoundHook(sound_op_boxes(low, h, h)))
    wq = [Fraction(v) for v in W[:, 0].tolist()]
    hq = Fraction(h.item())
    for s in range(S):
        exact = sum(Fraction(a) * w for a, w in zip(A[0, s].tolist(), wq)) * hq
        assert Fraction(lb[0, s].item()) <= exact, s


@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("kind", ["conv2d", "conv_transpose2d"])
def test_strict_mode_convolutions_meet_the_dot_product_error_bound(kind, batch):
    """The error model of the kernels sound mode runs (oneDNN's direct convolutions and
    deconvolutions, or the native ones): every output within ``gamma_k |W| |x|`` of the exact
    value, on adversarial data -- wide (k = 64 * 9 terms), weights and inputs spanning 1e-4..1e4,
    rows cancelling. The reference is fp64 (products of fp32 numbers are exact there; its own
    summation error, ``gamma_k`` of fp64, is added to the allowance)."""
    import torch.nn.functional as F

    from adcert.bounds.sound import strict_float_mode
    from adcert.ops._rounding import gamma

    g = torch.Generator().manual_seed(batch)
    cin, cout = 64, 48
    scale = torch.logspace(-4, 4, cin).view(1, cin, 1, 1)
    if kind == "conv2d":
        w = torch.randn(cout, cin, 3, 3, generator=g) * scale
        w = w - w.mean(dim=(1, 2, 3), keepdim=True)
        x = torch.randn(batch, cin, 10, 10, generator=g) * scale
        k = cin * 9
        run = lambda a, b: F.conv2d(a, b, padding=1)  # noqa: E731
    else:
        w = torch.randn(cin, cout, 3, 3, generator=g) * scale.view(cin, 1, 1, 1)
        w = w - w.mean(dim=0, keepdim=True)
        x = torch.randn(batch, cin, 10, 10, generator=g) * scale
        k = cin * 9
        run = lambda a, b: F.conv_transpose2d(a, b, padding=1)  # noqa: E731
    with strict_float_mode():
        got = run(x, w)
    ref = run(x.double(), w.double())
    size = run(x.abs().double(), w.abs().double())
    allowed = (gamma(k, torch.float32) + gamma(k, torch.float64)) * size \
        + k * torch.finfo(torch.float32).tiny
    assert bool(((got.double() - ref).abs() <= allowed).all())
