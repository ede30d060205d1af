"""The Triton kernels (``kernels/``) and the CUDA op implementations
(``adcert/ops/_triton_impl.py``), run on CPU tensors under the Triton interpreter and compared
with the fp64 plain-torch reference (``adcert.ops.reference``, and autograd through it for the
backward passes).

Triton fixes interpreter-or-compiler once per process, when ``triton`` is first imported (its own
``@jit`` library functions are decorated then), so ``TRITON_INTERPRET=1`` is set below before
anything imports triton (and again around each test: the interpreter reads it at launch time).
Consequences:

* on a machine with a GPU this module skips unless ``TRITON_INTERPRET=1`` is already in the
  environment (run it in its own pytest process there; setting it here would silently move every
  later Triton kernel of the session onto the interpreter);
* if something imported triton before this module without the variable, it skips with that reason.

The kernels are loaded as a private copy of ``kernels/`` (package ``_adcert_kernels_interpreted``,
independent of installation and of other packages named ``kernels``) and swapped into
``_triton_impl`` for the duration of each test.
"""
import os
import sys

import pytest
import torch  # does not import triton

pytestmark = pytest.mark.triton

_SET_HERE = os.environ.get("TRITON_INTERPRET") != "1"
if _SET_HERE:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the interpreter tests run on CPU-only machines, or in their "
                    "own process with TRITON_INTERPRET=1", allow_module_level=True)
    if "triton" in sys.modules:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set; run with "
                    "TRITON_INTERPRET=1 in the environment", allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import inspect  # noqa: E402
import re  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _load_interpreted_kernels():
    name = "_adcert_kernels_interpreted"
    package = types.ModuleType(name)
    package.__path__ = [str(ROOT / "kernels")]
    sys.modules[name] = package
    return [importlib.import_module(f"{name}.{m}")
            for m in ("interval_bn_relu", "interval_linear", "interval_relu")]


