"""Tests of the CROWN family in adcert.bounds.compute_bounds: crown-ibp, crown, alpha-crown.

References, all independent of the engine: the models' own outputs at points in the box (random
points, vertices, and PGD points that minimise each bounded quantity), the analytic CROWN
formula and the triangle-relaxation LP (scipy linprog) on a one-hidden-layer network, exact
rational arithmetic (fractions) for the sound mode on linear networks.
"""
import copy
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adcert.bounds import clean_bn_stats, compute_bounds
from adcert.bounds.linear_relax import lower_plan
from adcert.bounds.plan import LayerPlan
from adcert.models import Normalize
from conftest import frozen_copy, perturb_bn

DT = torch.float64
CROWN_FAMILY = ("crown-ibp", "crown", "alpha-crown")


# ----------------------------------------------------------------------------- models


def make(kind, bn_mode="eval", batch=3):
    """``(model, x, y, bn_stats)`` for a tiny fp64 model; ``bn_mode`` ``eval`` (running stats)
    or ``train`` (frozen clean-batch statistics)."""
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(),
                              nn.Linear(12, 3))
        x = torch.rand(batch, 4, dtype=DT)
    elif kind == "mlp_bn":
        model = nn.Sequential(nn.Linear(4, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 10),
                              nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3))
        x = torch.rand(batch, 4, dtype=DT)
    elif kind == "cnn":  # odd sizes + stride 2 (output_padding), a standalone BN step
        model = nn.Sequential(
            Normalize([0.4, 0.5], [0.3, 0.2]), nn.Conv2d(2, 3, 3, stride=2, padding=1),
            nn.BatchNorm2d(3), nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3))
        x = torch.rand(batch, 2, 7, 7, dtype=DT)
    else:
        raise AssertionError(kind)
    model = perturb_bn(model.double())
    y = torch.randint(0, 3, (batch,))
    if bn_mode == "train":
        model.train()
        return model, x, y, clean_bn_stats(model, x)
    model.eval()
    return model, x, y, None


# ----------------------------------------------------------------------------- sample points


def box_points(x, eps, n=300):
    """``[B, N, *in]`` points of the clipped box: random ones, vertices (random if too many)."""
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    u = torch.rand((x.shape[0], n) + x.shape[1:], dtype=x.dtype)
    verts = (torch.rand((x.shape[0], n) + x.shape[1:], dtype=x.dtype) < 0.5).to(x.dtype)
    pts = torch.cat([u, verts], 1)
    return lo.unsqueeze(1) + pts * (hi - lo).unsqueeze(1)


def pgd_min(f, x, eps, steps=30):
    """Points ``[B, *in]`` in the box that (locally) minimise ``f(points) -> [B]``."""
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    z = (lo + hi) / 2 + (torch.rand_like(x) - 0.5) * (hi - lo)
    step = (hi - lo) / 8
    for _ in range(steps):
        z = z.detach().requires_grad_()
        (g,) = torch.autograd.grad(f(z).sum(), z)
        z = torch.min(torch.max(z - step * g.sign(), lo), hi)
    return z.detach()


def outputs_at(net, pts):
    B, N = pts.shape[:2]
    with torch.no_grad():
        return net(pts.reshape((B * N,) + pts.shape[2:])).reshape(B, N, -1)


def margins_of(logits, y):
    """``z_y - z_i``: logits ``[B, ..., C]``, labels ``[B]`` -> ``[B, ..., C]``."""
    idx = y.reshape((-1,) + (1,) * (logits.dim() - 1)).expand(logits.shape[:-1] + (1,))
    return logits.gather(-1, idx) - logits


# ----------------------------------------------------------------------------- soundness


@pytest.mark.parametrize("kind,bn_mode", [("mlp", "eval"), ("mlp_bn", "eval"),
                                          ("mlp_bn", "train"), ("cnn", "eval"), ("cnn", "train")])
