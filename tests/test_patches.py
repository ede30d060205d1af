"""Receptive-field (patches) back-substitution: the same bounds as dense rows, at a fraction of
the cost, in plain and sound mode, for every kind of convolution chain (stride, padding,
dilation, batch norm, max pooling and residual joins falling back to dense rows)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from adcert.bounds import compute_bounds
from adcert.bounds.patches import Patches, unit_patches

DT = torch.float64


def test_unit_patches_round_trip_to_dense():
    idx = torch.tensor([[0, 5, 17, 35], [1, 2, 3, 4]])
    p = unit_patches(idx, (2, 3, 6), DT)
    dense = p.to_dense()
    assert dense.shape == (2, 8, 2, 3, 6)
    flat = dense.flatten(2)
    want = torch.zeros(2, 4, 36, dtype=DT).scatter_(2, idx.unsqueeze(2), 1.0)
    assert torch.equal(flat, torch.cat([want, -want], 1))


def test_gather_and_dense_respect_the_map_edges():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(1, 2, 4, 5, dtype=DT, generator=g)
    data = torch.randn(1, 3, 2, 3, 3, dtype=DT, generator=g)
    top = torch.tensor([[-1, 2, 0]])
    left = torch.tensor([[-2, 3, 1]])
    p = Patches(data, top, left, (2, 4, 5)).masked()
    dense = p.to_dense()
    # the window entries that fall inside the map, written there; the rest dropped
    for s in range(3):
        for i in range(3):
            for j in range(3):
                y, x = int(top[0, s]) + i, int(left[0, s]) + j
                inside = 0 <= y < 4 and 0 <= x < 5
                assert bool((p.data[0, s, :, i, j] == 0).all()) or inside
                if inside:
                    assert torch.equal(dense[0, s, :, y, x], p.data[0, s, :, i, j])
                    assert torch.equal(p.gather(t)[0, s, :, i, j], t[0, :, y, x])
    torch.testing.assert_close((p.data * p.gather(t)).flatten(2).sum(-1),
                               (dense * t.unsqueeze(1)).flatten(2).sum(-1))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5))

    def forward(self, x):
        h = torch.relu(self.c1(x))
        return self.head(self.c2(h) + h)


def _models():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6)
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 1.5)
    return {
        "strided": nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv2d(4, 6, 4, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(6, 5)),
        "dilated_bn": nn.Sequential(nn.Conv2d(2, 6, 3, padding=2, dilation=2), bn, nn.ReLU(),
                                    nn.Conv2d(6, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 1),
                                    nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 5)),
        "maxpool": nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(4 * 9, 5)),
        "grouped": nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.ReLU(),
                                 nn.Flatten(), nn.Linear(4 * 36, 5)),
        "residual": Residual(),
    }


@pytest.mark.parametrize("name", list(_models()))
@pytest.mark.parametrize("sound", [False, True])
def test_patches_give_the_dense_bounds_and_contain_the_outputs(name, sound):
    model = _models()[name].to(DT if not sound else torch.float32).eval()
    dtype = DT if not sound else torch.float32
    x = torch.rand(2, 2, 6, 6, dtype=dtype)
    eps = 0.05
    got = compute_bounds(model, x, eps, method="crown", sound=sound, patches=True)
    ref = compute_bounds(model, x, eps, method="crown", sound=sound, patches=False)
    tol = 1e-10 if not sound else 1e-4
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    pts = (x.unsqueeze(0) + eps * (2 * torch.rand((300,) + x.shape, dtype=dtype) - 1)).clamp(0, 1)
    with torch.no_grad():
        outs = torch.stack([model.double()(p.double()) for p in pts])
    lb, ub = got
    assert bool((lb.double() <= outs + 1e-9).all()) and bool((outs <= ub.double() + 1e-9).all())
    if sound:  # sound windows stay as tight as the sound dense rows (their gamma_n is smaller)
        assert bool((got[0] >= ref[0] - 1e-6).all()) and bool((got[1] <= ref[1] + 1e-6).all())


def test_patches_option_is_checked():
    model = _models()["strided"].to(DT)
    with pytest.raises(ValueError, match="patches"):
        compute_bounds(model, torch.rand(1, 2, 6, 6, dtype=DT), 0.1, method="crown",
                       patches="yes")
