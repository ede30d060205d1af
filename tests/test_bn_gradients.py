"""The robust loss's gradient flows through the clean batch's batch-norm statistics (DESIGN.md
section 5, the CTBench convention; issue 12).

For every registered method, the gradient of its loss with respect to the first conv weight,
computed the way the trainer computes it (:class:`adcert.train.bn.StepBatchNorm`: statistics
recorded by the clean forward and reused by every pass), must

* equal the gradient of the same loss with the statistics computed by an independent plain-torch
  forward (``h.mean`` / ``h.var`` of the clean batch at each batch norm, differentiable), and
* differ from the gradient computed with detached statistics (the bug that wrecked training).

For IBP and for PGD's adversarial forward, the reference is a whole plain-torch computation of
the loss, without any adcert code. Everything in fp64.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adcert.methods import METHODS, StepState, get_method
from adcert.train import Trainer, from_dict
from adcert.train.bn import StepBatchNorm

pytestmark = pytest.mark.usefixtures("float64_default")

METHOD_NAMES = sorted(n for n in METHODS if not n.startswith("test-"))
_BN = nn.modules.batchnorm._BatchNorm


def tiny_cnn(seed: int = 0) -> nn.Sequential:
    """``[B, 1, 4, 4] -> [B, 4]``: conv + BN2d + ReLU, linear + BN1d + ReLU, linear."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(48, 8), nn.BatchNorm1d(8), nn.ReLU(),
                          nn.Linear(8, 4))
    with torch.no_grad():  # non-trivial affine parameters, so every path matters
        for m in model.modules():
            if isinstance(m, _BN):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.train()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 1, 4, 4, generator=g)
    y = torch.tensor([0, 1, 2, 3, 1, 2])
    return x, y


def make(name: str):
    cls = METHODS[name]
    kw = {}
    if cls.needs_teacher:
        kw["teacher"] = tiny_cnn(9).eval()
    if name == "edac" and "lookahead" in cls.hyperparameters():
        kw["lookahead"] = "functional"  # no optimiser outside the trainer
    return get_method(name, **kw)


def plain_stats(model: nn.Sequential, x: torch.Tensor):
    """``{bn: (mean, var)}`` from a hand-written forward: each batch norm normalises its clean
    input with that input's own per-channel mean and biased variance, kept differentiable."""
    stats, h = {}, x
    for m in model:
        if isinstance(m, _BN):
            dims = [0] + list(range(2, h.dim()))
            mean, var = h.mean(dims), h.var(dims, unbiased=False)
            stats[m] = (mean, var)
            shape = [1, -1] + [1] * (h.dim() - 2)
            h = (h - mean.view(shape)) / torch.sqrt(var.view(shape) + m.eps)
            h = h * m.weight.view(shape) + m.bias.view(shape)
        else:
            h = m(h)
    return stats


def state(**kw):
    return StepState(eps=0.1, eps_target=0.1, **kw)


