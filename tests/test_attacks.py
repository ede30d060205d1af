"""PGD (CE and margin losses, restarts, explicit boxes, per-sample eps), the frozen batch-norm
context and EDAC's look-ahead attack, in fp64 on tiny nets."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adcert.attacks import (adversarial_certainty, edac_attack, edac_lookahead, frozen_bn,
                            margin_loss, pgd_attack, shared_bn)
from adcert.attacks.pgd import ctbench_step_factors
from adcert.bounds import clean_bn_stats


pytestmark = pytest.mark.usefixtures("float64_default")  # fp64 formula checks


def bn_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


@pytest.fixture(scope="module")
def trained():
    """A small net trained (100 Adam steps) on a 3-class linear problem, with its data."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    x = torch.rand(60, 6)
    y = (x[:, :3] - x[:, 3:]).argmax(1)
    model = bn_net(1)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    torch.set_default_dtype(old)
    return model, x, y


def test_margin_loss_is_best_other_minus_true():
    z = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 4.0]])
    torch.testing.assert_close(margin_loss(z, torch.tensor([1, 0])), torch.tensor([-1.0, 3.5]))


@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_pgd_raises_the_loss_of_a_trained_net_and_stays_in_the_box(trained, loss):
    model, x, y = trained
    model.eval()
    eps = 0.1
    fn = {"ce": lambda z: F.cross_entropy(z, y, reduction="none"),
          "margin": lambda z: margin_loss(z, y)}[loss]
    torch.manual_seed(0)
    x_adv = pgd_attack(model, x, y, eps, steps=10, loss=loss)
    assert bool((x_adv >= (x - eps).clamp(0, 1)).all() and (x_adv <= (x + eps).clamp(0, 1)).all())
    assert bool((x_adv >= 0).all() and (x_adv <= 1).all())
    with torch.no_grad():
        clean, adv = fn(model(x)), fn(model(x_adv))
    assert float(adv.mean()) > float(clean.mean()) + 0.05
    assert float((adv >= clean - 1e-6).double().mean()) > 0.9
    assert all(p.grad is None for p in model.parameters())


def test_pgd_in_train_mode_with_frozen_stats_leaves_bn_alone(trained):
    model, x, y = trained
    model = copy.deepcopy(model).train()
    bn = model[1]
    running = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    stats = clean_bn_stats(model, x)
    x_adv = pgd_attack(model, x, y, 0.1, steps=3, bn_stats=stats)
    assert bn.training and model.training
    assert torch.equal(bn.running_mean, running[0]) and torch.equal(bn.running_var, running[1])
    assert int(bn.num_batches_tracked) == running[2]
    # no stats given: batch statistics, still no running-stat update
    pgd_attack(model, x, y, 0.1, steps=2)
    assert torch.equal(bn.running_mean, running[0])
    assert x_adv.shape == x.shape and not x_adv.requires_grad


def test_explicit_box_and_per_sample_eps(trained):
    model, x, y = trained
    model.eval()
    x_L = (x - 0.02).clamp(0, 1)
    x_U = (x + 0.07).clamp(0, 1)
    x_adv = pgd_attack(model, x, y, steps=4, x_L=x_L, x_U=x_U)
    assert bool((x_adv >= x_L).all() and (x_adv <= x_U).all())
    eps = torch.linspace(0, 0.2, len(x))
    x_adv = pgd_attack(model, x, y, eps, steps=4)
    dist = (x_adv - x).abs().amax(1)
    assert bool((dist <= eps + 1e-12).all()) and float(dist[0]) == 0.0
    with pytest.raises(ValueError, match="x_L, x_U"):
        pgd_attack(model, x, y, x_L=x_L)


