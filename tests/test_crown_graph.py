"""CROWN-family bounds (crown-ibp, crown, alpha-crown) on traced graphs: residual joins (identity
and conv shortcuts), AvgPool2d and ``x.view(B, -1)``.

Soundness is checked against the true margins ``z_y - z_i`` of the model at points sampled in the
box (vertices included); the residual back-substitution against Sequential networks that compute
the same function.
"""
import copy

import pytest
import torch
from torch import nn

from adcert.bounds import clean_bn_stats, compute_bounds, get_plan
from adcert.bounds.linear_relax import backward_lower, lower_plan
from conftest import frozen_copy, perturb_bn

DT = torch.float64
CROWN_FAMILY = ("crown-ibp", "crown", "alpha-crown")


class Block(nn.Module):
    """relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)); shortcut: identity or conv+BN."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.b1 = nn.BatchNorm2d(cout)
        self.r1 = nn.ReLU()
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride),
                                       nn.BatchNorm2d(cout))
        self.r2 = nn.ReLU()

    def forward(self, x):
        return self.r2(self.b2(self.c2(self.r1(self.b1(self.c1(x))))) + self.short(x))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block1 = Block(4, 4, 1)
        self.block2 = Block(4, 6, 2)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(6 * 2 * 2, 3)

    def forward(self, x):
        h = self.pool(self.block2(self.block1(self.stem(x))))
        return self.fc(h.view(h.size(0), -1))


def make(bn_mode, batch=2, seed=0):
    torch.manual_seed(seed)
    model = perturb_bn(TinyResNet().double())
    x = torch.rand(batch, 2, 8, 8, dtype=DT)
    y = torch.randint(0, 3, (batch,))
    if bn_mode == "train":
        model.train()
        stats = clean_bn_stats(model, x)
        return model, x, y, stats, frozen_copy(model, stats)
    return model.eval(), x, y, None, model


def true_margins(net, x, y, eps, n=200):
    """``[B, N, C]`` true ``z_y - z_i`` at random points and random vertices of the box."""
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    u = torch.rand((x.shape[0], n) + x.shape[1:], dtype=DT)
    verts = (torch.rand_like(u) < 0.5).to(DT)
    pts = lo.unsqueeze(1) + torch.cat([u, verts], 1) * (hi - lo).unsqueeze(1)
    B, N = pts.shape[:2]
    with torch.no_grad():
        z = net(pts.reshape((B * N,) + x.shape[1:])).reshape(B, N, -1)
    return z.gather(2, y.view(B, 1, 1).expand(B, N, 1)) - z


def test_plan_has_graph_steps():
    from adcert.bounds.plan import AvgPoolStep, ReshapeStep, ResidualStep, iter_steps
    model, *_ = make("eval")
    kinds = {type(s) for s in iter_steps(get_plan(model).steps)}
    assert {ResidualStep, AvgPoolStep, ReshapeStep} <= kinds


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_bounds_contain_true_margins_and_crown_tighter_than_ibp(bn_mode):
    model, x, y, stats, twin = make(bn_mode)
    eps = 0.03
    truth = true_margins(twin, x, y, eps).min(1).values
    ibp = compute_bounds(model, x, eps, method="ibp", y=y, bn_stats=stats)
    out = {}
    for method in CROWN_FAMILY:
        m = compute_bounds(model, x, eps, method=method, y=y, bn_stats=stats,
                           **({"iterations": 5} if method == "alpha-crown" else {}))
        assert m.shape == truth.shape and torch.isfinite(m).all()
        assert (m <= truth + 1e-9).all(), (method, (m - truth).max())
        out[method] = m
    assert (out["crown"] >= ibp - 1e-9).all()
    assert (out["alpha-crown"] >= out["crown"] - 1e-9).all()
    assert (out["crown"] > ibp + 1e-6).any()  # the residual relaxation actually tightens


def test_crown_ibp_differentiable_wrt_parameters():
    model, x, y, stats, _ = make("train")
    m = compute_bounds(model, x, 0.02, method="crown-ibp", y=y, bn_stats=stats)
    torch.nn.functional.cross_entropy(-m, y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.block2.short[0].weight.grad.abs().sum() > 0  # through the conv shortcut
    assert model.block1.c1.weight.grad.abs().sum() > 0  # through a residual branch


def test_sound_rejects_unsupported_pool_and_dtype():
    """What the sound path still refuses: pooling modules other than the registered ones, and
    dtypes other than float32/float64 (clear errors)."""
    with pytest.raises(NotImplementedError, match="AvgPool1d"):
        compute_bounds(nn.Sequential(nn.AvgPool1d(2)), torch.rand(2, 2, 4), 0.1, sound=True)
    model, x, y, _, _ = make("eval")
    with pytest.raises(TypeError, match="float32 or float64"):
        compute_bounds(model.to(torch.bfloat16), x.to(torch.bfloat16), 0.01, method="crown",
                       y=y, sound=True)


class ZeroBranch(nn.Module):
    """stem -> branch(h) + h with the branch's last conv all zeros -> the head. (No ReLU after
    the add: IBP's ``mu - r`` of a ReLU output can be -1e-17, which would make the join's ReLU
    numerically "unstable" and let alpha-CROWN move its slope.)"""

    def __init__(self, head):
        super().__init__()
        self.stem, self.head = head[:3], head[3:]
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.z = nn.Conv2d(3, 3, 3, padding=1)
        with torch.no_grad():
            self.z.weight.zero_()
            self.z.bias.zero_()

    def forward(self, x):
        h = self.stem(x)
        h = self.z(torch.relu(self.a(h))) + h
        return self.head(h)


@pytest.mark.parametrize("method", ["crown", "alpha-crown"])
def test_zero_residual_branch_equals_sequential(method):
    torch.manual_seed(1)
    seq = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                        nn.Flatten(), nn.Linear(4 * 2 * 2, 3))
    seq = perturb_bn(seq.double()).eval()
    res = ZeroBranch(seq).double().eval()
    x = torch.rand(2, 2, 8, 8, dtype=DT)
    y = torch.tensor([0, 2])
    torch.testing.assert_close(res(x), seq(x))
    kw = {"iterations": 5} if method == "alpha-crown" else {}
    a = compute_bounds(res, x, 0.05, method=method, y=y, **kw)
    b = compute_bounds(seq, x, 0.05, method=method, y=y, **kw)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


class FoldableResidual(nn.Module):
    """relu(L1 x) = h -> relu(h + L2 h) -> L3: the Sequential L1, relu, (I + W2), relu, L3."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.l1(x))
        return self.l3(torch.relu(h + self.l2(h)))


