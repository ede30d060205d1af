"""Shared test helpers: random boxes and parameters for the interval ops."""
from __future__ import annotations

import pathlib

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-10)}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def random_box(shape, dtype=torch.float64, device="cpu", noncontiguous=False):
    """A random ``(mu, r)`` box; with ``noncontiguous`` both are strided views."""
    if noncontiguous:
        big = tuple(shape[:-1]) + (2 * shape[-1],)
        mu = torch.randn(big, dtype=dtype, device=device)[..., ::2]
        r = torch.rand(big, dtype=dtype, device=device)[..., ::2]
        assert not mu.is_contiguous() or mu.numel() <= 1
        return mu, r
    return (torch.randn(shape, dtype=dtype, device=device),
            torch.rand(shape, dtype=dtype, device=device))


def random_bn(channels, dtype=torch.float64, device="cpu", affine=True):
    """Random batch-norm statistics and parameters ``(mean, var, weight, bias)``, each ``[C]``;
    weights of both signs so ``|s|`` matters."""
    mean = torch.randn(channels, dtype=dtype, device=device)
    var = torch.rand(channels, dtype=dtype, device=device) + 0.1
    if not affine:
        return mean, var, None, None
    return (mean, var, torch.randn(channels, dtype=dtype, device=device),
            torch.randn(channels, dtype=dtype, device=device))


def to64(t):
    return None if t is None else t.detach().double()


@pytest.fixture
def shared_data():
    """``pathlib.Path`` of the shared data (``$ADCERT_DATA``, else ``<repo>/../shared/data``);
    skips the test when it is absent."""
    import os

    env = os.environ.get("ADCERT_DATA")
    path = pathlib.Path(env) if env else REPO.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"../shared/data not found: {path} is absent (set ADCERT_DATA to the shared "
                    f"data directory to run this test)")
    return path


@pytest.fixture
def float64_default():
    """fp64 as torch's default dtype for one test, restored afterwards (formula checks); use with
    ``pytestmark = pytest.mark.usefixtures("float64_default")``."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
