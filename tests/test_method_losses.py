"""Each training objective equals an independent plain-torch computation of its formula (fp64),
the teacher gets no gradient, and the attacks/regularisers behave as documented."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adcert.attacks import frozen_bn, pgd_attack
from adcert.bounds import clean_bn_stats
from adcert.methods import METHODS, StepState, get_method
from adcert.methods.regularizers import warmup_regularizer


pytestmark = pytest.mark.usefixtures("float64_default")  # fp64 formula checks


def mlp(seed=0, d=6, h=8, c=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                         nn.Linear(h, c)).double()


def plain_ibp_margins(model, x, y, x_L, x_U):
    """Interval arithmetic in lower/upper form through Flatten/Linear/ReLU, then z_y - z_i from
    the last layer's rows (the specification folded in), written independently of adcert."""
    lo, hi = x_L.flatten(1), x_U.flatten(1)
    layers = [m for m in model if not isinstance(m, nn.Flatten)]
    for m in layers[:-1]:
        if isinstance(m, nn.Linear):
            wp, wn = m.weight.clamp(min=0), m.weight.clamp(max=0)
            lo, hi = lo @ wp.T + hi @ wn.T + m.bias, hi @ wp.T + lo @ wn.T + m.bias
        else:
            lo, hi = lo.clamp(min=0), hi.clamp(min=0)
    last = layers[-1]
    w = last.weight[y].unsqueeze(1) - last.weight.unsqueeze(0)            # [B, C, K]
    b = last.bias[y].unsqueeze(1) - last.bias.unsqueeze(0)
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    return torch.einsum("bck,bk->bc", wp, lo) + torch.einsum("bck,bk->bc", wn, hi) + b


def kl(p_teacher_logits, q_logits):
    p = F.softmax(p_teacher_logits, 1)
    return (p * (F.log_softmax(p_teacher_logits, 1) - F.log_softmax(q_logits, 1))).sum(1).mean()


@pytest.fixture
def batch():
    torch.manual_seed(1)
    x = torch.rand(5, 6)
    y = torch.tensor([0, 1, 2, 3, 1])
    return x, y


def fixed_attack(method, x_adv):
    method.attack = lambda *args, **kwargs: x_adv
    return method


def state(eps=0.1, target=0.1):
    return StepState(eps=eps, eps_target=target)


def test_ibp_loss_matches_interval_arithmetic(batch):
    x, y = batch
    model = mlp()
    out = get_method("ibp", w_rob=0.7, reg_lambda=0.0).loss(model, x, y, state(0.05))
    m = plain_ibp_margins(model, x, y, (x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1))
    want = 0.3 * F.cross_entropy(model(x), y) + 0.7 * F.cross_entropy(-m, y)
    torch.testing.assert_close(out.loss, want)
    torch.testing.assert_close(out.margins, m)


def test_clean_epoch_is_plain_cross_entropy(batch):
    x, y = batch
    model = mlp()
    for name in ("ibp", "mtl-ibp", "sabr", "pgd"):
        out = get_method(name).loss(model, x, y, state(0.0))
        torch.testing.assert_close(out.loss, F.cross_entropy(model(x), y))


@pytest.mark.parametrize("alpha", [0.0, 0.37, 1.0])
def test_adcert_formula(batch, alpha):
    x, y = batch
    model, teacher = mlp(0), mlp(1)
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    method = fixed_attack(get_method("adcert", teacher=teacher, alpha=alpha, alpha_ramp=False,
                                     reg_lambda=0.0), x_adv)
    out = method.loss(model, x, y, state(0.1))
    m = plain_ibp_margins(model, x, y, (x - 0.1).clamp(0, 1), (x + 0.1).clamp(0, 1))
    want = (1 - alpha) * kl(teacher(x), model(x_adv)) + alpha * F.cross_entropy(-m, y)
    torch.testing.assert_close(out.loss, want)


def test_adcert_teacher_gets_no_gradient(batch):
    x, y = batch
    model, teacher = mlp(0), mlp(1)
    before = [p.clone() for p in teacher.parameters()]
    method = get_method("adcert", teacher=teacher, alpha=0.5, steps=2)
    method.loss(model, x, y, state(0.1)).loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    assert not teacher.training
    assert all(p.grad is not None for p in model.parameters())