def test_restarts_keep_the_per_sample_best(trained):
    model, x, y = trained
    model.eval()
    torch.manual_seed(5)
    singles = [pgd_attack(model, x, y, 0.1, steps=2) for _ in range(3)]
    torch.manual_seed(5)
    best = pgd_attack(model, x, y, 0.1, steps=2, restarts=3)
    with torch.no_grad():
        losses = torch.stack([F.cross_entropy(model(s), y, reduction="none") for s in singles])
        got = F.cross_entropy(model(best), y, reduction="none")
    torch.testing.assert_close(got, losses.max(0).values)


def _eval_twin(model, mean, var):
    """An eval-mode copy of ``bn_net`` normalising with ``(mean, var)`` as running statistics."""
    twin = copy.deepcopy(model).eval()
    twin[1].running_mean.copy_(mean)
    twin[1].running_var.copy_(var)
    return twin


@pytest.mark.parametrize("context", [frozen_bn, shared_bn])
def test_bn_context_normalises_with_given_stats_and_restores_after_an_exception(context):
    model = bn_net().train()
    bn = model[1]
    mean, var = torch.randn(16), torch.rand(16) + 0.5
    buffers = (bn.running_mean.clone(), bn.running_var.clone())
    x = torch.rand(5, 6)
    with pytest.raises(RuntimeError, match="boom"):
        with context(model, {bn: (mean, var)}):
            torch.testing.assert_close(model(x), _eval_twin(model, mean, var)(x))
            raise RuntimeError("boom")
    assert bn.training and "forward" not in bn.__dict__
    assert torch.equal(bn.running_mean, buffers[0]) and torch.equal(bn.running_var, buffers[1])
    model(x)  # the module's own training forward again: it updates the running statistics
    assert not torch.equal(bn.running_mean, buffers[0])


def test_shared_bn_passes_gradients_to_the_stats_and_frozen_bn_does_not():
    model = bn_net().train()
    bn = model[1]
    x = torch.rand(5, 6)
    mean = torch.randn(16, requires_grad=True)
    var = (torch.rand(16) + 0.5).requires_grad_()
    with shared_bn(model, {bn: (mean, var)}):
        model(x).square().sum().backward()
    assert mean.grad is not None and mean.grad.abs().sum() > 0 and var.grad.abs().sum() > 0
    mean.grad = var.grad = None
    with frozen_bn(model, {bn: (mean, var)}):
        out = model(x).square().sum()
    out.backward()
    assert mean.grad is None and var.grad is None


def test_bn_contexts_nest_and_restore_the_enclosing_override():
    model = bn_net().train()
    bn = model[1]
    outer = {bn: (torch.zeros(16), torch.ones(16))}
    inner = {bn: (torch.randn(16), torch.rand(16) + 0.5)}
    x = torch.rand(5, 6)
    with shared_bn(model, outer):
        outer_fwd = bn.__dict__["forward"]
        with frozen_bn(model, inner):
            torch.testing.assert_close(model(x), _eval_twin(model, *inner[bn])(x))
        assert bn.__dict__["forward"] is outer_fwd
        torch.testing.assert_close(model(x), _eval_twin(model, *outer[bn])(x))
    assert "forward" not in bn.__dict__


def test_frozen_bn_in_eval_mode_uses_running_statistics():
    model = bn_net().eval()
    bn = model[1]
    bn.running_mean.normal_()
    x = torch.rand(4, 6)
    want = model(x)
    with frozen_bn(model, None):
        torch.testing.assert_close(model(x), want)
    assert not bn.training


# -- EDAC ------------------------------------------------------------------------------------
def test_adversarial_certainty_is_mean_logit_std():
    z = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    want = (torch.tensor(1.0) + torch.tensor(12.0).sqrt()) / 2
    torch.testing.assert_close(adversarial_certainty(z), want)
    with pytest.raises(ValueError, match="logits"):
        adversarial_certainty(torch.rand(3))


