"""Tests of adcert.bounds.compute_bounds (IBP) and the models it is used with.

The reference here is plain fp64 interval arithmetic in LOWER/UPPER form, written independently of
the centre-radius engine; soundness is checked against model outputs at points sampled in the box
(vertices included).
"""
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adcert.ops
from adcert.bounds import (
    AffineStep, clean_bn_stats, compute_bounds, get_plan,
)
from adcert.models import CIFAR10_MEAN, CIFAR10_STD, Normalize, cnn3, cnn7
from conftest import frozen_copy, randomize_bn

DT = torch.float64


# ----------------------------------------------------------------------------- reference


def leaf_modules(model):
    out = []
    for m in model.children() if isinstance(model, nn.Sequential) else [model]:
        out.extend(leaf_modules(m) if isinstance(m, nn.Sequential) else [m])
    return out


def ref_bn_stats(model, x):
    """{bn: (mean, var)} as the model itself normalises at x: running stats in eval mode, the
    biased batch statistics of the BN's input (captured with hooks on a copy) in training mode."""
    twin = copy.deepcopy(model)
    seen = {}
    pairs = [(a, b) for a, b in zip(leaf_modules(model), leaf_modules(twin))
             if isinstance(a, nn.modules.batchnorm._BatchNorm)]
    for orig, dup in pairs:
        dup.register_forward_pre_hook(lambda mod, inp, key=orig: seen.__setitem__(key, inp[0]))
    with torch.no_grad():
        twin(x)
    stats = {}
    for orig, _ in pairs:
        if orig.training:
            h = seen[orig]
            dims = [0] + list(range(2, h.dim()))
            stats[orig] = (h.mean(dims), h.var(dims, unbiased=False))
        else:
            stats[orig] = (orig.running_mean, orig.running_var)
    return stats


def cview(t, ref):
    return t.reshape((1, -1) + (1,) * (ref.dim() - 2))


def ref_interval(modules, lo, hi, stats):
    """Interval arithmetic in lower/upper form through a list of modules."""
    for m in modules:
        if isinstance(m, nn.Linear):
            wp, wn = m.weight.clamp(min=0), m.weight.clamp(max=0)
            b = m.bias if m.bias is not None else 0.0
            lo, hi = lo @ wp.T + hi @ wn.T + b, hi @ wp.T + lo @ wn.T + b
        elif isinstance(m, nn.Conv2d):
            wp, wn = m.weight.clamp(min=0), m.weight.clamp(max=0)
            conv = lambda t, w, b=None: F.conv2d(t, w, b, m.stride, m.padding,  # noqa: E731
                                                 m.dilation, m.groups)
            lo, hi = conv(lo, wp, m.bias) + conv(hi, wn), conv(hi, wp, m.bias) + conv(lo, wn)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            mean, var = stats[m]
            s = m.weight / torch.sqrt(var + m.eps)
            t = m.bias - mean * s
            a, c = cview(s, lo) * lo + cview(t, lo), cview(s, lo) * hi + cview(t, lo)
            lo, hi = torch.minimum(a, c), torch.maximum(a, c)
        elif isinstance(m, nn.ReLU):
            lo, hi = lo.clamp(min=0), hi.clamp(min=0)
        elif isinstance(m, nn.Flatten):
            lo, hi = m(lo), m(hi)
        elif isinstance(m, Normalize):
            lo, hi = (lo - cview(m.mean, lo)) / cview(m.std, lo), (hi - cview(m.mean, lo)) / \
                cview(m.std, lo)
        elif isinstance(m, (nn.Identity, nn.Dropout)):
            pass
        else:
            raise AssertionError(type(m))
    return lo, hi


