"""ACR, ART and certified accuracy from radii (against direct Python computations), the plots,
and the ACERT training loss against a plain-torch computation of its formula."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adcert import certified_radius
from adcert.metrics import acr, art, certified_accuracy, radius_metrics


def test_certified_accuracy_acr_art_match_direct_computation():
    g = torch.Generator().manual_seed(0)
    eps_max = 0.3
    radius = torch.rand(50, generator=g, dtype=torch.float64) * eps_max
    radius[:10] = 0
    radius[10:15] = eps_max
    correct = radius > 0
    correct[:3] = True  # correct but not certified at any eps > 0
    grid = [0.0, 0.01, 0.1, 0.2999, eps_max]
    got = certified_accuracy(radius, grid, correct)
    rl, cl = radius.tolist(), correct.tolist()
    want = [sum(1 for r, c in zip(rl, cl) if c and r >= e) / 50 for e in grid]
    assert got.tolist() == pytest.approx(want, abs=1e-15)
    assert float(certified_accuracy(radius, 0.0, correct)) == pytest.approx(13 / 50 + 40 / 50 - 10 / 50)
    assert float(acr(radius, eps_max)) == pytest.approx(sum(rl) / 50 / eps_max)
    m = radius_metrics(radius, eps_max, correct, eps_grid=[0.1])
    acc = sum(cl) / 50
    assert m["acc"] == pytest.approx(acc)
    assert m["art"] == pytest.approx(math.sqrt(acc * sum(rl) / 50 / eps_max))
    assert m["cert_acc@0.1"] == pytest.approx(want[2])


def test_area_under_certified_accuracy_is_the_mean_radius():
    radius = torch.tensor([0.0, 0.05, 0.1, 0.17, 0.2], dtype=torch.float64)
    n = 200000
    grid = (torch.arange(n, dtype=torch.float64) + 0.5) * (0.2 / n)
    area = float(certified_accuracy(radius, grid).mean()) * 0.2
    assert area == pytest.approx(float(radius.mean()), abs=1e-6)


def test_metric_errors():
    with pytest.raises(ValueError, match="radius"):
        acr(torch.tensor([-0.1]), 1.0)
    with pytest.raises(ValueError, match="radius"):
        acr(torch.tensor([2.0]), 1.0)
    with pytest.raises(ValueError, match="eps_max"):
        acr(torch.tensor([0.1]), 0.0)
    with pytest.raises(ValueError, match="correct"):
        certified_accuracy(torch.tensor([0.1]), 0.0, torch.tensor([False]))
    with pytest.raises(ValueError, match="accuracy"):
        art(1.5, 0.2)


def test_plots_write_png(tmp_path):
    pytest.importorskip("matplotlib")
    from adcert.plots import plot_certified_accuracy, plot_tradeoff
    r = torch.rand(30, dtype=torch.float64) * 0.1
    p1 = plot_certified_accuracy({"a": r, "b": r / 2}, 0.1, tmp_path / "cert.png")
    p2 = plot_tradeoff({"ibp": (0.5, 0.4), "acert": (0.6, 0.42)}, tmp_path / "trade.png")
    for p in (p1, p2):
        with open(p, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="path"):
        plot_tradeoff({"x": (0.5, 0.5)}, tmp_path / "x.jpg")


def test_plot_cli(tmp_path):
    pytest.importorskip("matplotlib")
    import argparse

    from adcert.plots import add_parser
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    torch.save(torch.rand(20, dtype=torch.float64) * 0.1, tmp_path / "r.pt")
    out, trade = tmp_path / "c.png", tmp_path / "t.png"
    args = parser.parse_args(["plot", "--radii", f"a={tmp_path / 'r.pt'}", "--eps-max", "0.1",
                              "--out", str(out), "--tradeoff", "a=0.5,0.3",
                              "--out-tradeoff", str(trade)])
    assert args.fn(args) == 0 and out.stat().st_size > 0 and trade.stat().st_size > 0
    with pytest.raises(SystemExit, match="eps-max"):
        args = parser.parse_args(["plot", "--radii", f"a={tmp_path / 'r.pt'}"])
        args.fn(args)


def _hide(monkeypatch, package):
    """Make ``import package`` (and its submodules) fail, as if it were not installed."""
    import sys

    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, package, None)


def test_plots_without_matplotlib_say_how_to_install_it(tmp_path, monkeypatch, capsys):
    from adcert._deps import MissingDependency
    from adcert.cli import main
    from adcert.plots import plot_tradeoff

    _hide(monkeypatch, "matplotlib")
    want = "adcert.plots needs matplotlib, which is not installed: pip install matplotlib"
    with pytest.raises(MissingDependency, match=want):  # an ImportError subclass
        plot_tradeoff({"a": (0.5, 0.3)}, tmp_path / "t.png")
    assert main(["plot", "--tradeoff", "a=0.5,0.3", "--out-tradeoff",
                 str(tmp_path / "t.png")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"adcert plot: {want}"]


def test_plot_cli_eps_max_takes_fractions(tmp_path, monkeypatch):
    import argparse

    from adcert import plots
    seen = {}
    monkeypatch.setattr(plots, "plot_certified_accuracy",
                        lambda runs, eps_max, out: seen.setdefault("eps_max", eps_max))
    parser = argparse.ArgumentParser()
    plots.add_parser(parser.add_subparsers(dest="command"))
    torch.save(torch.rand(5, dtype=torch.float64) * 0.01, tmp_path / "r.pt")
    args = parser.parse_args(["plot", "--radii", f"a={tmp_path / 'r.pt'}", "--eps-max", "8/255"])
    assert args.fn(args) == 0 and seen["eps_max"] == 8 / 255


# ----------------------------------------------------------------------------- ACERT

def _tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double()


def _plain_ibp_margins(net, x, y, eps):
    """Per-sample IBP margin lower bounds with the margin folded into the last layer, written
    out with positive/negative weight parts (no adcert code)."""
    e = eps[:, None]
    lo, hi = (x - e).clamp(0, 1), (x + e).clamp(0, 1)
    w1, b1, w2, b2 = net[1].weight, net[1].bias, net[3].weight, net[3].bias
    pos, neg = w1.clamp(min=0), w1.clamp(max=0)
    l1 = lo @ pos.t() + hi @ neg.t() + b1
    u1 = hi @ pos.t() + lo @ neg.t() + b1
    l1, u1 = l1.clamp(min=0), u1.clamp(min=0)
    c = w2[y][:, None, :] - w2[None, :, :]                     # [B, C, H]
    d = b2[y][:, None] - b2[None, :]
    m = (c.clamp(min=0) * l1[:, None]).sum(-1) + (c.clamp(max=0) * u1[:, None]).sum(-1) + d
    return m


@pytest.mark.parametrize("kappa", [0.0, 0.3])
def test_acert_loss_equals_plain_formula(kappa):
    from adcert.methods.acert import ACERT
    from adcert.methods.base import StepState
    net = _tiny_net()
    x = torch.rand(16, 5, dtype=torch.float64)
    with torch.no_grad():
        y = net(x).argmax(1)
    y[:4] = (y[:4] + 1) % 3
    state = StepState(eps=0.1, eps_target=0.2)
    method = ACERT(kappa=kappa, maxiter=3, reg_lambda=0.0)
    out = method.loss(net, x, y, state)
    res = certified_radius(net, x, y, 0.1, xtol=1e-6, rtol=1e-4, maxiter=3)
    assert bool((res.estimate[:4] == 0).all())
    m = _plain_ibp_margins(net, x, y, res.estimate)
    want = kappa * F.cross_entropy(net(x), y) + (1 - kappa) * F.cross_entropy(-m, y)
    torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=1e-12)
    out.loss.backward()
    assert net[1].weight.grad is not None and bool(net[1].weight.grad.abs().sum() > 0)
    assert float(out.logs["acr_train"]) == pytest.approx(float(res.estimate.mean()) / 0.1)


def test_acert_fast_and_certified_only_and_warm_cache():
    from adcert.methods.acert import ACERT, ACERTFast
    from adcert.methods.base import StepState
    net = _tiny_net()
    x = torch.rand(10, 5, dtype=torch.float64)
    with torch.no_grad():
        logits = net(x)
    y = logits.argmax(1)
    y[:3] = (y[:3] + 1) % 3
    state = StepState(eps=0.05, eps_target=0.05)
    fast = ACERTFast().loss(net, x, y, state)
    e = torch.where(logits.argmax(1) == y, 0.05, 0.0).double()
    want = F.cross_entropy(-_plain_ibp_margins(net, x, y, e), y)
    torch.testing.assert_close(fast.loss, want, rtol=1e-10, atol=1e-12)
    strict = ACERT(maxiter=4, certified_only=True, reg_lambda=0.0, warm_start=True)
    idx = torch.arange(100, 110)
    strict.loss(net, x, y, state, index=idx)
    res = certified_radius(net, x, y, 0.05, xtol=1e-6, rtol=1e-4, maxiter=4)
    torch.testing.assert_close(strict.cache.get(idx, 0.05, x), res.radius, rtol=1e-12,
                               atol=1e-15)
    assert bool(torch.isnan(strict.cache.frac[:100]).all())
    # the second epoch starts from the cached radii: still certificates
    strict.loss(net, x, y, state, index=idx)
    again = strict.cache.get(idx, 0.05, x)
    from adcert.radius import margin_function
    pos = again > 0
    with torch.no_grad():
        assert bool((margin_function(net, x, y)(again, None)[pos] < 0).all())
    assert bool((again[:3] == 0).all())  # misclassified: radius 0
    with pytest.raises(ValueError, match="kappa"):
        ACERT(kappa=1.5)
