"""CROWN-IBP, TAPS, STAPS, CC-DIST and EDAC objectives against independent fp64 plain-torch
computations of their formulas, plus properties every registered method must have (clean epoch
= CE, gradients reach the student, the teacher never gets one, hyper-parameter errors)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adcert.bounds import METHODS as BOUND_METHODS
from adcert.bounds import clean_bn_stats, compute_bounds
from adcert.methods import METHODS, StepState, get_method
from adcert.methods._split import split_before_last_linear, split_by_relus
from adcert.methods.regularizers import first_layer_radius, warmup_regularizer
from adcert.methods.taps import RectifiedLink, class_margins, pivotal_points
from adcert.models import Normalize


pytestmark = pytest.mark.usefixtures("float64_default")  # fp64 formula checks


def mlp(seed=0, d=6, h=8, c=4, bn=False):
    torch.manual_seed(seed)
    mid = [nn.BatchNorm1d(h)] if bn else []
    return nn.Sequential(nn.Flatten(), nn.Linear(d, h), *mid, nn.ReLU(), nn.Linear(h, h),
                         nn.ReLU(), nn.Linear(h, c))


def interval(layers, lo, hi, shrink=1.0):
    """Plain lower/upper interval arithmetic through Flatten/Linear/ReLU (eval-free nets);
    ``shrink``: SABR's ReLU shrink, the upper bound of an unstable ReLU scaled before it."""
    for m in layers:
        if isinstance(m, nn.Flatten):
            lo, hi = lo.flatten(1), hi.flatten(1)
        elif isinstance(m, nn.Linear):
            wp, wn = m.weight.clamp(min=0), m.weight.clamp(max=0)
            lo, hi = lo @ wp.T + hi @ wn.T + m.bias, hi @ wp.T + lo @ wn.T + m.bias
        elif isinstance(m, nn.ReLU):
            hi = torch.where((lo < 0) & (hi > 0), shrink * hi, hi)
            lo, hi = lo.clamp(min=0), hi.clamp(min=0)
        else:
            raise AssertionError(type(m))
    return lo, hi


def margins_from_last(last, lo, hi, y):
    """Lower bounds of z_y - z_i with the difference folded into the last Linear's rows."""
    w = last.weight[y].unsqueeze(1) - last.weight.unsqueeze(0)            # [B, C, K]
    b = last.bias[y].unsqueeze(1) - last.bias.unsqueeze(0)
    return (torch.einsum("bck,bk->bc", w.clamp(min=0), lo)
            + torch.einsum("bck,bk->bc", w.clamp(max=0), hi) + b)


def plain_ibp_margins(model, x_L, x_U, y, shrink=1.0):
    layers = list(model)
    lo, hi = interval(layers[:-1], x_L, x_U, shrink)
    return margins_from_last(layers[-1], lo, hi, y)


def sabr_small_box(x, x_adv, eps, lam):
    """CTBench's SmallBoxModelWrapper box: half-width lam * (ub - lb) / 2 of the clipped eps-box,
    centre x_adv projected into [lb + r, ub - r]."""
    lb, ub = box(x, eps)
    r = lam * (ub - lb) / 2
    c = torch.max(torch.min(x_adv, ub - r), lb + r)
    return c - r, c + r


@pytest.fixture
def batch():
    torch.manual_seed(1)
    return torch.rand(5, 6), torch.tensor([0, 1, 2, 3, 1])


def state(eps=0.1, target=0.1, **kw):
    return StepState(eps=eps, eps_target=target, **kw)


def box(x, eps):
    return (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)


# -- splitting -------------------------------------------------------------------------------
def test_splits_share_modules_and_reject_bad_counts():
    model = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(6, 8), nn.ReLU()),
                          nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    h, g = split_by_relus(model, 1)
    assert [type(m) for m in g] == [nn.Linear, nn.ReLU, nn.Linear]
    assert g[0] is model[2] and h[1] is model[1][0]
    h, g = split_by_relus(model, 0)
    assert len(g) == 1 and g[0] is model[4]
    with pytest.raises(ValueError, match="classifier_relus"):
        split_by_relus(model, 2)
    h, last = split_before_last_linear(model)
    assert last is model[4] and len(h) == 5
    with pytest.raises(ValueError, match="nn.Linear"):
        split_before_last_linear(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))


