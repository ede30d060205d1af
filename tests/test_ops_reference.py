"""Every compiled op against its fp64 plain-torch reference (adcert.ops.reference): forward and
backward, fp32 and fp64, awkward shapes, non-contiguous inputs, grad_output != 1."""
from __future__ import annotations

import pytest
import torch

from adcert import ops
from adcert.ops import reference as ref
from conftest import DEVICES, TOL, random_bn, random_box, to64

DTYPES = [torch.float32, torch.float64]

# (batch, C_in, H, W, C_out, kernel, stride, padding, dilation, groups)
CONV_CASES = [
    (2, 3, 9, 9, 5, 3, 1, 1, 1, 1),     # odd channels, odd size
    (1, 4, 8, 8, 6, 1, 1, 0, 1, 1),     # 1x1 kernel, batch 1
    (3, 5, 11, 7, 7, 3, 2, 1, 1, 1),    # stride 2, non-square input
    (2, 4, 10, 10, 4, 3, 1, 2, 2, 1),   # dilation 2
    (2, 6, 7, 7, 9, 3, 1, 1, 1, 3),     # groups 3
    (2, 4, 6, 6, 4, 3, 1, 1, 1, 4),     # depthwise
    (0, 3, 8, 8, 5, 3, 1, 1, 1, 1),     # empty batch
    (2, 3, 5, 5, 2, (3, 1), (2, 1), (1, 0), 1, 1),  # rectangular kernel, per-axis geometry
]
LINEAR_CASES = [(4, 7, 5), (1, 1, 1), (3, 33, 17), (0, 6, 3), (5, 64, 10)]


def _compare(got, want, dtype):
    for g, w in zip(got, want):
        if w is None:
            assert g is None
            continue
        assert g.shape == w.shape
        torch.testing.assert_close(g.double(), w, **TOL[dtype])


def _run_both(fn_ours, fn_ref, tensors, kwargs, dtype, device, grad_scale=True):
    """Forward and backward of ``fn_ours`` (in ``dtype``) and ``fn_ref`` (in fp64) on the same
    values; backward with random (not all-ones) output gradients."""
    ours = [None if t is None else t.to(dtype=dtype, device=device).requires_grad_()
            for t in tensors]
    ref64 = [None if t is None else to64(t).cpu().requires_grad_() for t in tensors]
    out = fn_ours(*ours, **kwargs)
    out_ref = fn_ref(*ref64, **kwargs)
    _compare([o.cpu() for o in out], out_ref, dtype)
    grads = [torch.randn_like(o) * 3 for o in out_ref]
    differentiable = [t for t in ours if t is not None]
    g_ours = torch.autograd.grad(out, differentiable, [g.to(dtype=dtype, device=device)
                                                       for g in grads], allow_unused=True)
    g_ref = torch.autograd.grad(out_ref, [t for t in ref64 if t is not None], grads,
                                allow_unused=True)
    for a, b in zip(g_ours, g_ref):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0
        else:
            torch.testing.assert_close(a.cpu().double(), b, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LINEAR_CASES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("noncontig", [False, True])
def test_interval_linear(device, dtype, case, bias, noncontig):
    b, i, o = case
    mu, r = random_box((b, i), noncontiguous=noncontig)
    w = torch.randn(o, i, dtype=torch.float64)
    bb = torch.randn(o, dtype=torch.float64) if bias else None
    _run_both(ops.interval_linear, ref.interval_linear, [mu, r, w, bb], {}, dtype, device)


def test_interval_linear_leading_dims():
    mu, r = random_box((2, 3, 5))
    w = torch.randn(4, 5, dtype=torch.float64)
    _run_both(ops.interval_linear, ref.interval_linear, [mu, r, w, None], {}, torch.float64, "cpu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_interval_conv2d(device, dtype, case, bias):
    n, ci, h, w_, co, k, s, p, d, g = case
    k = k if isinstance(k, tuple) else (k, k)
    mu, r = random_box((n, ci, h, w_), noncontiguous=(n == 2))
    w = torch.randn(co, ci // g, *k, dtype=torch.float64)
    bb = torch.randn(co, dtype=torch.float64) if bias else None
    kw = dict(stride=s, padding=p, dilation=d, groups=g)
    _run_both(ops.interval_conv2d, ref.interval_conv2d, [mu, r, w, bb], kw, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 5, 7), (1, 1, 1, 1), (0, 4, 3, 3), (3, 6, 4)])
@pytest.mark.parametrize("affine", [True, False])
def test_interval_batch_norm(device, dtype, shape, affine):
    mu, r = random_box(shape)
    mean, var, w, b = random_bn(shape[1], affine=affine)
    _run_both(ops.interval_batch_norm, ref.interval_batch_norm, [mu, r, mean, var, w, b],
              dict(eps=1e-3), dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4, 5), (0, 3), (1, 1, 1, 1)])
@pytest.mark.parametrize("noncontig", [False, True])
def test_interval_relu(device, dtype, shape, noncontig):
    mu, r = random_box(shape, noncontiguous=noncontig and shape[-1] > 1)
    _run_both(ops.interval_relu, ref.interval_relu, [mu, r], {}, dtype, device)


# (bias, bn: None | "affine" | "stats", relu)
FUSED_VARIANTS = [(True, "affine", True), (False, "affine", True), (True, "stats", True),
                  (True, None, True), (False, None, False), (True, "affine", False),
                  (False, None, True)]


def _bn_args(variant, channels):
    bias, bn, relu = variant
    if bn is None:
        return [None, None, None, None]
    return list(random_bn(channels, affine=(bn == "affine")))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("variant", FUSED_VARIANTS)