@pytest.mark.parametrize("method", CROWN_FAMILY)
def test_bounds_contain_outputs(kind, bn_mode, method):
    model, x, y, stats = make(kind, bn_mode)
    eps = 0.05
    net = frozen_copy(model, stats)
    lb, ub = compute_bounds(model, x, eps, method=method, bn_stats=stats)
    margins = compute_bounds(model, x, eps, method=method, y=y, bn_stats=stats)
    pts = box_points(x, eps)
    out = outputs_at(net, pts)
    assert (out >= lb.unsqueeze(1) - 1e-9).all() and (out <= ub.unsqueeze(1) + 1e-9).all()
    assert (margins_of(out, y) >= margins.unsqueeze(1) - 1e-9).all()
    assert (margins.gather(1, y[:, None]) == 0).all()
    for i in range(out.shape[-1]):  # PGD on every output and every margin
        for f in (lambda z: net(z)[:, i], lambda z: -net(z)[:, i],
                  lambda z: margins_of(net(z), y)[:, i]):
            z = pgd_min(f, x, eps)
            with torch.no_grad():
                o = net(z)
            assert (o >= lb - 1e-9).all() and (o <= ub + 1e-9).all()
            assert (margins_of(o, y) >= margins - 1e-9).all()


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_tighter_than_ibp_and_alpha_tighter_than_crown(kind):
    model, x, y, stats = make(kind, batch=4)
    eps = 0.05
    m = {meth: compute_bounds(model, x, eps, method=meth, y=y)
         for meth in ("ibp", "crown", "alpha-crown")}
    assert (m["crown"] >= m["ibp"] - 1e-12).all()
    assert (m["alpha-crown"] >= m["crown"] - 1e-12).all()
    assert m["crown"].sum() > m["ibp"].sum() + 1e-6  # strictly tighter in aggregate
    assert m["alpha-crown"].sum() > m["crown"].sum() + 1e-9
    lb_i, ub_i = compute_bounds(model, x, eps, method="ibp")
    lb_c, ub_c = compute_bounds(model, x, eps, method="crown")
    assert (lb_c >= lb_i - 1e-12).all() and (ub_c <= ub_i + 1e-12).all()


def test_crown_intermediate_bounds_tighter_than_ibp():
    model, x, _, _ = make("mlp")
    ibp_b, crown_b = [], []
    compute_bounds(model, x, 0.1, method="ibp", relu_bounds=ibp_b)
    compute_bounds(model, x, 0.1, method="crown", relu_bounds=crown_b)
    assert len(ibp_b) == len(crown_b) == 2
    (l0, u0), (l1, u1) = ibp_b[1], crown_b[1]
    assert (l1 >= l0 - 1e-12).all() and (u1 <= u0 + 1e-12).all()
    assert ((u1 - l1).sum() < (u0 - l0).sum() - 1e-6)
    pts = box_points(x, 0.1)
    with torch.no_grad():
        pre = model[:3](pts)  # the second ReLU's input
    assert (pre >= l1.unsqueeze(1) - 1e-9).all() and (pre <= u1.unsqueeze(1) + 1e-9).all()


# ----------------------------------------------------------------------------- exact oracles


def one_hidden(seed):
    g = torch.Generator().manual_seed(seed)
    W1, b1 = torch.randn(6, 2, generator=g, dtype=DT), torch.randn(6, generator=g, dtype=DT) * .3
    W2, b2 = torch.randn(3, 6, generator=g, dtype=DT), torch.randn(3, generator=g, dtype=DT)
    model = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        model[0].weight.copy_(W1), model[0].bias.copy_(b1)
        model[2].weight.copy_(W2), model[2].bias.copy_(b2)
    return model, W1, b1, W2, b2


def analytic_crown(W1, b1, W2, b2, c, lo, hi):
    """CROWN's lower bound of ``c . f(x)`` for ``f = W2 relu(W1 x + b1) + b2``, written out."""
    W1, b1, W2, b2, c = (t.tolist() for t in (W1, b1, W2, b2, c))
    lo, hi = lo.tolist(), hi.tolist()
    a = [sum(c[o] * W2[o][j] for o in range(len(c))) for j in range(len(b1))]
    const = sum(c[o] * b2[o] for o in range(len(c)))
    coef = [0.0] * len(lo)
    for j in range(len(b1)):
        l = b1[j] + sum(min(W1[j][i] * lo[i], W1[j][i] * hi[i]) for i in range(len(lo)))
        u = b1[j] + sum(max(W1[j][i] * lo[i], W1[j][i] * hi[i]) for i in range(len(lo)))
        if l >= 0:
            slope, icpt = 1.0, 0.0
        elif u <= 0:
            slope, icpt = 0.0, 0.0
        elif a[j] >= 0:
            slope, icpt = (1.0 if u >= -l else 0.0), 0.0
        else:
            slope, icpt = u / (u - l), -l * u / (u - l)
        const += a[j] * (slope * b1[j] + icpt)
        for i in range(len(lo)):
            coef[i] += a[j] * slope * W1[j][i]
    return const + sum(min(coef[i] * lo[i], coef[i] * hi[i]) for i in range(len(lo)))