# -- CROWN-IBP -------------------------------------------------------------------------------
needs_crown_ibp = pytest.mark.skipif("crown-ibp" not in BOUND_METHODS,
                                     reason="compute_bounds(method='crown-ibp') not registered")


@needs_crown_ibp
@pytest.mark.parametrize("coef", [0.0, 0.3, 1.0])
def test_crown_ibp_mixes_the_two_bounds(batch, coef):
    x, y = batch
    model = mlp()
    out = get_method("crown-ibp", reg_lambda=0.0).loss(model, x, y, state(0.1, coef=coef))
    ibp = plain_ibp_margins(model, *box(x, 0.1), y)
    crown = compute_bounds(model, x, 0.1, method="crown-ibp", y=y)
    beta = 1 - coef
    want = beta * crown + (1 - beta) * ibp
    torch.testing.assert_close(out.margins, want)
    torch.testing.assert_close(out.loss, F.cross_entropy(-want, y))
    # soundness of the mixed bound: below the true margin at points of the box
    pts = x + 0.1 * (2 * torch.rand(64, *x.shape) - 1)
    z = model(pts.clamp(0, 1).reshape(-1, 6)).view(64, 5, 4)
    true = z.gather(2, y.view(1, 5, 1).expand(64, 5, 1)) - z
    assert bool((out.margins <= true.min(0).values + 1e-9).all())


@needs_crown_ibp
def test_crown_ibp_default_coef_is_the_eps_ramp(batch):
    x, y = batch
    method = get_method("crown-ibp")
    assert method.beta(state(0.025, 0.1)) == pytest.approx(0.75)
    assert method.beta(state(0.1, 0.1, coef=0.2)) == pytest.approx(0.8)


# -- TAPS / STAPS ------------------------------------------------------------------------------
def fixed_search(method, pts_fn):
    method.search = lambda head, lb, ub, y, k: pts_fn(lb, ub)
    return method


def corner_points(lb, ub, seed=3):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand((lb.shape[0], 4) + tuple(lb.shape[1:]), generator=g)
    return (lb.unsqueeze(1) + t * (ub - lb).unsqueeze(1)).detach()


@pytest.mark.parametrize("multiplier", [True, False])
def test_taps_loss_formula(batch, multiplier):
    x, y = batch
    model = mlp()
    method = fixed_search(get_method("taps", classifier_relus=1, ibp_multiplier=multiplier,
                                     reg_lambda=0.0), corner_points)
    out = method.loss(model, x, y, state(0.1))
    layers = list(model)
    lo, hi = interval(layers[:3], *box(x, 0.1))
    head = layers[3:]
    pts = corner_points(lo, hi)
    z = nn.Sequential(*head)(pts.reshape(-1, 8)).view(5, 4, 4)
    m_taps = z.gather(2, y.view(5, 1, 1).expand(5, 4, 1)).squeeze(2) - torch.diagonal(z, 0, 1, 2)
    taps = F.cross_entropy(-m_taps, y)
    m_ibp = plain_ibp_margins(model, *box(x, 0.1), y)
    want = taps * F.cross_entropy(-m_ibp, y) if multiplier else taps
    torch.testing.assert_close(out.loss, want)
    torch.testing.assert_close(out.margins, m_ibp)


def test_taps_gradient_scale_multiplies_the_taps_gradient(batch):
    x, y = batch
    grads = {}
    for scale in (1.0, 2.0, 3.0):
        model = mlp()
        method = fixed_search(get_method("taps", grad_scale=scale, reg_lambda=0.0), corner_points)
        method.loss(model, x, y, state(0.1)).loss.backward()
        grads[scale] = torch.cat([p.grad.flatten() for p in model.parameters()])
    # d(c L_T-path * L_I) = c * A + B: affine in c, and not constant
    torch.testing.assert_close(grads[2.0], (grads[1.0] + grads[3.0]) / 2)
    assert not torch.allclose(grads[1.0], grads[3.0])


