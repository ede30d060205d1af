"""Shared test helpers: random boxes and parameters for the interval ops."""
from __future__ import annotations

import copy
import importlib
import os
import pathlib
import sys
import types

import pytest
import torch
from torch import nn

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


def randomize_bn(model, gen):
    """Random statistics and affine parameters (scales of both signs) for every batch norm of
    ``model``, drawn in fp64 from ``gen``; returns ``model``."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
                m.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64) * 0.3)
                m.running_mean.copy_(torch.randn(c, generator=gen, dtype=torch.float64) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.3)
    return model


def perturb_bn(model):
    """Batch norms moved away from their identity initialisation (positive scales near 1), from
    torch's global generator; returns ``model``."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0, 0.2)
    return model


def frozen_copy(model, stats):
    """An eval-mode copy of ``model`` whose batch norms use ``stats`` (``{bn: (mean, var)}``, e.g.
    from ``clean_bn_stats``; ``None``: unchanged): the function the bounds are of."""
    twin = copy.deepcopy(model)
    for orig, dup in zip(model.modules(), twin.modules()):
        if stats and orig in stats:
            with torch.no_grad():
                dup.running_mean.copy_(stats[orig][0])
                dup.running_var.copy_(stats[orig][1])
    return twin.eval()


def interpreted_kernel(module: str):
    """Body of a module-scoped fixture that yields ``kernels/<module>.py`` loaded under the Triton
    interpreter (package ``_adcert_kernels_interpreted``). Sets ``TRITON_INTERPRET=1`` for the
    import and removes it afterwards if it was set here; skips when triton is absent or was
    already imported as the compiler (the choice is made once per process)."""
    set_here = os.environ.get("TRITON_INTERPRET") != "1"
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton", reason="triton is not installed")
        from triton.language import standard
        from triton.runtime.interpreter import InterpretedFunction
        if not isinstance(standard.sum, InterpretedFunction):
            pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set; run with "
                        "TRITON_INTERPRET=1 in the environment")
        name = "_adcert_kernels_interpreted"
        package = sys.modules.get(name)
        if package is None:
            package = types.ModuleType(name)
            package.__path__ = [str(REPO / "kernels")]
            sys.modules[name] = package
        yield importlib.import_module(f"{name}.{module}")
    finally:
        if set_here:
            os.environ.pop("TRITON_INTERPRET", None)


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
