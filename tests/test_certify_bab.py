"""The ReLU-split branch-and-bound stage (``bab-relu``): it certifies instances alpha-CROWN
alone cannot, every certified instance survives dense random sampling + PGD, planted non-robust
points are never certified and their counterexamples are real, budgets give ``unknown``."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from adcert.attacks.autoattack import margins
from adcert.attacks.pgd import pgd_attack
from adcert.bounds import compute_bounds
from adcert.certify.bab_relu import BAB_ALPHA_DEFAULTS, ReluSplitBaB
from adcert.certify.stages import make_stage, worst_margin

EPS = 0.12


def mlp(seed=0) -> nn.Module:
    """4-20-20-3 fp64 MLP with weights large enough that eps ~0.1 leaves many unstable ReLUs."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(),
                        nn.Linear(20, 3)).double()
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=torch.float64)
                               * 2 / m.weight.shape[1] ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=torch.float64) * 0.3)
    return net.eval()


def points(net, n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 4, generator=g, dtype=torch.float64)
    with torch.no_grad():
        return x, net(x).argmax(1)


def attackable(net, x, y, eps, n=20000, seed=0):
    """Per sample ``[B]`` bool: do ``n`` uniform points of the box (plus its 16 vertices) or PGD
    (16 restarts, 50 steps) find ``z_i >= z_y`` for some ``i != y``?"""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(x.shape[0]):
        lo, hi = (x[i] - eps).clamp(0, 1), (x[i] + eps).clamp(0, 1)
        u = torch.rand(n, 4, generator=g, dtype=torch.float64)
        verts = torch.cartesian_prod(*[torch.tensor([0.0, 1.0], dtype=torch.float64)] * 4)
        pts = lo + (hi - lo) * torch.cat([u, verts])
        pgd = pgd_attack(net, x[i:i + 1].expand(16, 4), y[i:i + 1].expand(16), eps, steps=50,
                         loss="margin")
        pts = torch.cat([pts, pgd])
        out.append(bool((margins(net, pts, y[i].expand(pts.shape[0])) <= 0).any()))
    return torch.tensor(out)


