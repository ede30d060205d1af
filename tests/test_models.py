"""adcert.models: architectures and their shapes, the registry, IBP / Kaiming initialisation, and
that every Sequential model goes through adcert.bounds.compute_bounds soundly."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from adcert.bounds import compute_bounds
from adcert.data import DATASETS
from adcert.models import (
    MODELS, BasicBlock, Normalize, ResNet, build_model, cnn5, cnn7, cnn7_tinyimagenet, ibp_init,
    kaiming_init,
)

SMALL = dict(width=4, linear_size=16)   # keep every model tiny on 2 shared cores


def _layers(model):
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("dataset", ["digits", "mnist", "cifar10", "tinyimagenet"])
def test_output_shapes_per_dataset(name, dataset):
    info = DATASETS[dataset]
    model = build_model(name, dataset=dataset, **SMALL)
    x = torch.rand(3, *info.shape)
    assert model(x).shape == (3, info.num_classes)
    norm = [m for m in model.modules() if isinstance(m, Normalize)]
    assert len(norm) == 1
    assert torch.allclose(norm[0].mean.flatten(), torch.tensor(info.mean))
    assert torch.allclose(norm[0].std.flatten(), torch.tensor(info.std))


def test_cnn_layouts():
    def convs(m):
        return [(c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0])
                for c in m if isinstance(c, nn.Conv2d)]
    assert convs(cnn7(width=8)) == [(8, 3, 1, 1), (8, 3, 1, 1), (16, 3, 2, 1), (16, 3, 1, 1),
                                    (16, 3, 1, 1)]
    tiny = cnn7_tinyimagenet(width=8, linear_size=32)
    assert convs(tiny) == convs(cnn7(width=8))[:4] + [(16, 3, 2, 1)]   # last stride doubled
    assert tiny[-4].in_features == 16 * 16 * 16                          # 64 -> 32 -> 16
    assert convs(cnn5(width=8)) == [(8, 3, 1, 1), (16, 4, 2, 1), (16, 4, 2, 1)]
    # every layer but the last is followed by BN + ReLU; bn=False removes the BNs
    m = cnn7(width=4, linear_size=8)
    kinds = [type(l).__name__ for l in m]
    assert kinds.count("BatchNorm2d") == 5 and kinds.count("BatchNorm1d") == 1
    assert kinds.count("ReLU") == 6 and kinds[-1] == "Linear"
    assert not any(isinstance(l, nn.modules.batchnorm._BatchNorm)
                   for l in cnn7(width=4, linear_size=8, bn=False))


def test_width_kwargs_and_spec_roundtrip():
    spec = {"name": "cnn7", "dataset": "mnist", "width": 8, "linear_size": 32}
    a, b = build_model(**spec), build_model(**dict(spec))
    assert {k: v.shape for k, v in a.state_dict().items()} == \
           {k: v.shape for k, v in b.state_dict().items()}
    assert _layers(a)[0].out_channels == 8 and _layers(a)[-2].out_features == 32
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(a.eval()(x), b.eval()(x))
    # explicit kwargs win over the dataset's
    assert build_model("cnn3", dataset="cifar10", num_classes=3, **SMALL)(
        torch.rand(2, 3, 32, 32)).shape == (2, 3)


def test_registry_errors_name_bad_keys():
    with pytest.raises(KeyError, match="unknown model 'vgg16'.*cnn7"):
        build_model("vgg16")
    with pytest.raises(TypeError, match="unknown argument\\(s\\) depth, widht.*width"):
        build_model("cnn7", depth=3, widht=4)
    with pytest.raises(KeyError, match="unknown dataset 'svhn'"):
        build_model("cnn7", dataset="svhn")
    with pytest.raises(ValueError, match="width: expected a positive int"):
        build_model("cnn5", width=0)
    with pytest.raises(ValueError, match="input_size: 1 is too small"):
        build_model("cnn3", input_size=1)
    with pytest.raises(ValueError, match="blocks: expected 1 to 3 positive ints"):
        build_model("resnet", blocks=[1, 0])
    with pytest.raises(ValueError, match="mean, std: expected 1 or in_channels=3"):
        build_model("cnn3", mean=[0.1, 0.2], std=[1.0, 1.0])


# ----------------------------------------------------------------------------- init
def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["cnn7", "resnet"])
def test_ibp_init_std_and_untouched_params(name):
    torch.manual_seed(0)
    model = build_model(name, dataset="cifar10", width=16, linear_size=64)
    with torch.no_grad():     # make biases / BN non-default so "untouched" is a real check
        for m in model.modules():
            for attr in ("bias", "running_mean"):
                t = getattr(m, attr, None)
                if isinstance(t, torch.Tensor):
                    t.uniform_(-1, 1)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
    before = _snapshot(model)
    assert ibp_init(model) is model
    after = model.state_dict()
    layers = _layers(model)
    last = layers[-1]
    names = {m: n for n, m in model.named_modules()}
    for m in layers[:-1]:
        fan_in = m.weight[0].numel()
        want = math.sqrt(2 * math.pi) / fan_in
        if getattr(m, "_adcert_residual_fed", False):
            want /= 2
        got = float(m.weight.detach().std())
        # a std estimated from n weights is off by ~1/sqrt(2n); n >= 600 here -> 15 % is > 5 sigma
        assert abs(got / want - 1) < 0.15, (names[m], got, want)
        assert abs(float(m.weight.detach().mean())) < 4 * want / math.sqrt(m.weight.numel())
        assert not torch.equal(after[names[m] + ".weight"], before[names[m] + ".weight"])
    redrawn = {names[m] + ".weight" for m in layers[:-1]}
    assert names[last] + ".weight" not in redrawn
    for key, value in before.items():   # last layer, biases, BN affine and statistics
        if key not in redrawn:
            assert torch.equal(after[key], value), f"{key} changed"


def test_ibp_init_halves_residual_fed_layers():
    torch.manual_seed(0)
    model = build_model("resnet", dataset="cifar10", width=16, linear_size=64)
    fed = {n for n, m in model.named_modules() if getattr(m, "_adcert_residual_fed", False)}
    # inputs that are a residual add's output: later blocks' conv1 and projection shortcut, fc
    assert fed == {"layers.1.conv1", "layers.1.shortcut.0", "layers.2.conv1",
                   "layers.2.shortcut.0", "fc"}
    ibp_init(model)
    ratio = [float(m.weight.detach().std()) * m.weight[0].numel() / math.sqrt(2 * math.pi)
             for n, m in model.named_modules() if n in fed]
    plain = [float(m.weight.detach().std()) * m.weight[0].numel() / math.sqrt(2 * math.pi)
             for n, m in model.named_modules() if isinstance(m, (nn.Conv2d,)) and n not in fed]
    assert all(abs(r - 0.5) < 0.1 for r in ratio), ratio
    assert all(abs(r - 1.0) < 0.15 for r in plain), plain


def test_kaiming_init():
    """Kaiming uniform as CTBench's code (``kaiming_uniform_`` defaults): U(-b, b), b =
    sqrt(6 / fan_in), on every conv/linear weight; biases keep their PyTorch defaults."""
    torch.manual_seed(0)
    model = cnn7(width=16, linear_size=64)
    biases = [m.bias.detach().clone() for m in _layers(model)]
    kaiming_init(model)
    for m, bias in zip(_layers(model), biases):
        w = m.weight.detach()
        bound = math.sqrt(6.0 / w[0].numel())
        assert float(w.abs().max()) <= bound
        assert float(w.abs().max()) > 0.95 * bound                 # uniform: fills the range
        assert abs(float(w.std()) / (bound / math.sqrt(3)) - 1) < 0.15
        assert torch.equal(m.bias.detach(), bias)                   # biases untouched


def test_demo_uses_the_shared_ibp_init():
    import adcert.demo

    assert adcert.demo.ibp_init is ibp_init


# ----------------------------------------------------------------------------- ResNet
def test_resnet_block_is_residual():
    torch.manual_seed(0)
    blk = BasicBlock(4, 8, stride=2).eval()
    x = torch.randn(2, 4, 6, 6)
    main = blk.bn2(blk.conv2(torch.relu(blk.bn1(blk.conv1(x)))))
    short = blk.shortcut[1](blk.shortcut[0](x))
    assert torch.allclose(blk(x), torch.relu(main + short))
    same = BasicBlock(4, 4, stride=1).eval()
    assert isinstance(same.shortcut, nn.Identity)
    main = same.bn2(same.conv2(torch.relu(same.bn1(same.conv1(x)))))
    assert torch.allclose(same(x), torch.relu(main + x))


def test_resnet_is_fx_traceable():
    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, Normalize) or super().is_leaf_module(m, qualname)

    model = build_model("resnet", dataset="cifar10", width=4, blocks=[2, 1]).eval()
    assert isinstance(model, ResNet) and not isinstance(model, nn.Sequential)
    gm = torch.fx.GraphModule(model, Tracer().trace(model))
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(gm(x), model(x))
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(adds) == 3                                   # one residual add per block


# ----------------------------------------------------------------------------- bounds
@pytest.mark.parametrize("name", [n for n in sorted(MODELS) if n != "resnet"])
@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_sequential_models_accepted_by_compute_bounds(name, dataset):
    torch.manual_seed(0)
    info = DATASETS[dataset]
    model = ibp_init(build_model(name, dataset=dataset, **SMALL)).double()
    assert isinstance(model, nn.Sequential)
    model.train()
    model(torch.rand(8, *info.shape, dtype=torch.float64))   # non-trivial running statistics
    model.eval()
    x = torch.rand(4, *info.shape, dtype=torch.float64)
    eps = 0.05
    lb, ub = compute_bounds(model, x, eps)
    assert lb.shape == ub.shape == (4, info.num_classes)
    with torch.no_grad():
        for _ in range(5):   # random points and vertices of the box stay inside the bounds
            for pts in (x + eps * (2 * torch.rand_like(x) - 1),
                        x + eps * torch.sign(torch.randn_like(x))):
                z = model(pts.clamp(0, 1))
                assert bool((z >= lb - 1e-9).all()) and bool((z <= ub + 1e-9).all())
        clean = model(x)
    assert bool((lb <= clean).all()) and bool((clean <= ub).all())
    assert bool((ub - lb > 0).all())