def triangle_lp(W1, b1, W2, b2, c, lo, hi):
    """The triangle-relaxation LP optimum of ``min c . f(x)`` (scipy linprog)."""
    import numpy as np
    from scipy.optimize import linprog
    W1, b1, W2, b2, c = (t.numpy() for t in (W1, b1, W2, b2, c))
    lo, hi = lo.numpy(), hi.numpy()
    n, k = W1.shape[1], W1.shape[0]
    l = b1 + np.minimum(W1 * lo, W1 * hi).sum(1)
    u = b1 + np.maximum(W1 * lo, W1 * hi).sum(1)
    # variables: x (n), h (k); z = W1 x + b1
    cost = np.concatenate([np.zeros(n), c @ W2])
    A_ub, b_ub, A_eq, b_eq = [], [], [], []
    bounds = [(lo[i], hi[i]) for i in range(n)]
    for j in range(k):
        e = np.zeros(k)
        e[j] = 1
        if l[j] >= 0:
            A_eq.append(np.concatenate([-W1[j], e])), b_eq.append(b1[j])
            bounds.append((None, None))
        elif u[j] <= 0:
            bounds.append((0, 0))
        else:
            bounds.append((0, None))
            A_ub.append(np.concatenate([W1[j], -e])), b_ub.append(-b1[j])  # h >= z
            s = u[j] / (u[j] - l[j])  # h <= s (z - l)
            A_ub.append(np.concatenate([-s * W1[j], e])), b_ub.append(s * (b1[j] - l[j]))
    res = linprog(cost, A_ub=np.array(A_ub) if A_ub else None, b_ub=b_ub or None,
                  A_eq=np.array(A_eq) if A_eq else None, b_eq=b_eq or None, bounds=bounds,
                  method="highs")
    assert res.status == 0
    return res.fun + float(c @ b2)


@pytest.mark.parametrize("seed", range(4))
def test_one_hidden_layer_matches_analytic_crown_and_lp(seed):
    model, W1, b1, W2, b2 = one_hidden(seed)
    x = torch.full((1, 2), 0.5, dtype=DT)
    eps = 0.4
    C = torch.randn(1, 2, 3, dtype=DT)
    lo, hi = (x - eps).clamp(0, 1)[0], (x + eps).clamp(0, 1)[0]
    with torch.no_grad():
        crown_lb, crown_ub = compute_bounds(model, x, eps, method="crown-ibp", C=C)
    alpha_lb, alpha_ub = compute_bounds(model, x, eps, method="alpha-crown", C=C,
                                        iterations=300, lr=1.0, lr_decay=0.97,
                                        patience=300)
    for s in range(2):
        for sign, crown_v, alpha_v in ((1, crown_lb[0, s], alpha_lb[0, s]),
                                       (-1, -crown_ub[0, s], -alpha_ub[0, s])):
            c = sign * C[0, s]
            assert float(crown_v) == pytest.approx(analytic_crown(W1, b1, W2, b2, c, lo, hi),
                                                   abs=1e-10)
            lp = triangle_lp(W1, b1, W2, b2, c, lo, hi)
            assert float(alpha_v) <= lp + 1e-7  # every alpha bound is an LP bound
            assert float(alpha_v) >= lp - 1e-4  # and the optimised one reaches the LP optimum


# ----------------------------------------------------------------------------- specs and eps


def test_per_sample_eps_and_C_spec():
    model, x, y, _ = make("cnn", batch=3)
    eps = torch.tensor([0.0, 0.02, 0.06], dtype=DT)
    batched = compute_bounds(model, x, eps, method="crown", y=y)
    for i in range(3):
        alone = compute_bounds(model, x[i:i + 1], float(eps[i]), method="crown", y=y[i:i + 1])
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-9, atol=1e-9)
    # at eps 0 the bound is the exact margin
    torch.testing.assert_close(batched[0], margins_of(model(x[:1]), y[:1])[0], rtol=1e-9,
                               atol=1e-9)
    # C with the margin rows reproduces the y result; random C rows contain C z
    eye = torch.eye(3, dtype=DT)
    C = eye[y].unsqueeze(1) - eye.unsqueeze(0)
    for method in CROWN_FAMILY:
        # alpha-CROWN's intermediate slopes are shared by the specification rows and optimised
        # for their sum, so only the final-layer variant gives the same rows the same bounds
        kw = {"intermediate": False} if method == "alpha-crown" else {}
        lb, ub = compute_bounds(model, x, eps, method=method, C=C, **kw)
        m = compute_bounds(model, x, eps, method=method, y=y, **kw)
        torch.testing.assert_close(lb, m, rtol=1e-9, atol=1e-9)
        Cr = torch.randn(3, 5, 3, dtype=DT)
        lb, ub = compute_bounds(model, x, eps, method=method, C=Cr)
        assert lb.shape == ub.shape == (3, 5)
        pts = torch.cat([box_points(x[i:i + 1], float(eps[i])) for i in range(3)])
        cz = torch.einsum("bsc,bnc->bns", Cr, outputs_at(model, pts))
        assert (cz >= lb.unsqueeze(1) - 1e-9).all() and (cz <= ub.unsqueeze(1) + 1e-9).all()