def test_edac_lookahead_is_one_gradient_step_down_the_certainty(trained):
    model, x, y = trained
    model = copy.deepcopy(model).train()
    stats = clean_bn_stats(model, x)
    before = copy.deepcopy(model.state_dict())
    x_adv = (x + 0.05).clamp(0, 1)
    got = edac_lookahead(model, x_adv, 0.3, stats)
    # independent computation on a copy in eval mode with the clean statistics as running ones
    ref = copy.deepcopy(model).eval()
    ref[1].running_mean.copy_(stats[model[1]][0].detach())
    ref[1].running_var.copy_(stats[model[1]][1].detach())
    z = ref(x_adv)
    z.std(1).mean().backward()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got[name], p.detach() - 0.3 * p.grad)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())
    # the step lowers the certainty (small enough step)
    small = edac_lookahead(model, x_adv, 1e-3, stats)
    with frozen_bn(model, stats):
        ac0 = adversarial_certainty(model(x_adv)).detach()
        ac1 = adversarial_certainty(torch.func.functional_call(model, small, (x_adv,))).detach()
    assert float(ac1) < float(ac0)


@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_edac_attack_is_pgd_on_the_lookahead_model(trained, gamma):
    model, x, y = trained
    model = copy.deepcopy(model).train()
    stats = clean_bn_stats(model, x)
    tracked = int(model[1].num_batches_tracked)
    torch.manual_seed(11)
    got = edac_attack(model, x, y, 0.1, steps=3, edac_step_size=gamma, bn_stats=stats)
    torch.manual_seed(11)
    x0 = pgd_attack(model, x, y, 0.1, steps=3, bn_stats=stats)
    ahead = copy.deepcopy(model)
    params = edac_lookahead(model, x0, gamma, stats)
    with torch.no_grad():
        for name, p in ahead.named_parameters():
            p.copy_(params[name])
    stats_ahead = {ahead[1]: stats[model[1]]}
    want = pgd_attack(ahead, x, y, 0.1, steps=3, bn_stats=stats_ahead)
    torch.testing.assert_close(got, want)
    assert all(p.grad is None for p in model.parameters())
    assert int(model[1].num_batches_tracked) == tracked