def test_interval_conv2d_bn_relu(device, dtype, case, variant):
    n, ci, h, w_, co, k, s, p, d, g = case
    k = k if isinstance(k, tuple) else (k, k)
    mu, r = random_box((n, ci, h, w_), noncontiguous=(n == 3))
    w = torch.randn(co, ci // g, *k, dtype=torch.float64)
    bb = torch.randn(co, dtype=torch.float64) if variant[0] else None
    kw = dict(bn_eps=1e-3, stride=s, padding=p, dilation=d, groups=g, relu=variant[2])
    _run_both(ops.interval_conv2d_bn_relu, ref.interval_conv2d_bn_relu,
              [mu, r, w, bb, *_bn_args(variant, co)], kw, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LINEAR_CASES)
@pytest.mark.parametrize("variant", FUSED_VARIANTS)
def test_interval_linear_bn_relu(device, dtype, case, variant):
    b, i, o = case
    mu, r = random_box((b, i), noncontiguous=(b == 3))
    w = torch.randn(o, i, dtype=torch.float64)
    bb = torch.randn(o, dtype=torch.float64) if variant[0] else None
    kw = dict(bn_eps=1e-3, relu=variant[2])
    _run_both(ops.interval_linear_bn_relu, ref.interval_linear_bn_relu,
              [mu, r, w, bb, *_bn_args(variant, o)], kw, dtype, device)


def test_fused_equals_unfused_chain():
    """The fused block is exactly the composition of the separate compiled ops."""
    mu, r = random_box((2, 3, 8, 8))
    w, b = torch.randn(4, 3, 3, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    mean, var, bw, bb = random_bn(4)
    fused = ops.interval_conv2d_bn_relu(mu, r, w, b, mean, var, bw, bb, 1e-5, padding=1)
    chain = ops.interval_conv2d(mu, r, w, b, padding=1)
    chain = ops.interval_batch_norm(*chain, mean, var, bw, bb, 1e-5)
    chain = ops.interval_relu(*chain)
    for a, c in zip(fused, chain):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("kind", ["conv2d", "linear"])
def test_only_needed_gradients_are_computed(monkeypatch, kind):
    """The fused blocks ask their compiled backward only for the gradients autograd needs
    (``output_mask = [input, weight, bias/BN parameters]``) and get ``None`` for the rest. The
    mask reaching the kernel and what the kernel returns are recorded: on the first layer (the
    input box needs no gradient) the input gradients are never computed."""
    import importlib

    mod = importlib.import_module(f"adcert.ops.interval_{kind}_bn_relu")
    calls = []
    real = mod._backward_op

    def recording(*args):
        grads = real(*args)
        calls.append((list(args[-1]), grads))
        return grads

    monkeypatch.setattr(mod, "_backward_op", recording)
    fn = getattr(ops, f"interval_{kind}_bn_relu")
    shape, wshape, kw = (((2, 3, 6, 6), (4, 3, 3, 3), dict(padding=1)) if kind == "conv2d" else
                         ((2, 5), (4, 5), {}))
    mean, var, gamma, beta = random_bn(4)

    def run(need_input, need_weight, need_params):
        mu, r = random_box(shape)
        mu.requires_grad_(need_input)
        w = torch.randn(wshape, dtype=torch.float64, requires_grad=need_weight)
        b = torch.randn(4, dtype=torch.float64, requires_grad=need_params)
        calls.clear()
        out = fn(mu, r, w, b, mean, var, gamma, beta, **kw)
        (out[0].sum() + 2 * out[1].sum()).backward()
        (mask, grads), = calls
        return mask, [g is not None for g in grads[:4]], mu, w, b

    mask, got, mu, w, b = run(False, True, False)      # first layer, frozen bias
    assert mask == [False, True, False]
    assert got == [False, False, True, False]           # grad mu, grad r, grad w, grad bias
    assert mu.grad is None and w.grad is not None and b.grad is None
    mask, got, mu, w, b = run(True, False, True)        # frozen weight
    assert mask == [True, False, True] and got == [True, True, False, True]
    assert mu.grad is not None and w.grad is None and b.grad is not None


def test_backward_through_one_output_only():
    """Using only the lower bound (mu - r) or only mu still gives the reference gradients."""
    mu, r = random_box((2, 5))
    w = torch.randn(3, 5, dtype=torch.float64)
    for pick in (lambda m, s: m.sum(), lambda m, s: (m - s).sum(), lambda m, s: s.sum()):
        w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
        pick(*ops.interval_linear_bn_relu(mu, r, w1)).backward()
        pick(*ref.interval_linear_bn_relu(mu, r, w2)).backward()
        torch.testing.assert_close(w1.grad, w2.grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [False, True])
def test_large_linear_weight_takes_the_blocked_path(dtype, fused):
    """Weights of >= 2^20 entries run the radius products block by block (|W| never fully
    materialised); 20 rows in blocks of 8 also covers a ragged last block."""
    mu, r = random_box((3, 65536))
    w = torch.randn(20, 65536, dtype=torch.float64) / 256
    b = torch.randn(20, dtype=torch.float64)
    if fused:
        _run_both(ops.interval_linear_bn_relu, ref.interval_linear_bn_relu,
                  [mu, r, w, b, *random_bn(20)], dict(bn_eps=1e-3), dtype, "cpu")
    else:
        _run_both(ops.interval_linear, ref.interval_linear, [mu, r, w, b], {}, dtype, "cpu")
