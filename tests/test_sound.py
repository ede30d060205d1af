"""Tests of rounding-sound IBP, ``compute_bounds(..., sound=True)`` (adcert.bounds.sound).

References: exact rational interval arithmetic (``fractions.Fraction``) on a tiny model, and fp64
interval arithmetic of the fp32 parameters with its own rigorous fp64 error allowance (orders of
magnitude below fp32 rounding) on larger ones.
"""
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adcert.bounds.sound as soundlib
from adcert.bounds import compute_bounds
from adcert.models import Normalize

F32, F64 = torch.float32, torch.float64


def _exact_linear(lo, hi, w, b):
    """Exact interval image of the box [lo, hi] (lists of Fractions) under w (rows), b."""
    out_lo, out_hi = [], []
    for row, bias in zip(w, b):
        a = sum((wi * (l if wi >= 0 else h) for wi, l, h in zip(row, lo, hi)), Fraction(0))
        c = sum((wi * (h if wi >= 0 else l) for wi, l, h in zip(row, lo, hi)), Fraction(0))
        out_lo.append(a + bias)
        out_hi.append(c + bias)
    return out_lo, out_hi


def _frac(t):
    return [[Fraction(float(v)) for v in row] for row in t.tolist()] if t.dim() == 2 else \
        [Fraction(float(v)) for v in t.tolist()]


def test_sound_contains_exact_rational_interval_on_tiny_model():
    torch.manual_seed(5)
    model = nn.Sequential(Normalize([0.3], [0.7]), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():  # large and tiny weights of both signs: cancellation everywhere
        for lin in (model[1], model[3]):
            lin.weight.mul_(torch.tensor([1e4, 1e-3, 3.0, -7e2, 1e-4, 1.0][: lin.in_features]))
            lin.bias.mul_(100.0)
    x = torch.rand(2, 6)
    eps = 0.1  # the exact ball uses the decimal 0.1, not its fp32 rounding
    lb, ub = compute_bounds(model, x, eps, sound=True)
    w1, b1, w2, b2 = (_frac(t.detach()) for t in (model[1].weight, model[1].bias,
                                                   model[3].weight, model[3].bias))
    m, sd = Fraction(float(model[0].mean[0])), Fraction(float(model[0].std[0]))
    for i in range(2):
        xs = [Fraction(float(v)) for v in x[i].tolist()]
        lo = [(max(v - Fraction("0.1"), Fraction(0)) - m) / sd for v in xs]
        hi = [(min(v + Fraction("0.1"), Fraction(1)) - m) / sd for v in xs]
        lo, hi = _exact_linear(lo, hi, w1, b1)
        lo, hi = [max(v, Fraction(0)) for v in lo], [max(v, Fraction(0)) for v in hi]
        lo, hi = _exact_linear(lo, hi, w2, b2)
        for j in range(3):
            assert Fraction(float(lb[i, j])) <= lo[j] and hi[j] <= Fraction(float(ub[i, j]))


def _adversarial_linear(k=3000, out=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, k, generator=g)
    scale = torch.where(torch.rand(out, k, generator=g) < 0.5, torch.tensor(1e4), torch.tensor(1e-3))
    w = w * scale
    lin = nn.Linear(k, out)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(torch.randn(out, generator=g) * 1e3)
    x = torch.rand(4, k, generator=g)
    return lin, x


def _fp64_interval_with_error(lin, lo, hi):
    """fp64 interval image of [lo, hi] under the (fp32) layer, widened by fp64's own gamma_k
    bound: a rigorous enclosure of the exact interval (fp64 errors << fp32 ones)."""
    w, b = lin.weight.double(), lin.bias.double()
    lo, hi = lo.double(), hi.double()
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    out_lo = lo @ wp.T + hi @ wn.T + b
    out_hi = hi @ wp.T + lo @ wn.T + b
    k = w.shape[1] + 2
    u = 2.0 ** -53
    err = 2 * (k * u / (1 - k * u)) * ((lo.abs().maximum(hi.abs())) @ w.abs().T + b.abs())
    return out_lo - err, out_hi + err


@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_sound_fp32_contains_exact_interval_where_plain_fp32_does_not(eps):
    lin, x = _adversarial_linear()
    model = nn.Sequential(lin)
    lb, ub = compute_bounds(model, x, eps, sound=True)
    # the exact box: [x - eps, x + eps] clipped, eps the real number (held exactly in fp64 here
    # up to fp64 rounding, which the fp64 error allowance covers)
    lo64, hi64 = (x.double() - eps).clamp(0, 1), (x.double() + eps).clamp(0, 1)
    ex_lo, ex_hi = _fp64_interval_with_error(lin, lo64, hi64)
    assert bool((lb.double() <= ex_lo).all()) and bool((ub.double() >= ex_hi).all())
    if eps == 0.0:
        # a point box: plain fp32 IBP returns the rounded fp32 output, lb == ub, which misses the
        # exact output (known to fp64 accuracy) for some entries; the sound bounds never do
        plain_lb, plain_ub = compute_bounds(model, x, eps)
        w64, b64 = lin.weight.double(), lin.bias.double()
        exact = x.double() @ w64.T + b64
        allowance = exact - _fp64_interval_with_error(lin, x.double(), x.double())[0]
        misses = (plain_lb.double() > exact + allowance) | (plain_ub.double() < exact - allowance)
        assert bool(misses.any()), "the adversarial case should defeat plain fp32 IBP"
        assert bool((lb.double() <= exact - allowance).all())
        assert bool((ub.double() >= exact + allowance).all())


def _resnet_fp32():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 3, 3, 1, 1, bias=False), nn.BatchNorm2d(3)
            self.c2, self.b2 = nn.Conv2d(3, 3, 3, 1, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = Normalize([0.5, 0.4], [0.2, 0.3])
            self.stem = nn.Conv2d(2, 3, 3, 1, 1)
            self.bn0 = nn.BatchNorm2d(3)  # standalone BN after a ReLU
            self.block = Block()
            self.pool = nn.AvgPool2d(2)
            self.fc = nn.Linear(3 * 3 * 3, 8)
            self.bnf = nn.BatchNorm1d(8)
            self.out = nn.Linear(8, 4)

        def forward(self, x):
            h = self.bn0(F.relu(self.stem(self.norm(x))))
            h = self.pool(self.block(h))
            return self.out(self.bnf(self.fc(h.flatten(1))))

    net = Net()
    g = torch.Generator().manual_seed(2)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.1)
    return net.eval()