KB, KL, KR = _load_interpreted_kernels()
if _SET_HERE:  # keep it out of the other tests' subprocesses; set again around each test below
    os.environ.pop("TRITON_INTERPRET")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    """The interpreter reads the variable again at launch time (e.g. when it loads modules)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")

if str(ROOT) not in sys.path:  # _triton_impl falls back to ``import kernels`` in a source checkout
    sys.path.insert(0, str(ROOT))

from adcert.ops import reference as ref  # noqa: E402

F64 = torch.float64
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5),
       torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


@pytest.fixture
def impl(monkeypatch):
    """``adcert.ops._triton_impl`` running the interpreted kernels."""
    from adcert.ops import _triton_impl
    monkeypatch.setattr(_triton_impl, "_bn_relu", KB)
    monkeypatch.setattr(_triton_impl, "_linear", KL)
    monkeypatch.setattr(_triton_impl, "_relu", KR)
    return _triton_impl


def close(actual, expected, dtype, scale_atol=True):
    """``actual`` (any dtype) against the fp64 ``expected`` within the tolerance of ``dtype``;
    the absolute tolerance scales with the magnitude of ``expected``."""
    assert actual is not None and expected is not None
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    rtol, atol = TOL[dtype]
    if scale_atol and expected.numel():
        atol *= max(1.0, float(expected.detach().abs().max()))
    torch.testing.assert_close(actual.detach().to(F64), expected.detach().to(F64), rtol=rtol,
                               atol=atol)


def rand_box(shape, gen, dtype=F64):
    """A box in ``dtype`` and its exact fp64 copy (leaves requiring grad)."""
    mu = torch.randn(shape, generator=gen, dtype=F64).to(dtype)
    r = torch.rand(shape, generator=gen, dtype=F64).to(dtype)
    return mu, r, mu.to(F64).requires_grad_(), r.to(F64).requires_grad_()


def leaf(t):
    return t.detach().to(F64).requires_grad_()


def grads(outputs, inputs, grad_outputs):
    """Autograd through the reference; zeros for inputs that do not influence the outputs."""
    gs = torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, gs)]


def test_kernels_are_interpreted():
    assert isinstance(KB._bn_relu_fwd_kernel, InterpretedFunction)
    assert isinstance(KL._dual_matmul_kernel, InterpretedFunction)
    assert isinstance(KR._relu_fwd_kernel, InterpretedFunction)


# ------------------------------------------------------------------------ kernels/interval_relu.py

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (3, 5, 7), (2, 0, 3), (1030,)])
def test_relu_kernel(shape, dtype):
    gen = torch.Generator().manual_seed(1)
    mu, r, mu64, r64 = rand_box(shape, gen, dtype)
    out = KR.relu_forward(mu, r)
    exp = ref.interval_relu(mu64, r64)
    for a, e in zip(out, exp):
        assert a.dtype == dtype
        close(a, e, dtype)
    g = [torch.randn(shape, generator=gen, dtype=F64) for _ in range(2)]
    got = KR.relu_backward(g[0].to(dtype), g[1].to(dtype), mu, r)
    for a, e in zip(got, grads(exp, (mu64, r64), g)):
        close(a, e, dtype)


def test_relu_kernel_non_contiguous_and_exact():
    gen = torch.Generator().manual_seed(2)
    mu, r, mu64, r64 = rand_box((6, 5), gen)
    mu_t, r_t = mu.t(), r.t()                      # [5, 6] non-contiguous views
    out = KR.relu_forward(mu_t, r_t)
    exp = ref.interval_relu(mu64.t(), r64.t())
    for a, e in zip(out, exp):                     # fp64: the same operations, bit for bit
        assert torch.equal(a, e)
    g = torch.randn(6, 5, generator=gen, dtype=F64)
    got = KR.relu_backward(g.t(), g.t() * 0.5, mu_t, r_t)
    for a, e in zip(got, grads(exp, (mu64, r64), (g.t(), g.t() * 0.5))):
        assert torch.equal(a, e.t())


# ------------------------------------------------------------------- kernels/interval_bn_relu.py

def _epilogue_reference(mu_pre, r_pre, scale, shift, relu):
    """Returns (mu_out, r_out, m, rr) in fp64; m, rr retain grad."""
    view = (1, -1) + (1,) * (mu_pre.dim() - 2)
    m, rr = mu_pre, r_pre
    if scale is not None:
        m, rr = m * scale.view(view), rr * scale.abs().view(view)
    if shift is not None:
        m = m + shift.view(view)
    m.retain_grad()
    rr.retain_grad()
    mu_out, r_out = ref.interval_relu(m, rr) if relu else (m, rr)
    return mu_out, r_out, m, rr


def _check_epilogue(shape, dtype, relu, has_scale, has_shift, seed=0, channels_last=False):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    mu, r, mu64, r64 = rand_box(shape, gen, dtype)
    if channels_last:
        mu, r = (t.contiguous(memory_format=torch.channels_last) for t in (mu, r))
    scale = torch.randn(c, generator=gen, dtype=F64) if has_scale else None
    if scale is not None and c > 1:
        scale[0] = -abs(scale[0])                  # a negative scale flips nothing but the sign
    shift = torch.randn(c, generator=gen, dtype=F64) if has_shift else None
    sc = scale.to(dtype) if has_scale else None
    sh = shift.to(dtype) if has_shift else None

    mu_out, r_out = KB.bn_relu_forward(mu, r, sc, sh, relu)
    sc64 = sc.to(F64).requires_grad_() if has_scale else None
    sh64 = sh.to(F64).requires_grad_() if has_shift else None
    e_mu, e_r, m, rr = _epilogue_reference(mu64, r64, sc64, sh64, relu)
    assert mu_out.dtype == dtype and mu_out.shape == mu.shape
    if channels_last:
        assert mu_out.is_contiguous(memory_format=torch.channels_last)
    close(mu_out, e_mu, dtype)
    close(r_out, e_r, dtype)
    assert bool((r_out >= 0).all())

    g_mu = torch.randn(shape, generator=gen, dtype=F64)
    g_r = torch.randn(shape, generator=gen, dtype=F64)
    got = KB.bn_relu_backward(g_mu.to(dtype), g_r.to(dtype), mu, r, sc, sh, relu)
    (e_mu * g_mu + e_r * g_r).sum().backward()
    red = [0] + list(range(2, len(shape)))
    gm, grr = m.grad, rr.grad
    expected = [mu64.grad, r64.grad, gm.sum(red), (gm * mu64).sum(red), (grr * r64).sum(red)]
    for a, e in zip(got, expected):
        close(a, e, dtype)
    acc = F64 if dtype == F64 else torch.float32
    assert all(s.dtype == acc and s.shape == (c,) for s in got[2:])
    if has_scale:   # the sums give d scale and d shift
        close(got[3] + torch.sign(sc.to(F64)) * got[4], sc64.grad, dtype)
    if has_shift:
        close(got[2], sh64.grad, dtype)
    # only the sums / only the input gradients
    only_sums = KB.bn_relu_backward(g_mu.to(dtype), g_r.to(dtype), mu, r, sc, sh, relu,
                                    input_grads=False)
    assert only_sums[0] is None and only_sums[1] is None
    for a, e in zip(only_sums[2:], got[2:]):
        assert torch.equal(a, e)
    only_grads = KB.bn_relu_backward(g_mu.to(dtype), g_r.to(dtype), mu, r, sc, sh, relu,
                                     sums=False)
    assert only_grads[2:] == (None, None, None)
    for a, e in zip(only_grads[:2], got[:2]):
        assert torch.equal(a, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 3), (1, 1, 1), (0, 4, 5), (4, 3, 33),
                                   (2, 3, 4, 5), (5, 70)])
def test_bn_relu_kernel(shape, relu, dtype):
    _check_epilogue(shape, dtype, relu, True, True)


@pytest.mark.parametrize("has_scale,has_shift", [(False, False), (True, False), (False, True)])
def test_bn_relu_kernel_optional_params(has_scale, has_shift):
    _check_epilogue((2, 3, 5), torch.float32, True, has_scale, has_shift, seed=3)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 1, 3, 3)])
def test_bn_relu_kernel_channels_last(shape):
    _check_epilogue(shape, torch.float64, True, True, True, seed=4, channels_last=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bn_relu_kernel_half(dtype):
    _check_epilogue((2, 3, 5), dtype, True, True, True, seed=5)


def test_bn_relu_kernel_split_reduction(monkeypatch):
    """Several programs per channel, each summing several blocks: tiny blocks force it."""
    monkeypatch.setattr(KB, "_BWD_TILE", 16)
    monkeypatch.setattr(KB, "_BWD_PROGRAMS", 6)
    for shape in ((5, 3, 13), (41, 2)):
        _check_epilogue(shape, torch.float64, True, True, True, seed=6)


def test_bn_relu_kernel_contains_sampled_points():
    """Soundness: every point of the input box, mapped exactly, lies in the output box."""
    gen = torch.Generator().manual_seed(7)
    mu, r, _, _ = rand_box((4, 3, 6), gen, torch.float32)
    scale, shift = torch.randn(3, generator=gen), torch.randn(3, generator=gen)
    mu_out, r_out = KB.bn_relu_forward(mu, r, scale, shift, True)
    for t in torch.linspace(-1, 1, 9, dtype=F64):      # both vertices included
        x = mu.to(F64) + t * r.to(F64)
        y = torch.relu(x * scale.to(F64).view(1, -1, 1) + shift.to(F64).view(1, -1, 1))
        slack = 1e-6 * (1 + y.abs())
        assert bool((y >= mu_out.to(F64) - r_out.to(F64) - slack).all())
        assert bool((y <= mu_out.to(F64) + r_out.to(F64) + slack).all())


# --------------------------------------------------------------------- kernels/interval_linear.py

LINEAR_SHAPES = [(1, 1, 1), (3, 5, 7), (0, 4, 3), (4, 0, 3), (33, 17, 19), (17, 40, 70)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("epilogue", ["none", "shift", "scale_shift_relu", "relu"])
@pytest.mark.parametrize("mkn", LINEAR_SHAPES)
def test_linear_kernel(mkn, epilogue, dtype):
    m, k, n = mkn
    gen = torch.Generator().manual_seed(m * 100 + k * 10 + n)
    mu, r, mu64, r64 = rand_box((m, k), gen, dtype)
    w = torch.randn(n, k, generator=gen, dtype=F64).to(dtype)
    w[:, :1] = 0                                       # |0| = 0 in the radius product
    scale = torch.randn(n, generator=gen, dtype=F64).to(dtype) if "scale" in epilogue else None
    shift = torch.randn(n, generator=gen, dtype=F64).to(dtype) if "shift" in epilogue else None
    relu = "relu" in epilogue
    mu_out, r_out, mu_pre, r_pre = KL.linear_forward(mu, r, w, scale, shift, relu=relu)
    e_pre = (mu64 @ w.to(F64).t(), r64 @ w.to(F64).abs().t())
    close(mu_pre, e_pre[0], dtype)
    close(r_pre, e_pre[1], dtype)
    e_out = _epilogue_reference(e_pre[0], e_pre[1], None if scale is None else scale.to(F64),
                                None if shift is None else shift.to(F64), relu)
    for a, e in zip((mu_out, r_out), e_out[:2]):
        assert a.dtype == dtype and a.shape == (m, n) and a.is_contiguous()
        close(a, e, dtype)
    assert bool((r_out >= 0).all())
    no_pre = KL.linear_forward(mu, r, w, scale, shift, relu=relu, write_pre=False)
    assert no_pre[2] is None and no_pre[3] is None
    assert torch.equal(no_pre[0], mu_out) and torch.equal(no_pre[1], r_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_kernel_strided(dtype):
    """Transposed weight (the input-gradient product ``g @ W``) and sliced, expanded inputs."""
    gen = torch.Generator().manual_seed(11)
    big = torch.randn(9, 40, generator=gen, dtype=F64).to(dtype)
    mu = big[:, ::2]                                   # [9, 20], stride (40, 2)
    r = torch.rand(1, 20, generator=gen, dtype=F64).to(dtype).expand(9, 20)  # stride 0
    w_kn = torch.randn(20, 18, generator=gen, dtype=F64).to(dtype)
    mu_out, r_out, _, _ = KL.linear_forward(mu, r, w_kn.t(), write_pre=False)
    close(mu_out, mu.to(F64) @ w_kn.to(F64), dtype)
    close(r_out, r.to(F64) @ w_kn.to(F64).abs(), dtype)


def test_linear_kernel_contains_sampled_points():
    """Soundness in fp32 up to rounding: sampled points of the input box stay in the output box."""
    gen = torch.Generator().manual_seed(12)
    mu, r, _, _ = rand_box((3, 10), gen, torch.float32)
    w = torch.randn(6, 10, generator=gen)
    b = torch.randn(6, generator=gen)
    mu_out, r_out, _, _ = KL.linear_forward(mu, r, w, None, b, relu=True)
    signs = torch.randint(0, 2, (64, 1, 10), generator=gen).to(F64) * 2 - 1   # vertices
    pts = torch.cat([signs, torch.rand(64, 1, 10, generator=gen, dtype=F64) * 2 - 1])
    x = mu.to(F64) + pts * r.to(F64)                   # [128, 3, 10]
    y = torch.relu(x @ w.to(F64).t() + b.to(F64))
    slack = 1e-5 * (1 + y.abs())
    assert bool((y >= (mu_out - r_out).to(F64) - slack).all())
    assert bool((y <= (mu_out + r_out).to(F64) + slack).all())


# ------------------------------------------------------------ adcert/ops/_triton_impl.py, direct

BN_CASES = {
    "plain": dict(bias=True, bn=False),
    "no_bias": dict(bias=False, bn=False),
    "bn": dict(bias=True, bn=True, bn_weight=True, bn_bias=True),
    "bn_no_affine": dict(bias=False, bn=True, bn_weight=False, bn_bias=False),
    "bn_weight_only": dict(bias=True, bn=True, bn_weight=True, bn_bias=False),
}


def _fused_params(case, c_out, gen, dtype):
    """``(bias, bn_mean, bn_var, bn_weight, bn_bias)`` in ``dtype`` (``None`` where absent)."""
    spec = BN_CASES[case]

    def vec(present, positive=False):
        if not present:
            return None
        if positive:
            return (torch.rand(c_out, generator=gen, dtype=F64) + 0.5).to(dtype)
        return torch.randn(c_out, generator=gen, dtype=F64).to(dtype)

    bn = spec["bn"]
    weight = vec(bn and spec.get("bn_weight", False))
    if weight is not None and c_out > 1:
        weight[0] = -weight[0].abs()                   # a negative BN scale
    return (vec(spec["bias"]), vec(bn), vec(bn, positive=True), weight,
            vec(bn and spec.get("bn_bias", False)))


def _check_fused(impl, kind, dtype, case, relu, mask, mu_shape, w_shape, conv=None, seed=0,
                 channels_last=False):
    gen = torch.Generator().manual_seed(seed)
    mu, r, _, _ = rand_box(mu_shape, gen, dtype)
    if channels_last:
        mu, r = (t.contiguous(memory_format=torch.channels_last) for t in (mu, r))
    w = (torch.randn(w_shape, generator=gen, dtype=F64) * 0.5).to(dtype)
    w.view(-1)[::5] = 0                                # sign(0) = 0 in the weight gradient
    params = _fused_params(case, w_shape[0], gen, dtype)
    eps = 1e-3
    conv_args = () if conv is None else tuple(conv)
    if kind == "linear":
        fwd, bwd = impl.interval_linear_bn_relu, impl.interval_linear_bn_relu_backward
    else:
        fwd, bwd = impl.interval_conv2d_bn_relu, impl.interval_conv2d_bn_relu_backward

    def ref_fn(m, rr, ww, *p):
        if kind == "linear":
            return ref.interval_linear_bn_relu(m, rr, ww, *p, eps, relu)
        return ref.interval_conv2d_bn_relu(m, rr, ww, *p, eps, *conv_args, relu)
    mu_out, r_out, mu_pre, r_pre = fwd(mu, r, w, *params, eps, *conv_args, relu)

    leaves = [leaf(mu), leaf(r), leaf(w)] + [None if p is None else leaf(p) for p in params]
    e_out = ref_fn(*leaves)
    close(mu_out, e_out[0], dtype)
    close(r_out, e_out[1], dtype)
    assert bool((r_out >= 0).all())
    e_pre = (ref.interval_linear(leaves[0], leaves[1], leaves[2]) if kind == "linear" else
             ref.interval_conv2d(leaves[0], leaves[1], leaves[2], None, *conv_args))
    close(mu_pre, e_pre[0], dtype)
    close(r_pre, e_pre[1], dtype)

    g = [torch.randn(mu_out.shape, generator=gen, dtype=F64) for _ in range(2)]
    got = bwd(g[0].to(dtype), g[1].to(dtype), mu, r, w, *params, eps, *conv_args, relu,
              mu_pre, r_pre, list(mask))
    assert len(got) == 8
    present = [t for t in leaves if t is not None]
    exp = dict(zip(map(id, present), grads(e_out, present, g)))
    wanted = [mask[0], mask[0], mask[1]] + [mask[2]] * 5
    for i, (a, t) in enumerate(zip(got, leaves)):
        if t is None or not wanted[i]:
            assert a is None, f"output {i}: expected None"
        else:
            close(a, exp[id(t)], dtype)
            assert a.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(BN_CASES))
@pytest.mark.parametrize("relu", [True, False])
def test_impl_linear_bn_relu(impl, case, relu, dtype):
    _check_fused(impl, "linear", dtype, case, relu, (True, True, True), (5, 9), (7, 9), seed=21)


@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False),
                                  (False, False, True), (False, False, False)])
def test_impl_linear_bn_relu_masks(impl, mask):
    _check_fused(impl, "linear", F64, "bn", True, mask, (3, 6), (4, 6), seed=22)


def test_impl_linear_bn_relu_empty_batch(impl):
    _check_fused(impl, "linear", torch.float32, "bn", True, (True, True, True), (0, 6), (4, 6))


CONV_CASES = [  # (mu shape, weight shape, (stride, padding, dilation, groups))
    ((2, 3, 5, 5), (4, 3, 3, 3), ([1, 1], [0, 0], [1, 1], 1)),
    ((1, 4, 6, 5), (6, 2, 3, 2), ([2, 1], [1, 2], [1, 2], 2)),
    ((2, 3, 4, 4), (5, 3, 1, 1), ([1, 1], [0, 0], [1, 1], 1)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["plain", "bn", "bn_no_affine"])
@pytest.mark.parametrize("conv_case", range(len(CONV_CASES)))
def test_impl_conv2d_bn_relu(impl, conv_case, case, dtype):
    mu_shape, w_shape, conv = CONV_CASES[conv_case]
    _check_fused(impl, "conv", dtype, case, True, (True, True, True), mu_shape, w_shape, conv,
                 seed=30 + conv_case)


@pytest.mark.parametrize("mask", [(True, False, True), (False, True, False),
                                  (False, False, True)])
def test_impl_conv2d_bn_relu_masks_no_relu(impl, mask):
    mu_shape, w_shape, conv = CONV_CASES[1]
    _check_fused(impl, "conv", F64, "bn_weight_only", False, mask, mu_shape, w_shape, conv,
                 seed=33)


def test_impl_conv2d_bn_relu_channels_last_and_empty(impl):
    mu_shape, w_shape, conv = CONV_CASES[0]
    _check_fused(impl, "conv", torch.float32, "bn", True, (True, True, True), mu_shape, w_shape,
                 conv, seed=34, channels_last=True)
    _check_fused(impl, "conv", torch.float32, "bn", True, (True, True, True), (0,) + mu_shape[1:],
                 w_shape, conv, seed=35)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_bias", [True, False])
def test_impl_linear(impl, with_bias, dtype):
    gen = torch.Generator().manual_seed(40)
    mu, r, mu64, r64 = rand_box((6, 11), gen, dtype)
    w = torch.randn(5, 11, generator=gen, dtype=F64).to(dtype)
    b = torch.randn(5, generator=gen, dtype=F64).to(dtype) if with_bias else None
    out = impl.interval_linear(mu, r, w, b)
    w64, b64 = leaf(w), (leaf(b) if with_bias else None)
    exp = ref.interval_linear(mu64, r64, w64, b64)
    for a, e in zip(out, exp):
        close(a, e, dtype)
    g = [torch.randn(6, 5, generator=gen, dtype=F64) for _ in range(2)]
    got = impl.interval_linear_backward(g[0].to(dtype), g[1].to(dtype), mu, r, w,
                                        [True, True, True])
    expected = grads(exp, (mu64, r64, w64), g) + [g[0].sum(0)]   # d bias, given or not
    for a, e in zip(got, expected):
        close(a, e, dtype)
    partial = impl.interval_linear_backward(g[0].to(dtype), g[1].to(dtype), mu, r, w,
                                            [False, True, False])
    assert partial[0] is None and partial[1] is None and partial[3] is None
    close(partial[2], got[2].to(F64), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("conv_case", range(len(CONV_CASES)))
def test_impl_conv2d(impl, conv_case, dtype):
    mu_shape, w_shape, conv = CONV_CASES[conv_case]
    gen = torch.Generator().manual_seed(50)
    mu, r, mu64, r64 = rand_box(mu_shape, gen, dtype)
    w = torch.randn(w_shape, generator=gen, dtype=F64).to(dtype)
    b = torch.randn(w_shape[0], generator=gen, dtype=F64).to(dtype)
    out = impl.interval_conv2d(mu, r, w, b, *conv)
    w64, b64 = leaf(w), leaf(b)
    exp = ref.interval_conv2d(mu64, r64, w64, b64, *conv)
    for a, e in zip(out, exp):
        close(a, e, dtype)
    g = [torch.randn(exp[0].shape, generator=gen, dtype=F64) for _ in range(2)]
    got = impl.interval_conv2d_backward(g[0].to(dtype), g[1].to(dtype), mu, r, w, *conv,
                                        [True, True, True])
    for a, e in zip(got, grads(exp, (mu64, r64, w64, b64), g)):
        close(a, e, dtype)
    partial = impl.interval_conv2d_backward(g[0].to(dtype), g[1].to(dtype), mu, r, w, *conv,
                                            [False, False, True])
    assert partial[:3] == (None, None, None)
    close(partial[3], got[3].to(F64), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 5), (2, 3, 2, 3), (0, 3)])
@pytest.mark.parametrize("affine", [(True, True), (False, False), (False, True)])
def test_impl_batch_norm(impl, shape, affine, dtype):
    gen = torch.Generator().manual_seed(60)
    mu, r, mu64, r64 = rand_box(shape, gen, dtype)
    c = shape[1]
    mean = torch.randn(c, generator=gen, dtype=F64).to(dtype)
    var = (torch.rand(c, generator=gen, dtype=F64) + 0.5).to(dtype)
    weight = torch.randn(c, generator=gen, dtype=F64).to(dtype) if affine[0] else None
    bias = torch.randn(c, generator=gen, dtype=F64).to(dtype) if affine[1] else None
    out = impl.interval_batch_norm(mu, r, mean, var, weight, bias, 1e-3)
    p64 = [leaf(mean), leaf(var), leaf(weight) if affine[0] else None,
           leaf(bias) if affine[1] else None]
    exp = ref.interval_batch_norm(mu64, r64, *p64, 1e-3)
    for a, e in zip(out, exp):
        close(a, e, dtype)
    g = [torch.randn(shape, generator=gen, dtype=F64) for _ in range(2)]
    got = impl.interval_batch_norm_backward(g[0].to(dtype), g[1].to(dtype), mu, r, mean, var,
                                            weight, bias, 1e-3)
    inputs = [mu64, r64] + p64
    present = [t for t in inputs if t is not None]
    exp_g = dict(zip(map(id, present), grads(exp, present, g)))
    for a, t in zip(got, inputs):
        if t is None:
            assert a is None
        else:
            close(a, exp_g[id(t)], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_impl_relu(impl, dtype):
    gen = torch.Generator().manual_seed(70)
    mu, r, mu64, r64 = rand_box((3, 4, 5), gen, dtype)
    out = impl.interval_relu(mu, r)
    exp = ref.interval_relu(mu64, r64)
    for a, e in zip(out, exp):
        close(a, e, dtype)
    g = [torch.randn(3, 4, 5, generator=gen, dtype=F64) for _ in range(2)]
    got = impl.interval_relu_backward(g[0].to(dtype), g[1].to(dtype), mu, r)
    for a, e in zip(got, grads(exp, (mu64, r64), g)):
        close(a, e, dtype)


# --------------------------------------------------------------------- schemas and registration

def _schemas():
    path = ROOT / "csrc" / "ops.cpp"
    if not path.exists():
        pytest.skip("csrc/ops.cpp not found")
    defs = re.findall(r'm\.def\(\s*((?:"(?:[^"\\]|\\.)*"\s*)+)\)', path.read_text())
    return ["".join(re.findall(r'"((?:[^"\\]|\\.)*)"', d)) for d in defs]


def test_impl_signatures_match_schemas(impl):
    schemas = {}
    for text in _schemas():
        schema = torch._C.parse_schema("adcert::" + text)
        schemas[schema.name.split("::")[1]] = schema
    assert set(impl.CUDA_KERNELS) <= set(schemas)   # box_status (a CPU argument check) has none
    for name, fn in impl.CUDA_KERNELS.items():
        params = list(inspect.signature(fn).parameters)
        assert params == [a.name for a in schemas[name].arguments], name


def test_impl_through_the_dispatcher(impl):
    """The functions registered as kernels of ops with the real schemas (a private namespace, CPU
    key): argument conversion (int[2], bool[3], float, Tensor?) and ``None`` outputs."""
    ns = "adcert_triton_interp_test"
    lib = torch.library.Library(ns, "DEF")
    try:
        for text in _schemas():
            lib.define(text)
        for name, fn in impl.CUDA_KERNELS.items():
            lib.impl(name, fn, "CPU")
        ops = getattr(torch.ops, ns)
        gen = torch.Generator().manual_seed(80)
        mu, r, _, _ = rand_box((2, 3, 5, 5), gen)
        w = torch.randn(4, 3, 3, 3, generator=gen, dtype=F64)
        params = _fused_params("bn", 4, gen, F64)
        conv = ([1, 1], [1, 1], [1, 1], 1)
        out = ops.interval_conv2d_bn_relu(mu, r, w, *params, 1e-5, *conv, True)
        direct = impl.interval_conv2d_bn_relu(mu, r, w, *params, 1e-5, *conv, True)
        for a, e in zip(out, direct):
            assert torch.equal(a, e)
        g = torch.randn(out[0].shape, generator=gen, dtype=F64)
        back = ops.interval_conv2d_bn_relu_backward(g, g, mu, r, w, *params, 1e-5, *conv, True,
                                                    out[2], out[3], [False, True, True])
        assert back[0] is None and back[1] is None and all(t is not None for t in back[2:])
        lin = ops.interval_linear_backward(g[:, :, 0, 0], g[:, :, 0, 0], mu[:, :, 0, 0],
                                           r[:, :, 0, 0], w[:, :, 0, 0], [True, False, False])
        assert lin[2] is None and lin[3] is None and lin[0].shape == (2, 3)
    finally:
        lib._destroy()


def test_register_cuda_kernels(impl):
    """With the compiled schemas loaded, registration for the CUDA key succeeds (idempotently)."""
    try:
        torch.ops.adcert.interval_linear
    except (AttributeError, RuntimeError):
        pytest.skip("adcert._C (the op schemas) is not loaded")
    impl.register_cuda_kernels()
    impl.register_cuda_kernels()
    for name in impl.CUDA_KERNELS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"adcert::{name}", "CUDA"), name