def test_residual_backsubstitution_equals_folded_sequential():
    torch.manual_seed(2)
    res = FoldableResidual().double()
    fold = nn.Linear(6, 6).double()
    with torch.no_grad():
        fold.weight.copy_(res.l2.weight + torch.eye(6, dtype=DT))
        fold.bias.copy_(res.l2.bias)
    seq = nn.Sequential(res.l1, nn.ReLU(), fold, nn.ReLU(), res.l3)
    x = torch.rand(3, 4, dtype=DT)
    torch.testing.assert_close(res(x), seq(x))
    eps = 0.2
    boxes = []
    compute_bounds(seq, x, eps, method="crown", y=torch.zeros(3, dtype=torch.long),
                   relu_bounds=boxes)
    spec = torch.randn(3, 5, 3, dtype=DT)
    mu, r = x, torch.full_like(x, eps)
    lbs = []
    for net in (res, seq):
        low = lower_plan(get_plan(net), {}, (4,), DT, "cpu", "crown")
        lbs.append(backward_lower(low, len(low.ops), spec, mu, r, boxes))
    torch.testing.assert_close(lbs[0], lbs[1], rtol=1e-10, atol=1e-10)
    # and the relaxation holds at points of the box
    pts = mu.unsqueeze(1) + r.unsqueeze(1) * (2 * torch.rand(3, 300, 4, dtype=DT) - 1)
    with torch.no_grad():
        vals = torch.einsum("bsc,bnc->bns", spec, res(pts.reshape(-1, 4)).reshape(3, 300, 3))
    assert (lbs[0].unsqueeze(1) <= vals + 1e-9).all()