def test_rectified_link_backward():
    lb = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    ub = torch.tensor([[1.0, 3.0, 2.0]], requires_grad=True)
    pts = torch.tensor([[[1.0, 1.5, 2.0], [0.2, 2.75, 2.0]]])       # [B=1, K=2, 3]
    g = torch.tensor([[[1.0, 2.0, 4.0], [3.0, 5.0, 7.0]]])
    (RectifiedLink.apply(lb, ub, pts, 0.5) * g).sum().backward()
    # width 1, 2, 0; slack 0.5, 1, 0. share_u = clamp((p - (u - s)) / s); share_l symmetric
    want_u = torch.tensor([[1.0 * 1 + 3 * 0, 2 * 0 + 5 * 0.75, 4 * 0.5 + 7 * 0.5]])
    want_l = torch.tensor([[1.0 * 0 + 3 * 0.6, 2 * 0.5 + 5 * 0, 4 * 0.5 + 7 * 0.5]])
    torch.testing.assert_close(ub.grad, want_u)
    torch.testing.assert_close(lb.grad, want_l)


def test_pivotal_points_stay_in_box_and_find_the_linear_minimum():
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(5, 4))
    lb = torch.randn(3, 5)
    ub = lb + torch.rand(3, 5)
    y = torch.tensor([0, 2, 3])
    pts = pivotal_points(head, lb, ub, y, 4, steps=10, restarts=1)
    assert pts.shape == (3, 4, 5)
    assert bool((pts >= lb.unsqueeze(1)).all() and (pts <= ub.unsqueeze(1)).all())
    # for a linear head the minimum of each margin is at a vertex: PGD reaches the IBP bound
    found = class_margins(head, pts, y)
    exact = margins_from_last(head[0], lb, ub, y)
    torch.testing.assert_close(found, exact)


def test_taps_margins_lie_above_ibp_and_below_sampled_points(batch):
    x, y = batch
    model = mlp()
    h, g = split_by_relus(model, 1)
    lb, ub = interval(list(h), *box(x, 0.2))
    pts = pivotal_points(g, lb, ub, y, 4, steps=10, restarts=2)
    found = class_margins(g, pts, y)
    ibp = margins_from_last(list(g)[-1], *interval(list(g)[:-1], lb, ub), y)
    assert bool((found >= ibp - 1e-9).all())
    rand = lb.unsqueeze(1) + torch.rand(5, 4, 8) * (ub - lb).unsqueeze(1)
    assert bool((found <= class_margins(g, rand, y) + 1e-9).all())


@pytest.mark.parametrize("shrink", [1.0, 0.8])
def test_staps_runs_taps_on_the_sabr_box(batch, shrink):
    x, y = batch
    model = mlp()
    eps, lam = 0.2, 0.4
    x_adv = (x + eps * torch.sign(torch.randn_like(x))).clamp(0, 1)
    method = fixed_search(get_method("staps", lambda_ratio=lam, reg_lambda=0.0,
                                     relu_shrink=shrink), corner_points)
    method.attack = lambda *a, **k: x_adv
    out = method.loss(model, x, y, state(eps, eps))
    x_L, x_U = sabr_small_box(x, x_adv, eps, lam)
    layers = list(model)
    lo, hi = interval(layers[:3], x_L, x_U, shrink)
    pts = corner_points(lo, hi)
    z = nn.Sequential(*layers[3:])(pts.reshape(-1, 8)).view(5, 4, 4)
    m_taps = z.gather(2, y.view(5, 1, 1).expand(5, 4, 1)).squeeze(2) - torch.diagonal(z, 0, 1, 2)
    m_ibp = plain_ibp_margins(model, x_L, x_U, y, shrink)
    want = F.cross_entropy(-m_taps, y) * F.cross_entropy(-m_ibp, y)
    torch.testing.assert_close(out.loss, want)
    assert out.margins is None          # the small box certifies nothing about the eps-ball