def test_sound_traced_model_contains_fp64_bounds_and_margins():
    net = _resnet_fp32()
    x = torch.rand(3, 2, 6, 6)
    eps = torch.tensor([0.0, 0.01, 0.03])
    y = torch.tensor([0, 2, 3])
    relus = []
    lb, ub = compute_bounds(net, x, eps, sound=True, relu_bounds=relus)
    margins = compute_bounds(net, x, eps, y=y, sound=True)
    net64 = _resnet_fp32().double()
    net64.load_state_dict({k: v.double() for k, v in net.state_dict().items()})
    relus64 = []
    lb64, ub64 = compute_bounds(net64, x.double(), eps.double(), relu_bounds=relus64)
    m64 = compute_bounds(net64, x.double(), eps.double(), y=y)
    assert bool((lb.double() <= lb64).all()) and bool((ub.double() >= ub64).all())
    assert bool((margins.double() <= m64).all())
    assert bool((margins.gather(1, y[:, None]) == 0).all())
    assert len(relus) == len(relus64) == 3
    for (a, b), (c, d) in zip(relus, relus64):
        assert bool((a.double() <= c).all()) and bool((b.double() >= d).all())
    # the widening is small: sound bounds stay close to the plain ones
    plain_lb = compute_bounds(net, x, eps)[0].detach()
    assert float((plain_lb - lb).max()) < 1e-3 * (1 + float(lb.abs().max()))
    # sampled outputs lie inside
    with torch.no_grad():
        e = eps.reshape(-1, 1, 1, 1)
        lo, hi = (x - e).clamp(0, 1), (x + e).clamp(0, 1)
        for _ in range(10):
            out = net(lo + torch.rand(x.shape) * (hi - lo))
            assert bool((out >= lb).all()) and bool((out <= ub).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sound_rejects_half_precision(dtype):
    model = nn.Sequential(nn.Linear(3, 2)).to(dtype)
    x = torch.rand(2, 3).to(dtype)
    with pytest.raises(TypeError, match="sound.*float32 or float64"):
        compute_bounds(model, x, 0.1, sound=True)


def test_strict_float_mode_disables_and_restores_tf32(monkeypatch):
    seen = []
    real = soundlib.sound_steps

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                     torch.get_float32_matmul_precision()))
        return real(*args, **kwargs)

    monkeypatch.setattr(soundlib, "sound_steps", spy)
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("medium")
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        compute_bounds(model, torch.rand(2, 3), 0.1, sound=True)
        assert seen == [(False, False, "highest")]
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "medium"
        # restored after an error too
        with pytest.raises(ValueError):
            compute_bounds(model, torch.rand(2, 3, 1), 0.1, sound=True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def test_gamma_and_directed_rounding_helpers():
    u = 2.0 ** -24
    assert soundlib.gamma(10, F32) == pytest.approx(10 * u / (1 - 10 * u), rel=1e-12)
    with pytest.raises(ValueError, match="sound"):
        soundlib.gamma(2 ** 23, F32)
    t = torch.tensor([1.0, -0.0, 3e-38])
    assert bool((soundlib.down(t) < t).all()) and bool((soundlib.up(t) > t).all())
    L, U = torch.tensor([0.1, -3.0]), torch.tensor([0.3, 1e-30])
    c, rho = soundlib.centre_radius(L, U)
    Lf, Uf, cf, rf = (v.double() for v in (L, U, c, rho))
    assert bool((cf - rf <= Lf).all()) and bool((cf + rf >= Uf).all())


def test_sound_convolutions_never_use_winograd_backends():
    """With oneDNN off, PyTorch picks NNPACK (Winograd/FFT) for CPU convolutions of batch >= 16;
    its error is tens of times the dot-product bound the sound rules charge. Sound bounds of a
    wide-dynamic-range conv at batch 32 must contain the fp64 result, and no NNPACK kernel may
    run inside a sound pass (oneDNN's direct kernels may)."""
    from torch.profiler import profile

    torch.manual_seed(0)
    scale = torch.logspace(-3, 3, 8)
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    conv.weight.data = torch.randn(8, 8, 3, 3) * scale.view(1, 8, 1, 1)
    model = nn.Sequential(conv)
    for method, size in (("ibp", 12), ("crown", 3)):
        x = torch.randn(32, 8, size, size) * scale.view(1, 8, 1, 1)
        exact = nn.functional.conv2d(x.double(), conv.weight.double(), padding=1)
        with profile() as prof:
            lb, ub = compute_bounds(model, x, x_L=x, x_U=x, method=method, sound=True)
        kernels = {e.key for e in prof.key_averages()}
        assert not any("nnpack" in k for k in kernels), kernels
        assert bool((lb.double() <= exact).all()) and bool((exact <= ub.double()).all()), method


@pytest.mark.parametrize("method", ["crown", "alpha-crown"])
def test_sound_crown_fp32_contains_fp64_on_cancelling_wide_layers(method):
    """oneDNN's kernels stay on in sound mode: its error must be within the charged bound on
    adversarial layers -- wide (many terms), cancelling (weights of both signs summing to ~0),
    with tiny and huge weights mixed -- at batch 1 and 16 (a different kernel path)."""
    torch.manual_seed(3)
    c1 = nn.Conv2d(4, 32, 3, padding=1)
    c2 = nn.Conv2d(32, 32, 3, padding=1)
    with torch.no_grad():
        for c in (c1, c2):
            w = torch.randn_like(c.weight) * torch.logspace(-4, 4, c.weight.shape[1]).view(1, -1, 1, 1)
            c.weight.copy_(w - w.mean(dim=(1, 2, 3), keepdim=True))  # rows sum to ~0
    model = nn.Sequential(c1, nn.ReLU(), c2, nn.ReLU(), nn.Flatten(), nn.Linear(32 * 16, 6))
    opts = {"iterations": 2} if method == "alpha-crown" else {}
    for batch in (1, 16):
        x = torch.rand(batch, 4, 4, 4)
        lb, ub = compute_bounds(model, x, 1e-4, method=method, sound=True, **opts)
        lo64, hi64 = compute_bounds(model.double(), x.double(), 1e-4, method=method, **opts)
        model.float()
        pts = x.double().unsqueeze(0) + 1e-4 * (2 * torch.rand(64, *x.shape,
                                                               dtype=torch.float64) - 1)
        outs = torch.stack([model.double()(p.clamp(0, 1)) for p in pts]).detach()
        model.float()
        assert bool((lb.double() <= outs).all()) and bool((outs <= ub.double()).all())
        # the fp64 bound of the same relaxation is (almost) the exact one: fp32 sound contains it
        assert bool((lb.double() <= lo64 + 1e-9 * lo64.abs()).all())
        assert bool((ub.double() >= hi64 - 1e-9 * hi64.abs()).all())