# -- CTBench's training schedule ---------------------------------------------------------------
class Recorder(nn.Module):
    """``model`` that records every input it is called on (detached copies, in call order)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.model(x)


@pytest.mark.parametrize("steps", [0, 1, 8, 10, 11, 19, 20, 35, 49, 50, 100])
def test_ctbench_step_factors_follow_the_published_schedule(steps):
    f = ctbench_step_factors(steps)
    assert len(f) == steps and all(a >= b for a, b in zip(f, f[1:]))
    assert steps == 0 or f[0] == 1.0
    drops = [i for i in range(1, steps) if f[i] < f[i - 1]]
    if steps >= 50:  # x0.1 at 50 %, 80 %, 90 % of the steps
        want, gamma = [math.ceil(steps * q) for q in (0.5, 0.8, 0.9)], 0.1
    elif steps >= 20:  # x0.1 at 70 %
        want, gamma = [math.ceil(steps * 0.7)], 0.1
    else:  # x0.2 every 10 steps
        want, gamma = [i for i in (10,) if i < steps], 0.2
    assert drops == want
    for i in drops:
        assert f[i] == pytest.approx(f[i - 1] * gamma)


def test_ctbench_schedule_returns_the_best_iterate_of_all_steps_and_restarts(trained):
    model, x, y = trained
    model.eval()
    rec = Recorder(model)
    torch.manual_seed(2)
    x_adv = pgd_attack(rec, x, y, 0.15, steps=5, restarts=3, schedule="ctbench")
    assert len(rec.seen) == 3 * (5 + 1)          # every iterate, the start and the last included
    with torch.no_grad():
        every = torch.stack([F.cross_entropy(model(p), y, reduction="none") for p in rec.seen])
        got = F.cross_entropy(model(x_adv), y, reduction="none")
    torch.testing.assert_close(got, every.max(0).values)
    # and the point is one of the iterates (per sample), inside the clipped eps-box
    pts = torch.stack(rec.seen)                                      # [N, B, 6]
    assert bool(((pts - x_adv).abs().amax(2) == 0).any(0).all())
    assert bool((x_adv >= (x - 0.15).clamp(0, 1)).all() and (x_adv <= (x + 0.15).clamp(0, 1)).all())


@pytest.mark.parametrize("step_size", [None, 0.3])
def test_ctbench_step_is_a_decayed_fraction_of_the_half_width(trained, step_size):
    model, x, y = trained
    model.eval()
    torch.manual_seed(4)
    lo_w, hi_w = 0.02 + 0.1 * torch.rand_like(x), 0.02 + 0.1 * torch.rand_like(x)
    x_L, x_U = x - lo_w, x + hi_w                      # asymmetric, per-coordinate widths
    half = (x_U - x_L) / 2
    steps = 12                                         # one x0.2 decay, at step 10
    rec = Recorder(model)
    pgd_attack(rec, x, y, steps=steps, step_size=step_size, random_start=False, x_L=x_L,
               x_U=x_U, schedule="ctbench")
    its = rec.seen                                     # x_0 (= x), ..., x_12
    assert len(its) == steps + 1 and torch.equal(its[0], x)
    base = max(0.25, 2 / steps) if step_size is None else step_size
    interior_after_decay = 0
    for i in range(steps):
        alpha = base * (0.2 if i >= 10 else 1.0) * half
        move = (its[i + 1] - its[i]).abs()
        inside = (its[i + 1] > x_L) & (its[i + 1] < x_U)
        assert bool((move <= alpha + 1e-12).all())
        torch.testing.assert_close(move[inside], alpha[inside])
        interior_after_decay += int(inside.sum()) if i >= 10 else 0
    assert interior_after_decay > 0


def test_fixed_schedule_stays_the_default_and_returns_the_last_iterate(trained):
    model, x, y = trained
    model.eval()
    rec = Recorder(model)
    torch.manual_seed(6)
    x_adv = pgd_attack(rec, x, y, 0.1, steps=4)
    assert len(rec.seen) == 4                          # no extra evaluation for one restart
    # the last ascent step from the last evaluated point, a constant 2.5 * half-width / steps
    last = rec.seen[-1].requires_grad_(True)
    value = F.cross_entropy(model(last), y, reduction="none").sum()
    (grad,) = torch.autograd.grad(value, last)
    lo, hi = (x - 0.1).clamp(0, 1), (x + 0.1).clamp(0, 1)
    want = torch.min(torch.max(last.detach() + 2.5 * (hi - lo) / 2 / 4 * grad.sign(), lo), hi)
    torch.testing.assert_close(x_adv, want)


def test_schedule_and_step_size_errors(trained):
    model, x, y = trained
    with pytest.raises(ValueError, match="schedule"):
        pgd_attack(model, x, y, 0.1, schedule="cosine")
    with pytest.raises(ValueError, match="step_size"):
        pgd_attack(model, x, y, 0.1, step_size=0.0, schedule="ctbench")


# ------------------------------------------------- AutoAttack: the reference's standard version

def _spy_torchattacks(monkeypatch):
    """Replace the torchattacks classes AutoAttack uses by spies that record their keyword
    arguments (building the real object from them, so torchattacks' own reading of them can be
    checked) and return their input unchanged instead of attacking."""
    from adcert.attacks import autoattack as aa_mod

    real = aa_mod._torchattacks()
    seen = {}

    def spy(cls, name):
        def make(model, **kw):
            seen[name] = dict(kw, obj=cls(model, **kw))
            return lambda x, y: x.clone()
        return make
    monkeypatch.setattr(aa_mod, "_torchattacks", lambda: tuple(
        spy(c, n) for c, n in zip(real, ("apgd-ce", "apgd-t", "fab-t", "square"))))
    return seen


def _tiny(classes, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, classes)).eval()


@pytest.mark.parametrize("classes, targets", [(12, 9), (10, 9), (4, 3)])
def test_autoattack_defaults_are_the_reference_standard_version(monkeypatch, classes, targets):
    from adcert.attacks.autoattack import autoattack

    seen = _spy_torchattacks(monkeypatch)
    model = _tiny(classes)
    x = torch.rand(3, 5)
    y = model(x).argmax(1)
    autoattack(model, x, y, 0.1, classes)
    assert list(seen) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    for name in ("apgd-ce", "apgd-t", "fab-t"):   # 100 iterations, one restart, as the reference
        assert seen[name]["steps"] == 100 and seen[name]["obj"].steps == 100
        assert seen[name]["n_restarts"] == 1
    assert seen["apgd-ce"]["loss"] == "ce" and seen["fab-t"]["multi_targeted"] is True
    # min(9, C - 1) target classes, as torchattacks reads its arguments (not C - 1 for C > 10)
    assert seen["apgd-t"]["obj"].n_target_classes == targets
    assert seen["fab-t"]["obj"].n_target_classes == targets
    sq = seen["square"]["obj"]
    assert (sq.n_queries, sq.p_init, sq.rescale_schedule, sq.n_restarts) == (5000, 0.8, False, 1)


def test_autoattack_settings_are_explicit_arguments_of_the_function_and_the_stage(monkeypatch):
    from adcert.attacks.autoattack import autoattack, n_targets
    from adcert.certify.stages import AutoAttackStage, make_stage

    seen = _spy_torchattacks(monkeypatch)
    model = _tiny(12)
    x = torch.rand(2, 5)
    y = model(x).argmax(1)
    autoattack(model, x, y, 0.1, 12, steps=7, target_classes=2, square_queries=30)
    assert seen["apgd-ce"]["steps"] == seen["fab-t"]["obj"].steps == 7
    assert seen["apgd-t"]["obj"].n_target_classes == seen["fab-t"]["obj"].n_target_classes == 2
    assert seen["square"]["obj"].n_queries == 30
    assert n_targets(200) == 9 and n_targets(10) == 9 and n_targets(5) == 4
    st = AutoAttackStage(12)
    assert st.fingerprint() == {"components": ["apgd-ce", "apgd-t", "fab-t", "square"],
                                "seed": 0, "steps": 100, "target_classes": 9,
                                "square_queries": 5000, "square_p_init": 0.8,
                                "square_rescale_schedule": False}
    seen.clear()
    st = make_stage("autoattack", 12, options={"autoattack": {"steps": 3,
                                                              "components": ("apgd-t",)}})
    st.run(model, x, y, 0.1)
    assert list(seen) == ["apgd-t"] and seen["apgd-t"]["obj"].steps == 3
    assert seen["apgd-t"]["obj"].n_target_classes == 9
    with pytest.raises(ValueError, match="steps"):
        autoattack(model, x, y, 0.1, 12, steps=0)


def test_autoattack_runs_on_a_12_class_model_with_few_iterations():
    """A real (short) run with more than 10 classes: the targeted attacks pick 9 of 11 targets."""
    from adcert.attacks.autoattack import autoattack, verify_counterexamples

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # torchattacks makes tensors in the default dtype
    try:
        model = _tiny(12, seed=1)
        x = torch.rand(4, 5)
        y = model(x).argmax(1)
        cand = autoattack(model, x, y, 0.3, 12, steps=3, square_queries=20)
        broken, proj, m = verify_counterexamples(model, x, cand, y, 0.3)
    finally:
        torch.set_default_dtype(old)
    assert cand.shape == x.shape and cand.dtype == x.dtype
    assert (((proj - x).abs() <= 0.3 + 1e-12) & (proj >= 0) & (proj <= 1)).all()
    assert (m[broken] <= 0).all()