# -- CC-DIST ---------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha,beta", [(0.0, 0.3), (0.4, None), (1.0, 0.1)])
def test_cc_dist_formula(batch, alpha, beta):
    x, y = batch
    model, teacher = mlp(0), mlp(1)
    x_adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    method = get_method("cc-dist", teacher=teacher, alpha=alpha, beta=beta, reg_lambda=0.0)
    method.attack = lambda *a, **k: x_adv
    out = method.loss(model, x, y, state(0.1))
    layers, t_layers = list(model), list(teacher)
    f_adv = nn.Sequential(*layers[:-1])(x_adv)
    z_adv = layers[-1](f_adv)
    t = nn.Sequential(*t_layers[:-1])(x)
    lo, hi = interval(layers[:-1], *box(x, 0.1))
    m_ibp = margins_from_last(layers[-1], lo, hi, y)
    m_adv = z_adv.gather(1, y[:, None]) - z_adv
    cc = F.cross_entropy(-((1 - alpha) * m_adv + alpha * m_ibp), y)
    up, low = (1 - alpha) * f_adv + alpha * hi, (1 - alpha) * f_adv + alpha * lo
    r = torch.maximum((up - t) ** 2, (low - t) ** 2).sum(1).mean()
    b = 5 / 8 if beta is None else beta
    torch.testing.assert_close(out.loss, cc + b * r)
    torch.testing.assert_close(out.margins, m_ibp)


def test_cc_dist_teacher_gets_no_gradient(batch):
    x, y = batch
    model, teacher = mlp(0, bn=True), mlp(1, bn=True)
    teacher.train()
    before = copy.deepcopy(teacher.state_dict())
    model.train()
    method = get_method("cc-dist", teacher=teacher, steps=2)
    out = method.loss(model, x, y, state(0.1, bn_stats=clean_bn_stats(model, x)))
    out.loss.backward()
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is not None for p in model.parameters())


# -- EDAC ------------------------------------------------------------------------------------
def test_edac_loss_is_ce_at_the_edac_examples(batch):
    x, y = batch
    model = mlp()
    x_adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    method = get_method("edac", w_rob=0.6, lookahead="functional")  # no optimiser here
    method.edac_examples = lambda *a, **k: x_adv
    out = method.loss(model, x, y, state(0.1))
    want = 0.4 * F.cross_entropy(model(x), y) + 0.6 * F.cross_entropy(model(x_adv), y)
    torch.testing.assert_close(out.loss, want)


# -- every method ----------------------------------------------------------------------------
def make(name, **kw):
    cls = METHODS[name]
    if cls.needs_teacher:
        kw["teacher"] = mlp(7)
    if name == "edac":  # the default look-ahead steps a training optimiser (tests/test_edac.py)
        kw.setdefault("lookahead", "functional")
    known = cls.hyperparameters()
    for k, v in (("steps", 2), ("restarts", 1), ("input_steps", 2)):
        if k in known:
            kw.setdefault(k, v)
    return get_method(name, **kw)


# the library's methods only: other test modules register "test-*" methods of their own
ALL = sorted(n for n in METHODS
             if n not in ("acert", "acert-fast") and not n.startswith("test-"))


@pytest.mark.parametrize("name", ALL)
def test_clean_epoch_is_plain_cross_entropy(batch, name):
    x, y = batch
    model = mlp()
    out = make(name).loss(model, x, y, state(0.0))
    torch.testing.assert_close(out.loss, F.cross_entropy(model(x), y))
    assert out.margins is None