def planted(net, eps, seed=3):
    """A correctly classified point at L-inf distance ~eps/3 from a decision boundary, with a
    constructed counterexample inside its box: ``(x [1, 4], y [1], x_adv [1, 4])``."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(200):
        a, b = torch.rand(2, 4, generator=g, dtype=torch.float64)
        with torch.no_grad():
            ca, cb = net(torch.stack([a, b])).argmax(1)
        if ca == cb:
            continue
        a0 = a
        for _ in range(40):
            mid = (a + b) / 2
            with torch.no_grad():
                same = net(mid[None]).argmax(1)[0] == ca
            a, b = (mid, b) if same else (a, mid)
        u = b - a0
        u = u / u.abs().max()
        x0, x1 = (a - u * eps / 3).clamp(0, 1), (a + u * eps / 3).clamp(0, 1)
        with torch.no_grad():
            c0, c1 = net(torch.stack([x0, x1])).argmax(1)
        if c0 == ca and c1 != c0:
            return x0[None], c0[None], x1[None]
    raise AssertionError("no decision boundary found")


def test_certifies_beyond_alpha_crown_and_every_certificate_survives_attacks():
    net = mlp()
    x, y = points(net)
    alpha = worst_margin(compute_bounds(net, x, EPS, method="alpha-crown", y=y, sound=True), y)
    out = ReluSplitBaB(sound=True, timeout=4).run(net, x, y, EPS)
    cert = torch.tensor([v == "certified" for v in out.verdicts])
    assert (cert & (alpha <= 0)).any(), "bab-relu must certify something alpha-CROWN cannot"
    assert not attackable(net, x[cert], y[cert], EPS).any()
    for i, v in enumerate(out.verdicts):
        if v == "attacked":  # a stage's counterexample is real
            a = out.adv[i]
            assert ((a >= (x[i] - EPS).clamp(0, 1)) & (a <= (x[i] + EPS).clamp(0, 1))).all()
            assert margins(net, a[None], y[i:i + 1])[0] <= 0


@pytest.mark.parametrize("sound,method", [(True, "crown"), (False, "alpha-crown")])
def test_planted_non_robust_point_is_attacked_never_certified(sound, method):
    net = mlp()
    x, y, adv = planted(net, EPS)
    assert margins(net, adv, y)[0] <= 0 and margins(net, x, y)[0] > 0
    out = ReluSplitBaB(sound=sound, timeout=5, method=method, attack_every=3).run(net, x, y, EPS)
    assert out.verdicts == ["attacked"]
    a = out.adv[0]
    assert ((a >= (x[0] - EPS).clamp(0, 1)) & (a <= (x[0] + EPS).clamp(0, 1))).all()
    with torch.no_grad():
        assert net(a[None]).argmax(1)[0] != y[0]
    # without the attack the search can never close the domain holding the counterexample
    out = ReluSplitBaB(sound=sound, timeout=1.5, method=method, attack_every=0).run(net, x, y,
                                                                                    EPS)
    assert out.verdicts == [None]


def test_timeout_and_domain_budget_give_unknown():
    net = mlp()
    x, y = points(net, n=1)
    alpha = worst_margin(compute_bounds(net, x, 0.2, method="crown", y=y, sound=True), y)
    assert alpha[0] <= 0  # the root domain is open, so a search is needed
    for kw in (dict(timeout=0.05), dict(max_domains=1)):
        out = ReluSplitBaB(sound=True, attack_every=0, **kw).run(net, x, y, 0.2)
        assert out.verdicts == [None] and out.values == [None]


def test_registered_and_bad_arguments_name_the_argument():
    st = make_stage("bab-relu", 3, sound=True, timeout=7.0, options={"bab-relu": {"batch": 8}})
    assert isinstance(st, ReluSplitBaB) and st.timeout == 7.0 and st.batch == 8 and st.sound
    # the pipeline's default is the papers' verifier: alpha-CROWN with split multipliers
    assert st.method == "alpha-crown" and st.beta and st.warm_start
    net = mlp()
    x, y = points(net, n=1)
    assert st.unavailable(net, x, y, EPS) is None
    for kw, name in ((dict(timeout=0), "timeout"), (dict(method="ibp"), "method"),
                     (dict(batch=0), "batch"), (dict(batch="big"), "batch"),
                     (dict(max_domains=0), "max_domains"),
                     (dict(restarts=0), "attack_every, pgd_steps, restarts")):
        with pytest.raises(ValueError, match=f"^{name}:"):
            ReluSplitBaB(**kw)


def test_beta_and_branching_options_reach_the_stage_and_stats_are_recorded():
    st = make_stage("bab-relu", 3, options={"bab-relu": {
        "method": "alpha-crown", "beta": False, "branching": "width",
        "bound_options": {"iterations": 5}}})
    assert not st.beta and st.branching == "width"
    assert st.bound_options == dict(BAB_ALPHA_DEFAULTS, iterations=5)
    st = make_stage("bab-relu", 3, options={"bab-relu": {"method": "alpha-crown"}})
    assert st.beta and st.branching == "babsr" and st.bound_options["lr_beta"] > 0
    net = mlp()
    x, y = points(net, n=2)
    out = ReluSplitBaB(sound=True, method="alpha-crown", timeout=2).run(net, x, y, EPS)
    assert len(st.last_stats) == 0 and len(out.verdicts) == 2
    st.timeout = 2
    out = st.run(net, x, y, EPS)
    assert [s["verdict"] for s in st.last_stats] == \
        [v if v is not None else "unknown" for v in out.verdicts]
    for s in st.last_stats:
        assert s["domains"] >= 1 and s["rounds"] >= 0 and s["seconds"] >= 0


def test_warm_start_gives_the_same_verdicts_and_its_certificates_survive_attacks():
    """Warm-started domains (parents' slopes and multipliers, few Adam steps) reach the same
    verdicts as cold-started ones on a harder radius, where some points are attackable and the
    rest need a search; every warm certificate survives sampling + PGD, every counterexample is
    real."""
    eps = 0.2
    net = mlp()
    x, y = points(net)
    alpha = worst_margin(compute_bounds(net, x, eps, method="alpha-crown", y=y, sound=True), y)
    verdicts, domains = {}, {}
    for warm in (True, False):
        st = ReluSplitBaB(sound=True, method="alpha-crown", timeout=30, warm_start=warm,
                          warm_iterations=10)
        out = st.run(net, x, y, eps)
        verdicts[warm] = out.verdicts
        domains[warm] = [s["domains"] for s in st.last_stats]
        if warm:
            for i, v in enumerate(out.verdicts):
                if v == "attacked":
                    assert margins(net, out.adv[i][None], y[i:i + 1])[0] <= 0
    assert verdicts[True] == verdicts[False], (verdicts, domains)
    cert = torch.tensor([v == "certified" for v in verdicts[True]])
    assert (cert & (alpha <= 0)).sum() >= 2  # searches were needed
    assert "attacked" in verdicts[True]
    assert not attackable(net, x[cert], y[cert], eps).any()
    # the searched instances closed: a warm start must not blow the domain count up
    assert sum(domains[True]) <= 2 * sum(domains[False]), domains


@pytest.mark.parametrize("method", ["crown", "alpha-crown"])
def test_box_modes_never_contradict_and_refining_needs_fewest_domains(method):
    """Domains bounded with their parent's ReLU boxes (``reuse``: one backward walk each),
    with those boxes tightened by CROWN under the splits (``refine``) or with CROWN's from
    scratch (``recompute``) never contradict one another (one certifies, another attacks);
    every certificate survives sampling + PGD and every counterexample is real; ``refine``,
    the tightest, needs no more domains than the others on the samples all three certify."""
    eps = 0.2
    net = mlp()
    x, y = points(net)
    x, y = x[[1, 3, 4, 5]], y[[1, 3, 4, 5]]  # the points decided in seconds (0 and 2 are not)
    verdicts, domains = {}, {}
    for mode in ("reuse", "refine", "recompute"):
        st = ReluSplitBaB(sound=True, method=method, timeout=4, max_domains=400,
                          boxes=mode)
        out = st.run(net, x, y, eps)
        verdicts[mode], domains[mode] = out.verdicts, [s["domains"] for s in st.last_stats]
        for i, v in enumerate(out.verdicts):
            if v == "attacked":
                assert margins(net, out.adv[i][None], y[i:i + 1])[0] <= 0
        cert = torch.tensor([v == "certified" for v in out.verdicts])
        assert cert.sum() >= (2 if mode == "reuse" else 1)
        assert not attackable(net, x[cert], y[cert], eps).any()
    for i, vs in enumerate(zip(*verdicts.values())):
        assert not {"certified", "attacked"} <= set(vs), (verdicts, domains)
        if set(vs) == {"certified"}:
            assert domains["refine"][i] <= min(domains["reuse"][i], domains["recompute"][i])


def test_interm_boxes_replace_the_intermediate_pass_and_are_checked():
    """Given CROWN's own ReLU boxes, crown reproduces its bound in one walk; given looser (IBP)
    ones it is looser but still contains sampled margins; a malformed list is refused by name."""
    net = mlp()
    x, y = points(net)
    eps = 0.2
    crown_boxes, ibp_boxes = [], []
    crown = compute_bounds(net, x, eps, method="crown", y=y, relu_bounds=crown_boxes)
    compute_bounds(net, x, eps, method="ibp", y=y, relu_bounds=ibp_boxes)
    for sound in (False, True):
        again = compute_bounds(net, x, eps, method="crown", y=y, sound=sound,
                               interm_boxes=compute_boxes(net, x, eps, sound))
        ref = compute_bounds(net, x, eps, method="crown", y=y, sound=sound)
        torch.testing.assert_close(again, ref, rtol=0, atol=0)
    loose = compute_bounds(net, x, eps, method="crown", y=y, interm_boxes=ibp_boxes)
    assert (loose <= crown + 1e-12).all() and (loose < crown - 1e-6).any()
    pts = x.unsqueeze(1) + eps * (2 * torch.rand((x.shape[0], 500) + x.shape[1:],
                                                 dtype=x.dtype) - 1)
    with torch.no_grad():
        z = net(pts.flatten(0, 1)).reshape(x.shape[0], 500, -1)
    m = z.gather(2, y.view(-1, 1, 1).expand(-1, 500, 1)) - z
    assert (m.min(1).values >= loose - 1e-9).all()
    with pytest.raises(ValueError, match="interm_boxes"):
        compute_bounds(net, x, eps, method="crown", y=y, interm_boxes=crown_boxes[:1])
    with pytest.raises(ValueError, match="interm_boxes: entry 0"):
        compute_bounds(net, x, eps, method="crown", y=y,
                       interm_boxes=[(b[0][:1], b[1][:1]) for b in crown_boxes])


def compute_boxes(net, x, eps, sound):
    boxes = []
    compute_bounds(net, x, eps, method="crown", sound=sound, relu_bounds=boxes, y=None)
    return boxes
