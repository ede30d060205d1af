"""Points of an L-inf input box for soundness tests: the box, uniform points, random vertices
and the two extreme corners, and a model's outputs at all of them."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread_per_module():
    """Tiny tensors: one intra-op thread is faster, and far faster on a loaded machine (autouse
    in every module that imports it)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def box(x, eps):
    """``[clamp(x - eps, 0, 1), clamp(x + eps, 0, 1)]``."""
    return (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)


def sample_points(x, eps, n=200, seed=1):
    """``[B, 2n + 2, *in]``: n uniform points, n random vertices and the two extreme corners."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = box(x, eps)
    shape = (x.shape[0], n) + x.shape[1:]
    u = torch.rand(shape, generator=g, dtype=x.dtype)
    v = (torch.rand(shape, generator=g) < 0.5).to(x.dtype)
    ends = torch.stack([torch.zeros_like(x), torch.ones_like(x)], 1)
    return lo.unsqueeze(1) + torch.cat([u, v, ends], 1) * (hi - lo).unsqueeze(1)


def outputs_at(model, pts):
    """The model at every point: ``[B, N, *out]``."""
    B, N = pts.shape[:2]
    with torch.no_grad():
        z = model(pts.reshape((B * N,) + pts.shape[2:]))
    return z.reshape((B, N) + z.shape[1:])