def grad_via_trainer(model, method, x, y, detach=False, seed=0):
    """The first conv weight's gradient as :meth:`Trainer.train_step` computes it."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    step_bn = StepBatchNorm(model, detach=detach)
    with step_bn:
        out = method.loss(model, x, y, state(bn_stats=step_bn.view))
        out.loss.backward()
    step_bn.backward()
    return model[0].weight.grad.clone()


def grad_with_stats(model, method, x, y, stats, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    method.loss(model, x, y, state(bn_stats=stats)).loss.backward()
    return model[0].weight.grad.clone()


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_gradient_flows_through_the_clean_batch_statistics(batch, name):
    x, y = batch
    model = tiny_cnn()
    ours = grad_via_trainer(copy.deepcopy(model), make(name), x, y)
    detached = grad_via_trainer(copy.deepcopy(model), make(name), x, y, detach=True)
    ref_model = copy.deepcopy(model)
    ref = grad_with_stats(ref_model, make(name), x, y, plain_stats(ref_model, x))
    assert bool(torch.isfinite(ours).all()) and float(ours.abs().max()) > 0
    torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-10)
    gap = float((detached - ref).norm() / ref.norm())
    assert gap > 1e-3, f"{name}: detached statistics give the same gradient (gap {gap:.2e})"


def _ibp_margins_plain(model, stats, lo, hi, y):
    """Margin lower bounds ``[B, C]`` by hand-written interval arithmetic (specification
    ``e_y - e_i`` folded into the last linear layer)."""
    mu, r = (hi + lo) / 2, (hi - lo) / 2
    layers = list(model)
    for m in layers[:-1]:
        if isinstance(m, nn.Conv2d):
            mu = F.conv2d(mu, m.weight, m.bias, padding=m.padding)
            r = F.conv2d(r, m.weight.abs(), padding=m.padding)
        elif isinstance(m, nn.Linear):
            mu, r = F.linear(mu, m.weight, m.bias), F.linear(r, m.weight.abs())
        elif isinstance(m, _BN):
            mean, var = stats[m]
            shape = [1, -1] + [1] * (mu.dim() - 2)
            s = (m.weight / torch.sqrt(var + m.eps)).view(shape)
            mu, r = s * (mu - mean.view(shape)) + m.bias.view(shape), s.abs() * r
        elif isinstance(m, nn.ReLU):
            lo_, hi_ = (mu - r).clamp(min=0), (mu + r).clamp(min=0)
            mu, r = (hi_ + lo_) / 2, (hi_ - lo_) / 2
        else:
            mu, r = m(mu), m(r)
    last = layers[-1]
    w = last.weight[y][:, None, :] - last.weight[None]          # [B, C, k]
    b = last.bias[y][:, None] - last.bias[None]                  # [B, C]
    return (w @ mu[:, :, None]).squeeze(-1) + b - (w.abs() @ r[:, :, None]).squeeze(-1)


def test_ibp_gradient_equals_a_plain_torch_computation(batch):
    x, y = batch
    model = tiny_cnn()
    ours = grad_via_trainer(copy.deepcopy(model), make("ibp"), x, y)
    ref_model = copy.deepcopy(model)
    stats = plain_stats(ref_model, x)
    margins = _ibp_margins_plain(ref_model, stats, (x - 0.1).clamp(0, 1), (x + 0.1).clamp(0, 1), y)
    F.cross_entropy(-margins, y).backward()
    torch.testing.assert_close(ours, ref_model[0].weight.grad, rtol=1e-7, atol=1e-10)


def test_adversarial_forward_gradient_equals_a_plain_torch_computation(batch, monkeypatch):
    x, y = batch
    x_adv = (x + 0.1 * torch.sign(torch.sin(torch.arange(x.numel()).view_as(x)))).clamp(0, 1)
    method = make("pgd")
    monkeypatch.setattr(method, "attack", lambda *a, **k: x_adv)
    model = tiny_cnn()
    ours = grad_via_trainer(copy.deepcopy(model), method, x, y)
    ref_model = copy.deepcopy(model)
    stats = plain_stats(ref_model, x)
    h = x_adv
    for m in ref_model:
        if isinstance(m, _BN):
            mean, var = stats[m]
            shape = [1, -1] + [1] * (h.dim() - 2)
            h = (h - mean.view(shape)) / torch.sqrt(var.view(shape) + m.eps) \
                * m.weight.view(shape) + m.bias.view(shape)
        else:
            h = m(h)
    F.cross_entropy(h, y).backward()
    torch.testing.assert_close(ours, ref_model[0].weight.grad, rtol=1e-7, atol=1e-10)


def test_statistics_requested_before_the_clean_forward_are_an_error(batch):
    x, y = batch
    model = tiny_cnn()
    step_bn = StepBatchNorm(model)
    with step_bn, pytest.raises(RuntimeError, match="clean forward"):
        from adcert.bounds import compute_bounds
        compute_bounds(model, x, 0.1, y=y, bn_stats=step_bn.view)


def _trainer(tmp_path, accum):
    return Trainer(from_dict({
        "seed": 1, "output_dir": str(tmp_path), "device": "cpu",
        "data": {"dataset": "digits", "batch_size": 16, "train_subset": 64, "test_subset": 8,
                 "augment": False},
        "model": {"name": "cnn3", "kwargs": {"width": 4, "linear_size": 16}},
        "method": {"name": "ibp"},
        "train": {"epochs": 1, "lr": 1e-3, "eps": 0.1, "clean_epochs": 0, "ramp_epochs": 0,
                  "threads": 1, "grad_accum": accum},
        "log": {"progress": False}}))


def test_gradient_accumulation_uses_full_batch_statistics_exactly(tmp_path):
    """Micro-batches reuse the whole batch's statistics and push their gradient through them:
    the accumulated gradient equals the unsplit batch's."""
    grads, running = [], []
    for accum in (1, 4):
        tr = _trainer(tmp_path / str(accum), accum)
        tr.model.double()
        x, y = next(iter(tr.batches.epoch(0)))
        tr.train_step(x.double(), y, {})
        grads.append({n: p.grad.clone() for n, p in tr.model.named_parameters()})
        running.append({n: b.clone() for n, b in tr.model.named_buffers()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-9, atol=1e-12, msg=n)
    for n in running[0]:
        torch.testing.assert_close(running[1][n], running[0][n], rtol=1e-12, atol=0, msg=n)
