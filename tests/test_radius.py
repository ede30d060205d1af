"""Batched certified-radius search: the Brent step (C++ vs plain torch), the batched Brent core
on synthetic functions (against scipy's brentq), and certified_radius on networks (analytic
radii of a linear model, scipy on a ReLU net, the certificate property, edge cases, warm starts).
"""
import math

import pytest
import torch
from torch import nn

from adcert import certified_radius
from adcert.bounds import compute_bounds
from adcert.ops.brent_step import (DONE, HI, ITERS, LO, XCUR, brent_init, brent_step,
                                   brent_step_reference)
from adcert.radius import brent_search, margin_function

scipy_optimize = pytest.importorskip("scipy.optimize")


# ----------------------------------------------------------------------------- synthetic

def _cubic(roots, slopes):
    """Per-sample strictly increasing f(x) = (x - r)^3 + s (x - r): ``fn(x, rows)``."""
    def fn(x, rows=None):
        r = roots if rows is None else roots[rows]
        s = slopes if rows is None else slopes[rows]
        d = x - r
        return d * d * d + s * d
    return fn


def _search(fn, n, dtype, xtol=1e-6, rtol=None, maxiter=100, sync_every=None, lo=0.0, hi=1.0):
    a = torch.full((n,), lo, dtype=dtype)
    b = torch.full((n,), hi, dtype=dtype)
    rows = torch.arange(n)
    rtol = 4 * torch.finfo(dtype).eps if rtol is None else rtol
    return brent_search(fn, a, fn(a, rows), b, fn(b, rows), xtol=xtol, rtol=rtol,
                        maxiter=maxiter, sync_every=sync_every)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_step_equals_reference_along_searches(dtype):
    """Run the C++ step and the reference side by side on searches that visit every branch
    (secant, inverse quadratic, bisection, swaps, plateaus, convergence, maxiter) and require
    bit-identical states at every step."""
    n = 64
    roots = torch.rand(n, dtype=dtype) * 0.9 + 0.05
    slopes = torch.rand(n, dtype=dtype) * 2
    slopes[::4] = 0  # a triple root: slow, bisection-heavy
    base = _cubic(roots, slopes)

    def fn(x):
        f = base(x)
        f[1::5] = torch.where(x[1::5] < roots[1::5], -1.0, 1.0).to(dtype)  # steps
        g = torch.minimum(x - roots, torch.zeros_like(x)) + torch.clamp(x - roots - 0.1, min=0)
        f[2::5] = g[2::5]  # a plateau at 0 on [r, r + 0.1]
        return f

    a, b = torch.zeros(n, dtype=dtype), torch.ones(n, dtype=dtype)
    rtol = 4 * torch.finfo(dtype).eps
    s_cpp = s_ref = brent_init(a, fn(a), b, fn(b))
    f = fn(b)
    for _ in range(40):
        s_cpp = brent_step(s_cpp, f, 1e-7, rtol, 30)
        s_ref = brent_step_reference(s_ref, f, 1e-7, rtol, 30)
        torch.testing.assert_close(s_cpp, s_ref, rtol=0, atol=0, equal_nan=True)
        f = fn(s_cpp[XCUR])
    assert bool((s_cpp[DONE] == 1).all())
    assert 0 < int(s_cpp[ITERS].min()) and int(s_cpp[ITERS].max()) <= 30


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_step_equals_reference_on_random_states(dtype):
    """Arbitrary states (including done columns, zeros and ties) give identical outputs."""
    n = 512
    g = torch.Generator().manual_seed(1)
    state = torch.randn(12, n, generator=g, dtype=dtype)
    state[10] = (torch.rand(n, generator=g) < 0.2).to(dtype)
    state[11] = torch.randint(0, 6, (n,), generator=g).to(dtype)
    state[0, ::7] = state[2, ::7]          # xpre == xblk: the secant branch
    state[3, ::11] = 0                     # fpre == 0
    f = torch.randn(n, generator=g, dtype=dtype)
    f[::13] = 0
    out = brent_step(state, f, 1e-3, 1e-6, 5)
    ref = brent_step_reference(state, f, 1e-3, 1e-6, 5)
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    frozen = state[10] == 1
    torch.testing.assert_close(out[:, frozen], state[:, frozen], rtol=0, atol=0)


