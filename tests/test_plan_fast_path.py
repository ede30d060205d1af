"""The fused fast path (conv/linear + batch norm + ReLU as ONE step, run by one fused interval
op) is what the plan chooses for Sequential CNNs, and it gives the same bounds as the general
path (one step per module)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import adcert.bounds.api as api
from adcert.bounds import AffineStep, BatchNormStep, ReluStep, build_plan, compute_bounds, \
    get_plan
from adcert.models import Normalize

DT = torch.float64


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(Normalize([0.4, 0.5], [0.2, 0.3]), nn.Conv2d(2, 4, 3, stride=2),
                      nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten(),
                      nn.Linear(24, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5)).to(DT)
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return m


def test_the_plan_fuses_sequential_cnns():
    plan = get_plan(cnn())
    fused = [s for s in plan.steps if isinstance(s, AffineStep)]
    assert [(s.bn is not None, s.relu) for s in fused] == \
        [(True, True), (False, True), (True, True), (False, False)]
    general = build_plan(cnn(), fuse=False)
    assert all(not s.relu and s.bn is None for s in general.steps if isinstance(s, AffineStep))
    assert sum(isinstance(s, ReluStep) for s in general.steps) == 3
    assert sum(isinstance(s, BatchNormStep) for s in general.steps) == 2


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("method, sound", [("ibp", False), ("ibp", True), ("crown-ibp", False),
                                           ("crown", False), ("crown", True),
                                           ("alpha-crown", False)])
def test_fast_path_equals_general_path(monkeypatch, mode, method, sound):
    if sound and mode == "train":
        pytest.skip("sound bounds are for eval mode")
    model = cnn().train(mode == "train")
    x = torch.rand(3, 2, 9, 9, dtype=DT)
    y = torch.tensor([0, 3, 4])
    opts = {"iterations": 3} if method == "alpha-crown" else {}
    out = {}
    for name, plan_of in (("fast", get_plan), ("general", lambda m: build_plan(m, fuse=False))):
        monkeypatch.setattr(api, "get_plan", plan_of)
        boxes = []
        lb, ub = compute_bounds(model, x, 0.03, method=method, sound=sound, relu_bounds=boxes,
                                **opts)
        margins = compute_bounds(model, x, 0.03, method=method, y=y, sound=sound, **opts)
        out[name] = [lb, ub, margins] + [t for b in boxes for t in b]
    assert len(out["fast"]) == len(out["general"])
    for a, b in zip(out["fast"], out["general"]):
        # sound IBP folds the batch norm only on the fast path (a different, rigorous rounding)
        tol = 1e-9 if sound else 1e-12
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_fast_path_gradients_equal_general_path(monkeypatch):
    model = cnn().train()
    x = torch.rand(3, 2, 9, 9, dtype=DT)
    y = torch.tensor([0, 3, 4])
    grads = {}
    for name, plan_of in (("fast", get_plan), ("general", lambda m: build_plan(m, fuse=False))):
        monkeypatch.setattr(api, "get_plan", plan_of)
        model.zero_grad()
        m = compute_bounds(model, x, 0.03, method="ibp", y=y)
        torch.nn.functional.cross_entropy(-m, y).backward()
        grads[name] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads["fast"], grads["general"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