@pytest.mark.parametrize("name", ALL)
def test_gradients_reach_every_student_parameter(batch, name):
    if name == "crown-ibp" and "crown-ibp" not in BOUND_METHODS:
        pytest.skip("compute_bounds(method='crown-ibp') not registered")
    x, y = batch
    model = mlp(bn=True).train()
    stats = clean_bn_stats(model, x)
    running = model[2].running_mean.clone()
    out = make(name).loss(model, x, y, state(0.05, bn_stats=stats))
    assert out.loss.dim() == 0 and bool(torch.isfinite(out.loss))
    out.loss.backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all())
               for p in model.parameters())
    # only the clean forward updates running statistics, once
    assert int(model[2].num_batches_tracked) == 1
    assert not torch.equal(model[2].running_mean, running)
    if out.margins is not None:  # reported margins are certificates: below sampled margins
        pts = (x + 0.05 * (2 * torch.rand(32, *x.shape) - 1)).clamp(0, 1)
        model.eval()
        for bn in (model[2],):
            bn.running_mean, bn.running_var = (t.detach() for t in stats[bn])
        z = model(pts.reshape(-1, 6)).view(32, 5, 4)
        true = z.gather(2, y.view(1, 5, 1).expand(32, 5, 1)) - z
        assert bool((out.margins <= true.min(0).values + 1e-9).all())


def test_new_hyperparameters_are_validated_by_name():
    for name, kw, word in [("taps", {"grad_scale": 0.0}, "grad_scale"),
                           ("taps", {"soft_thre": 2.0}, "soft_thre"),
                           ("staps", {"lambda_ratio": 0.0}, "lambda_ratio"),
                           ("edac", {"edac_step_size": -1.0}, "edac_step_size"),
                           ("cc-dist", {"teacher": mlp(1), "beta": -1.0}, "beta")]:
        with pytest.raises(ValueError, match=word):
            get_method(name, **kw)
    with pytest.raises(ValueError, match="maxiter"):  # certified_radius needs >= 1 iteration
        get_method("acert", maxiter=0)
    with pytest.raises(TypeError, match="gradscale"):
        get_method("taps", gradscale=3)
    with pytest.raises(ValueError, match="teacher"):
        get_method("cc-dist")
    with pytest.raises(ValueError, match="classifier_relus"):
        get_method("taps", classifier_relus=5).loss(mlp(), torch.rand(2, 6),
                                                    torch.tensor([0, 1]), state(0.1))
    assert {"crown-ibp", "taps", "staps", "cc-dist", "edac"} <= set(METHODS)


# -- warm-up regulariser wiring --------------------------------------------------------------
def plain_relu_inputs(model, x_L, x_U):
    """``(lb, ub)`` of every ReLU input of ``mlp()`` by interval arithmetic."""
    out, lo, hi = [], x_L, x_U
    for m in model:
        if isinstance(m, nn.ReLU):
            out.append((lo, hi))
        lo, hi = interval([m], lo, hi)
    return out


@pytest.mark.parametrize("name", ["ibp", "taps", "crown-ibp"])
def test_warmup_regulariser_is_added_during_the_ramp(batch, name):
    from adcert.methods.regularizers import warmup_regularizer
    if name == "crown-ibp" and "crown-ibp" not in BOUND_METHODS:
        pytest.skip("compute_bounds(method='crown-ibp') not registered")
    x, y = batch
    model = mlp()
    kw = {"reg_lambda": 0.5}
    on = get_method(name, **kw)
    off = get_method(name, reg_lambda=0.0)
    if name == "taps":
        on, off = fixed_search(on, corner_points), fixed_search(off, corner_points)
    st = state(0.025, 0.1, coef=0.5)
    try:
        got = on.loss(model, x, y, st)
    except NotImplementedError as err:  # relu_bounds not supported by the bound engine
        pytest.skip(str(err))
    base = off.loss(model, x, y, st).loss
    x_L, x_U = box(x, 0.025)
    reg = warmup_regularizer((x_U - x_L) / 2, plain_relu_inputs(model, x_L, x_U), 0.5)
    torch.testing.assert_close(got.loss, base + 0.5 * (1 - 0.25) * reg)
    torch.testing.assert_close(got.logs["loss_reg"], reg)
    # after the ramp the regulariser is off
    done = on.loss(model, x, y, state(0.1, 0.1)).loss
    torch.testing.assert_close(done, off.loss(model, x, y, state(0.1, 0.1)).loss)