def test_margin_rows_leave_out_the_identically_zero_label_row():
    """With ``y`` only the ``C - 1`` rows ``e_y - e_i`` (``i != y``, ascending) are walked: the
    helpers agree with the full specification, slopes come back with ``C - 1`` rows, and the
    result's ``y`` entry is exactly 0 in every method (one class: the full, zero, row)."""
    from adcert.bounds.spec import margin_spec, margin_spec_others, other_classes, scatter_others

    y = torch.tensor([0, 2, 4])
    assert other_classes(y, 5).tolist() == [[1, 2, 3, 4], [0, 1, 3, 4], [0, 1, 2, 3]]
    full = margin_spec(y, 5, DT, "cpu")
    for b in range(3):
        keep = [i for i in range(5) if i != int(y[b])]
        assert torch.equal(margin_spec_others(y, 5, DT, "cpu")[b], full[b, keep])
    lb = torch.randn(3, 4, dtype=DT)
    out = scatter_others(lb, y)
    assert out.shape == (3, 5) and bool((out.gather(1, y[:, None]) == 0).all())
    assert torch.equal(out.gather(1, other_classes(y, 5)), lb)
    model, x, y, _ = make("cnn", batch=3)
    for method in CROWN_FAMILY:
        for sound in (False, True):
            kw = {"alpha_out": {}, "iterations": 2} if method == "alpha-crown" else {}
            m = compute_bounds(model, x, 0.05, method=method, y=y, sound=sound, **kw)
            assert m.shape == (3, 3) and bool((m.gather(1, y[:, None]) == 0).all())
            if kw:
                assert all(a.shape[1] == 2 for a in kw["alpha_out"]["alphas"].values())
    one = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1)).double()
    z = torch.rand(2, 4, dtype=DT)
    for method in CROWN_FAMILY:
        assert torch.equal(compute_bounds(one, z, 0.1, method=method, y=torch.zeros(2).long()),
                           torch.zeros(2, 1, dtype=DT))


# ----------------------------------------------------------------------------- gradients


