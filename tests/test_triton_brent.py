"""The Triton Brent-step kernel (``kernels/brent_step.py``) and its CUDA op implementation
(``adcert/ops/_triton_impl.py``), run on CPU tensors under the Triton interpreter and compared
bit for bit with the C++ CPU op and the plain-torch reference.

Same per-process interpreter caveats as ``tests/test_triton_adcert_loss.py`` (read its header):
this module collects without importing triton; a module fixture loads triton and the kernel with
``TRITON_INTERPRET=1`` set, and skips when triton was already imported as the compiler or when a
GPU is present without ``TRITON_INTERPRET=1`` in the environment.
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

from adcert.ops.brent_step import (DONE, XCUR, brent_init,  # noqa: E402  (loads adcert._C)
                                   brent_step_reference)
from conftest import interpreted_kernel  # noqa: E402


@pytest.fixture(scope="module")
def KB():
    """The interpreted ``kernels/brent_step.py`` (package ``_adcert_kernels_interpreted``)."""
    yield from interpreted_kernel("brent_step")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def impl(monkeypatch, KB):
    from adcert.ops import _triton_impl
    monkeypatch.setattr(_triton_impl, "_brent", KB)
    return _triton_impl


def test_kernel_is_interpreted(KB):
    from triton.runtime.interpreter import InterpretedFunction
    assert isinstance(KB._brent_step_kernel, InterpretedFunction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_equals_cpu_op_and_reference_along_searches(impl, dtype):
    """Searches on steps, plateaus and cubics (every branch of the step), 300 samples (more than
    one program, a ragged last block): all three implementations agree at every step."""
    n = 300
    g = torch.Generator().manual_seed(3)
    roots = (torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.05).to(dtype)

    def fn(x):
        d = x - roots
        f = d * d * d + 0.5 * d
        f[1::4] = torch.where(x[1::4] < roots[1::4], -1.0, 1.0).to(dtype)
        plateau = torch.clamp(d, max=0) + torch.clamp(d - 0.1, min=0)
        f[2::4] = plateau[2::4]
        return f

    a, b = torch.zeros(n, dtype=dtype), torch.ones(n, dtype=dtype)
    rtol = 4 * torch.finfo(dtype).eps
    s_tri = s_cpu = s_ref = brent_init(a, fn(a), b, fn(b))
    f = fn(b)
    for _ in range(12):
        s_tri = impl.brent_step(s_tri, f, 1e-6, rtol, 10)
        s_cpu = torch.ops.adcert.brent_step(s_cpu, f, 1e-6, rtol, 10)
        s_ref = brent_step_reference(s_ref, f, 1e-6, rtol, 10)
        torch.testing.assert_close(s_tri, s_cpu, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(s_tri, s_ref, rtol=0, atol=0, equal_nan=True)
        f = fn(s_tri[XCUR])
    assert bool((s_tri[DONE] == 1).all())


def test_kernel_random_states_and_empty_batch(impl):
    g = torch.Generator().manual_seed(5)
    n = 257
    state = torch.randn(12, n, generator=g)
    state[10] = (torch.rand(n, generator=g) < 0.3).float()
    state[11] = torch.randint(0, 4, (n,), generator=g).float()
    state[0, ::5] = state[2, ::5]
    f = torch.randn(n, generator=g)
    f[::9] = 0
    torch.testing.assert_close(impl.brent_step(state, f, 1e-2, 1e-5, 3),
                               torch.ops.adcert.brent_step(state, f, 1e-2, 1e-5, 3),
                               rtol=0, atol=0, equal_nan=True)
    empty = torch.zeros(12, 0)
    assert impl.brent_step(empty, torch.zeros(0), 1e-3, 0.0, 3).shape == (12, 0)