# -- per-sample state: ACERT's radius cache fed by StepState.index ------------------------------
def test_acert_caches_radii_by_state_index_and_round_trips_its_state(batch):
    from adcert.radius import certified_radius

    x, y = batch
    model = mlp(3)
    method = get_method("acert", maxiter=20, xtol=1e-7, certified_only=True, reg_lambda=0.0,
                        warm_start=True)
    index = torch.tensor([7, 2, 9, 0, 4])
    method.loss(model, x, y, state(eps=0.3, target=0.3, index=index))
    frac = method.cache.frac
    assert frac.shape == (10,) and bool(torch.isnan(frac[[1, 3, 5, 6, 8]]).all())
    with torch.no_grad():
        expect = certified_radius(model, x, y, 0.3, xtol=1e-7, maxiter=20).radius
    torch.testing.assert_close(frac[index] * 0.3, expect, rtol=0, atol=1e-12)
    saved = method.state_dict()
    fresh = get_method("acert")
    fresh.load_state_dict(saved)
    torch.testing.assert_close(fresh.cache.frac, frac, rtol=0, atol=0, equal_nan=True)
    assert get_method("ibp").state_dict() == {}
    with pytest.raises(ValueError, match="state"):
        get_method("ibp").load_state_dict(saved)
    with pytest.raises(ValueError, match="unknown key"):
        fresh.load_state_dict({"cache": None})
    with pytest.raises(ValueError, match="index"):
        method.loss(model, x, y, state(eps=0.3, target=0.3, index=index.float()))


def test_acert_without_index_or_warm_start_leaves_the_cache_empty(batch):
    x, y = batch
    method = get_method("acert", reg_lambda=0.0, warm_start=True)
    method.loss(mlp(3), x, y, state(eps=0.3, target=0.3))
    assert method.cache.frac is None
    cold = get_method("acert", reg_lambda=0.0, warm_start=False)
    cold.loss(mlp(3), x, y, state(eps=0.3, target=0.3, index=torch.arange(5)))
    assert cold.cache.frac is None


# -- the papers' training protocols (CTBench App. B.4, Table 5; Shi et al.; AD-CERT Table 4) ----
ATTACKING = ["sabr", "staps", "mtl-ibp", "cc-ibp", "exp-ibp", "cc-dist", "adcert", "rslad-cert",
             "pgd"]


@pytest.mark.parametrize("name", ATTACKING)
def test_training_attacks_default_to_three_restarts_and_the_ctbench_schedule(batch, name,
                                                                             monkeypatch):
    import adcert.methods.ibp_family as family
    calls = []

    def spy(model, x, y, eps, **kw):
        calls.append(kw)
        return x.detach()
    monkeypatch.setattr(family, "pgd_attack", spy)
    x, y = batch
    key = "input_restarts" if name == "staps" else "restarts"
    assert METHODS[name].hyperparameters()[key] == 3
    teacher = {"teacher": mlp(7)} if METHODS[name].needs_teacher else {}
    for given in ({}, {key: 2}):
        calls.clear()
        method = get_method(name, **teacher, **given)
        if name == "staps":
            fixed_search(method, corner_points)
        method.loss(mlp(), x, y, state(0.1, 0.1))
        assert calls and all(c["restarts"] == given.get(key, 3) and c["schedule"] == "ctbench"
                             for c in calls)


def test_attack_and_shrink_hyperparameters_are_validated_by_name(batch):
    for name, kw, word in [("sabr", {"restarts": 0}, "restarts"),
                           ("staps", {"input_restarts": 0}, "input_restarts"),
                           ("mtl-ibp", {"step_size": -0.1}, "step_size"),
                           ("pgd", {"restarts": 0}, "restarts"),
                           ("cc-dist", {"teacher": mlp(1), "restarts": 0}, "restarts"),
                           ("adcert", {"teacher": mlp(1), "restarts": 1.5}, "restarts"),
                           ("sabr", {"relu_shrink": 0.0}, "relu_shrink"),
                           ("staps", {"relu_shrink": 1.2}, "relu_shrink")]:
        with pytest.raises(ValueError, match=word):
            get_method(name, **kw)
    with pytest.raises(TypeError, match="ibp_warmup"):
        get_method("taps", ibp_warmup="yes")
    x, _ = batch
    for bad, err in ((1.5, ValueError), (-0.1, ValueError), ("0.8", TypeError)):
        with pytest.raises(err, match="relu_shrink"):
            compute_bounds(mlp(), x, 0.1, relu_shrink=bad)
    with pytest.raises(ValueError, match="relu_shrink"):    # unsound: never for certificates
        compute_bounds(mlp(), x, 0.1, sound=True, relu_shrink=0.8)