def ref_margins(model, lo, hi, y, stats):
    """Margin lower bounds with the spec folded into the last Linear (+ optional BN1d)."""
    mods = leaf_modules(model)
    k = max(i for i, m in enumerate(mods) if isinstance(m, nn.Linear))
    lin, tail = mods[k], mods[k + 1:]
    lo, hi = ref_interval(mods[:k], lo, hi, stats)
    w, b = lin.weight, lin.bias
    for m in tail:
        if isinstance(m, nn.BatchNorm1d):
            mean, var = stats[m]
            s = m.weight / torch.sqrt(var + m.eps)
            w, b = w * s[:, None], (b - mean) * s + m.bias
        else:
            assert isinstance(m, (nn.Identity, nn.Dropout))
    cw = w[y][:, None, :] - w[None]  # [B, C, K]
    cb = b[y][:, None] - b[None]
    low = (cw.clamp(min=0) * lo[:, None, :] + cw.clamp(max=0) * hi[:, None, :]).sum(-1) + cb
    return low


def box(x, eps):
    e = eps if not torch.is_tensor(eps) else eps.reshape((-1,) + (1,) * (x.dim() - 1))
    return (x - e).clamp(0, 1), (x + e).clamp(0, 1)


# ----------------------------------------------------------------------------- models


def mlp(normalize):
    layers = [Normalize([0.3, 0.5, 0.4], [0.2, 0.5, 0.9])] if normalize else []
    layers += [nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
               nn.Dropout(0.5), nn.Linear(8, 4)]
    return nn.Sequential(*layers)


def convnet(normalize):
    layers = [Normalize([0.4, 0.6], [0.3, 0.25])] if normalize else []
    layers += [nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
               nn.Sequential(nn.Conv2d(4, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU()),
               nn.Flatten(), nn.Linear(16, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 5)]
    return nn.Sequential(*layers)


def oddnet(normalize):
    """Unfused layouts: a leading batch norm, BN after ReLU, ReLU twice, Identity, nesting, and a
    final Linear + BatchNorm1d (folded into the spec)."""
    layers = [Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])] if normalize else []
    layers += [nn.Flatten(), nn.BatchNorm1d(12), nn.Linear(12, 7), nn.ReLU(), nn.BatchNorm1d(7),
               nn.Identity(), nn.ReLU(), nn.ReLU(),
               nn.Sequential(nn.Linear(7, 7), nn.ReLU(), nn.Sequential(nn.Linear(7, 3))),
               nn.BatchNorm1d(3)]
    return nn.Sequential(*layers)


MODELS = {"mlp": (mlp, (3,)), "conv": (convnet, (2, 5, 5)), "odd": (oddnet, (3, 2, 2))}
CASES = [(name, norm, train)
         for name in MODELS for norm in (False, True) for train in (False, True)]


