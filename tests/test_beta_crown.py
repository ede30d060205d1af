"""beta-CROWN split multipliers (``compute_bounds(..., method="alpha-crown", splits=...,
beta=True)``) and their use by the ``bab-relu`` stage.

* soundness: on tiny random fp64 nets, for random split assignments, the beta bound (plain and
  ``sound=True``) of every margin row is <= the smallest margin over points of the box that
  satisfy the splits (dense sampling + a penalised sign-gradient descent, both filtered by the
  splits), and never below the clamp-only CROWN bound (iteration 0 of the optimisation);
* a planted instance where the multipliers are strictly tighter than the clamps alone;
* bab-relu with beta certifies an instance that alpha-CROWN cannot, with fewer domains than
  clamp-only bab-relu (which fails on it), also with short optimisations (the re-optimisation of
  fully split domains), in agreement with an exact verifier (activation-pattern enumeration +
  one LP per pattern), and never certifies a non-robust instance;
* the BaBSR-style branching score needs fewer domains than the triangle height on an instance;
* bab-relu through :func:`adcert.certify.certify`: the journal records a ``bab-relu``
  certificate, and a planted non-robust sample is never certified;
* warm start (``init_alphas`` / ``init_betas`` / ``alpha_out``): 0 steps give the relaxation at
  the projected start (a plain fp64 reference), a start at a previous optimum is kept and stays
  below the sampled truth, bad starts raise naming the option, and warm-started bab-relu agrees
  with the exact verifier.
"""
from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

from adcert.bounds import compute_bounds
from adcert.certify.bab_relu import ReluSplitBaB
from adcert.certify.stages import worst_margin

linprog = pytest.importorskip("scipy.optimize").linprog

F64 = torch.float64