def test_brent_step_argument_errors():
    s = torch.zeros(12, 3)
    with pytest.raises(ValueError, match="state"):
        brent_step(torch.zeros(11, 3), torch.zeros(3), 1e-3, 0.0, 5)
    with pytest.raises(ValueError, match="f"):
        brent_step(s, torch.zeros(4), 1e-3, 0.0, 5)
    with pytest.raises(TypeError, match="f"):
        brent_step(s, torch.zeros(3, dtype=torch.float64), 1e-3, 0.0, 5)
    with pytest.raises(ValueError, match="xtol"):
        brent_step(s, torch.zeros(3), 0.0, 0.0, 5)


def test_brent_core_follows_scipy_brentq():
    """Same points evaluated as scipy.optimize.brentq, sample by sample, and the same root within
    xtol (the returned point is the verified-negative end of the final bracket)."""
    n, xtol = 24, 1e-9
    rtol = 4 * torch.finfo(torch.float64).eps
    roots = torch.rand(n, dtype=torch.float64) * 0.8 + 0.1
    slopes = torch.rand(n, dtype=torch.float64) * 3 + 0.01
    fn = _cubic(roots, slopes)
    seen = [[] for _ in range(n)]

    def recording(x, rows):
        for i, v in zip(rows.tolist() if rows is not None else range(n), x.tolist()):
            seen[i].append(v)
        return fn(x, rows)

    state = _search(recording, n, torch.float64, xtol=xtol, maxiter=100, sync_every=1)
    for i in range(n):
        calls = []

        def f1(t, i=i):
            calls.append(t)
            d = t - float(roots[i])
            return d * d * d + float(slopes[i]) * d

        root = scipy_optimize.brentq(f1, 0.0, 1.0, xtol=xtol, rtol=rtol, maxiter=100)
        assert seen[i][2:] == calls[2:], f"sample {i}: different iterates"
        assert abs(float(state[LO, i]) - root) <= xtol + rtol * root
        assert float(fn(state[LO, i:i + 1], torch.tensor([i]))) < 0
        assert float(fn(state[HI, i:i + 1], torch.tensor([i]))) >= 0
        assert float(state[HI, i] - state[LO, i]) <= xtol + rtol * root


def test_plateau_at_zero_and_steps_give_the_leftmost_root():
    n, xtol = 16, 1e-6
    left = torch.rand(n, dtype=torch.float64) * 0.5 + 0.1
    width = torch.rand(n, dtype=torch.float64) * 0.3

    def plateau(x, rows=None):
        lft = left if rows is None else left[rows]
        w = width if rows is None else width[rows]
        return torch.clamp(x - lft, max=0) + torch.clamp(x - lft - w, min=0)

    def step(x, rows=None):
        lft = left if rows is None else left[rows]
        return torch.where(x < lft, -2.0, 3.0).to(x.dtype)

    for fn in (plateau, step):
        state = _search(fn, n, torch.float64, xtol=xtol)
        lo, hi = state[LO], state[HI]
        assert bool((lo < left).all()) and bool((hi >= left).all())
        assert float((left - lo).max()) <= xtol + 1e-12
        assert bool((fn(lo) < 0).all())


