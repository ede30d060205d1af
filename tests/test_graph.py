"""Tests of traced model graphs (residual blocks, AvgPool, functional ReLU, view) and of
``compute_bounds(..., relu_bounds=lst)``.

The reference is an independent fp64 interval-arithmetic interpreter in LOWER/UPPER form run over
the model's own ``torch.fx`` graph (its own tracer, its own rules per module/function), so it
shares no code with the plan/step engine under test. Soundness is also checked against model
outputs at points sampled in the box (vertices included).
"""
import copy
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from adcert.bounds import AffineStep, build_plan, clean_bn_stats, compute_bounds, get_plan
from adcert.models import Normalize, cnn3
from conftest import frozen_copy, randomize_bn

DT = torch.float64
_BN = nn.modules.batchnorm._BatchNorm


# ----------------------------------------------------------------------------- reference


class _RefTracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, Normalize) or super().is_leaf_module(m, qualname)


def _cview(t, ref):
    return t.reshape((1, -1) + (1,) * (ref.dim() - 2))


def _is_box(v):
    return isinstance(v, tuple) and len(v) == 2 and all(torch.is_tensor(t) for t in v)


class IntervalInterp(fx.Interpreter):
    """Lower/upper interval arithmetic over an fx graph. ``stats``: {bn: (mean, var)}; every
    ReLU input box is appended to ``self.relu_inputs`` in execution order."""

    def __init__(self, model, stats):
        gm = fx.GraphModule(model, _RefTracer().trace(model))
        super().__init__(gm)
        self.stats = stats
        self.relu_inputs = []

    def _relu(self, box):
        lo, hi = box
        self.relu_inputs.append((lo, hi))
        return lo.clamp(min=0), hi.clamp(min=0)

    def call_module(self, target, args, kwargs):
        m = self.fetch_attr(target)
        (lo, hi), = args
        if isinstance(m, nn.Linear):
            wp, wn = m.weight.clamp(min=0), m.weight.clamp(max=0)
            b = m.bias if m.bias is not None else 0.0
            return lo @ wp.T + hi @ wn.T + b, hi @ wp.T + lo @ wn.T + b
        if isinstance(m, nn.Conv2d):
            wp, wn = m.weight.clamp(min=0), m.weight.clamp(max=0)

            def conv(t, w, b=None):
                return F.conv2d(t, w, b, m.stride, m.padding, m.dilation, m.groups)
            return conv(lo, wp, m.bias) + conv(hi, wn), conv(hi, wp, m.bias) + conv(lo, wn)
        if isinstance(m, _BN):
            mean, var = self.stats[m]
            s = m.weight / torch.sqrt(var + m.eps)
            t = m.bias - mean * s
            a, c = _cview(s, lo) * lo + _cview(t, lo), _cview(s, lo) * hi + _cview(t, lo)
            return torch.minimum(a, c), torch.maximum(a, c)
        if isinstance(m, nn.ReLU):
            return self._relu((lo, hi))
        if isinstance(m, (nn.Flatten, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            return m(lo), m(hi)
        if isinstance(m, Normalize):
            return ((lo - _cview(m.mean, lo)) / _cview(m.std, lo),
                    (hi - _cview(m.mean, lo)) / _cview(m.std, lo))
        if isinstance(m, (nn.Identity, nn.Dropout)):
            return lo, hi
        raise AssertionError(f"reference: no rule for {type(m).__name__}")

    def call_function(self, target, args, kwargs):
        if target in (F.relu, torch.relu):
            return self._relu(args[0])
        if target in (operator.add, torch.add):
            (l1, h1), (l2, h2) = args
            return l1 + l2, h1 + h2
        if target is torch.flatten:
            lo, hi = args[0]
            return torch.flatten(lo, *args[1:], **kwargs), torch.flatten(hi, *args[1:], **kwargs)
        if target is F.avg_pool2d:
            lo, hi = args[0]
            return F.avg_pool2d(lo, *args[1:], **kwargs), F.avg_pool2d(hi, *args[1:], **kwargs)
        if target is operator.getitem and not _is_box(args[0]):
            return operator.getitem(*args)
        raise AssertionError(f"reference: no rule for {target}")

    def call_method(self, target, args, kwargs):
        self_arg = args[0]
        if target == "size":
            return self_arg[0].size(*args[1:])
        if target in ("view", "reshape", "flatten"):
            lo, hi = self_arg
            return (getattr(lo, target)(*args[1:], **kwargs),
                    getattr(hi, target)(*args[1:], **kwargs))
        if target == "relu":
            return self._relu(self_arg)
        raise AssertionError(f"reference: no rule for method {target}")


def ref_bn_stats(model, x):
    """{bn: (mean, var)} as the model normalises at x: running stats in eval mode, else the biased
    batch statistics of the BN's input (captured with hooks on a copy)."""
    twin = copy.deepcopy(model)
    seen = {}
    pairs = [(a, b) for a, b in zip(model.modules(), twin.modules()) if isinstance(a, _BN)]
    hooks = [dup.register_forward_pre_hook(
        lambda mod, inp, key=orig: seen.__setitem__(key, inp[0])) for orig, dup in pairs]
    with torch.no_grad():
        twin(x)
    for h in hooks:
        h.remove()
    stats = {}
    for orig, _ in pairs:
        if orig.training and model.training:
            h = seen[orig]
            dims = [0] + list(range(2, h.dim()))
            stats[orig] = (h.mean(dims), h.var(dims, unbiased=False))
        else:
            stats[orig] = (orig.running_mean, orig.running_var)
    return stats


def ref_bounds(model, lo, hi, stats):
    interp = IntervalInterp(model, stats)
    out = interp.run((lo, hi))
    return out, interp.relu_inputs


def box(x, eps):
    e = eps if not torch.is_tensor(eps) else eps.reshape((-1,) + (1,) * (x.dim() - 1))
    return (x - e).clamp(0, 1), (x + e).clamp(0, 1)


# ----------------------------------------------------------------------------- relu_bounds


def _seq_model():
    gen = torch.Generator().manual_seed(1)
    model = cnn3(in_channels=1, num_classes=5, input_size=8, width=3, linear_size=7).double()
    model.add_module("extra_relu", nn.ReLU())  # an unfused ReLU at the end
    model.add_module("head", nn.Linear(5, 4).double())
    return randomize_bn(model, gen)


@pytest.mark.parametrize("training", [False, True])
def test_relu_bounds_match_reference_and_leave_result_unchanged(training):
    model = _seq_model().train(training)
    x = torch.rand(3, 1, 8, 8, dtype=DT)
    eps = torch.tensor([0.0, 0.05, 0.2], dtype=DT)
    collected = []
    lb, ub = compute_bounds(model, x, eps, relu_bounds=collected)
    lb0, ub0 = compute_bounds(model, x, eps)
    torch.testing.assert_close(lb, lb0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ub, ub0, rtol=1e-12, atol=1e-12)
    (rlo, rhi), ref_relus = ref_bounds(model, *box(x, eps), ref_bn_stats(model, x))
    assert len(collected) == len(ref_relus) == 4
    for (a, b), (c, d) in zip(collected, ref_relus):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(b, d, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lb, rlo, rtol=1e-10, atol=1e-10)
    # margins: also unchanged by collecting, and the collected list is the same
    y = torch.tensor([0, 3, 1])
    again = []
    m1 = compute_bounds(model, x, eps, y=y, relu_bounds=again)
    torch.testing.assert_close(m1, compute_bounds(model, x, eps, y=y), rtol=1e-12, atol=1e-12)
    assert len(again) == 4


def test_relu_bounds_are_differentiable():
    model = _seq_model()
    x = torch.rand(2, 1, 8, 8, dtype=DT)
    collected = []
    compute_bounds(model, x, 0.1, relu_bounds=collected)
    loss = sum((ub - lb).sum() for lb, ub in collected)
    loss.backward()
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- traced models


class Block(nn.Module):
    """ResNet basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        if stride == 1 and cin == cout:
            self.shortcut = nn.Sequential()  # identity
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class TinyResNet(nn.Module):
    def __init__(self, num_classes=4):
        super().__init__()
        self.norm = Normalize([0.4], [0.3])
        self.stem = nn.Conv2d(1, 3, 3, 1, 1)
        self.block1 = Block(3, 3, 1)
        self.block2 = Block(3, 4, 2)
        self.pool = nn.AvgPool2d(2)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 2 * 2, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem(self.norm(x)))
        x = self.block2(self.block1(x))
        x = self.pool(x)
        x = x.view(x.size(0), -1)
        return self.fc(self.drop(x))


class ThreeWay(nn.Module):
    """One fork used three times (nested adds), F.avg_pool2d, torch.flatten, reshape(-1, K)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 2, 3, 1, 1)
        self.b = nn.Conv2d(2, 2, 1)
        self.lin = nn.Linear(2 * 2 * 2, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = x + F.relu(self.a(x)) + self.b(x)
        h = F.avg_pool2d(h, 2)
        h = torch.flatten(h, 1).reshape(-1, 8)
        return self.out(self.lin(h).relu())


def make(kind, training, dtype=DT):
    gen = torch.Generator().manual_seed(3)
    if kind == "resnet":
        model, shape = TinyResNet(), (4, 1, 8, 8)
    else:
        model, shape = ThreeWay(), (4, 2, 4, 4)
    model = randomize_bn(model.to(dtype), gen).train(training)
    if training:
        model.drop.eval() if hasattr(model, "drop") else None  # dropout only in eval
    x = torch.rand(shape, dtype=dtype, generator=gen)
    return model, x


@pytest.mark.parametrize("kind", ["resnet", "threeway"])
@pytest.mark.parametrize("training", [False, True])
def test_traced_ibp_equals_fp64_reference_and_contains_samples(kind, training):
    model, x = make(kind, training)
    eps = torch.tensor([0.0, 0.01, 0.05, 0.3], dtype=DT)  # per-sample eps
    stats = ref_bn_stats(model, x)
    relus = []
    lb, ub = compute_bounds(model, x, eps, relu_bounds=relus)
    (rlo, rhi), ref_relus = ref_bounds(model, *box(x, eps), stats)
    torch.testing.assert_close(lb, rlo, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ub, rhi, rtol=1e-9, atol=1e-9)
    assert len(relus) == len(ref_relus) > 0
    for (a, b), (c, d) in zip(relus, ref_relus):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(b, d, rtol=1e-9, atol=1e-9)
    # eps = 0: the box is the clean output of the model as the engine normalises it
    frozen = frozen_copy(model, stats)
    with torch.no_grad():
        clean = frozen(x)
    torch.testing.assert_close(lb[0], clean[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ub[0], clean[0], rtol=1e-9, atol=1e-9)
    # samples in the box (random points and vertices) stay inside
    lo, hi = box(x, eps)
    with torch.no_grad():
        for k in range(40):
            if k < 20:
                t = torch.rand(x.shape, dtype=DT)
            else:
                t = (torch.rand(x.shape, dtype=DT) < 0.5).to(DT)
            out = frozen(lo + t * (hi - lo))
            assert bool((out >= lb - 1e-9).all()) and bool((out <= ub + 1e-9).all())
    # margins: sound (below the reference logit-difference bound is allowed, above is not)
    y = torch.tensor([0, 1, 2, 0])
    margins = compute_bounds(model, x, eps, y=y)
    assert bool((margins >= (rlo.gather(1, y[:, None]) - rhi) - 1e-9).all())
    assert bool((margins.gather(1, y[:, None]) == 0).all())
    with torch.no_grad():
        out = frozen(lo + torch.rand(x.shape, dtype=DT) * (hi - lo))
    assert bool((out.gather(1, y[:, None]) - out >= margins - 1e-9).all())


def test_clean_bn_stats_of_traced_model_match_the_model():
    model, x = make("resnet", True)
    stats = clean_bn_stats(model, x)
    ref = ref_bn_stats(model, x)
    assert set(stats) == set(ref) and len(stats) == 5
    for bn, (mean, var) in stats.items():
        torch.testing.assert_close(mean, ref[bn][0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(var, ref[bn][1], rtol=1e-10, atol=1e-10)
    # given frozen stats are used as is (bounds with them == bounds computed from x)
    a = compute_bounds(model, x, 0.02, bn_stats=stats)
    b = compute_bounds(model, x, 0.02)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)


def test_traced_gradients_flow_to_every_parameter():
    model, x = make("resnet", True)
    margins = compute_bounds(model, x, 0.05, y=torch.tensor([0, 1, 2, 3]))
    F.cross_entropy(-margins, torch.tensor([0, 1, 2, 3])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
        assert p.grad.abs().sum() > 0, name


def test_plan_structure_and_cache():
    model, _ = make("resnet", False)
    plan = get_plan(model)
    assert get_plan(model) is plan  # built once, reused
    from adcert.bounds import AvgPoolStep, ReshapeStep, ResidualStep
    kinds = [type(s).__name__ for s in plan.steps]
    assert kinds == ["NormalizeStep", "AffineStep", "ResidualStep", "ResidualStep",
                     "AvgPoolStep", "ReshapeStep", "AffineStep"]
    res1, res2 = plan.steps[2], plan.steps[3]
    assert isinstance(res1, ResidualStep) and res1.relu and res2.relu
    assert res1.branches[1] == ()  # identity shortcut
    main = res1.branches[0]
    assert [(s.layer, s.bn, s.relu) for s in main] == [
        (model.block1.conv1, model.block1.bn1, True), (model.block1.conv2, model.block1.bn2, False)]
    short = res2.branches[1]
    assert len(short) == 1 and short[0].layer is model.block2.shortcut[0] and \
        short[0].bn is model.block2.shortcut[1] and not short[0].relu
    assert isinstance(plan.steps[4], AvgPoolStep) and isinstance(plan.steps[5], ReshapeStep)
    assert plan.final_linear() is plan.steps[-1]
    model.fc = nn.Linear(16, 4).double()  # a replaced module rebuilds the plan
    assert get_plan(model) is not plan and get_plan(model).steps[-1].layer is model.fc


def test_sequential_keeps_the_fast_path_plan():
    model = cnn3(in_channels=1, num_classes=3, input_size=8, width=2, linear_size=5)
    plan = get_plan(model)
    fresh = build_plan(model)
    assert [type(s) for s in plan.steps] == [type(s) for s in fresh.steps]
    assert all(isinstance(s, AffineStep) for s in plan.steps[1:3])
    assert plan.modules == tuple(m for m in model.modules() if not isinstance(m, nn.Sequential))
    for a, b in zip(plan.steps, fresh.steps):
        assert getattr(a, "layer", None) is getattr(b, "layer", None)
        assert getattr(a, "bn", None) is getattr(b, "bn", None)
        assert getattr(a, "relu", None) == getattr(b, "relu", None)
    # the same model traced (wrapped in a module) gives the same fused steps and bounds
    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net(x)

    wrapped = Wrap()
    traced = get_plan(wrapped)
    assert [(type(a), getattr(a, "layer", None), getattr(a, "relu", None)) for a in traced.steps] \
        == [(type(b), getattr(b, "layer", None), getattr(b, "relu", None)) for b in plan.steps]
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(compute_bounds(wrapped, x, 0.1)[0], compute_bounds(model, x, 0.1)[0],
                               rtol=0, atol=0)


def test_shared_relu_module_used_twice_in_a_chain():
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2, self.l3 = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.l3(self.act(self.l2(self.act(self.l1(x)))))

    model = MLP().double()
    x = torch.rand(3, 3, dtype=DT)
    lb, ub = compute_bounds(model, x, 0.1)
    (rlo, rhi), relus = ref_bounds(model, *box(x, 0.1), {})
    assert len(relus) == 2
    torch.testing.assert_close(lb, rlo, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ub, rhi, rtol=1e-10, atol=1e-10)


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.lin(x))


@pytest.mark.parametrize("model, name", [
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.LPPool2d(2, 2)), "LPPool2d"),
    (_Fn(torch.exp), "exp"),
    (_Fn(lambda h: h * h), "mul.*not linear"),
    (_Fn(lambda h: 2.0 / h), "truediv.*not linear"),
    (_Fn(lambda h: h.view(-1)), "view"),
    (_Fn(lambda h: torch.flatten(h)), "flatten"),
    (_Fn(lambda h: (h, h)), "tuple"),
])
def test_unsupported_graphs_name_the_culprit(model, name):
    x = torch.rand(2, 1, 6, 6) if isinstance(model, nn.Sequential) else torch.rand(2, 3)
    with pytest.raises(NotImplementedError, match=f"{name}.*supported modules: Conv2d, Linear"):
        compute_bounds(model, x, 0.1)


def test_non_series_parallel_and_hooks_are_refused():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            h = self.a(x)
            g = self.b(h)
            return (h + x) + (g + x)  # x and h both forked, joined across

    with pytest.raises(NotImplementedError, match="series-parallel|more than once"):
        compute_bounds(Cross(), torch.rand(2, 3), 0.1)
    model, x = make("resnet", False)
    compute_bounds(model, x, 0.1)
    model.block1.register_forward_hook(lambda mod, inp, out: out * 2)
    with pytest.raises(NotImplementedError, match="hooks"):
        compute_bounds(model, x, 0.1)


def test_traced_model_checks_x_against_its_first_layer():
    model, x = make("resnet", False)
    with pytest.raises(ValueError, match="^x:.*channels"):
        compute_bounds(model, torch.rand(2, 3, 8, 8, dtype=DT), 0.1)
    with pytest.raises(TypeError, match="^x:.*dtype"):
        compute_bounds(model, x.float(), 0.1)
    with pytest.raises(ValueError, match="^x:"):  # view(-1, 8) cannot keep this batch
        compute_bounds(ThreeWay().double(), torch.rand(2, 2, 6, 6, dtype=DT), 0.1)


def test_sequential_with_avgpool_is_traced_and_exact():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8, 3)).double()
    x = torch.rand(3, 1, 8, 8, dtype=DT)
    lb, ub = compute_bounds(model, x, 0.1)
    (rlo, rhi), _ = ref_bounds(model, *box(x, 0.1), {})
    torch.testing.assert_close(lb, rlo, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ub, rhi, rtol=1e-10, atol=1e-10)
    assert get_plan(model) is get_plan(model)