@pytest.mark.parametrize("shrink", [1.0, 0.8, 0.0])
def test_ibp_relu_shrink_scales_the_upper_bound_of_unstable_relus(batch, shrink):
    x, y = batch
    model = mlp()
    x_L, x_U = box(x, 0.3)
    lo, hi = interval(list(model)[:2], x_L, x_U)
    assert bool(((lo < 0) & (hi > 0)).any())               # there are unstable neurons
    lb, ub = compute_bounds(model, x, x_L=x_L, x_U=x_U, relu_shrink=shrink)
    want_lb, want_ub = interval(list(model), x_L, x_U, shrink)
    torch.testing.assert_close(lb, want_lb)
    torch.testing.assert_close(ub, want_ub)
    inputs = []
    m = compute_bounds(model, x, x_L=x_L, x_U=x_U, y=y, relu_shrink=shrink, relu_bounds=inputs)
    torch.testing.assert_close(m, plain_ibp_margins(model, x_L, x_U, y, shrink))
    torch.testing.assert_close(inputs[0][1], hi)            # ReLU inputs are recorded unshrunk
    assert len(inputs) == 2


@pytest.mark.parametrize("lam", [0.1, 0.4, 1.0])
def test_sabr_box_is_the_lambda_share_of_the_clipped_eps_box(lam):
    torch.manual_seed(3)
    x = torch.rand(64, 6)
    x[:8], x[8:16], x[16:24] = 0.0, 1.0, 0.03                 # pixels whose eps-box is clipped
    eps = 0.1
    x_adv = x + eps * (4 * torch.rand_like(x) - 2)              # anywhere, even outside the box
    x_L, x_U = get_method("sabr", lambda_ratio=lam).small_box(x, x_adv, eps)
    lb, ub = box(x, eps)
    r = lam * (ub - lb) / 2
    torch.testing.assert_close((x_U - x_L) / 2, r)
    assert bool((x_L >= lb - 1e-12).all() and (x_U <= ub + 1e-12).all())
    centre = (x_L + x_U) / 2
    fits = (x_adv >= lb + r) & (x_adv <= ub - r)
    torch.testing.assert_close(centre[fits], x_adv[fits])    # the adversarial point when it fits
    nearest = torch.where(x_adv < lb + r, lb + r, ub - r)     # else the closest feasible centre
    torch.testing.assert_close(centre[~fits], nearest[~fits])
    if lam == 1.0:
        torch.testing.assert_close(x_L, lb)
        torch.testing.assert_close(x_U, ub)


def test_sabr_loss_is_ibp_on_the_small_box_with_the_relu_shrink(batch):
    x, y = batch
    model = mlp()
    eps, lam = 0.2, 0.4
    x_adv = (x + eps * torch.sign(torch.randn_like(x))).clamp(0, 1)
    losses = {}
    for shrink in (1.0, 0.8):
        method = get_method("sabr", lambda_ratio=lam, relu_shrink=shrink, reg_lambda=0.0)
        method.attack = lambda *a, **k: x_adv
        losses[shrink] = method.loss(model, x, y, state(eps, eps)).loss
        m = plain_ibp_margins(model, *sabr_small_box(x, x_adv, eps, lam), y, shrink)
        torch.testing.assert_close(losses[shrink], F.cross_entropy(-m, y))
    assert float(losses[0.8].detach()) < float(losses[1.0].detach())


def _no_search(*args):
    raise AssertionError("the TAPS search ran")