def test_crown_ibp_gradients_flow_to_parameters():
    model, x, y, stats = make("cnn", "train", batch=4)
    margins = compute_bounds(model, x, 0.03, method="crown-ibp", y=y, bn_stats=stats)
    F.cross_entropy(-margins, y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_crown_ibp_gradcheck():
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    x = torch.rand(2, 3, dtype=DT)
    y = torch.tensor([0, 1])
    w = model[0].weight.detach().clone().requires_grad_()

    def f(weight):
        with torch.no_grad():
            model[0].weight.copy_(weight.detach())
        model[0].weight.grad = None
        # route the gradient through the real parameter by re-binding it for the call
        orig = model[0].weight
        del model[0].weight
        model[0].weight = weight
        try:
            return compute_bounds(model, x, 0.2, method="crown-ibp", y=y)
        finally:
            model[0].weight = orig

    assert torch.autograd.gradcheck(f, (w,), eps=1e-6, atol=1e-6)


def test_crown_result_is_detached():
    model, x, y, _ = make("mlp")
    assert not compute_bounds(model, x, 0.05, method="crown", y=y).requires_grad
    assert not compute_bounds(model, x, 0.05, method="alpha-crown", y=y,
                              iterations=2).requires_grad


# ----------------------------------------------------------------------------- splits


def test_splits_union_sound_and_sides_hold_on_their_subdomain():
    model, x, y, _ = make("mlp", batch=2)
    eps = 0.15
    ib = []
    compute_bounds(model, x, eps, method="crown", relu_bounds=ib)
    lo, up = ib[0]
    unstable = ((lo < 0) & (up > 0))[0].nonzero().flatten()
    assert unstable.numel() > 0
    j = int(unstable[0])
    base = compute_bounds(model, x[:1], eps, method="crown", y=y[:1])
    sides = {}
    for sign in (1, -1):
        s = torch.zeros(1, 12)
        s[0, j] = sign
        sides[sign] = compute_bounds(model, x[:1], eps, method="crown", y=y[:1],
                                     splits={0: s})
    pts = box_points(x[:1], eps, n=2000)[0]
    with torch.no_grad():
        pre = model[0](pts)[:, j]
        marg = margins_of(model(pts), y[:1].expand(pts.shape[0]))
    union = torch.minimum(sides[1], sides[-1])
    assert (marg >= union - 1e-9).all() and (marg >= base - 1e-9).all()
    assert (marg[pre >= 0] >= sides[1] - 1e-9).all()
    assert (marg[pre <= 0] >= sides[-1] - 1e-9).all()
    with pytest.raises(ValueError, match="^splits:"):
        compute_bounds(model, x, eps, method="crown", y=y, splits={5: torch.zeros(2, 12)})


# ----------------------------------------------------------------------------- errors


def test_bad_options_raise():
    model, x, y, _ = make("mlp")
    for method in CROWN_FAMILY:
        with pytest.raises(TypeError, match="'bogus'"):
            compute_bounds(model, x, 0.1, method=method, bogus=1)
    with pytest.raises(TypeError, match="'iterations'"):
        compute_bounds(model, x, 0.1, method="crown", iterations=3)
    with pytest.raises(ValueError, match="^iterations:"):
        compute_bounds(model, x, 0.1, method="alpha-crown", iterations=-1)
    with pytest.raises(ValueError, match="^lr:"):
        compute_bounds(model, x, 0.1, method="alpha-crown", lr=0.0)
    with pytest.raises(ValueError, match="^max_spec_elements:"):
        compute_bounds(model, x, 0.1, method="crown", max_spec_elements=0)
    with pytest.raises(ValueError, match="^C:"):
        compute_bounds(model, x, 0.1, method="crown", C=torch.zeros(3, 2, 4, dtype=DT))
    with pytest.raises(TypeError, match="^C:"):
        compute_bounds(model, x, 0.1, method="crown", C=torch.zeros(3, 2, 3))


def test_unknown_step_type_names_step_and_method():
    class Mystery:
        pass
    plan = LayerPlan(modules=(), steps=(Mystery(),))
    with pytest.raises(NotImplementedError, match="Mystery.*'crown'"):
        lower_plan(plan, {}, (3,), DT, "cpu", "crown")


def test_small_chunks_give_the_same_bounds():
    model, x, y, _ = make("cnn")
    a = compute_bounds(model, x, 0.05, method="crown", y=y)
    b = compute_bounds(model, x, 0.05, method="crown", y=y, max_spec_elements=1)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- auto_LiRPA


def test_matches_auto_lirpa_when_available():
    auto_lirpa = pytest.importorskip("auto_LiRPA")
    model = nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(),
                          nn.Linear(12, 3))
    x = torch.rand(3, 4)
    eps = 0.05
    bm = auto_lirpa.BoundedModule(model, torch.zeros(1, 4))
    ptb = auto_lirpa.PerturbationLpNorm(norm=float("inf"), x_L=(x - eps).clamp(0, 1),
                                        x_U=(x + eps).clamp(0, 1))
    bx = auto_lirpa.BoundedTensor(x, ptb)
    for ours, theirs in (("ibp", "IBP"), ("crown", "CROWN")):
        lb, ub = compute_bounds(model, x, eps, method=ours)
        l2, u2 = bm.compute_bounds(x=(bx,), method=theirs)
        if ours == "crown":  # ours intersects with IBP: never looser, usually identical
            assert (lb >= l2 - 1e-5 * (1 + l2.abs())).all()
        else:
            torch.testing.assert_close(lb, l2, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ub, u2, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- sound mode


def _mixed_scale(model, seed):
    """Weights spanning 1e-4 .. 1e4 (cancellation-prone), biases up to 1e3."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(10.0 ** torch.randint(-4, 5, m.weight.shape, generator=g))
                m.bias.mul_(1e3)
    return model


def _exact_affine_range(model, xL, xU):
    """Exact (rational) min and max of every output of a ReLU-free Linear stack over a box."""
    n = xL.shape[-1]
    M = [[Fraction(int(i == j)) for j in range(n)] for i in range(n)]
    c = [Fraction(0)] * n
    for layer in model:
        W = [[Fraction(v) for v in row] for row in layer.weight.double().tolist()]
        b = [Fraction(v) for v in layer.bias.double().tolist()]
        M = [[sum(W[i][k] * M[k][j] for k in range(len(M))) for j in range(n)]
             for i in range(len(W))]
        c = [sum(W[i][k] * c[k] for k in range(len(c))) + b[i] for i in range(len(W))]
    L = [Fraction(v) for v in xL.double().tolist()]
    U = [Fraction(v) for v in xU.double().tolist()]
    lo = [sum(min(r[j] * L[j], r[j] * U[j]) for j in range(n)) + ci for r, ci in zip(M, c)]
    hi = [sum(max(r[j] * L[j], r[j] * U[j]) for j in range(n)) + ci for r, ci in zip(M, c)]
    return lo, hi


def test_sound_contains_exact_range_of_linear_nets_in_fp32():
    violations = {"sound": 0, "plain": 0}
    for seed in range(6):
        torch.manual_seed(seed)
        model = _mixed_scale(nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)),
                             seed)
        x = torch.rand(1, 6)
        xL, xU = x - 0.01, x + 0.01
        lo, hi = _exact_affine_range(model, xL[0], xU[0])
        runs = [("sound", m, True) for m in CROWN_FAMILY] + [("plain", "crown", False)]
        for key, method, sound in runs:
            lb, ub = compute_bounds(model, x, x_L=xL, x_U=xU, method=method, sound=sound)
            for i in range(2):
                if Fraction(float(lb[0, i])) > lo[i] or Fraction(float(ub[0, i])) < hi[i]:
                    violations[key] += 1
    assert violations["sound"] == 0
    assert violations["plain"] > 0  # the cases are adversarial: plain fp32 misses the range


@pytest.mark.parametrize("kind,bn_mode", [("mlp", "eval"), ("cnn", "eval"), ("mlp_bn", "train")])
@pytest.mark.parametrize("method", CROWN_FAMILY)
def test_sound_fp32_contains_fp64_result(kind, bn_mode, method):
    model64, x64, y, stats64 = make(kind, bn_mode)
    _mixed_scale(model64, 0)
    model32 = copy.deepcopy(model64).float()
    model64 = copy.deepcopy(model32).double()  # the same (fp32-representable) parameters
    x32 = x64.float()
    x64 = x32.double()
    stats32 = stats64 = None
    if bn_mode == "train":  # the same frozen statistics for both precisions
        stats32 = clean_bn_stats(model32, x32)
        bns = [[m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
               for net in (model32, model64)]
        stats64 = {b64: tuple(t.double() for t in stats32[b32]) for b32, b64 in zip(*bns)}
    eps = 0.02
    opts = dict(iterations=5) if method == "alpha-crown" else {}
    lb32, ub32 = compute_bounds(model32, x32, eps, method=method, bn_stats=stats32, sound=True,
                                **opts)
    lb64, ub64 = compute_bounds(model64, x64, eps, method=method, bn_stats=stats64, **opts)
    assert lb32.dtype == torch.float32
    assert (lb32.double() <= lb64).all() and (ub32.double() >= ub64).all()
    out = outputs_at(frozen_copy(model64, stats64), box_points(x64, eps, n=100))
    assert (out >= lb32.double().unsqueeze(1)).all() and (out <= ub32.double().unsqueeze(1)).all()
    m32 = compute_bounds(model32, x32, eps, method=method, y=y, bn_stats=stats32, sound=True,
                         **opts)
    m64 = compute_bounds(model64, x64, eps, method=method, y=y, bn_stats=stats64, **opts)
    assert (m32.double() <= m64).all()


def test_sound_restores_float_flags_and_rejects_half():
    model, x, y, _ = make("mlp")
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
              torch.get_float32_matmul_precision(), torch.backends.mkldnn.enabled)
    compute_bounds(model, x, 0.1, method="crown", sound=True)
    after = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision(), torch.backends.mkldnn.enabled)
    assert before == after
    half = copy.deepcopy(model).to(torch.bfloat16)
    with pytest.raises(TypeError, match="^sound:"):
        compute_bounds(half, x.to(torch.bfloat16), 0.1, method="crown", sound=True)