def make(name, normalize, train, batch=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    build, shape = MODELS[name]
    model = randomize_bn(build(normalize).to(DT), gen)
    model.train(train)
    x = torch.rand((batch,) + shape, generator=gen, dtype=DT)
    x[0] = (x[0] > 0.5).to(DT)  # a sample on the [0, 1] faces: exercises clipping
    y = torch.randint(0, 3, (batch,), generator=gen)
    return model, x, y


def case_id(c):
    return f"{c[0]}-{'norm' if c[1] else 'raw'}-{'train' if c[2] else 'eval'}"


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_fp64_reference(case):
    model, x, y = make(*case)
    eps = 0.07
    stats = ref_bn_stats(model, x)
    lo, hi = box(x, eps)
    ref_lo, ref_hi = ref_interval(leaf_modules(model), lo, hi, stats)
    lb, ub = compute_bounds(model, x, eps)
    torch.testing.assert_close(lb, ref_lo, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ub, ref_hi, rtol=1e-10, atol=1e-10)

    margins = compute_bounds(model, x, eps, y=y)
    ref_m = ref_margins(model, lo, hi, y, stats)
    ref_m[torch.arange(len(y)), y] = 0
    torch.testing.assert_close(margins, ref_m, rtol=1e-10, atol=1e-10)
    assert margins.shape == (x.shape[0], ref_hi.shape[1])
    assert bool((margins[torch.arange(len(y)), y] == 0).all())
    naive = lb.gather(1, y[:, None]) - ub
    assert bool((margins >= naive - 1e-10).all())
    assert bool((margins > naive + 1e-6).any())  # folding is strictly tighter somewhere


def sample_points(lo, hi, gen, n_random, all_vertices):
    """[N, B, *in] points in the box: vertices (all, or random ones) and interior points."""
    d = lo[0].numel()
    if all_vertices:
        bits = torch.tensor(list(itertools.product([0.0, 1.0], repeat=d)), dtype=DT)
    else:
        bits = (torch.rand(n_random, d, generator=gen, dtype=DT) > 0.5).to(DT)
    bits = bits.reshape((-1, 1) + tuple(lo.shape[1:]))
    inner = torch.rand((n_random,) + tuple(lo.shape), generator=gen, dtype=DT)
    return torch.cat([lo + bits * (hi - lo), lo + inner * (hi - lo)])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_soundness_sampled_points(case):
    name = case[0]
    for seed in range(3):
        model, x, y = make(*case, seed=seed)
        gen = torch.Generator().manual_seed(100 + seed)
        eps = torch.rand(x.shape[0], generator=gen, dtype=DT) * 0.3
        stats = ref_bn_stats(model, x)
        f = frozen_copy(model, stats)
        lb, ub = compute_bounds(model, x, eps)
        margins = compute_bounds(model, x, eps, y=y)
        lo, hi = box(x, eps)
        pts = sample_points(lo, hi, gen, 300, all_vertices=(name == "mlp"))
        with torch.no_grad():
            z = f(pts.reshape((-1,) + tuple(x.shape[1:]))).reshape(pts.shape[0], x.shape[0], -1)
        tol = 1e-9
        assert bool((z >= lb - tol).all()) and bool((z <= ub + tol).all())
        zy = z.gather(2, y[None, :, None].expand(z.shape[0], -1, 1))
        assert bool((zy - z >= margins - tol).all())
        # the clean point is in the box too
        with torch.no_grad():
            zc = f(x)
        assert bool((zc >= lb - tol).all()) and bool((zc <= ub + tol).all())


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_per_sample_eps_equals_separate_calls(train):
    model, x, y = make("conv", True, train)
    eps = torch.tensor([0.0, 0.01, 0.05, 0.2, 0.1, 1.0], dtype=DT)
    stats = clean_bn_stats(model, x)
    lb, ub = compute_bounds(model, x, eps)
    margins = compute_bounds(model, x, eps, y=y)
    for i in range(x.shape[0]):
        lb_i, ub_i = compute_bounds(model, x[i:i + 1], float(eps[i]), bn_stats=stats)
        m_i = compute_bounds(model, x[i:i + 1], float(eps[i]), y=y[i:i + 1], bn_stats=stats)
        torch.testing.assert_close(lb[i:i + 1], lb_i, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ub[i:i + 1], ub_i, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(margins[i:i + 1], m_i, rtol=1e-12, atol=1e-12)
    # a 0-d tensor eps and a numpy float are the same as the float
    torch.testing.assert_close(compute_bounds(model, x, eps.numpy()[4])[0],
                               compute_bounds(model, x, 0.1)[0])
    torch.testing.assert_close(compute_bounds(model, x, torch.tensor(0.05, dtype=DT))[0],
                               compute_bounds(model, x, 0.05)[0])


def test_fallback_margins_without_final_linear():
    """A model ending in ReLU cannot fold the spec: margins are lb_y - ub_i."""
    model, x, y = make("mlp", False, False)
    model.append(nn.ReLU())
    lb, ub = compute_bounds(model, x, 0.05)
    margins = compute_bounds(model, x, 0.05, y=y)
    expected = lb.gather(1, y[:, None]) - ub
    expected[torch.arange(len(y)), y] = 0
    torch.testing.assert_close(margins, expected)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_eps_zero_is_the_model_output(train):
    torch.manual_seed(0)
    model = cnn3(in_channels=1, input_size=8, mean=0.3, std=0.4).train(train)
    x = torch.rand(4, 1, 8, 8)
    lb, ub = compute_bounds(model, x, 0.0)
    out = copy.deepcopy(model)(x)  # in training mode this would update running stats: use a copy
    torch.testing.assert_close(lb, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ub, out, rtol=1e-5, atol=1e-5)
    assert bool((lb <= ub).all())
    margins = compute_bounds(model, x, 0.0, y=torch.tensor([0, 1, 2, 3]))
    torch.testing.assert_close(margins, out[:, :4].diag()[:, None] - out, rtol=1e-4, atol=1e-4)


def test_clipping_to_unit_box():
    x = torch.tensor([[0.0, 0.1, 0.5, 0.95, 1.0]], dtype=DT)
    lb, ub = compute_bounds(nn.Sequential(nn.Flatten()), x, 0.2)
    torch.testing.assert_close(lb, torch.tensor([[0.0, 0.0, 0.3, 0.75, 0.8]], dtype=DT))
    torch.testing.assert_close(ub, torch.tensor([[0.2, 0.3, 0.7, 1.0, 1.0]], dtype=DT))
    model, x, _ = make("conv", True, False)
    big = compute_bounds(model, x, 5.0)
    full = compute_bounds(model, x, x_L=torch.zeros_like(x), x_U=torch.ones_like(x))
    torch.testing.assert_close(big[0], full[0])
    torch.testing.assert_close(big[1], full[1])


def test_explicit_box_matches_eps_box():
    model, x, y = make("mlp", True, True)
    lo, hi = box(x, 0.1)
    a = compute_bounds(model, x, 0.1, y=y)
    b = compute_bounds(model, x, x_L=lo, x_U=hi, y=y)
    torch.testing.assert_close(a, b)


def test_training_mode_bn_statistics():
    model, x, y = make("conv", True, True)
    running = {k: v.clone() for k, v in model.state_dict().items()}
    stats = clean_bn_stats(model, x)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert set(stats) == set(bns)
    for m in bns:  # differentiable functions of the parameters (DESIGN.md section 5)
        mean, var = stats[m]
        assert mean.requires_grad and var.requires_grad
    with torch.no_grad():
        assert not any(t.requires_grad for pair in clean_bn_stats(model, x).values()
                       for t in pair)
    ref = ref_bn_stats(model, x)
    for m in bns:
        torch.testing.assert_close(stats[m][0], ref[m][0])
        torch.testing.assert_close(stats[m][1], ref[m][1])
    a = compute_bounds(model, x, 0.05, y=y)
    b = compute_bounds(model, x, 0.05, y=y, bn_stats=stats)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # statistics of another batch are used as given
    x2 = torch.rand_like(x)
    other = clean_bn_stats(model, x2)
    lb, ub = compute_bounds(model, x, 0.05, bn_stats=other)
    ref_lo, ref_hi = ref_interval(leaf_modules(model), *box(x, 0.05), other)
    torch.testing.assert_close(lb, ref_lo)
    torch.testing.assert_close(ub, ref_hi)
    # running statistics are never updated
    for k, v in model.state_dict().items():
        assert torch.equal(v, running[k]), k
    # eval mode: only running statistics, nothing to collect
    assert clean_bn_stats(model.eval(), x) == {}


def test_eval_mode_rules():
    """Running statistics whenever the model's or the module's training flag is False; batch
    statistics for a batch norm without running statistics, even in eval mode."""
    model, x, y = make("conv", True, False)
    expected = compute_bounds(model, x, 0.05, y=y)
    model.train()
    model.training = False  # top-level flag only
    torch.testing.assert_close(compute_bounds(model, x, 0.05, y=y), expected, rtol=0, atol=0)
    assert clean_bn_stats(model, x) == {}
    model.train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    bns[0].eval()  # this one uses its running statistics, the others batch statistics
    stats = ref_bn_stats(model, x)
    assert set(clean_bn_stats(model, x)) == set(m for m in stats if m.training)
    lo, hi = box(x, 0.05)
    torch.testing.assert_close(compute_bounds(model, x, 0.05, y=y), ref_margins_zeroed(
        model, lo, hi, y, stats))
    free = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False),
                         nn.ReLU(), nn.Linear(4, 2)).to(DT).eval()
    xf = torch.rand(5, 3, dtype=DT)
    lb, ub = compute_bounds(free, xf, 0.0)
    torch.testing.assert_close(lb, free(xf))
    assert set(clean_bn_stats(free, xf)) == {free[1]}


