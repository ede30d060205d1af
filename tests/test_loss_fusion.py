"""CROWN-IBP loss fusion (:func:`adcert.bounds.crown_ibp_ce_upper`) and the ``loss_fusion`` option
of the ``crown-ibp`` training method.

* an independent fp64 plain-torch reference of the whole fused bound (interval arithmetic, the
  exp chords, an explicit UPPER-bound back-substitution with CROWN's slopes) for MLPs;
* soundness: the bound is >= CE at the clean point, at box vertices and at PGD points (MLP, a
  tiny CNN with BN in eval and in frozen-train mode, a tiny ResNet), >= the exact max of CE over
  a dense grid of a 2-D input box, and equal to CE at eps = 0;
* its relation to the unfused CROWN-IBP and IBP losses (reported; asserted only where the
  construction guarantees it);
* gradients reach every parameter and match central finite differences in fp64;
* the method: loss formula per beta, a training step, hyper-parameter errors.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adcert.attacks import frozen_bn, pgd_attack
from adcert.bounds import clean_bn_stats, compute_bounds, crown_ibp_ce_upper
from adcert.bounds.loss_fusion import exp_chord
from adcert.methods import StepState, get_method
from adcert.models import Normalize, resnet

pytestmark = pytest.mark.usefixtures("float64_default")  # fp64 formula and soundness checks


# --------------------------------------------------------------------------- models and helpers
def mlp(seed=0, d=6, h=10, c=4, bn=False):
    torch.manual_seed(seed)
    mid = [nn.BatchNorm1d(h)] if bn else []
    return nn.Sequential(nn.Flatten(), nn.Linear(d, h), *mid, nn.ReLU(), nn.Linear(h, h),
                         nn.ReLU(), nn.Linear(h, c))


def tiny_cnn(seed=0, c=4):
    """``[B, 1, 6, 6] -> [B, c]``: Normalize, conv+BN+ReLU, strided conv+ReLU, linear+BN+ReLU,
    linear."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        Normalize(mean=[0.4], std=[0.3]),
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(36, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, c))
    for m in model.modules():  # non-trivial running statistics and affine parameters
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(-1.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model


def setup(kind, batch=4):
    """``(model, x, y, bn_stats)``; ``bn_stats`` frozen clean-batch statistics in train mode."""
    torch.manual_seed(7)
    if kind == "mlp":
        model, x = mlp().eval(), torch.rand(batch, 6)
        stats = None
    elif kind == "mlp-relu-out":  # no final Linear to fold the margin rows into
        model, x = nn.Sequential(*mlp(), nn.ReLU()).eval(), torch.rand(batch, 6)
        stats = None
    elif kind == "resnet-train":  # a residual graph (fx-traced), BN in frozen-train mode
        model = resnet(in_channels=1, num_classes=4, input_size=8, width=2, blocks=(1, 1),
                       linear_size=8).train()
        x = torch.rand(batch, 1, 8, 8)
        stats = clean_bn_stats(model, x)
    else:
        model, x = tiny_cnn(), torch.rand(batch, 1, 6, 6)
        model.train(kind == "cnn-train")
        stats = clean_bn_stats(model, x) if kind == "cnn-train" else None
    y = torch.randint(0, 4, (batch,))
    return model, x, y, stats


def ce_at(model, pts, y, stats):
    """Per-sample CE ``[B]`` at points ``pts: [B, *in]`` with the step's frozen statistics."""
    with torch.no_grad(), frozen_bn(model, stats):
        return F.cross_entropy(model(pts), y, reduction="none")


def plain_chord(lo, up):
    """Slope of exp's chord on [lo, up] (exp(lo) on a point interval), plain formula."""
    w = up - lo
    safe = torch.where(w > 0, w, torch.ones_like(w))
    return torch.where(w > 0, (up.exp() - lo.exp()) / safe, lo.exp())


def reference_fused(model, x_L, x_U, y):
    """fp64 plain-torch fused bound for ``Sequential(Flatten, Linear, ReLU, ..., Linear)``:
    interval arithmetic, chords, then the UPPER bound of ``c . z`` back-substituted directly
    (positive coefficients take the ReLU chord, negative ones CROWN's adaptive lower slope)."""
    lins = [m for m in model if isinstance(m, nn.Linear)]
    lo, hi = x_L.flatten(1), x_U.flatten(1)
    boxes = []
    for lin in lins[:-1]:
        wp, wn = lin.weight.clamp(min=0), lin.weight.clamp(max=0)
        lo, hi = lo @ wp.T + hi @ wn.T + lin.bias, hi @ wp.T + lo @ wn.T + lin.bias
        boxes.append((lo, hi))
        lo, hi = lo.clamp(min=0), hi.clamp(min=0)
    W, b = lins[-1].weight, lins[-1].bias
    Wd = W.unsqueeze(0) - W[y].unsqueeze(1)                        # rows e_i - e_y: [B, n, k]
    bd = b.unsqueeze(0) - b[y].unsqueeze(1)
    l_d = torch.einsum("bnk,bk->bn", Wd.clamp(min=0), lo) + \
        torch.einsum("bnk,bk->bn", Wd.clamp(max=0), hi) + bd
    u_d = torch.einsum("bnk,bk->bn", Wd.clamp(min=0), hi) + \
        torch.einsum("bnk,bk->bn", Wd.clamp(max=0), lo) + bd
    M = u_d.max(1, keepdim=True).values
    a = plain_chord(l_d - M, u_d - M)
    onehot = F.one_hot(y, W.shape[0]).double()
    a = a * (1 - onehot)
    const = ((l_d - M).exp() - a * l_d).sum(1)
    c = a - onehot * a.sum(1, keepdim=True)                        # T(z) = c . z + const
    g = c @ W
    const = const + c @ b
    for lin, (l, u) in zip(reversed(lins[:-1]), reversed(boxes)):
        unstable = (l < 0) & (u > 0)
        up_slope = torch.where(unstable, u / torch.where(unstable, u - l, 1.0), (l >= 0).double())
        up_icpt = torch.where(unstable, -l * up_slope, 0.0)
        lo_slope = torch.where(unstable, (u >= -l).double(), (l >= 0).double())
        gp, gn = g.clamp(min=0), g.clamp(max=0)
        const = const + (gp * up_icpt).sum(1)
        g = gp * up_slope + gn * lo_slope
        const = const + g @ lin.bias
        g = g @ lin.weight
    mid, rad = (x_U + x_L).flatten(1) / 2, (x_U - x_L).flatten(1) / 2
    T = const + (g * mid).sum(1) + (g.abs() * rad).sum(1)
    return M[:, 0] + T.log(), l_d, u_d


def ibp_lower_of_d(model, x, eps, y, stats):
    """IBP lower bounds ``[B, C]`` of ``d_i = z_i - z_y`` (folded into the last layer): the IBP
    margins of the model with its last Linear negated (``z -> -z``), negated back afterwards."""
    last = model[-1]
    with torch.no_grad():
        last.weight.neg_()
        last.bias.neg_()
    try:
        return compute_bounds(model, x, eps, y=y, bn_stats=stats).detach()
    finally:
        with torch.no_grad():
            last.weight.neg_()
            last.bias.neg_()


def box(x, eps):
    return (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)


# --------------------------------------------------------------------------- the exp chord
def test_exp_chord_is_an_upper_line_and_exact_at_the_ends():
    lo = torch.tensor([-3.0, -1e-9, 0.0, -800.0, 2.0, -0.2])
    up = torch.tensor([1.0, 1e-9, 0.0, 0.0, 2.0 + 1e-12, 0.1])
    slope, e_lo = exp_chord(lo, up)
    assert bool(torch.isfinite(slope).all())
    torch.testing.assert_close(e_lo, lo.exp())
    torch.testing.assert_close(slope * (up - lo) + e_lo, up.exp(), rtol=1e-12, atol=1e-300)
    t = torch.linspace(0, 1, 101).unsqueeze(1)
    d = lo + t * (up - lo)
    assert bool((slope * (d - lo) + e_lo >= d.exp() * (1 - 1e-12)).all())
    # narrow intervals: the slope tends to exp(l) without cancellation
    torch.testing.assert_close(slope[1], torch.tensor(1.0), rtol=1e-8, atol=0)


# --------------------------------------------------------------------------- reference
@pytest.mark.parametrize("seed,eps", [(0, 0.05), (1, 0.2), (2, 0.5)])
def test_matches_the_plain_torch_reference(seed, eps):
    model = mlp(seed).eval()
    x, y = torch.rand(6, 6), torch.tensor([0, 1, 2, 3, 1, 0])
    got = crown_ibp_ce_upper(model, x, eps, y)
    want, _, _ = reference_fused(model, *box(x, eps), y)
    assert got.shape == (6,)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # explicit box, per-sample eps tensor: the same bound
    torch.testing.assert_close(crown_ibp_ce_upper(model, x, None, y, x_L=box(x, eps)[0],
                                                  x_U=box(x, eps)[1]), got)
    torch.testing.assert_close(crown_ibp_ce_upper(model, x, torch.full((6,), eps), y), got)


def test_equals_ce_at_eps_zero():
    for kind in ("mlp", "mlp-relu-out", "cnn-eval", "cnn-train", "resnet-train"):
        model, x, y, stats = setup(kind)
        got = crown_ibp_ce_upper(model, x, 0.0, y, bn_stats=stats)
        torch.testing.assert_close(got, ce_at(model, x, y, stats), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- soundness
def random_vertices(x, eps, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = box(x, eps)
    pick = torch.randint(0, 2, (n,) + tuple(x.shape), generator=g).bool()
    return torch.where(pick, hi, lo)                               # [n, B, *in]


@pytest.mark.parametrize("kind", ["mlp", "mlp-relu-out", "cnn-eval", "cnn-train",
                                  "resnet-train"])
@pytest.mark.parametrize("eps", [0.02, 0.1])
def test_sound_at_clean_vertex_and_pgd_points(kind, eps):
    model, x, y, stats = setup(kind)
    bound = crown_ibp_ce_upper(model, x, eps, y, bn_stats=stats)
    assert bound.shape == (x.shape[0],) and bool(torch.isfinite(bound).all())
    found = ce_at(model, x, y, stats)
    for v in random_vertices(x, eps, 64):
        found = torch.maximum(found, ce_at(model, v, y, stats))
    adv = pgd_attack(model, x, y, eps, steps=20, restarts=3, bn_stats=stats)
    lo, hi = box(x, eps)
    assert bool(((adv >= lo - 1e-12) & (adv <= hi + 1e-12)).all())
    found = torch.maximum(found, ce_at(model, adv, y, stats))
    assert bool((bound >= found - 1e-9).all()), (bound, found)
    # the attack points lie inside the bounds of the unfused CROWN-IBP margins too (sanity of
    # the shared setup: BN statistics and box are the same for both)
    m = compute_bounds(model, x, eps, method="crown-ibp", y=y, bn_stats=stats)
    with torch.no_grad(), frozen_bn(model, stats):
        z = model(adv)
    assert bool((m <= z.gather(1, y[:, None]) - z + 1e-9).all())


def test_above_the_exact_max_on_a_dense_grid():
    """A 2-D input: the max of CE over a 301 x 301 grid of the box (which includes the vertices
    and the edges) never exceeds the fused bound; the gap is reported."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(),
                          nn.Linear(12, 3)).eval()
    x = torch.tensor([[0.3, 0.6], [0.5, 0.5], [0.8, 0.2]])
    y = torch.tensor([0, 1, 2])
    eps = 0.15
    bound = crown_ibp_ce_upper(model, x, eps, y).detach()
    lo, hi = box(x, eps)
    t = torch.linspace(0, 1, 301)
    grid = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    for b in range(3):
        pts = lo[b] + grid * (hi[b] - lo[b])
        with torch.no_grad():
            ce = F.cross_entropy(model(pts), y[b].expand(len(pts)), reduction="none")
        exact = ce.max()
        assert float(bound[b]) >= float(exact) - 1e-9, (b, bound[b], exact)
        print(f"sample {b}: grid max CE {float(exact):.4f}, fused bound {float(bound[b]):.4f}")


# --------------------------------------------------------------------------- relation to unfused
@pytest.mark.parametrize("kind", ["mlp", "cnn-eval", "cnn-train"])
def test_relation_to_the_unfused_bounds(kind):
    """Guaranteed (subadditivity of one back-substitution with fixed ReLU lines, same IBP boxes):
    ``T* <= sum_i chord_i(U_i)`` with ``U_i`` the unfused CROWN-IBP upper bounds of
    ``d_i = z_i - z_y``; so ``fused <= log sum_i chord_i(U_i)``. Also ``fused >= CE`` at the clean
    point and, since the chords lie above exp on ``[l_i, u_i]``, ``fused <= log sum_i
    chord_i(u_i) = log sum_i exp(u_i)`` whenever every ``U_i <= u_i`` (checked per sample where it
    applies). The unfused and IBP losses are printed, not compared: neither order is guaranteed."""
    model, x, y, stats = setup(kind, batch=6)
    eps = 0.08
    fused = crown_ibp_ce_upper(model, x, eps, y, bn_stats=stats)
    m_crown = compute_bounds(model, x, eps, method="crown-ibp", y=y, bn_stats=stats)
    m_ibp = compute_bounds(model, x, eps, y=y, bn_stats=stats)
    u_d, U_d = -m_ibp, -m_crown                     # IBP / CROWN-IBP upper bounds of d_i
    l_d = ibp_lower_of_d(model, x, eps, y, stats)   # IBP lower bounds of d_i
    assert bool((l_d <= u_d).all())
    n = m_ibp.shape[1]
    a = plain_chord(l_d, u_d) * (1 - F.one_hot(y, n).double())
    chord_at_U = (l_d.exp() + a * (U_d - l_d)).sum(1)
    assert bool((fused <= chord_at_U.log() + 1e-9).all()), (fused, chord_at_U.log())
    assert bool((fused >= ce_at(model, x, y, stats) - 1e-9).all())
    inside = (U_d <= u_d + 1e-12).all(1)
    ibp_ce = F.cross_entropy(-m_ibp, y, reduction="none")
    assert bool((fused[inside] <= ibp_ce[inside] + 1e-9).all())
    unfused_ce = F.cross_entropy(-m_crown, y, reduction="none")
    print(f"{kind}: fused {fused.mean():.4f}  unfused crown-ibp {unfused_ce.mean():.4f}  "
          f"ibp {ibp_ce.mean():.4f}")


def test_two_classes_equal_the_chord_of_the_unfused_bound():
    """With two classes the fused specification is one positive multiple of the single margin
    row, so one back-substitution gives exactly ``max d = U`` (the unfused CROWN-IBP bound of
    ``d = z_other - z_y``) and the fused bound is ``log(1 + chord(U))`` -- an equality, not only
    the subadditivity inequality."""
    model = mlp(seed=4, c=2).eval()
    x, y = torch.rand(6, 6), torch.tensor([0, 1, 1, 0, 1, 0])
    for eps in (0.03, 0.15):
        fused = crown_ibp_ce_upper(model, x, eps, y)
        U = -compute_bounds(model, x, eps, method="crown-ibp", y=y)
        u = -compute_bounds(model, x, eps, y=y)
        lo = ibp_lower_of_d(model, x, eps, y, None)
        other = 1 - y
        U, u, lo = (t.gather(1, other[:, None])[:, 0] for t in (U, u, lo))
        want = torch.log1p(lo.exp() + plain_chord(lo, u) * (U - lo))
        torch.testing.assert_close(fused, want, rtol=1e-10, atol=1e-10)


def test_fp32_agrees_with_fp64():
    """The training dtype: the fp32 bound is the fp64 one up to fp32 rounding (no cancellation
    blow-up in the chords or the shift)."""
    model, x, y, stats = setup("cnn-train")
    eps = 0.05
    want = crown_ibp_ce_upper(model, x, eps, y, bn_stats=stats)
    m32 = copy.deepcopy(model).float()
    stats32 = {bn32: (stats[bn][0].float(), stats[bn][1].float())
               for bn, bn32 in zip(model.modules(), m32.modules()) if bn in stats}
    got = crown_ibp_ce_upper(m32, x.float(), eps, y, bn_stats=stats32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- gradients
def test_gradients_reach_every_parameter_and_match_finite_differences():
    """fp64 central differences on every entry of every parameter of a tiny MLP with BN in
    training mode, the clean-batch statistics a function of the parameters (as in a training
    step, DESIGN.md section 5), with a random upstream weight per sample
    (``grad_output != 1``)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 4),
                          nn.ReLU(), nn.Linear(4, 3)).train()
    x, y = torch.rand(4, 3), torch.tensor([0, 1, 2, 1])
    g = torch.rand(4) + 0.5
    eps = 0.1

    def f():
        stats = clean_bn_stats(model, x)
        return (crown_ibp_ce_upper(model, x, eps, y, bn_stats=stats) * g).sum()

    f().backward()
    params = dict(model.named_parameters())
    for name, p in params.items():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
        assert float(p.grad.abs().max()) > 0, f"{name}: zero gradient"
    h = 1e-6
    with torch.no_grad():
        for name, p in params.items():
            fd = torch.empty_like(p)
            for idx in itertools.product(*(range(s) for s in p.shape)):
                old = p[idx].item()
                p[idx] = old + h
                up = f()
                p[idx] = old - h
                down = f()
                p[idx] = old
                fd[idx] = (up - down) / (2 * h)
            torch.testing.assert_close(p.grad, fd, rtol=1e-5, atol=1e-6, msg=name)
    # and w.r.t. the input (the box moves with x)
    xg = x.clone().requires_grad_(True)
    (crown_ibp_ce_upper(model, xg, eps, y, bn_stats=clean_bn_stats(model, x)) * g).sum().backward()
    assert xg.grad is not None and bool(torch.isfinite(xg.grad).all())


# --------------------------------------------------------------------------- errors
def test_bad_inputs_name_the_argument():
    model = mlp().eval()
    x, y = torch.rand(3, 6), torch.tensor([0, 1, 2])
    with pytest.raises(TypeError, match="y"):
        crown_ibp_ce_upper(model, x, 0.1, y.double())
    with pytest.raises(ValueError, match=r"y: labels must be in \[0, 4\)"):
        crown_ibp_ce_upper(model, x, 0.1, torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="y: expected shape"):
        crown_ibp_ce_upper(model, x, 0.1, y[:2])
    with pytest.raises(ValueError, match="eps"):
        crown_ibp_ce_upper(model, x, -0.1, y)
    with pytest.raises(ValueError, match="x_L"):
        crown_ibp_ce_upper(model, x, None, y, x_L=x + 0.1, x_U=x)
    conv_out = nn.Sequential(nn.Conv2d(1, 2, 3)).eval()
    with pytest.raises(ValueError, match=r"y: the CE loss needs logits of shape \[B, C\]"):
        crown_ibp_ce_upper(conv_out, torch.rand(2, 1, 5, 5), 0.1, torch.tensor([0, 1]))


# --------------------------------------------------------------------------- the method
def state(eps=0.1, target=0.1, **kw):
    return StepState(eps=eps, eps_target=target, **kw)


@pytest.mark.parametrize("coef", [0.0, 0.4, 1.0])
def test_method_mixes_the_fused_and_ibp_losses(coef):
    model, x, y, _ = setup("mlp", batch=5)
    out = get_method("crown-ibp", reg_lambda=0.0, loss_fusion=True).loss(
        model, x, y, state(0.1, coef=coef))
    beta = 1 - coef
    fused = crown_ibp_ce_upper(model, x, 0.1, y)
    ibp_m = compute_bounds(model, x, 0.1, y=y)
    ibp_ce = F.cross_entropy(-ibp_m, y, reduction="none")
    torch.testing.assert_close(out.loss, (beta * fused + (1 - beta) * ibp_ce).mean())
    torch.testing.assert_close(out.margins, ibp_m)  # the reported IBP certificates
    if beta == 0:  # after the ramp: the same objective as without fusion
        plain = get_method("crown-ibp", reg_lambda=0.0).loss(model, x, y, state(0.1, coef=coef))
        torch.testing.assert_close(out.loss, plain.loss)
    # every per-sample term bounds the worst-case CE, so the loss bounds the PGD loss
    adv = pgd_attack(model, x, y, 0.1, steps=10)
    assert float(out.loss.detach()) >= float(ce_at(model, adv, y, None).mean()) - 1e-9


def test_method_training_step_with_bn():
    model = mlp(bn=True).train()
    x, y = torch.rand(8, 6), torch.randint(0, 4, (8,))
    method = get_method("crown_ibp", loss_fusion=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    stats = clean_bn_stats(model, x)
    out = method.loss(model, x, y, state(0.05, 0.1, bn_stats=stats))  # mid-ramp: reg active
    assert out.loss.dim() == 0 and bool(torch.isfinite(out.loss))
    assert {"loss_rob", "loss_fused", "loss_reg", "beta"} <= set(out.logs)
    opt.zero_grad()
    out.loss.backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all())
               for p in model.parameters())
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_method_warmup_regulariser_uses_the_ibp_relu_boxes():
    """During the ramp the fused objective adds the same warm-up regulariser as the unfused one,
    computed from the IBP ReLU-input boxes of the fused call's own IBP pass."""
    from adcert.methods.regularizers import warmup_regularizer
    model, x, y, _ = setup("mlp", batch=5)
    st = state(0.025, 0.1, coef=0.5)
    on = get_method("crown-ibp", reg_lambda=0.5, loss_fusion=True).loss(model, x, y, st)
    off = get_method("crown-ibp", reg_lambda=0.0, loss_fusion=True).loss(model, x, y, st)
    boxes = []
    compute_bounds(model, x, 0.025, y=y, relu_bounds=boxes)
    x_L, x_U = box(x, 0.025)
    reg = warmup_regularizer((x_U - x_L) / 2, boxes, 0.5)
    torch.testing.assert_close(on.logs["loss_reg"], reg)
    torch.testing.assert_close(on.loss, off.loss + 0.5 * (1 - 0.25) * reg)