def test_taps_and_staps_train_plain_ibp_during_the_eps_ramp(batch):
    x, y = batch
    model = mlp()
    ramp = state(0.05, 0.1)
    taps = get_method("taps", reg_lambda=0.0)
    taps.search = _no_search
    out = taps.loss(model, x, y, ramp)
    m = plain_ibp_margins(model, *box(x, 0.05), y)
    torch.testing.assert_close(out.loss, F.cross_entropy(-m, y))
    torch.testing.assert_close(out.margins, m)
    x_adv = (x + 0.05 * torch.sign(torch.randn_like(x))).clamp(0, 1)
    staps = get_method("staps", lambda_ratio=0.4, reg_lambda=0.0)
    staps.search, staps.attack = _no_search, (lambda *a, **k: x_adv)
    out = staps.loss(model, x, y, ramp)
    m = plain_ibp_margins(model, *sabr_small_box(x, x_adv, 0.05, 0.4), y)
    torch.testing.assert_close(out.loss, F.cross_entropy(-m, y))
    assert out.margins is None
    # after the ramp, or with ibp_warmup=False, the TAPS loss (and its search) is used
    eager = get_method("taps", reg_lambda=0.0, ibp_warmup=False)
    eager.search = _no_search
    for method, st in ((taps, state(0.1, 0.1)), (staps, state(0.1, 0.1)), (eager, ramp)):
        with pytest.raises(AssertionError, match="search ran"):
            method.loss(model, x, y, st)


def test_first_layer_radius_divides_by_the_normalize_std():
    std = torch.tensor([0.2, 0.5, 0.25])
    model = nn.Sequential(nn.Sequential(Normalize([0.4, 0.5, 0.6], std)), nn.Conv2d(3, 4, 3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
    torch.manual_seed(0)
    x_L = torch.rand(2, 3, 4, 4)
    x_U = x_L + torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(first_layer_radius(model, x_L, x_U),
                               (x_U - x_L) / 2 / std.view(1, 3, 1, 1))
    a, b = torch.zeros(2, 6), torch.full((2, 6), 0.3)
    torch.testing.assert_close(first_layer_radius(mlp(), a, b), (b - a) / 2)   # no Normalize


def normalized_mlp():
    """``Normalize`` (std 0.2..0.4 per feature) then ``mlp``'s layers, weights x3 so that the
    tightness terms are active."""
    std = torch.linspace(0.2, 0.4, 6)
    model = mlp()
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(3)
    return nn.Sequential(Normalize(torch.full((6,), 0.5), std), *list(model)[1:]), std


@pytest.mark.parametrize("name,kw", [("ibp", {}), ("crown-ibp", {}),
                                     ("crown-ibp", {"loss_fusion": True}), ("taps", {}),
                                     ("sabr", {}), ("cc-dist", {}), ("acert-fast", {})])
def test_warmup_tightness_r0_is_the_radius_after_normalize(batch, name, kw):
    if name == "crown-ibp" and "crown-ibp" not in BOUND_METHODS:
        pytest.skip("compute_bounds(method='crown-ibp') not registered")
    x, y = batch
    model, std = normalized_mlp()
    if METHODS[name].needs_teacher:
        kw = {**kw, "teacher": mlp(7)}
    method = get_method(name, reg_lambda=0.5, **kw)
    method.attack = lambda model, x, *a, **k: x.detach()
    if name == "acert-fast":   # trained at eps_t where correctly classified (all here), else 0
        y = model(x).argmax(1)
    out = method.loss(model, x, y, state(0.025, 0.1, coef=0.5))
    x_L, x_U = box(x, 0.025)
    if name == "sabr":
        x_L, x_U = sabr_small_box(x, x, 0.025, method.lambda_ratio)
    inputs = []
    compute_bounds(model, x, x_L=x_L, x_U=x_U, relu_bounds=inputs)
    want = warmup_regularizer((x_U - x_L) / 2 / std, inputs, 0.5)
    pixel = warmup_regularizer((x_U - x_L) / 2, inputs, 0.5)
    assert abs(float(want.detach() - pixel.detach())) > 1e-3   # the test tells them apart
    torch.testing.assert_close(out.logs["loss_reg"], want)
