"""EDAC's look-ahead through the training optimiser (CTBench's ``_EDACMixin.EDAC_step``): one
persistent optimiser step on ``gamma * AC(PGD(theta; x))`` before the training loss, which is
then PGD training at the updated parameters. fp64 on a tiny batch-norm net."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adcert.attacks import adversarial_certainty, edac_lookahead, pgd_attack
from adcert.attacks.edac import edac_optimizer_step
from adcert.methods import StepState, get_method

pytestmark = pytest.mark.usefixtures("float64_default")


def bn_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


@pytest.fixture
def setup():
    model = bn_net(1).train()
    torch.manual_seed(2)
    x = torch.rand(24, 6)
    y = (x[:, :3] - x[:, 3:]).argmax(1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    # a few steps so Adam's moments are not trivial
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt, x, y


def _clone(model, opt):
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict shares tensors
    return ref, ref_opt


@pytest.mark.parametrize("keep_grad", [True, False])
def test_lookahead_is_one_optimiser_step_on_the_certainty(setup, keep_grad):
    model, opt, x, y = setup
    ref, ref_opt = _clone(model, opt)
    running = model[1].running_mean.clone()
    prior = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, g in zip(model.parameters(), prior):
        p.grad = g.clone()
    torch.manual_seed(5)
    got = edac_optimizer_step(model, opt, x, y, 0.1, edac_step_size=0.3, steps=3, restarts=2,
                              keep_grad=keep_grad)
    # independent: plain-torch clean statistics (differentiable), the same PGD, Adam's step
    torch.manual_seed(5)
    h = ref[0](x)
    mean, var = h.mean(0), h.var(0, unbiased=False)
    x0 = pgd_attack(ref, x, y, 0.1, steps=3, restarts=2, schedule="ctbench",
                    bn_stats={ref[1]: (mean.detach(), var.detach())})
    hb = (ref[0](x0) - mean) / torch.sqrt(var + ref[1].eps) * ref[1].weight + ref[1].bias
    ac = adversarial_certainty(ref[3](torch.relu(hb)))
    ref_opt.zero_grad(set_to_none=True)
    (0.3 * ac).backward()
    ref_opt.step()
    torch.testing.assert_close(got, ac.detach())
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, msg=name)            # the step was taken, in place
    for p, q, g in zip(model.parameters(), ref.parameters(), prior):
        if keep_grad:   # CTBench: the look-ahead's gradient stays for the training backward
            torch.testing.assert_close(p.grad, q.grad)
        else:           # the EDAC authors' code: cleared (here: put back as it was)
            assert torch.equal(p.grad, g)
    assert torch.equal(model[1].running_mean, running)      # no running-statistics update
    assert int(opt.state_dict()["state"][0]["step"]) == 4


def test_with_sgd_and_constant_statistics_it_is_the_functional_lookahead(setup):
    """SGD at rate 1 without momentum, statistics held constant: the persistent step equals
    the functional look-ahead ``theta - gamma dAC/dtheta`` of :func:`edac_lookahead`."""
    model, _, x, y = setup
    var, mean = torch.var_mean(model[0](x).detach(), 0, correction=0)
    stats = {model[1]: (mean, var)}
    torch.manual_seed(3)
    x0 = pgd_attack(model, x, y, 0.1, steps=2, restarts=1, schedule="ctbench", bn_stats=stats)
    want = edac_lookahead(model, x0, 0.3, stats)
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    torch.manual_seed(3)
    edac_optimizer_step(model, sgd, x, y, 0.1, edac_step_size=0.3, steps=2, restarts=1,
                        bn_stats=stats)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), want[name], msg=name)


def test_edac_loss_is_pgd_training_after_the_lookahead(setup):
    model, opt, x, y = setup
    ref, ref_opt = _clone(model, opt)
    state = StepState(eps=0.1, eps_target=0.1)
    method = get_method("edac", steps=2, restarts=1, w_rob=0.6, edac_step_size=0.3)
    with pytest.raises(RuntimeError, match="bind_optimizer"):
        method.loss(model, x, y, state)
    method.bind_optimizer(opt)
    torch.manual_seed(9)
    out = method.loss(model, x, y, state)
    torch.manual_seed(9)
    edac_optimizer_step(ref, ref_opt, x, y, 0.1, edac_step_size=0.3, steps=2, restarts=1)
    want = get_method("pgd", steps=2, restarts=1, w_rob=0.6).loss(ref, x, y, state)
    torch.testing.assert_close(out.loss, want.loss)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)
    # evaluation mode: no look-ahead, the model is left alone
    before = copy.deepcopy(model.state_dict())
    model.eval()
    method.loss(model, x, y, state)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_edac_hyperparameters():
    m = get_method("edac")
    assert (m.restarts, m.edac_step_size, m.lookahead, m.keep_lookahead_grad) == \
        (3, 0.3, "optimizer", True)              # CTBench App. B.4; AD-CERT App. F.3
    assert m.uses_optimizer and not get_method("edac", lookahead="functional").uses_optimizer
    with pytest.raises(ValueError, match="lookahead"):
        get_method("edac", lookahead="persistent")
