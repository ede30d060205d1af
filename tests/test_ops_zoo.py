"""A zoo of small models written the way users write them, bounded by every method.

Each model uses the operations ``compute_bounds`` accepts in traced (``torch.fx``) user models:
a hand-written normalisation module with buffers, functional ReLUs (``F.relu``, ``torch.relu``,
``x.relu()``), ``torch.flatten`` / ``x.view(x.size(0), -1)`` / ``reshape``, max and average
pooling, a tiny ResNet with ``AdaptiveAvgPool2d``, Sigmoid/Tanh, ``torch.cat`` of two branches,
``permute``/``transpose``/``unsqueeze``/``squeeze`` and arithmetic with numbers, buffers and
parameters.

Checked for every model and method (``sound`` in {False, True} where supported):

* soundness: the model's outputs at random points of the box and at random box vertices lie in
  ``[lb, ub]``, and the true margins ``z_y - z_i`` are >= the margin lower bounds (fp64, 1e-9);
* alpha-CROWN is at least as tight as CROWN (both sides);
* ``sound=True`` only widens the fp64 bounds of the same method (ibp, crown);
* twins: the user-written models give the same bounds as their ``nn.Sequential`` /
  ``nn.ReLU``-module twins;
* gradients: IBP and CROWN-IBP losses reach every parameter and match finite differences;
* training: IBP margins of a user CNN (own normalisation, pooling) give finite nonzero gradients
  and a few optimiser steps reduce the IBP loss.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adcert.bounds import compute_bounds
from box_sampling import one_thread_per_module, outputs_at, sample_points  # noqa: F401
from adcert.models import Normalize

DT = torch.float64
TOL = 1e-9
METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")
SOUND_METHODS = ("ibp", "crown", "alpha-crown")
EPS = 0.03
MEAN3 = (0.4914, 0.4822, 0.4465)
STD3 = (0.2470, 0.2435, 0.2616)


def opts(method):
    return {"iterations": 3} if method == "alpha-crown" else {}


# ----------------------------------------------------------------------------- the zoo


class MyNormalize(nn.Module):
    """What users write: buffers shaped ``[1, C, 1, 1]`` and ``(x - mean) / std``."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class UserNormCNN(nn.Module):
    """Own Normalize, functional ReLUs of three spellings, torch.flatten."""

    def __init__(self):
        super().__init__()
        self.norm = MyNormalize(MEAN3, STD3)
        self.conv1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        x = self.norm(x)
        x = F.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.flatten(x, 1)
        x = self.fc1(x).relu()
        return self.fc2(x)

    def twin(self):
        """The same function as an ``nn.Sequential`` of library modules (same weights)."""
        norm = Normalize(MEAN3, STD3)
        seq = nn.Sequential(norm, nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(),
                            nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                            nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 5)).to(DT)
        with torch.no_grad():
            for dst, src in ((seq[1], self.conv1), (seq[3], self.conv2), (seq[6], self.fc1),
                             (seq[8], self.fc2)):
                dst.weight.copy_(src.weight)
                dst.bias.copy_(src.bias)
            norm.mean.copy_(self.norm.mean.reshape(-1))
            norm.std.copy_(self.norm.std.reshape(-1))
        return seq


class NormMaxPoolCNN(nn.Module):
    """Own normalisation with ``[C]`` buffers viewed in forward, nn.MaxPool2d(2) and an
    overlapping F.max_pool2d(3, 2, 1), x.view(x.size(0), -1)."""

    def __init__(self, pool="max"):
        super().__init__()
        self.register_buffer("mean", torch.tensor(MEAN3))
        self.register_buffer("std", torch.tensor(STD3))
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.pool1 = nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = pool
        self.fc = nn.Linear(4 * 2 * 2, 5)

    def forward(self, x):
        x = (x - self.mean.view(1, 3, 1, 1)) / self.std.view(1, 3, 1, 1)
        x = self.pool1(torch.relu(self.conv1(x)))
        x = F.relu(self.conv2(x))
        if self.pool == "max":
            x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        else:
            x = F.avg_pool2d(x, 2)
        return self.fc(x.view(x.size(0), -1))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, functional):
        super().__init__()
        self.functional = functional
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))
        if not functional:
            self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        if self.functional:
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return F.relu(out + self.shortcut(x))
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self, functional=True):
        super().__init__()
        self.functional = functional
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.layer1 = BasicBlock(4, 4, 1, functional)
        self.layer2 = BasicBlock(4, 6, 2, functional)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(6, 4)
        if not functional:
            self.relu = nn.ReLU()

    def forward(self, x):
        out = self.bn(self.conv(x))
        out = F.relu(out) if self.functional else self.relu(out)
        out = self.layer2(self.layer1(out))
        out = self.avgpool(out)
        out = torch.flatten(out, 1)
        return self.fc(out)


class SigTanhNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, stride=2, padding=1)
        self.act1 = nn.Sigmoid()
        self.conv2 = nn.Conv2d(3, 3, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(3 * 2 * 2, 8)
        self.act3 = nn.Tanh()
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        x = self.act1(self.conv1(x))
        x = torch.tanh(self.conv2(x))
        x = self.act3(self.fc1(x.flatten(1)))
        return self.fc2(torch.sigmoid(x))


class CatNet(nn.Module):
    """Two branches of the same tensor concatenated along channels (inception style)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 3, stride=2, padding=1)
        self.b3 = nn.Conv2d(3, 2, 3, padding=1)
        self.b1 = nn.Conv2d(3, 2, 1)
        self.fc = nn.Linear(4 * 4 * 4, 4)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = torch.cat([F.relu(self.b3(h)), self.b1(h).relu()], dim=1)
        return self.fc(torch.flatten(h, 1))


class PermuteNet(nn.Module):
    """Channels-last permute, a transpose, unsqueeze/squeeze and reshape(-1, K)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(4 * 4 * 3, 10)
        self.fc2 = nn.Linear(10, 4)

    def forward(self, x):
        h = F.relu(self.conv(x))           # [B, 3, 4, 4]
        h = h.permute(0, 2, 3, 1)          # [B, 4, 4, 3]
        h = h.transpose(1, 2)              # [B, 4, 4, 3]
        h = h.reshape(-1, 4 * 4 * 3)
        h = torch.relu(self.fc1(h)).unsqueeze(1)
        return self.fc2(h.squeeze(1))


class ArithNet(nn.Module):
    """Arithmetic with numbers, buffers and parameters of both signs."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.conv = nn.Conv2d(1, 3, 3, stride=2, padding=1)
        self.gain = nn.Parameter(torch.tensor([1.5, -0.5, 2.0]).view(3, 1, 1))
        self.register_buffer("shift", torch.tensor([0.1, -0.2, 0.3]).view(1, 3, 1, 1))
        self.register_buffer("pos", torch.randn(3, 4, 4, generator=g) * 0.1)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        x = (x - 0.5) * 2.0
        h = self.conv(x)
        h = F.relu(h * self.gain - self.shift)
        h = 1.0 - h
        h = -h / 3.0 + self.pos
        h = torch.relu(0.25 - h)
        return self.fc(h.view(h.size(0), -1))


def _perturb_bn(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g, dtype=DT) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=g, dtype=DT) + 0.5)
                m.weight.copy_(torch.randn(c, generator=g, dtype=DT) * 0.3 + 1.0)
                m.bias.copy_(torch.randn(c, generator=g, dtype=DT) * 0.2)
    return model


ZOO = {
    "user_norm_cnn": (UserNormCNN, 3),
    "norm_maxpool_cnn": (NormMaxPoolCNN, 3),
    "resnet_functional": (TinyResNet, 1),
    "sigmoid_tanh": (SigTanhNet, 1),
    "cat": (CatNet, 1),
    "permute": (PermuteNet, 1),
    "arith": (ArithNet, 1),
}


def make(name, seed=0, batch=2):
    cls, channels = ZOO[name]
    torch.manual_seed(seed)
    model = cls().to(DT)
    _perturb_bn(model).eval()
    x = torch.rand(batch, channels, 8, 8, dtype=DT, generator=torch.Generator().manual_seed(seed))
    return model, x


# ----------------------------------------------------------------------------- helpers


def true_margins(z, y):
    """``[B, N, C]`` true ``z_y - z_i`` from logits ``z: [B, N, C]``."""
    B, N, _ = z.shape
    return z.gather(2, y.view(B, 1, 1).expand(B, N, 1)) - z


def assert_contains(lb, ub, z, what=""):
    lo_gap = (lb.unsqueeze(1) - z).max().item()
    hi_gap = (z - ub.unsqueeze(1)).max().item()
    assert lo_gap <= TOL and hi_gap <= TOL, (what, lo_gap, hi_gap)


# ----------------------------------------------------------------------------- soundness


CASES = [(m, s) for m in METHODS for s in (False, True) if not (s and m == "crown-ibp")]


@pytest.mark.parametrize("method,sound", CASES, ids=[f"{m}-{'sound' if s else 'plain'}"
                                                     for m, s in CASES])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_bounds_contain_outputs_and_margins(name, method, sound):
    model, x = make(name)
    lb, ub = compute_bounds(model, x, EPS, method=method, sound=sound, **opts(method))
    z = outputs_at(model, sample_points(x, EPS))
    assert lb.shape == ub.shape == z.shape[:1] + z.shape[2:]
    assert torch.isfinite(lb).all() and torch.isfinite(ub).all()
    assert (lb <= ub).all()
    assert_contains(lb, ub, z, (name, method, sound))

    y = torch.arange(x.shape[0]) % z.shape[-1]
    m = compute_bounds(model, x, EPS, method=method, y=y, sound=sound, **opts(method))
    assert m.shape == (x.shape[0], z.shape[-1]) and torch.isfinite(m).all()
    assert (m.gather(1, y.view(-1, 1)) == 0).all()
    truth = true_margins(z, y).min(1).values
    assert (m <= truth + TOL).all(), (name, method, sound, (m - truth).max().item())


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_alpha_crown_not_looser_than_crown(name):
    model, x = make(name)
    lc, uc = compute_bounds(model, x, EPS, method="crown")
    la, ua = compute_bounds(model, x, EPS, method="alpha-crown", iterations=3)
    assert (la >= lc - TOL).all(), (la - lc).min().item()
    assert (ua <= uc + TOL).all(), (ua - uc).max().item()
    y = torch.arange(x.shape[0]) % lc.shape[-1]
    mc = compute_bounds(model, x, EPS, method="crown", y=y)
    ma = compute_bounds(model, x, EPS, method="alpha-crown", y=y, iterations=3)
    assert (ma >= mc - TOL).all(), (ma - mc).min().item()


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_sound_widens_plain(name):
    model, x = make(name)
    for method in ("ibp", "crown"):
        lp, up = compute_bounds(model, x, EPS, method=method)
        ls, us = compute_bounds(model, x, EPS, method=method, sound=True)
        assert (ls <= lp + 1e-12).all(), (method, (ls - lp).max().item())
        assert (us >= up - 1e-12).all(), (method, (up - us).max().item())
        # and only by a rounding-sized amount in fp64
        assert (lp - ls).max() < 1e-6 and (us - up).max() < 1e-6, method


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_training_gradients(name):
    """IBP and CROWN-IBP losses (``F.cross_entropy(-margins, y)``) reach every parameter (learnable
    arithmetic constants included) with finite gradients that match central finite differences
    along a random direction."""
    model, x = make(name)
    y = torch.arange(x.shape[0])
    params = [p for p in model.parameters()]
    g = torch.Generator().manual_seed(9)
    direction = [torch.randn(p.shape, generator=g, dtype=DT) for p in params]
    for method in ("ibp", "crown-ibp"):
        def loss():
            return F.cross_entropy(-compute_bounds(model, x, EPS, method=method, y=y), y)

        model.zero_grad()
        loss().backward()
        for (pname, p) in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (method, pname)
            assert p.grad.abs().sum() > 0, (method, pname)
        analytic = sum((p.grad * d).sum() for p, d in zip(params, direction)).item()
        h = 1e-6
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(h * d)
            plus = loss().item()
            for p, d in zip(params, direction):
                p.sub_(2 * h * d)
            minus = loss().item()
            for p, d in zip(params, direction):
                p.add_(h * d)
        numeric = (plus - minus) / (2 * h)
        assert abs(numeric - analytic) <= 1e-5 * (1 + abs(analytic)), (method, numeric, analytic)


# ----------------------------------------------------------------------------- twins


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_user_norm_cnn_equals_sequential_twin(method):
    model, x = make("user_norm_cnn")
    twin = model.twin()
    pts = sample_points(x, EPS, n=20)
    torch.testing.assert_close(outputs_at(model, pts), outputs_at(twin, pts),
                               rtol=1e-12, atol=1e-12)
    a = compute_bounds(model, x, EPS, method=method)
    b = compute_bounds(twin, x, EPS, method=method)
    for s, t in zip(a, b):
        torch.testing.assert_close(s, t, rtol=1e-12, atol=1e-12)
    y = torch.tensor([1, 3])
    torch.testing.assert_close(compute_bounds(model, x, EPS, method=method, y=y),
                               compute_bounds(twin, x, EPS, method=method, y=y),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_functional_resnet_equals_module_relu_twin(method):
    model, x = make("resnet_functional")
    twin = TinyResNet(functional=False).to(DT).eval()
    twin.load_state_dict(model.state_dict())
    pts = sample_points(x, EPS, n=20)
    torch.testing.assert_close(outputs_at(model, pts), outputs_at(twin, pts),
                               rtol=1e-12, atol=1e-12)
    for s, t in zip(compute_bounds(model, x, EPS, method=method),
                    compute_bounds(twin, x, EPS, method=method)):
        torch.testing.assert_close(s, t, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- training


def _train_model(pool):
    torch.manual_seed(5)
    return NormMaxPoolCNN(pool=pool).to(DT)


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_user_cnn_with_own_normalisation_trains_with_ibp(pool):
    """The issue's "user CNN with own normalisation and max pooling trains with ibp"."""
    model = _train_model(pool)
    g = torch.Generator().manual_seed(6)
    x = torch.rand(8, 3, 8, 8, dtype=DT, generator=g)
    y = torch.randint(0, 5, (8,), generator=g)
    eps = 0.01

    margins = compute_bounds(model, x, eps, method="ibp", y=y)
    F.cross_entropy(-margins, y).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname
    model.zero_grad()

    def ibp_loss():
        return F.cross_entropy(-compute_bounds(model, x, eps, method="ibp", y=y), y)

    with torch.no_grad():
        before = ibp_loss().item()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(10):
        opt.zero_grad()
        loss = ibp_loss()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = ibp_loss().item()
    assert after < before, (before, after)
    # the bounds of the trained model are still sound
    lb, ub = compute_bounds(model, x[:2], eps, method="ibp")
    assert_contains(lb, ub, outputs_at(model, sample_points(x[:2], eps, n=50)))
