"""The Triton AD-CERT loss kernel (``kernels/adcert_loss.py``) and its CUDA op implementation
(``adcert/ops/_triton_impl.py``), run on CPU tensors under the Triton interpreter and compared
with the fp64 plain-torch reference and the C++ CPU op.

Same per-process interpreter caveats as ``tests/test_triton_kernels.py`` (read its header):
Triton picks interpreter-or-compiler once per process, when it is first imported. This module
collects *without* importing triton (it sorts before ``test_triton_kernels.py``, whose collection
skips when triton is already imported): triton and the kernel are loaded by a module fixture,
with ``TRITON_INTERPRET=1`` set (and removed again afterwards if it was set here). If triton was
already imported as the compiler (not the interpreter), the tests skip with that reason; on a
machine with a GPU they skip unless ``TRITON_INTERPRET=1`` is already in the environment.
"""
import os
import sys
from pathlib import Path

import pytest
import torch  # does not import triton

pytestmark = pytest.mark.triton

if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available():
    pytest.skip("a GPU is present: the interpreter tests run on CPU-only machines, or in their "
                "own process with TRITON_INTERPRET=1", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # _triton_impl falls back to ``import kernels`` in a source checkout
    sys.path.insert(0, str(ROOT))

from adcert import ops  # noqa: E402,F401  (loads adcert._C: the CPU op)
from adcert.ops import reference as ref  # noqa: E402
from conftest import interpreted_kernel  # noqa: E402

F64 = torch.float64


@pytest.fixture(scope="module")
def KA():
    """The interpreted ``kernels/adcert_loss.py`` (package ``_adcert_kernels_interpreted``)."""
    yield from interpreted_kernel("adcert_loss")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    """The interpreter reads the variable again at launch time."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def impl(monkeypatch, KA):
    from adcert.ops import _triton_impl
    monkeypatch.setattr(_triton_impl, "_loss", KA)
    return _triton_impl


def test_kernel_is_interpreted(KA):
    from triton.runtime.interpreter import InterpretedFunction
    assert isinstance(KA._adcert_loss_kernel, InterpretedFunction)


def _inputs(B, C, dtype, extreme=False, clean=False):
    gen = torch.Generator().manual_seed(C + B)
    scale = 1e4 if extreme else 3.0
    s, t, m, c = (torch.randn(B, C, generator=gen, dtype=F64) * scale for _ in range(4))
    m[torch.arange(B), torch.randint(C, (B,), generator=gen)] = 0.0
    return [x.to(dtype) for x in (s, t, m)] + [c.to(dtype) if clean else None]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("C", [1, 10, 200, 1000])
@pytest.mark.parametrize("extreme", [False, True])
@pytest.mark.parametrize("clean", [False, True])
@pytest.mark.parametrize("alpha,tau", [(0.37, 1.0), (0.0, 4.0), (1.0, 4.0)])
def test_kernel_matches_reference_and_cpu_op(impl, dtype, C, extreme, clean, alpha, tau):
    B = 5
    s, t, m, c = _inputs(B, C, dtype, extreme, clean)
    out = impl.adcert_loss(s, t, m, c, alpha, tau, 0.7)
    cpu = torch.ops.adcert.adcert_loss(s, t, m, c, alpha, tau, 0.7)
    leaves = [x.to(F64).requires_grad_() for x in (s, m) + ((c,) if clean else ())]
    want = ref.adcert_loss(leaves[0], t.to(F64), leaves[1], alpha, tau, "none",
                           clean_logits=leaves[2] if clean else None, adv_weight=0.7)
    want_g = torch.autograd.grad(want.sum(), leaves)
    if dtype == F64:
        tol = dict(rtol=1e-9, atol=1e-6 if extreme else 1e-9)
    else:
        tol = dict(rtol=1e-4, atol=2e-2 if extreme else 1e-4)
    assert out[0].shape == (B,) and out[3].shape == ((B, C) if clean else (0,))
    torch.testing.assert_close(out[0].to(F64), want.detach(), **tol)
    for got, exp in zip((out[1], out[2]) + ((out[3],) if clean else ()), want_g):
        torch.testing.assert_close(got.to(F64), exp, **tol)
    for a, b in zip(out, cpu):
        torch.testing.assert_close(a, b, **tol)


def test_kernel_empty(impl):
    e = torch.zeros(0, 10)
    out = impl.adcert_loss(e, e, e, None, 0.5, 1.0, 0.8)
    assert out[0].shape == (0,) and out[1].shape == (0, 10) and out[3].shape == (0,)


def test_registered_for_cuda(impl):
    from adcert.ops import _triton_impl
    assert _triton_impl.CUDA_KERNELS["adcert_loss"] is _triton_impl.adcert_loss