def test_rslad_cert_formula(batch):
    x, y = batch
    model, teacher = mlp(0), mlp(1)
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    a, lam = 0.3, 5 / 6
    method = fixed_attack(get_method("rslad-cert", teacher=teacher, alpha=a, alpha_ramp=False,
                                     reg_lambda=0.0), x_adv)
    out = method.loss(model, x, y, state(0.1))
    m = plain_ibp_margins(model, x, y, (x - 0.1).clamp(0, 1), (x + 0.1).clamp(0, 1))
    t = teacher(x)
    want = ((1 - a) * ((1 - lam) * kl(t, model(x)) + lam * kl(t, model(x_adv)))
            + a * F.cross_entropy(-m, y))
    torch.testing.assert_close(out.loss, want)


def test_adcert_alpha_ramps_with_eps(batch):
    x, y = batch
    method = get_method("adcert", teacher=mlp(1), alpha=0.5)
    assert method.current_alpha(state(0.025, 0.1)) == pytest.approx(0.125)
    assert method.current_alpha(state(0.1, 0.1)) == pytest.approx(0.5)


@pytest.mark.parametrize("name", ["mtl-ibp", "cc-ibp", "exp-ibp"])
def test_expressive_losses(batch, name):
    x, y = batch
    model = mlp()
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    a = 0.4
    method = fixed_attack(get_method(name, alpha=a, reg_lambda=0.0), x_adv)
    out = method.loss(model, x, y, state(0.1))
    m = plain_ibp_margins(model, x, y, (x - 0.1).clamp(0, 1), (x + 0.1).clamp(0, 1))
    z = model(x_adv)
    ibp, adv = F.cross_entropy(-m, y), F.cross_entropy(z, y)
    if name == "mtl-ibp":
        want = (1 - a) * adv + a * ibp
    elif name == "cc-ibp":
        want = F.cross_entropy(-((1 - a) * (z.gather(1, y[:, None]) - z) + a * m), y)
    else:
        want = ibp ** a * adv ** (1 - a)
    torch.testing.assert_close(out.loss, want)


def test_sabr_box_lies_in_the_eps_ball_and_sets_the_loss(batch):
    x, y = batch
    model = mlp()
    eps, lam = 0.2, 0.4
    x_adv = (x + eps * torch.sign(torch.randn_like(x))).clamp(0, 1)
    method = fixed_attack(get_method("sabr", lambda_ratio=lam, reg_lambda=0.0), x_adv)
    x_L, x_U = method.small_box(x, x_adv, eps)
    assert bool((x_L >= (x - eps).clamp(0, 1) - 1e-12).all())
    assert bool((x_U <= (x + eps).clamp(0, 1) + 1e-12).all())
    assert bool(((x_U - x_L) <= 2 * lam * eps + 1e-12).all())
    out = method.loss(model, x, y, state(eps, eps))
    m = plain_ibp_margins(model, x, y, x_L, x_U)
    torch.testing.assert_close(out.loss, F.cross_entropy(-m, y))


def test_unknown_hyperparameters_are_named():
    with pytest.raises(TypeError, match="alhpa"):
        get_method("mtl-ibp", alhpa=0.5)
    with pytest.raises(KeyError, match="nonsense"):
        get_method("nonsense")
    with pytest.raises(ValueError, match="teacher"):
        get_method("adcert")
    assert {"ibp", "pgd", "mtl-ibp", "cc-ibp", "exp-ibp", "sabr", "adcert",
            "rslad-cert"} <= set(METHODS)


def test_warmup_regularizer_formula_and_finite_gradients():
    torch.manual_seed(0)
    c = torch.randn(4, 10, requires_grad=True)
    r = torch.rand(4, 10) + 0.1
    lb, ub = c - r, c + r
    r0 = torch.full((4, 6), 0.05)
    got = warmup_regularizer(r0, [(lb, ub)], tau=0.5)
    # direct evaluation of the documented formula for one layer
    tight = F.relu(0.5 - r0.mean() / r.mean()) / 0.5
    act, inact = (lb > 0).double(), (ub < 0).double()
    mr = (c * act).mean() / -(c * inact).mean()
    d = (c - c.mean()) ** 2
    vr = (d * act).sum() / (d * inact).sum()
    mr, vr = torch.minimum(mr, 1 / mr), torch.minimum(vr, 1 / vr)
    bal = (F.relu(0.5 - mr) + F.relu(0.5 - vr)) / 0.5
    torch.testing.assert_close(got, tight + bal)
    # a layer with no inactive neuron: its balance term is dropped, gradients stay finite
    pos = torch.rand(4, 10, requires_grad=True)
    val = warmup_regularizer(r0, [(pos + 0.01, pos + 0.2)], tau=0.5)
    val.backward()
    assert torch.isfinite(val) and bool(torch.isfinite(pos.grad).all())


def bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)).double()


def test_pgd_stays_in_box_raises_loss_and_leaves_model_alone(batch):
    x, y = batch
    model = bn_net().train()
    running = [b.clone() for b in (model[1].running_mean, model[1].running_var)]
    stats = clean_bn_stats(model, x)
    eps = 0.1
    x_adv = pgd_attack(model, x, y, eps, steps=10, bn_stats=stats)
    assert bool((x_adv >= (x - eps).clamp(0, 1) - 1e-12).all())
    assert bool((x_adv <= (x + eps).clamp(0, 1) + 1e-12).all())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model[1].running_mean, running[0])
    assert torch.equal(model[1].running_var, running[1])
    assert model.training and model[1].training
    with frozen_bn(model, stats):
        clean = F.cross_entropy(model(x), y, reduction="sum")
        adv = F.cross_entropy(model(x_adv), y, reduction="sum")
    assert float(adv.detach()) > float(clean.detach())


def test_frozen_bn_uses_given_statistics_and_restores():
    model = bn_net().train()
    x = torch.rand(7, 6)
    mean, var = torch.randn(8), torch.rand(8) + 0.5
    with frozen_bn(model, {model[1]: (mean, var)}):
        h = model[1](model[0](x))
    bn = model[1]
    want = (model[0](x) - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
    torch.testing.assert_close(h, want)
    assert bn.training and torch.equal(bn.running_mean, torch.zeros(8))
    assert int(bn.num_batches_tracked) == 0


def test_pgd_argument_errors(batch):
    x, y = batch
    with pytest.raises(ValueError, match="eps"):
        pgd_attack(mlp(), x, y, -0.1)
    with pytest.raises(ValueError, match="steps"):
        pgd_attack(mlp(), x, y, 0.1, steps=-1)


def test_rslad_cert_attacks_the_teachers_soft_labels_and_adcert_the_hard_ones(batch,
                                                                               monkeypatch):
    """AD-CERT Table 4 footnote: RSLAD's x_adv maximises KL(P_T(x) || P_S(x_adv)) (as RSLAD);
    AD-CERT's maximises CE with the labels. Both: CTBench's attack, 3 restarts."""
    import adcert.methods.ibp_family as family
    x, y = batch
    model, teacher = mlp(0), mlp(1)
    t = teacher(x).detach()

    def kl_rows(z, _y):
        p = F.softmax(t, 1)
        return (p * (F.log_softmax(t, 1) - F.log_softmax(z, 1))).sum(1)

    calls = []
    real = family.pgd_attack

    def spy(*args, **kw):
        calls.append((kw, real(*args, **kw)))
        return calls[-1][1]
    monkeypatch.setattr(family, "pgd_attack", spy)
    want = {}
    for name, loss in (("rslad-cert", kl_rows), ("adcert", "ce")):
        torch.manual_seed(5)
        want[name] = real(model, x, y, 0.1, steps=3, restarts=3, loss=loss, schedule="ctbench")
        calls.clear()
        torch.manual_seed(5)
        get_method(name, teacher=teacher, steps=3, reg_lambda=0.0).loss(model, x, y, state(0.1))
        (kw, got), = calls
        torch.testing.assert_close(got, want[name])
    assert not torch.equal(want["rslad-cert"], want["adcert"])
    z = torch.randn(5, 4)
    calls.clear()
    get_method("rslad-cert", teacher=teacher, steps=1, reg_lambda=0.0).loss(model, x, y,
                                                                           state(0.1))
    torch.testing.assert_close(calls[0][0]["loss"](z, y), kl_rows(z, y))