def test_maxiter_zero_and_sync_every_compaction():
    n = 20
    roots = torch.rand(n, dtype=torch.float64) * 0.9 + 0.05
    fn = _cubic(roots, torch.ones(n, dtype=torch.float64))
    s0 = _search(fn, n, torch.float64, maxiter=0)
    assert bool((s0[LO] == 0).all()) and bool((s0[HI] == 1).all())
    assert bool((s0[ITERS] == 0).all())
    full = _search(fn, n, torch.float64, maxiter=50)
    for k in (1, 3):
        compact = _search(fn, n, torch.float64, maxiter=50, sync_every=k)
        torch.testing.assert_close(compact, full, rtol=0, atol=0)


# ----------------------------------------------------------------------------- networks

def _linear_model(d=6, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, c)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(c, d, generator=g, dtype=torch.float64))
        model[1].bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
    return model


def _relu_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 3)).double()


def test_linear_model_radius_is_analytic():
    """IBP of one linear layer with the margin folded in is exact: the radius of a correctly
    classified sample is min_i margin_i / ||w_y - w_i||_1 (box kept inside [0, 1])."""
    model = _linear_model()
    x = 0.4 + 0.2 * torch.rand(40, 6, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
    y = torch.randint(0, 4, (40,))
    eps_max, xtol = 0.35, 1e-7
    w = model[1].weight.detach()
    marg = logits.gather(1, y[:, None]) - logits
    dist = (w[y][:, None, :] - w[None]).abs().sum(-1)
    ratio = (marg / dist).masked_fill(torch.nn.functional.one_hot(y, 4).bool(), math.inf)
    expect = ratio.amin(1).clamp(min=0, max=eps_max)
    expect[(marg < 0).any(1)] = 0
    res = certified_radius(model, x, y, eps_max, xtol=xtol, maxiter=60)
    assert res.iterations.dtype == torch.int64
    assert bool((res.radius <= expect + 1e-12).all())       # never above the true radius
    assert float((expect - res.radius).max()) <= xtol + 1e-9
    assert 0 < int((expect == 0).sum()) < 40 and int((expect == eps_max).sum()) >= 0


@pytest.mark.parametrize("method_dtype", [torch.float64, torch.float32])
def test_relu_net_radius_matches_scipy_and_is_a_certificate(method_dtype):
    """The certificate is checked with a pass of the same batch shape as the search's (the
    verdict of an unsound bound may move by an ulp with the batch shape); the root against
    scipy's brentq on the per-sample function."""
    model = _relu_model().to(method_dtype)
    x = torch.rand(12, 8, dtype=method_dtype)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:3] = (y[:3] + 1) % 3  # a few misclassified samples
    eps_max = 0.2
    xtol = 1e-5 if method_dtype == torch.float32 else 1e-8
    res = certified_radius(model, x, y, eps_max, xtol=xtol, maxiter=80)
    fn = margin_function(model, x, y)
    with torch.no_grad():
        r0, r_at, r_eps = fn(torch.zeros_like(res.radius), None), fn(res.radius, None), \
            fn(torch.full_like(res.radius, eps_max), None)
        r_up = fn(torch.where(res.radius < eps_max, res.upper, 0.0), None)
        r_next = fn((res.radius + 2 * xtol).clamp(max=eps_max), None)
    assert bool((res.radius[:3] == 0).all()) and bool((r0[:3] >= 0).all())
    certified = res.radius > 0
    assert bool((r_at[certified] < 0).all()), "the returned radius must be certified"
    assert bool((res.radius[r0 >= 0] == 0).all())
    robust = r_eps < 0
    assert bool((res.radius[robust] == eps_max).all())
    assert bool(torch.isinf(res.upper[robust]).all())
    inner = (r0 < 0) & ~robust
    assert int(inner.sum()) >= 3, "the test needs samples with an interior root"
    assert bool((r_next[inner] >= 0).all()) and bool((r_up[inner] >= 0).all())
    assert bool((res.upper[inner] - res.radius[inner] <= xtol * 1.01).all())
    for i in inner.nonzero().squeeze(1).tolist():
        def R(e, i=i):
            with torch.no_grad():
                return float(fn(torch.tensor([e], dtype=method_dtype), torch.tensor([i])))
        root = scipy_optimize.brentq(R, 0.0, eps_max, xtol=xtol / 4)
        assert abs(float(res.radius[i]) - root) <= 1.5 * xtol