def ref_margins_zeroed(model, lo, hi, y, stats):
    m = ref_margins(model, lo, hi, y, stats)
    m[torch.arange(len(y)), y] = 0
    return m


def test_gradients_flow_to_parameters():
    model, x, y = make("conv", True, True)
    margins = compute_bounds(model, x, 0.05, y=y)
    F.cross_entropy(-margins, y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    assert any(float(p.grad.abs().sum()) > 0 for p in model.parameters())


def test_plan_fuses_and_is_cached(monkeypatch):
    model = cnn7(width=4, linear_size=8, mean=CIFAR10_MEAN, std=CIFAR10_STD).eval()
    plan = get_plan(model)
    assert get_plan(model) is plan
    affine = [s for s in plan.steps if isinstance(s, AffineStep)]
    assert len(plan.steps) == 9 and len(affine) == 7
    assert all(s.bn is not None and s.relu for s in affine[:-1])
    assert affine[-1].bn is None and not affine[-1].relu
    calls = {"conv": 0, "linear": 0}

    def counting(kind, fn):
        def wrapped(*args, **kwargs):
            calls[kind] += 1
            return fn(*args, **kwargs)
        return wrapped
    monkeypatch.setattr(adcert.ops, "interval_conv2d_bn_relu",
                        counting("conv", adcert.ops.interval_conv2d_bn_relu))
    monkeypatch.setattr(adcert.ops, "interval_linear_bn_relu",
                        counting("linear", adcert.ops.interval_linear_bn_relu))
    compute_bounds(model, torch.rand(2, 3, 32, 32), 0.01)
    assert calls == {"conv": 5, "linear": 2}
    model.append(nn.ReLU())
    new = get_plan(model)
    assert new is not plan and len(new.steps) == 9 and new.steps[-1].relu


def test_cnn7_shapes():
    torch.manual_seed(0)
    model = cnn7(mean=CIFAR10_MEAN, std=CIFAR10_STD)
    x = torch.rand(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    model.eval()
    lb, ub = compute_bounds(model, x, 2 / 255)
    assert lb.shape == ub.shape == (2, 10) and bool((lb <= ub).all())
    margins = compute_bounds(model, x, 2 / 255, y=torch.tensor([3, 7]))
    assert margins.shape == (2, 10)
    small = cnn7(in_channels=1, input_size=28, num_classes=7)
    assert small(torch.rand(2, 1, 28, 28)).shape == (2, 7)


def test_normalize_layer():
    n = Normalize([0.5, 0.25], [0.5, 2.0])
    x = torch.rand(3, 2, 4, 4)
    expected = (x - torch.tensor([0.5, 0.25]).view(1, 2, 1, 1)) / torch.tensor([0.5, 2.0]).view(
        1, 2, 1, 1)
    torch.testing.assert_close(n(x), expected)
    torch.testing.assert_close(n(x[:, :, 0, 0]), expected[:, :, 0, 0])
    assert set(dict(n.named_buffers())) == {"mean", "std"} and not list(n.parameters())
    assert Normalize(0.1, 0.3)(x).shape == x.shape
    with pytest.raises(ValueError, match="^std:"):
        Normalize([0.5], [0.0])
    with pytest.raises(ValueError, match="^std:"):
        Normalize([0.5, 0.5], [1.0, -1.0])
    with pytest.raises(ValueError, match="^std:"):
        Normalize([0.5, 0.5], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="^x:"):
        n(torch.rand(3, 3, 4, 4))


def test_input_errors():
    model, x, y = make("conv", True, False)
    with pytest.raises(TypeError, match="^x:"):
        compute_bounds(model, x.numpy(), 0.1)
    with pytest.raises(TypeError, match="^x:"):
        compute_bounds(model, (x * 255).long(), 0.1)
    with pytest.raises(TypeError, match="^x:"):
        compute_bounds(model, x.float(), 0.1)  # model is fp64
    with pytest.raises(ValueError, match="^x:"):
        compute_bounds(model, x[0], 0.1)  # missing batch dimension
    with pytest.raises(ValueError, match="^x:"):
        compute_bounds(model, x[:, :1], 0.1)  # wrong channel count
    with pytest.raises(ValueError, match="^x:"):
        compute_bounds(model, x.flatten(1), 0.1)
    bad = x.clone()
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="^x:.*NaN"):
        compute_bounds(model, bad, 0.1)
    with pytest.raises(ValueError, match="^eps:"):
        compute_bounds(model, x, -0.1)
    with pytest.raises(ValueError, match="^eps:"):
        compute_bounds(model, x, float("nan"))
    with pytest.raises(ValueError, match="^eps:"):
        compute_bounds(model, x, torch.full((6,), 0.1, dtype=DT) - torch.arange(6) * 0.05)
    with pytest.raises(ValueError, match="^eps:"):
        compute_bounds(model, x, torch.full((5,), 0.1, dtype=DT))
    with pytest.raises(TypeError, match="^eps:"):
        compute_bounds(model, x, "0.1")
    with pytest.raises(TypeError, match="^eps:"):
        compute_bounds(model, x, torch.ones(6, dtype=torch.long))
    with pytest.raises(ValueError, match="^eps:"):
        compute_bounds(model, x)
    with pytest.raises(ValueError, match="^eps:"):
        compute_bounds(model, x, 0.1, x_L=x, x_U=x)
    with pytest.raises(ValueError, match="^x_L, x_U:"):
        compute_bounds(model, x, x_L=x)
    with pytest.raises(ValueError, match="^x_L, x_U:"):
        compute_bounds(model, x, x_L=x + 0.1, x_U=x)
    with pytest.raises(ValueError, match="^x_U:"):
        compute_bounds(model, x, x_L=x, x_U=x[:2])
    with pytest.raises(ValueError, match="^y:"):
        compute_bounds(model, x, 0.1, y=y[:3])
    with pytest.raises(ValueError, match="^y:"):
        compute_bounds(model, x, 0.1, y=y[:, None])
    with pytest.raises(TypeError, match="^y:"):
        compute_bounds(model, x, 0.1, y=y.to(DT))
    with pytest.raises(TypeError, match="^y:"):
        compute_bounds(model, x, 0.1, y=[0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match=r"^y:.*\[0, 5\)"):
        compute_bounds(model, x, 0.1, y=torch.tensor([0, 1, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match="^y:"):
        compute_bounds(model, x, 0.1, y=torch.tensor([0, 1, -1, 3, 4, 0]))
    with pytest.raises(TypeError, match="^bn_stats:"):
        compute_bounds(model.train(), x, 0.1, bn_stats=[1, 2])
    stats = clean_bn_stats(model, x)
    key = next(iter(stats))
    stats[key] = (stats[key][0][:1], stats[key][1])
    with pytest.raises(ValueError, match="^bn_stats:"):
        compute_bounds(model, x, 0.1, bn_stats=stats)


def test_inputs_outside_the_pixel_range_are_refused_or_need_data_range():
    """An eps-box is clamped to [0, 1]: around an already-normalised x it would not contain x
    (a different point would be certified), so x is refused unless data_range says otherwise."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    x = torch.tensor([[-1.2, 0.3, 0.5, 2.0]], dtype=DT)  # e.g. (pixels - mean) / std
    for method in ("ibp", "crown"):
        with pytest.raises(ValueError, match=r"^x: expected pixels in \[0, 1\].*Normalize"):
            compute_bounds(model, x, 0.1, method=method)
    with pytest.raises(ValueError, match=r"^x: expected pixels in \[0, 1\]"):
        compute_bounds(model, x, 0.1, y=torch.zeros(1, dtype=torch.long))
    lb, ub = compute_bounds(nn.Sequential(nn.Flatten()), x, 0.1, data_range=(-3.0, 3.0))
    assert bool((lb <= x).all() and (x <= ub).all())
    torch.testing.assert_close(ub - lb, torch.full_like(x, 0.2))
    lb, ub = compute_bounds(nn.Sequential(nn.Flatten()), x, 1.0, data_range=(-1.5, 2.5))
    torch.testing.assert_close(lb, torch.tensor([[-1.5, -0.7, -0.5, 1.0]], dtype=DT))
    torch.testing.assert_close(ub, torch.tensor([[-0.2, 1.3, 1.5, 2.5]], dtype=DT))
    for bad in ((1.0, 0.0), (0.0,), (0.0, float("inf")), "01"):
        with pytest.raises(ValueError, match="^data_range:"):
            compute_bounds(model, x.clamp(0, 1), 0.1, data_range=bad)
    # an explicit box is the caller's (SABR's small box is centred elsewhere): not checked
    compute_bounds(model, x, x_L=x - 0.1, x_U=x + 0.1)
    # the pixel range itself, ends included, is fine
    compute_bounds(model, torch.tensor([[0.0, 0.3, 0.5, 1.0]], dtype=DT), 0.1)


def test_wrong_input_size_names_x_and_the_expected_shape():
    """A spatial size the model was not built for used to fail inside a layer, naming its
    weight shape; now the message names x and the input shape the model takes."""
    torch.manual_seed(0)
    model = cnn3(in_channels=1, num_classes=10, input_size=8).double().eval()
    x = torch.rand(2, 1, 12, 12, dtype=DT)
    for method in ("ibp", "crown", "crown-ibp"):
        with pytest.raises(ValueError, match=r"^x: got shape \(2, 1, 12, 12\).*expects inputs "
                                             r"of shape \[B, 1, 8, 8\]"):
            compute_bounds(model, x, 0.1, method=method, y=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^x: got shape \(3, 1, 12, 12\).*\[B, 1, 8, 8\]"):
        compute_bounds(model.train(), torch.rand(3, 1, 12, 12, dtype=DT), 0.1)  # BN statistics
    model.eval()
    big = cnn7(in_channels=3, num_classes=10, input_size=32).double().eval()
    with pytest.raises(ValueError, match=r"^x: got shape \(2, 3, 28, 28\).*\[B, 3, 32, 32\]"):
        compute_bounds(big, torch.rand(2, 3, 28, 28, dtype=DT), 0.1)
    # other errors raised inside a bound pass are left as they are
    with pytest.raises(ValueError, match=r"^y:.*\[0, 10\)"):
        compute_bounds(model, torch.rand(2, 1, 8, 8, dtype=DT), 0.1,
                       y=torch.tensor([0, 12]))


def test_method_errors():
    model, x, _ = make("mlp", False, False)
    for method in ("nonsense", "alpha_crown"):
        with pytest.raises(NotImplementedError, match="'ibp'"):
            compute_bounds(model, x, 0.1, method=method)
    assert compute_bounds(model, x, 0.1, method="IBP")[0].shape == (6, 4)


def test_unsupported_modules():
    x = torch.rand(2, 3)
    with pytest.raises(NotImplementedError, match="GELU.*supported modules: Conv2d, Linear"):
        compute_bounds(nn.Sequential(nn.Linear(3, 3), nn.GELU()), x, 0.1)

    class MyLinear(nn.Linear):
        def forward(self, h):
            return super().forward(h) * 2

    with pytest.raises(NotImplementedError, match="MyLinear"):
        compute_bounds(nn.Sequential(MyLinear(3, 3)), x, 0.1)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 3))

        def forward(self, h):
            return self.net(h)

    wrapped = Wrapper()  # a non-Sequential model is traced (adcert.bounds.trace): same bounds
    for a, b in zip(compute_bounds(wrapped, x, 0.1), compute_bounds(wrapped.net, x, 0.1)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    model = nn.Sequential(nn.Linear(3, 3))
    compute_bounds(model, x, 0.1)  # cached plan; a hook added afterwards is still refused
    model[0].register_forward_pre_hook(lambda mod, inp: None)
    with pytest.raises(NotImplementedError, match="hooks"):
        compute_bounds(model, x, 0.1)
    outer = nn.Sequential(nn.Sequential(nn.Linear(3, 3)))
    outer[0].register_forward_hook(lambda mod, inp, out: out * 2)
    with pytest.raises(NotImplementedError, match="hooks"):
        compute_bounds(outer, x, 0.1)
    # a lone supported leaf module works without a Sequential
    lb, ub = compute_bounds(nn.Linear(3, 2), x, 0.1)
    assert lb.shape == (2, 2)