def test_identity_only_residual_doubles():
    """A join of two identity shortcuts is 2x: the bounds of a linear net are exact."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x + x)
    net = Twice().double()
    x = torch.rand(2, 3, dtype=DT)
    lo, up = compute_bounds(net, x, 0.1, method="crown")
    W = 2 * net.fc.weight
    centre = x @ W.T + net.fc.bias
    rad = 0.1 * W.abs().sum(1)
    torch.testing.assert_close(lo, centre - rad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(up, centre + rad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pool", [nn.AvgPool2d(2, padding=1, count_include_pad=False),
                                  nn.AdaptiveAvgPool2d((2, 3))])
def test_pool_backward_is_the_adjoint(pool):
    """``A P`` from the pool op equals ``A`` times the pooling's dense Jacobian."""
    from adcert.bounds.layers.avg_pool import AvgPoolPiece
    from adcert.bounds.layers.base import Walk
    in_shape = (2, 5, 5)
    op = AvgPoolPiece(pool)
    out_shape = tuple(pool(torch.zeros((1,) + in_shape, dtype=DT)).shape[1:])
    op.in_shape, op.out_shape = in_shape, out_shape
    n_in = 2 * 5 * 5
    J = pool(torch.eye(n_in, dtype=DT).reshape((n_in,) + in_shape)).reshape(n_in, -1).T
    A = torch.randn((2, 4) + out_shape, dtype=DT)
    want = (A.reshape(2, 4, -1) @ J).reshape((2, 4) + in_shape)
    (back,), _, _ = op.backward(A, Walk(()))
    torch.testing.assert_close(back, want, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- sound=True on graphs


class PoolHead(nn.Module):
    """TinyResNet's body with an AdaptiveAvgPool2d head (windows of unequal sizes)."""

    def __init__(self):
        super().__init__()
        self.body = TinyResNet()
        self.pool = nn.AdaptiveAvgPool2d((3, 2))
        self.fc = nn.Linear(6 * 3 * 2, 3)

    def forward(self, x):
        b = self.body
        h = self.pool(b.block2(b.block1(b.stem(x))))
        return self.fc(torch.flatten(h, 1))


def _fp32_pair(cls, seed):
    """An fp32 model with randomised BN and its exact fp64 twin; an fp32-representable input
    and eps (so both precisions bound the same real box)."""
    torch.manual_seed(seed)
    m32 = perturb_bn(cls()).eval()
    m64 = copy.deepcopy(m32).double()
    x = torch.rand(2, 2, 8, 8)
    y = torch.randint(0, 3, (2,))
    return m32, m64, x, y, 2.0 ** -5


@pytest.mark.parametrize("cls,seed", [(TinyResNet, 3), (PoolHead, 4)])
def test_sound_fp32_graph_contains_fp64(cls, seed):
    """Residual joins (identity and conv shortcuts), AvgPool2d/AdaptiveAvgPool2d and views
    with sound=True in fp32: the margins are <= the true fp64 margins at sampled points and
    vertices, and <= the fp64 non-sound CROWN margins. The latter is not a theorem (wider
    intermediate boxes can flip CROWN's adaptive lower slopes) but holds by a wide margin here:
    the sound boxes are only ~1e-6 relatively wider, so no slope flips; we require it exactly."""
    m32, m64, x, y, eps = _fp32_pair(cls, seed)
    x64 = x.double()
    truth = true_margins(m64, x64, y, eps).min(1).values
    crown64 = compute_bounds(m64, x64, eps, method="crown", y=y)
    for method in ("crown-ibp", "crown", "alpha-crown"):
        kw = {"iterations": 3} if method == "alpha-crown" else {}
        s = compute_bounds(m32, x, eps, method=method, y=y, sound=True, **kw)
        assert s.dtype == torch.float32 and torch.isfinite(s).all(), method
        assert (s.double() <= truth).all(), (method, (s.double() - truth).max())
        if method == "crown":
            assert (s.double() <= crown64).all(), (s.double() - crown64).max()
            # and the error terms are small: sound fp32 is close to the fp64 bound
            assert ((crown64 - s.double()).abs() <= 1e-2 * (1 + crown64.abs())).all()