def test_zero_and_eps_max_edges_batch_of_one_and_empty():
    model = _linear_model()
    x = torch.full((1, 6), 0.5, dtype=torch.float64)
    y = model(x).argmax(1)
    big = certified_radius(model, x, y, 1e-6)          # robust at a tiny eps_max
    assert float(big.radius[0]) == 1e-6 and int(big.iterations[0]) == 0
    wrong = certified_radius(model, x, (y + 1) % 4, 0.3)
    assert float(wrong.radius[0]) == 0 and float(wrong.upper[0]) == 0
    one = certified_radius(model, x, y, 0.45)
    assert one.radius.shape == (1,) and 0 < float(one.radius[0]) < 0.45
    empty = certified_radius(model, x[:0], y[:0], 0.3)
    assert empty.radius.shape == (0,) and empty.iterations.shape == (0,)


def test_bad_inputs_raise_clear_errors():
    model = _linear_model()
    x = torch.rand(3, 6, dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.int64)
    bad = x.clone()
    bad[1, 2] = math.nan
    with pytest.raises(ValueError, match="x: contains NaN"):
        certified_radius(model, bad, y, 0.1)
    for eps_max in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="eps_max"):
            certified_radius(model, x, y, eps_max)
    with pytest.raises(ValueError, match="y"):
        certified_radius(model, x, y[:2], 0.1)
    with pytest.raises(ValueError, match="xtol"):
        certified_radius(model, x, y, 0.1, xtol=0.0)
    with pytest.raises(ValueError, match="maxiter"):
        certified_radius(model, x, y, 0.1, maxiter=-1)
    # maxiter=0 ran no search step and answered radius 0 for every sample with an interior root
    with pytest.raises(ValueError, match=r"^maxiter: expected an int >= 1.*got 0"):
        certified_radius(model, x, y, 0.1, maxiter=0)
    assert certified_radius(model, x, y, 0.1, maxiter=1).radius.shape == (3,)
    with pytest.raises(ValueError, match="init"):
        certified_radius(model, x, y, 0.1, init=torch.zeros(2))
    with pytest.raises((KeyError, ValueError, NotImplementedError), match="nope"):
        certified_radius(model, x, y, 0.1, method="nope")


def test_warm_start_gives_the_same_radii():
    model = _relu_model(1)
    x = torch.rand(30, 8, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:4] = (y[:4] + 1) % 3
    eps_max, xtol = 0.3, 1e-7
    cold = certified_radius(model, x, y, eps_max, xtol=xtol, maxiter=60, sync_every=1)
    fn = margin_function(model, x, y)
    for init in (cold.radius, torch.zeros(30), torch.full((30,), eps_max),
                 torch.rand(30, dtype=torch.float64) * eps_max):
        warm = certified_radius(model, x, y, eps_max, xtol=xtol, maxiter=60, init=init,
                                sync_every=1)
        assert float((warm.radius - cold.radius).abs().max()) <= 2 * xtol
        pos = warm.radius > 0
        assert bool((fn(warm.radius[pos], pos.nonzero().squeeze(1)) < 0).all())
    near = certified_radius(model, x, y, eps_max, xtol=xtol, maxiter=60, init=cold.radius,
                            sync_every=1)
    assert int(near.iterations.sum()) <= int(cold.iterations.sum())