def test_loss_fusion_hyperparameter_is_validated():
    with pytest.raises(TypeError, match="loss_fusion"):
        get_method("crown-ibp", loss_fusion="yes")
    with pytest.raises(TypeError, match="loss_fusion"):
        get_method("crown-ibp", loss_fusion=1)
    assert get_method("crown-ibp").loss_fusion is False
    assert "loss_fusion" in get_method("crown-ibp").hyperparameters()
    # from a config override, as the trainer builds it (method.hparams is checked by get_method)
    from adcert.train.config import load_config
    cfg = load_config(None, ["method.name=crown-ibp", "method.hparams.loss_fusion=true"])
    assert get_method(cfg.method.name, **cfg.method.hparams).loss_fusion is True


@pytest.mark.slow
def test_trainer_runs_crown_ibp_with_loss_fusion(tmp_path):
    """Config -> trainer -> method: a 3-epoch digits run (clean epoch, ramp, full eps) with
    ``method.hparams.loss_fusion: true`` logs the fused loss during the ramp and stays finite."""
    import json
    import math

    from adcert.train import Trainer, from_dict
    torch.set_default_dtype(torch.float32)  # the trainer's dtype (the fixture restores fp64)
    cfg = from_dict({
        "seed": 1, "output_dir": str(tmp_path), "device": "cpu",
        "data": {"dataset": "digits", "batch_size": 32, "train_subset": 256, "test_subset": 64},
        "model": {"name": "cnn3", "kwargs": {"width": 4, "linear_size": 16}},
        "method": {"name": "crown-ibp", "hparams": {"loss_fusion": True}},
        "train": {"epochs": 3, "lr": 1e-3, "lr_milestones": [2], "eps": 0.1, "clean_epochs": 1,
                  "ramp_epochs": 1, "threads": 1},
        "swa": {"enabled": False}, "eval": {"subset": 32, "pgd_steps": 2},
        "log": {"progress": False}})
    Trainer(cfg).fit()
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ramp = recs[1]
    assert 0 < ramp["beta"] < 1 and math.isfinite(ramp["loss_fused"])
    assert all(math.isfinite(r["loss_rob"]) for r in recs[1:3])