def tiny_net(seed: int, d: int = 2, h: int = 8, c: int = 3) -> nn.Module:
    """``d-h-h-c`` fp64 ReLU MLP with weights ``~ 2 N(0, 1/fan_in)`` (many unstable neurons)."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                        nn.Linear(h, c)).double()
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=F64) * 2
                               / m.weight.shape[1] ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=F64) * 0.3)
    return net.eval()


def pre_activations(net: nn.Module, x):
    """The inputs of the two ReLUs of a :func:`tiny_net`, ``[N, h]`` each, and the logits."""
    z1 = net[0](x)
    z2 = net[2](torch.relu(z1))
    return [z1, z2], net[4](torch.relu(z2))


def feasible(zs, splits) -> torch.Tensor:
    """``[N]`` bool: every split ``s_j z_j >= 0`` holds (``splits[k]: [h]``)."""
    ok = torch.ones(zs[0].shape[0], dtype=torch.bool)
    for k, z in enumerate(zs):
        s = splits[k].to(z.dtype)
        ok &= ((s * z) >= 0).all(1)
    return ok


def subdomain_min(net, lo, hi, y: int, splits, n: int = 20000, seed: int = 0):
    """Per logit ``i``, the smallest ``z_y - z_i`` found at points of ``[lo, hi]`` satisfying the
    splits: ``n`` uniform points and 16 runs of sign-gradient descent on the margin plus a
    penalty on violated splits, filtered by the splits. ``[C]`` (inf where none is feasible)."""
    g = torch.Generator().manual_seed(seed)
    d = lo.numel()
    pts = lo + (hi - lo) * torch.rand(n, d, generator=g, dtype=F64)
    C = net[4].out_features
    found = [pts]
    for i in range(C):
        if i == y:
            continue
        p = (lo + (hi - lo) * torch.rand(16, d, generator=g, dtype=F64)).requires_grad_()
        step = float((hi - lo).max()) / 20
        for t in range(60):
            zs, out = pre_activations(net, p)
            pen = sum(torch.relu(-splits[k].to(F64) * z).sum(1) for k, z in enumerate(zs))
            obj = (out[:, y] - out[:, i] + 10 * pen).sum()
            (grad,) = torch.autograd.grad(obj, p)
            with torch.no_grad():
                p -= step * (0.95 ** t) * grad.sign()
                p.copy_(torch.maximum(torch.minimum(p, hi), lo))
        found.append(p.detach())
    pts = torch.cat(found)
    with torch.no_grad():
        zs, out = pre_activations(net, pts)
    ok = feasible(zs, splits)
    marg = out[:, y:y + 1] - out
    return torch.where(ok[:, None], marg, torch.full_like(marg, float("inf"))).min(0).values


def random_splits(net, lo, hi, boxes, g, flip: float):
    """Split about half of the unstable neurons (per ``boxes``) by the signs at a random point of
    the box (a feasible sub-domain), flipping each sign with probability ``flip``."""
    p = lo + (hi - lo) * torch.rand(1, lo.numel(), generator=g, dtype=F64)
    with torch.no_grad():
        zs, _ = pre_activations(net, p)
    out = []
    for (l, u), z in zip(boxes, zs):
        unstable = (l[0] < 0) & (u[0] > 0)
        pick = unstable & (torch.rand(unstable.shape, generator=g) < 0.5)
        sign = torch.where(z[0] >= 0, 1, -1)
        sign = torch.where(torch.rand(sign.shape, generator=g) < flip, -sign, sign)
        out.append(torch.where(pick, sign, 0).to(torch.int8))
    return out


@pytest.mark.parametrize("seed,d,h,dtype", [(0, 2, 8, F64), (1, 4, 6, F64), (2, 2, 10, F64),
                                            (3, 4, 8, F64), (4, 4, 8, torch.float32)])
def test_beta_bound_is_sound_on_split_subdomains_and_never_looser(seed, d, h, dtype):
    """float32: the bounds run on the float32 net, the truth on its exact fp64 copy (the sound
    bound must hold for the real-arithmetic network, the plain one up to rounding)."""
    net = tiny_net(seed, d, h).to(dtype)
    ref = copy.deepcopy(net).double()  # the same real numbers
    g = torch.Generator().manual_seed(50 + seed)
    x = torch.rand(1, d, generator=g, dtype=F64).to(dtype)
    y = ref(x.double()).argmax(1)
    eps = 0.5
    lo, hi = (x[0].double() - eps).clamp(0, 1), (x[0].double() + eps).clamp(0, 1)
    slack = 0.0 if dtype == F64 else 1e-4  # rounding of the float32 computation
    boxes = []
    compute_bounds(net, x, eps, method="crown", y=y, relu_bounds=boxes)
    assert sum(int(((l < 0) & (u > 0)).sum()) for l, u in boxes) >= 3  # a real search space
    checked, tighter = 0, 0.0
    for trial in range(4):
        sp = random_splits(ref, lo, hi, boxes, g, flip=0.25 if trial % 2 else 0.0)
        splits = {k: s[None] for k, s in enumerate(sp)}
        alpha = compute_bounds(net, x, eps, method="alpha-crown", y=y, splits=splits)[0]
        truth = subdomain_min(ref, lo, hi, int(y), sp, seed=trial)
        for sound in (False, True):
            clamp = compute_bounds(net, x, eps, method="crown", y=y, splits=splits,
                                   sound=sound)[0].double()
            beta = compute_bounds(net, x, eps, method="alpha-crown", y=y, splits=splits,
                                  beta=True, sound=sound)[0].double()
            assert (beta >= clamp - 1e-6 - slack).all(), (sound, beta, clamp)
            rows = torch.isfinite(truth)
            tol = 1e-9 + (0.0 if sound else slack)
            assert (beta[rows] <= truth[rows] + tol).all(), (sound, beta, truth)
            checked += int(rows.sum())
        tighter += float((beta - alpha.double()).sum())
    assert checked >= 8  # most drawn sub-domains are non-empty and actually tested
    assert tighter >= -1e-6  # on average the multipliers do not lose against slopes alone


def planted_net() -> nn.Module:
    """``x in [-1, 1] -> z = (x, -x) -> relu -> (-relu(-x), 0)``: with neuron 0 split active
    (``x >= 0``) the margin ``z_0 - z_1 = -relu(-x)`` is exactly 0 on the sub-domain; the clamp
    leaves neuron 1 unstable on ``[-1, 1]``, whose chord gives ``(x - 1) / 2 >= -1``; the
    multiplier ``beta`` adds ``-beta x`` and gives ``-1 + beta`` for ``beta`` in [0, 1]."""
    net = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 2)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[0.0, -1.0], [0.0, 0.0]]))
        net[2].bias.zero_()
    return net.eval()


@pytest.mark.parametrize("sound", [False, True])
def test_beta_strictly_tighter_than_clamps_on_a_planted_instance(sound):
    net = planted_net()
    x = torch.zeros(1, 1, dtype=F64)
    y = torch.tensor([0])
    box = dict(x_L=-torch.ones_like(x), x_U=torch.ones_like(x))
    splits = {0: torch.tensor([[1, 0]], dtype=torch.int8)}
    clamp = compute_bounds(net, x, method="alpha-crown", y=y, splits=splits, sound=sound, **box)
    beta = compute_bounds(net, x, method="alpha-crown", y=y, splits=splits, beta=True,
                          sound=sound, **box)
    assert clamp[0, 1] == pytest.approx(-1.0, abs=1e-9)
    assert beta[0, 1] > -0.6  # the optimum is -0.5 (beta = 0.5); Adam gets close
    assert beta[0, 1] <= 0.0  # the true minimum over x in [0, 1]
    # without splits (or without beta) the option changes nothing
    plain = compute_bounds(net, x, method="alpha-crown", y=y, beta=True, sound=sound, **box)
    assert torch.equal(plain, compute_bounds(net, x, method="alpha-crown", y=y, sound=sound,
                                             **box))


def test_beta_options_are_validated():
    net = planted_net()
    x, y = torch.zeros(1, 1, dtype=F64), torch.tensor([0])
    with pytest.raises(ValueError, match="^beta:"):
        compute_bounds(net, x, 0.5, method="alpha-crown", y=y, beta=1)
    with pytest.raises(ValueError, match="^lr_beta:"):
        compute_bounds(net, x, 0.5, method="alpha-crown", y=y, lr_beta=0.0)
    with pytest.raises(TypeError, match="beta"):
        compute_bounds(net, x, 0.5, method="crown", y=y, beta=True)
    with pytest.raises(ValueError, match="^beta:"):
        ReluSplitBaB(method="crown", beta=True)
    assert ReluSplitBaB(method="alpha-crown").beta and not ReluSplitBaB(method="crown").beta


# ----------------------------------------------------------------------------- exact verifier


def exact_min_margin(net: nn.Module, lo, hi, y: int, boxes) -> float:
    """The exact ``min_{x in [lo, hi]} min_{i != y} z_y - z_i`` of a :func:`tiny_net`: every
    activation pattern of the neurons unstable in ``boxes`` (``[(l, u)]`` per ReLU, ``[h]``,
    over-approximations, so the other neurons' phases are right) makes the net affine on the
    polytope of the box and the pattern's sign constraints; one LP per pattern and class."""
    lin = [m for m in net if isinstance(m, nn.Linear)]
    W = [m.weight.detach().numpy() for m in lin]
    b = [m.bias.detach().numpy() for m in lin]
    d = lo.numel()
    bounds = list(zip(lo.tolist(), hi.tolist()))
    unstable = [((l < 0) & (u > 0)).numpy() for l, u in boxes]
    active = [(l >= 0).numpy() for l, _ in boxes]
    counts = [int(m.sum()) for m in unstable]
    best = np.inf
    for bits in itertools.product([False, True], repeat=sum(counts)):
        M, v = np.eye(d), np.zeros(d)
        A_ub, b_ub, off = [], [], 0
        for k in range(len(boxes)):
            M, v = W[k] @ M, W[k] @ v + b[k]
            on = active[k].copy()
            on[unstable[k]] = bits[off:off + counts[k]]
            for j in np.nonzero(unstable[k])[0]:
                s = 1.0 if on[j] else -1.0
                A_ub.append(-s * M[j])  # s (M_j x + v_j) >= 0
                b_ub.append(s * v[j])
            off += counts[k]
            M, v = M * on[:, None], v * on
        M, v = W[-1] @ M, W[-1] @ v + b[-1]
        for i in range(M.shape[0]):
            if i == y:
                continue
            res = linprog(M[y] - M[i], A_ub=np.array(A_ub) if A_ub else None,
                          b_ub=np.array(b_ub) if b_ub else None, bounds=bounds, method="highs")
            if res.status == 2:  # an empty pattern
                break
            assert res.status == 0, res.message
            best = min(best, res.fun + v[y] - v[i])
    return float(best)


def _root(net, x, y, eps):
    boxes = []
    compute_bounds(net, x, eps, method="crown", y=y, sound=True, relu_bounds=boxes)
    return [(l[0], u[0]) for l, u in boxes], (x[0] - eps).clamp(0, 1), (x[0] + eps).clamp(0, 1)


BO = {"iterations": 50, "lr": 0.2, "lr_beta": 0.2}


def robust_instance():
    """``(net, x [1, 2], y [1], eps)``: robust (exact minimum margin ~0.105) but alpha-CROWN's
    bound is negative and 9 neurons are unstable (found by a seed scan)."""
    net = tiny_net(0)
    x = torch.rand(1, 2, generator=torch.Generator().manual_seed(100), dtype=F64)
    return net, x, net(x).argmax(1), 0.9998


def non_robust_instance():
    """``(net, x [1, 2], y [1], eps)`` with exact minimum margin ~ -0.07 (found by a seed scan)."""
    net = tiny_net(2, h=6)
    x = torch.rand(1, 2, generator=torch.Generator().manual_seed(102), dtype=F64) * 0.6 + 0.2
    return net, x, net(x).argmax(1), 0.2597


@pytest.mark.slow
def test_bab_with_beta_certifies_what_clamps_cannot_and_agrees_with_exact():
    net, x, y, eps = robust_instance()
    assert worst_margin(compute_bounds(net, x, eps, method="alpha-crown", y=y, sound=True),
                        y)[0] <= 0  # alpha-CROWN alone fails
    boxes, lo, hi = _root(net, x, y, eps)
    exact = exact_min_margin(net, lo, hi, int(y), boxes)
    assert exact > 0  # robust
    runs = {}
    for beta in (True, False):
        st = ReluSplitBaB(sound=True, method="alpha-crown", beta=beta, attack_every=0,
                          timeout=30, bound_options=BO)
        runs[beta] = (st.run(net, x, y, eps).verdicts[0], st.last_stats[0]["domains"])
    assert runs[True][0] == "certified", runs
    # clamp-only either fails (a fully split domain still ranges over the whole box) or, when
    # it certifies, needs more domains
    assert runs[False][0] is None or runs[False][1] > runs[True][1], runs
    assert runs[False][0] != "attacked"
    # with the literature's short optimisation (20 steps, lr_beta 0.05) the search leaves fully
    # split domains open; their longer re-optimisation (an LP dual) closes them
    weak = {"iterations": 20, "lr": 0.1, "lr_beta": 0.05}
    st = ReluSplitBaB(sound=True, method="alpha-crown", attack_every=0, timeout=30,
                      bound_options=weak)
    assert st.run(net, x, y, eps).verdicts == ["certified"], st.last_stats


def test_bab_with_beta_never_certifies_a_non_robust_instance():
    net, x, y, eps = non_robust_instance()
    boxes, lo, hi = _root(net, x, y, eps)
    assert exact_min_margin(net, lo, hi, int(y), boxes) < 0  # not robust
    for sound in (True, False):
        st = ReluSplitBaB(sound=sound, method="alpha-crown", attack_every=0, timeout=5)
        assert st.run(net, x, y, eps).verdicts == [None]
        st = ReluSplitBaB(sound=sound, method="alpha-crown", attack_every=2, timeout=5)
        assert st.run(net, x, y, eps).verdicts == ["attacked"]


def test_babsr_branching_needs_fewer_domains_than_the_triangle_height():
    """Instance seed 16 of benchmarks/bench_bab.py (the height score needed 12 domains there)."""
    net = tiny_net(16)
    x = torch.rand(1, 2, generator=torch.Generator().manual_seed(1016), dtype=F64)
    y, eps = net(x).argmax(1), 0.071875
    domains = {}
    for branching in ("width", "babsr"):
        st = ReluSplitBaB(sound=True, method="alpha-crown", attack_every=0, timeout=20,
                          branching=branching)
        assert st.run(net, x, y, eps).verdicts == ["certified"]
        domains[branching] = st.last_stats[0]["domains"]
    assert domains["babsr"] < domains["width"], domains
    with pytest.raises(ValueError, match="^branching:"):
        ReluSplitBaB(branching="random")


# ----------------------------------------------------------------------------- the pipeline


def test_bab_relu_with_beta_through_the_certify_pipeline(tmp_path):
    from adcert.certify import certify

    net, x_rob, y_rob, eps = robust_instance()
    res = certify(net, x_rob, y_rob, eps, stages=["bab-relu"], out_dir=tmp_path / "rob",
                  sound=True, timeout=30, stage_options={"bab-relu": {
                      "method": "alpha-crown", "attack_every": 0}})
    lines = [json.loads(s) for s in
             next((tmp_path / "rob").glob("journal-*.jsonl")).read_text().splitlines()]
    samples = [r for r in lines if r.get("type") == "sample"]
    assert len(samples) == 1
    assert samples[0]["stage"] == "bab-relu" and samples[0]["verdict"] == "certified"
    assert res.records[0]["verdict"] == "certified"

    # the planted non-robust instance of the test above (exact minimum margin < 0)
    net, x_bad, y_bad, eps = non_robust_instance()
    res = certify(net, x_bad, y_bad, eps, stages=["bab-relu"], out_dir=tmp_path / "bad",
                  sound=True, timeout=5, stage_options={"bab-relu": {"method": "alpha-crown"}})
    rec = res.records[0]
    assert rec["verdict"] != "certified"
    assert rec["verdict"] == "attacked" and rec["stage"] == "bab-relu"


# ----------------------------------------------------------------------------- warm start


def relaxation_reference(net: nn.Module, lo, hi, y: int, boxes, alphas, betas):
    """Plain-torch fp64 reference of the backward linear relaxation of a :func:`tiny_net` with
    the given lower slopes ``alphas[k]: [S, h]`` and SIGNED multipliers ``betas[k]: [S, h]``
    (``beta_j s_j``) on the ReLU input boxes ``boxes[k] = (l, u)``, each ``[h]``: the lower bound
    ``[S]`` of the margin rows ``e_y - e_i`` over the input box ``[lo, hi]`` (``[d]``)."""
    W = [m.weight.detach() for m in net if isinstance(m, nn.Linear)]
    b = [m.bias.detach() for m in net if isinstance(m, nn.Linear)]
    C = W[-1].shape[0]
    spec = torch.eye(C, dtype=F64)[y][None] - torch.eye(C, dtype=F64)  # [S, C]
    A, const = spec @ W[-1], spec @ b[-1]
    for k in (1, 0):
        l, u = boxes[k]
        unstable = (l < 0) & (u > 0)
        lower = torch.where(unstable, alphas[k], (l >= 0).to(F64))
        upper = torch.where(unstable, u / (u - l), (l >= 0).to(F64))
        icpt = torch.where(unstable, -l * u / (u - l), torch.zeros_like(l))
        Az = A.clamp(min=0) * lower + A.clamp(max=0) * upper - betas[k]
        const = const + (A.clamp(max=0) * icpt).sum(1)
        A, const = Az @ W[k], const + Az @ b[k]
    return const + (A.clamp(min=0) * lo).sum(1) + (A.clamp(max=0) * hi).sum(1)


def _split_instance(seed: int = 0, d: int = 2, h: int = 8):
    """A tiny net, a point, eps 0.5, and a feasible random split sub-domain of it."""
    net = tiny_net(seed, d, h)
    g = torch.Generator().manual_seed(70 + seed)
    x = torch.rand(1, d, generator=g, dtype=F64)
    y = net(x).argmax(1)
    eps = 0.5
    lo, hi = (x[0] - eps).clamp(0, 1), (x[0] + eps).clamp(0, 1)
    boxes = []
    compute_bounds(net, x, eps, method="crown", y=y, relu_bounds=boxes)
    sp = random_splits(net, lo, hi, boxes, g, flip=0.0)
    return net, x, y, eps, lo, hi, sp, {k: s[None] for k, s in enumerate(sp)}


@pytest.mark.parametrize("seed", [0, 3])
def test_warm_start_with_zero_iterations_is_the_bound_at_the_given_slopes_and_multipliers(seed):
    """0 Adam steps: the bound is the relaxation at the PROJECTED start (slopes clamped to [0, 1],
    multipliers to >= 0), checked against a plain fp64 reference (and IBP, which the certifying
    methods never fall below); the sound bound lies just below it; ``alpha_out`` returns them."""
    net, x, y, eps, lo, hi, sp, splits = _split_instance(seed)
    C, h = 3, net[0].out_features
    g = torch.Generator().manual_seed(seed)
    # one row per class i != y (ascending): the zero y row is not walked
    others = [i for i in range(C) if i != int(y)]
    alphas = {k: (torch.rand(1, C, h, generator=g, dtype=F64) * 1.6 - 0.3)[:, others]
              for k in (0, 1)}
    betas = {k: (torch.rand(1, C, h, generator=g, dtype=F64) * 1.2 - 0.2)[:, others]
             for k in (0, 1)}

    def per_class(t: torch.Tensor) -> torch.Tensor:
        """``[C - 1, h]`` -> ``[C, h]``, the ``y`` row 0 (its specification row is 0)."""
        full = torch.zeros(C, h, dtype=F64)
        full[others] = t
        return full
    boxes, out = [], {}
    got = compute_bounds(net, x, eps, method="alpha-crown", y=y, splits=splits, beta=True,
                         iterations=0, init_alphas=alphas, init_betas=betas, alpha_out=out,
                         relu_bounds=boxes)[0]
    box = [(l[0], u[0]) for l, u in boxes]
    assert sum(int(((l < 0) & (u > 0)).sum()) for l, u in box) >= 2  # slopes matter
    a_proj = {k: per_class(a[0].clamp(0, 1)) for k, a in alphas.items()}
    b_signed = {k: per_class(b[0].clamp(min=0) * sp[k].to(F64)) for k, b in betas.items()}
    ref = relaxation_reference(net, lo, hi, int(y), box, a_proj, b_signed)
    ibp = compute_bounds(net, x, eps, method="ibp", y=y)[0]
    want = torch.maximum(ref, ibp)
    want[y] = 0.0
    assert torch.allclose(got, want, rtol=0, atol=1e-10), (got, want)
    assert bool((ref > ibp + 1e-3).any())  # the relaxation, not the IBP floor, decides a row
    # without the projection the reference differs: the start really was projected
    raw = relaxation_reference(net, lo, hi, int(y), box,
                               {k: per_class(a[0]) for k, a in alphas.items()},
                               {k: per_class(b[0] * sp[k].to(F64)) for k, b in betas.items()})
    assert not torch.allclose(raw, ref, atol=1e-6)
    for k in (0, 1):
        assert torch.equal(out["alphas"][k], alphas[k].clamp(0, 1))
        if bool((sp[k] != 0).any()):
            assert torch.equal(out["betas"][k], betas[k].clamp(min=0))
    snd = compute_bounds(net, x, eps, method="alpha-crown", y=y, splits=splits, beta=True,
                         iterations=0, init_alphas=alphas, init_betas=betas, sound=True)[0]
    # sound: the same relaxation minus rounding terms (its IBP floor is the unfolded one)
    ref[y] = 0.0
    assert (snd <= got).all() and (snd >= ref - 1e-9).all(), (snd, got, ref)


@pytest.mark.parametrize("seed,d,h", [(0, 2, 8), (1, 4, 6), (3, 4, 8)])
def test_warm_start_from_an_optimum_keeps_it_and_stays_sound(seed, d, h):
    """Starting from the optimum of a first run, a short second run never returns a looser bound
    (keep-best covers iteration 0) and it stays below the sampled minimum on the sub-domain,
    plain and sound."""
    net, x, y, eps, lo, hi, sp, splits = _split_instance(seed, d, h)
    truth = subdomain_min(net, lo, hi, int(y), sp, seed=seed)
    rows = torch.isfinite(truth)
    assert int(rows.sum()) >= 2  # a non-empty sub-domain
    for sound in (False, True):
        out = {}
        first = compute_bounds(net, x, eps, method="alpha-crown", y=y, splits=splits, beta=True,
                               iterations=8, alpha_out=out, sound=sound)[0]
        assert set(out["alphas"]) == {0, 1} and out["alphas"][0].shape == (1, 2, h)  # i != y
        assert all(not t.requires_grad for t in list(out["alphas"].values())
                   + list(out["betas"].values()))
        again = compute_bounds(net, x, eps, method="alpha-crown", y=y, splits=splits, beta=True,
                               iterations=10, init_alphas=out["alphas"],
                               init_betas=out["betas"], sound=sound)[0]
        assert (again >= first - (1e-9 if sound else 0.0)).all(), (sound, again, first)
        assert (again[rows] <= truth[rows] + 1e-9).all(), (sound, again, truth)
        cold = compute_bounds(net, x, eps, method="alpha-crown", y=y, splits=splits, beta=True,
                              iterations=10, sound=sound)[0]
        assert (again >= cold - 1e-9).sum() >= 2  # warm 8 + 10 steps: mostly no worse than 10


def test_warm_start_options_are_validated():
    net = tiny_net(0)
    x = torch.rand(1, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    y = net(x).argmax(1)
    good = torch.full((1, 2, 8), 0.5, dtype=F64)  # a row per class i != y

    def call(**kw):
        return compute_bounds(net, x, 0.3, method="alpha-crown", y=y, iterations=1, **kw)

    for kw, exc, msg in (
            (dict(init_alphas=[good]), TypeError, r"^init_alphas: expected a dict"),
            (dict(init_alphas={2: good}), ValueError, r"^init_alphas: keys must be ReLU"),
            (dict(init_alphas={0: good[:, :1]}), ValueError,
             r"^init_alphas: entry 0 must have shape .*\(1, 2, 8\).*S = 2"),
            (dict(init_alphas={1: good.float()}), TypeError, r"^init_alphas: entry 1 .*dtype"),
            (dict(init_alphas={0: 0.5}), TypeError, r"^init_alphas: entry 0 must be a torch"),
            (dict(init_betas={0: good[0]}), ValueError, r"^init_betas: entry 0 must have shape"),
            (dict(alpha_out=[]), TypeError, r"^alpha_out: expected a dict")):
        with pytest.raises(exc, match=msg):
            call(**kw)
    with pytest.raises(TypeError, match="init_alphas"):  # crown has no slopes to start from
        compute_bounds(net, x, 0.3, method="crown", y=y, init_alphas={0: good})
    call(init_alphas={0: good}, init_betas={1: good})  # accepted (no beta: betas unused)
    for kw, name in ((dict(method="crown", warm_start=True), "warm_start"),
                     (dict(method="alpha-crown", warm_start=1), "warm_start"),
                     (dict(method="alpha-crown", warm_iterations=-1), "warm_iterations")):
        with pytest.raises(ValueError, match=f"^{name}:"):
            ReluSplitBaB(**kw)
    assert ReluSplitBaB(method="alpha-crown").warm_start
    assert not ReluSplitBaB(method="crown").warm_start


@pytest.mark.parametrize("warm_iterations", [3, 15])
def test_bab_warm_start_agrees_with_exact_and_certifies_the_same(warm_iterations):
    """Warm-started bab-relu certifies the robust instance (exact minimum margin > 0) and the
    bench_bab instance seed 16 like the cold start, and never certifies the non-robust one."""
    net, x, y, eps = robust_instance()
    boxes, lo, hi = _root(net, x, y, eps)
    assert exact_min_margin(net, lo, hi, int(y), boxes) > 0
    net16 = tiny_net(16)
    x16 = torch.rand(1, 2, generator=torch.Generator().manual_seed(1016), dtype=F64)
    for inst in ((net, x, y, eps), (net16, x16, net16(x16).argmax(1), 0.071875)):
        for warm in (True, False):
            st = ReluSplitBaB(sound=True, method="alpha-crown", attack_every=0, timeout=30,
                              bound_options=BO, warm_start=warm,
                              warm_iterations=warm_iterations)
            assert st.run(*inst).verdicts == ["certified"], (warm, st.last_stats)
    net, x, y, eps = non_robust_instance()
    boxes, lo, hi = _root(net, x, y, eps)
    assert exact_min_margin(net, lo, hi, int(y), boxes) < 0
    for sound in (True, False):
        st = ReluSplitBaB(sound=sound, method="alpha-crown", attack_every=0, timeout=5,
                          warm_iterations=warm_iterations)
        assert st.warm_start and st.run(net, x, y, eps).verdicts == [None]
        st = ReluSplitBaB(sound=sound, method="alpha-crown", attack_every=2, timeout=5,
                          warm_iterations=warm_iterations)
        assert st.run(net, x, y, eps).verdicts == ["attacked"]


def test_slopes_use_the_fused_adam_where_it_runs_and_the_loop_elsewhere():
    """:func:`slope_adam`: the fused kernel for float CPU tensors, the per-tensor loop for a
    dtype it does not take; both take the same steps (to rounding)."""
    from adcert.bounds.alpha_crown import slope_adam

    g = torch.Generator().manual_seed(0)
    start = torch.rand(3, 5, generator=g, dtype=F64)
    grads = [torch.randn(3, 5, generator=g, dtype=F64) for _ in range(4)]
    runs = []
    for fused in (True, False):
        p = start.clone().requires_grad_()
        opt = slope_adam([{"params": [p], "lr": 0.1}]) if fused else \
            torch.optim.Adam([{"params": [p], "lr": 0.1}])
        assert bool(opt.defaults.get("fused")) == fused
        for grad in grads:
            p.grad = grad.clone()
            opt.step()
        runs.append(p.detach())
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-12, atol=1e-12)
    assert not (runs[0] - start).abs().lt(1e-3).all()  # it moved
    odd = torch.zeros(2, dtype=torch.complex64, requires_grad=True)
    assert not slope_adam([{"params": [odd], "lr": 0.1}]).defaults.get("fused")