def test_clean_logits_replace_the_eps_zero_pass():
    model = _relu_model(2)
    x = torch.rand(20, 8, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    y[:5] = (y[:5] + 2) % 3
    base = certified_radius(model, x, y, 0.3, xtol=1e-7, maxiter=50)
    fast = certified_radius(model, x, y, 0.3, xtol=1e-7, maxiter=50, logits=logits)
    assert bool((fast.radius[:5] == 0).all())
    torch.testing.assert_close(fast.radius, base.radius, rtol=0, atol=2e-7)
    with pytest.raises(ValueError, match="logits"):
        certified_radius(model, x, y, 0.3, logits=logits[:3])


# ----------------------------------------------------------------------------- warm starts

def _counting(monkeypatch):
    """Count the rows every bound pass of ``certified_radius`` evaluates: ``[rows per pass]``."""
    import adcert.radius as radius_mod

    counts = []
    orig = radius_mod.margin_function

    def counted(*args, **kwargs):
        fn = orig(*args, **kwargs)

        def g(eps, rows):
            counts.append(eps.numel())
            return fn(eps, rows)
        return g

    monkeypatch.setattr(radius_mod, "margin_function", counted)
    return counts


def test_unknown_init_entries_are_searched_cold():
    """NaN in ``init`` (no previous radius, e.g. a sample not seen yet) means the cold bracket
    ``[0, eps_max]`` for that sample; the others start warm; all radii match a cold search."""
    model = _relu_model(3)
    x = torch.rand(24, 8, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:3] = (y[:3] + 1) % 3
    eps_max, xtol = 0.3, 1e-7
    cold = certified_radius(model, x, y, eps_max, xtol=xtol, maxiter=60)
    init = cold.radius.clone()
    init[::2] = math.nan
    warm = certified_radius(model, x, y, eps_max, xtol=xtol, maxiter=60, init=init)
    assert float((warm.radius - cold.radius).abs().max()) <= 2 * xtol
    fn = margin_function(model, x, y)
    pos = warm.radius > 0
    assert bool((fn(warm.radius[pos], pos.nonzero().squeeze(1)) < 0).all())
    assert bool((warm.radius[:3] == 0).all()) and bool((warm.upper[:3] == 0).all())
    allnan = certified_radius(model, x, y, eps_max, xtol=xtol, maxiter=60,
                              init=torch.full((24,), math.nan, dtype=torch.float64))
    torch.testing.assert_close(allnan.radius, cold.radius, rtol=0, atol=0)
    torch.testing.assert_close(allnan.iterations, cold.iterations, rtol=0, atol=0)


def test_warm_start_with_logits_reads_r0_from_them(monkeypatch):
    """A warm bracket that misses on the left (misclassified, or the radius shrank below it)
    takes R(0) from the clean logits: the extra pass evaluates only the rows that missed on the
    right (``eps_max`` side), and the radii match a cold search."""
    model = _relu_model(4)
    x = torch.rand(16, 8, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    y[:4] = (y[:4] + 1) % 3                       # misclassified: a left miss for any init > 0
    eps_max, xtol = 0.3, 1e-7
    cold = certified_radius(model, x, y, eps_max, xtol=xtol, maxiter=60, logits=logits)
    r0 = 0.05 * eps_max
    init = torch.full((16,), r0, dtype=torch.float64)
    counts = _counting(monkeypatch)
    warm = certified_radius(model, x, y, eps_max, xtol=xtol, maxiter=60, init=init,
                            init_width=0.01, sync_every=1, logits=logits)
    fn = margin_function(model, x, y)
    with torch.no_grad():   # R at the bracket's right end r0 + (0.01 eps_max + 0.1 r0)
        f_hi = fn(torch.full((16,), r0 + 0.01 * eps_max + 0.1 * r0, dtype=torch.float64), None)
    right_miss = int((f_hi < 0).sum())
    assert 1 <= right_miss <= 12, "the test needs samples whose root is above the bracket"
    assert counts[:3] == [16, 16, right_miss]    # no extra pass for the 4 misclassified rows
    assert bool((warm.radius[:4] == 0).all()) and bool((warm.upper[:4] == 0).all())
    assert float((warm.radius - cold.radius).abs().max()) <= 2 * xtol
