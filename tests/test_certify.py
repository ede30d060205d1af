"""The certifier: soundness on planted non-robust points, agreement with exhaustive checks on a
2-D toy network, crash + resume, sharding, corrupt journals, the report, model loading, the CLI."""
from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch
from torch import nn

from adcert.attacks.autoattack import autoattack, margins, verify_counterexamples
from adcert.certify import (
    JournalError, JournalMismatch, ModelFileError, StageUnavailable, certify, format_table,
    load_model, read_journal, report,
)
from adcert.certify import pipeline as pipeline_mod
from adcert.certify.bab import InputSplitBaB
from adcert.certify.journal import Journal, journal_name
from adcert.certify.stages import BoundStage

# sound=False runs warn by design; the tests that check the warnings use pytest.warns, which
# sees them regardless of this filter
pytestmark = pytest.mark.filterwarnings("ignore:certify. sound=False:RuntimeWarning")

EPS = 0.06
BOUND_STAGES = ("ibp", "crown", "alpha-crown")


def toy_net(seed=2) -> nn.Module:
    """2-D input, 4 classes, with several decision boundaries inside [0, 1]^2 (fp64)."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(),
                        nn.Linear(24, 4)).double()
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=torch.float64))
        # first-layer hyperplanes through random points of [0, 1]^2, so the classes interleave
        c = torch.rand(24, 2, generator=g, dtype=torch.float64)
        net[0].weight.mul_(4)
        net[0].bias.copy_(-(net[0].weight * c).sum(1))
        net[2].bias.zero_()
        net[4].bias.zero_()
    return net.eval()


def in_box(a, x, eps):
    """Is ``a`` inside the box ``[clamp(x - eps, 0, 1), clamp(x + eps, 0, 1)]`` (computed in x's
    dtype, the box every stage uses)?"""
    return bool(((a >= (x - eps).clamp(0, 1)) & (a <= (x + eps).clamp(0, 1))).all())


def predict(net, x):
    with torch.no_grad():
        return net(x).argmax(1)


def grid_counterexample(net, x, y, eps, k=61):
    """Per sample: does a k x k grid of the box (vertices included) hold a point with
    ``z_i >= z_y`` for some ``i != y``?  ``[B]`` bool."""
    t = torch.linspace(-1, 1, k, dtype=torch.float64)
    offs = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2) * eps
    pts = (x[:, None, :] + offs[None]).clamp(0, 1)
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    pts = torch.min(torch.max(pts, lo[:, None]), hi[:, None])  # exactly inside the box
    m = margins(net, pts.reshape(-1, 2), y.repeat_interleave(pts.shape[1]))
    return (m <= 0).reshape(x.shape[0], -1).any(1)


def planted(net, n, eps, seed=1):
    """``n`` correctly classified points at distance ~eps/3 from a decision boundary, each with a
    constructed counterexample inside its eps-box: ``(x, y, x_adv)``."""
    g = torch.Generator().manual_seed(seed)
    xs, ys, advs = [], [], []
    for _ in range(100 * n):
        if len(xs) == n:
            break
        a, b = torch.rand(2, 2, generator=g, dtype=torch.float64) * 0.8 + 0.1
        ca, cb = predict(net, torch.stack([a, b]))
        if ca == cb:
            continue
        for _ in range(60):  # bisect to the boundary between a's class and another
            mid = (a + b) / 2
            if predict(net, mid[None])[0] == ca:
                a = mid
            else:
                b = mid
        u = (b - a) / (b - a).norm()
        x0 = a - u * eps / 3       # on a's side
        x1 = a + u * eps / 3       # across the boundary, |x1 - x0|_inf < eps
        y0 = predict(net, x0[None])[0]
        if y0 != ca or predict(net, x1[None])[0] == y0:
            continue
        xs.append(x0), ys.append(y0), advs.append(x1)
    assert len(xs) == n, "the toy network has too few decision boundaries"
    return torch.stack(xs), torch.stack(ys), torch.stack(advs)


def assert_sound_available(method):
    """Every bound stage has a sound mode: one reporting itself unavailable (a broken import,
    a NotImplementedError) is a failure, never a skip."""
    net, x = toy_net(), torch.full((1, 2), 0.5, dtype=torch.float64)
    why = BoundStage(method, sound=True).unavailable(net, x, torch.zeros(1, dtype=torch.long),
                                                     EPS)
    assert why is None, f"sound {method!r} is unavailable: {why}"


@pytest.mark.parametrize("method", BOUND_STAGES)
def test_a_broken_sound_stage_fails_instead_of_skipping(monkeypatch, method):
    """The sound tests used to skip when a sound stage reported itself unavailable, so a
    broken import passed silently; now it fails them."""
    assert_sound_available(method)
    import adcert.bounds.api as api

    def broken(*args, **kwargs):
        raise ImportError("cannot import name 'sound_ibp' (simulated)")
    monkeypatch.setitem(api.METHODS, method, broken)
    with pytest.raises(AssertionError, match="unavailable.*sound_ibp"):
        assert_sound_available(method)
    net = toy_net()
    x, y, _ = planted(net, 2, EPS)
    with pytest.raises(ImportError):
        BoundStage(method, sound=True).run(net, x, y, EPS)


# ---------------------------------------------------------------------------------- soundness

@pytest.mark.parametrize("sound", [True, False])
@pytest.mark.parametrize("method", BOUND_STAGES)
def test_planted_non_robust_points_are_never_certified(method, sound):
    if sound:
        assert_sound_available(method)
    net = toy_net()
    x, y, adv = planted(net, 12, EPS)
    broken, _, _ = verify_counterexamples(net, x, adv, y, EPS)
    assert broken.all(), "the planted counterexamples must be real"
    out = BoundStage(method, sound=sound).run(net, x, y, EPS)
    assert all(v is None for v in out.verdicts)
    assert all(m is None or m <= 0 for m in out.values)


def test_bab_finds_the_planted_counterexamples():
    net = toy_net()
    x, y, _ = planted(net, 8, EPS)
    out = InputSplitBaB(sound=False, timeout=20).run(net, x, y, EPS)
    assert out.verdicts == ["attacked"] * 8
    for i, a in enumerate(out.adv):
        assert in_box(a, x[i], EPS) and predict(net, a[None])[0] != y[i]


def test_autoattack_breaks_planted_points_and_every_counterexample_is_verified():
    net = toy_net()
    x, y, _ = planted(net, 6, EPS)
    cand = autoattack(net, x, y, EPS, 4, components=("apgd-ce", "apgd-t"))
    broken, x_proj, m = verify_counterexamples(net, x, cand, y, EPS)
    assert broken.sum() >= 5  # APGD on a 2-D toy problem finds (nearly) all of them
    assert in_box(x_proj, x, EPS)
    assert (predict(net, x_proj[broken]) != y[broken]).all() and (m[broken] <= 0).all()


def test_autoattack_keeps_a_batch_norm_model_in_eval_mode():
    model = _digits_model()
    x = torch.rand(3, 1, 8, 8)
    y = predict(model, x)
    stats = [t.clone() for t in model.state_dict().values()]
    cand = autoattack(model, x, y, 0.05, 10, components=("apgd-ce", "apgd-t"))
    assert not model.training and cand.shape == x.shape
    assert all(torch.equal(a, b) for a, b in zip(stats, model.state_dict().values()))
    verify_counterexamples(model, x[:1], cand[:1], y[:1], 0.05)  # batch 1 works in eval mode


def test_autoattack_without_torchattacks_says_how_to_install_it(monkeypatch, tmp_path):
    from adcert._deps import MissingDependency
    from adcert.certify.stages import AutoAttackStage

    for name in [m for m in sys.modules if m == "torchattacks" or m.startswith("torchattacks.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None makes the import fail
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    net = toy_net()
    x, y, _ = planted(net, 2, EPS)
    with pytest.raises(MissingDependency, match=r"^AutoAttack needs torchattacks, which is not "
                                                r"installed: pip install --no-deps torchattacks$"):
        autoattack(net, x, y, EPS, 4)
    why = AutoAttackStage(4).unavailable(net, x, y, EPS)   # the certifier: one line, exit 3
    assert "torchattacks" in why and "pip install --no-deps torchattacks" in why
    with pytest.raises(StageUnavailable, match="autoattack.*pip install --no-deps torchattacks"):
        certify(net, x, y, EPS, stages=("autoattack",), out_dir=tmp_path)


def test_verify_counterexamples_rejects_fakes():
    net = toy_net()
    x, y, adv = planted(net, 4, EPS)
    far = x + (adv - x) * 1e3                      # outside the box: projected back first
    broken, proj, _ = verify_counterexamples(net, x, far, y, EPS)
    assert in_box(proj, x, EPS) and not in_box(far, x, EPS)
    same, _, _ = verify_counterexamples(net, x, x.clone(), y, EPS)
    assert not same.any()                           # a correctly classified point is no attack
    with pytest.raises(ValueError, match="x_adv"):
        verify_counterexamples(net, x, x[:2], y, EPS)


def test_verdicts_agree_with_exhaustive_2d_checks(tmp_path):
    net = toy_net()
    g = torch.Generator().manual_seed(3)
    xr = torch.rand(24, 2, generator=g, dtype=torch.float64)
    xp, yp, _ = planted(net, 8, EPS)
    x = torch.cat([xr, xp])
    y = torch.cat([predict(net, xr), yp])
    y[:3] = (y[:3] + 1) % 4                         # three misclassified samples
    res = certify(net, x, y, EPS, stages=("ibp", "crown", "bab"), out_dir=tmp_path,
                  sound=False, timeout=20, batch_size=10)
    cex = grid_counterexample(net, x, y, EPS)
    verdicts = [res.records[i]["verdict"] for i in range(len(y))]
    for i, v in enumerate(verdicts):
        if v == "certified":
            assert not cex[i], f"sample {i} certified by {res.records[i]['stage']} but attackable"
        if cex[i]:
            assert v in ("misclassified", "attacked"), (i, v)  # BaB is complete here
        if v == "attacked":
            a = torch.load(tmp_path / res.records[i]["adv"])
            assert in_box(a, x[i], EPS) and predict(net, a[None])[0] != y[i]
    assert verdicts[:3] == ["misclassified"] * 3
    assert "certified" in verdicts and "attacked" in verdicts
    assert {res.records[i]["stage"] for i in range(len(y))} >= {"clean", "bab"}
    # IBP alone at a smaller radius, where it certifies some samples: never contradicts the grid
    small = EPS / 4
    ibp = BoundStage("ibp", sound=False).run(net, x, y, small)
    certified = torch.tensor([v == "certified" for v in ibp.verdicts])
    assert certified.any() and not (certified & grid_counterexample(net, x, y, small)).any()


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_sound_pipeline_end_to_end(tmp_path, method):
    assert_sound_available(method)
    net = toy_net()
    xp, yp, _ = planted(net, 4, EPS)
    xr = torch.rand(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    x, y = torch.cat([xp, xr]), torch.cat([yp, predict(net, xr)])
    res = certify(net, x, y, EPS / 2, stages=(method, "bab"), out_dir=tmp_path, timeout=20,
                  stage_options={"bab": {"method": method}})
    cex = grid_counterexample(net, x, y, EPS / 2)
    for i, r in res.records.items():
        assert r["skipped"] == [] and r["verdict"] != "unknown"
        assert (r["verdict"] == "certified") == (not bool(cex[i])), (i, r)
    assert read_journal(tmp_path / journal_name(0, 1)).meta["sound"] is True


def test_autoattack_stage_in_the_pipeline_saves_verified_counterexamples(tmp_path):
    net = toy_net()
    x, y, _ = planted(net, 4, EPS)
    res = certify(net, x, y, EPS, stages=("autoattack",), out_dir=tmp_path,
                  stage_options={"autoattack": {"components": ("apgd-ce",)}})
    attacked = [r for r in res.records.values() if r["verdict"] == "attacked"]
    assert len(attacked) >= 3 and all(r["stage"] == "autoattack" for r in attacked)
    for r in attacked:
        a = torch.load(tmp_path / r["adv"])
        assert in_box(a, x[r["index"]], EPS) and predict(net, a[None])[0] != y[r["index"]]
        assert r["margin"] <= 0
    summary = report([tmp_path])
    assert summary["autoattack_accuracy"] == pytest.approx(1 - len(attacked) / 4)


def test_radii_are_recorded_and_give_acr(tmp_path):
    net = toy_net()
    x = torch.rand(10, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y = predict(net, x)
    y[0] = (y[0] + 1) % 4
    eps, eps_max = 0.01, 0.05
    res = certify(net, x, y, eps, stages=("ibp",), out_dir=tmp_path, sound=False,
                  radius={"eps_max": eps_max, "method": "ibp"})
    radii = torch.tensor([res.records[i]["radius"] for i in range(10)], dtype=torch.float64)
    assert radii[0] == 0 and ((radii >= 0) & (radii <= eps_max)).all()
    for i, r in res.records.items():   # R(radius) < 0 was verified and IBP's R is monotone
        if r["radius"] >= eps:
            assert r["verdict"] == "certified", (i, r)
    assert (radii > 0).any()
    summary = report([tmp_path])
    assert summary["acr"] == pytest.approx(float(radii.mean()) / eps_max)
    assert "ACR" in format_table(summary)


def test_radius_stage_stops_when_every_sample_has_converged(monkeypatch):
    """The certifier's radius search drops converged samples and stops early (``sync_every=1``)
    instead of running all ``maxiter`` passes, and finds the same radii as the sync-free loop."""
    import adcert.radius as radius_mod
    from adcert.certify.stages import RadiusStage

    net = toy_net()
    x = torch.rand(12, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y = predict(net, x)
    calls = []
    real = radius_mod.margin_function

    def counted(*args, **kwargs):
        fn = real(*args, **kwargs)

        def g(eps, rows):
            calls.append(eps.numel())
            return fn(eps, rows)
        return g

    monkeypatch.setattr(radius_mod, "margin_function", counted)
    stage = RadiusStage(eps_max=0.2, sound=False)
    radii = torch.tensor(stage.radii(net, x, y), dtype=torch.float64)
    assert len(calls) < 30 and sum(calls) < 12 * 20   # maxiter is 100
    calls.clear()
    free = radius_mod.certified_radius(net, x, y, 0.2, maxiter=100).radius
    assert len(calls) == 102                           # 2 bracketing passes + maxiter
    torch.testing.assert_close(radii, free, rtol=0, atol=2e-4 * 0.2)


# ------------------------------------------------------------------------ unavailable stages

def test_unavailable_stage_is_an_error_or_recorded_when_skipped(tmp_path, monkeypatch):
    def missing(self, model, x, y, eps):
        raise NotImplementedError("method 'crown' is being written")
    monkeypatch.setattr(BoundStage, "margins", missing)
    net = toy_net()
    x = torch.rand(5, 2, dtype=torch.float64)
    y = predict(net, x)
    with pytest.raises(StageUnavailable, match="crown.*being written"):
        certify(net, x, y, EPS, stages=("crown",), out_dir=tmp_path)
    assert not (tmp_path / journal_name(0, 1)).exists() or \
        not read_journal(tmp_path / journal_name(0, 1)).samples
    with pytest.warns(RuntimeWarning, match="skipping unavailable"):
        res = certify(net, x, y, EPS, stages=("crown", "bab"), out_dir=tmp_path, sound=False,
                      skip_unavailable=True, timeout=20)
    assert res.unavailable == {"crown": "NotImplementedError: method 'crown' is being written"}
    for r in res.records.values():
        assert r["skipped"] == ["crown"] and "crown" not in r["stage_times"]
        assert r["stage"] in ("clean", "bab")
    text = format_table(report([tmp_path]))
    assert "UNAVAILABLE" in text and "UNSOUND" in text


# -------------------------------------------------------------------------- crash and resume

class _Crash(Exception):
    pass


def _count_calls(monkeypatch, calls):
    """Wrap every stage so ``calls[(stage, index_in_x)]`` counts how often it saw a sample."""
    real = pipeline_mod.make_stage

    def make(name, *a, **k):
        st = real(name, *a, **k)
        run = st.run

        def counted(model, xb, yb, eps):
            for row in xb:
                key = (st.name, tuple(row.tolist()))
                calls[key] = calls.get(key, 0) + 1
            return run(model, xb, yb, eps)
        st.run = counted
        return st
    monkeypatch.setattr(pipeline_mod, "make_stage", make)


def test_kill_and_resume_loses_nothing_and_recomputes_nothing(tmp_path, monkeypatch):
    net = toy_net()
    x = torch.rand(10, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y = predict(net, x)
    y[1] = (y[1] + 1) % 4
    kw = dict(stages=("ibp", "bab"), sound=False, timeout=20, batch_size=1)
    full = certify(net, x, y, EPS, out_dir=tmp_path / "ref", **kw).records

    calls = {}
    _count_calls(monkeypatch, calls)
    real_finish, k = pipeline_mod._finish, 4

    def finish_then_crash(journal, index, *a):
        real_finish(journal, index, *a)
        if len(calls) and index == k - 1:
            raise _Crash("killed")
    monkeypatch.setattr(pipeline_mod, "_finish", finish_then_crash)
    with pytest.raises(_Crash):
        certify(net, x, y, EPS, out_dir=tmp_path / "run", **kw)
    path = tmp_path / "run" / journal_name(0, 1)
    assert sorted(read_journal(path).samples) == list(range(k))
    with open(path, "ab") as f:   # killed in the middle of writing sample k's line
        f.write(b'{"index": 4, "type": "sample", "verd')
    monkeypatch.setattr(pipeline_mod, "_finish", real_finish)
    first = dict(calls)
    with pytest.warns(RuntimeWarning, match="truncated last line removed"):
        res = certify(net, x, y, EPS, out_dir=tmp_path / "run", **kw)
    assert sorted(res.computed) == list(range(k, 10))     # nothing journaled is recomputed
    assert {i: r["verdict"] for i, r in res.records.items()} == \
        {i: r["verdict"] for i, r in full.items()}
    # samples finished before the kill were seen by each stage exactly once in total
    done_rows = {tuple(x[i].tolist()) for i in range(k)}
    for (stage, row), n in calls.items():
        if row in done_rows:
            assert n == first.get((stage, row)) == 1, (stage, row, n)
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(json.loads(l) for l in lines[:-1])
    assert len(read_journal(path).samples) == 10


def test_rerun_with_other_settings_is_refused(tmp_path):
    net = toy_net()
    x = torch.rand(3, 2, dtype=torch.float64)
    y = predict(net, x)
    certify(net, x, y, EPS, stages=("crown",), out_dir=tmp_path, sound=False)
    with pytest.raises(JournalMismatch, match="eps"):
        certify(net, x, y, EPS / 2, stages=("crown",), out_dir=tmp_path, sound=False)
    res = certify(net, x, y, EPS, stages=("crown",), out_dir=tmp_path, sound=False)
    assert res.computed == [] and len(res.records) == 3


# -------------------------------------------------------------------- shards and the report

def test_shards_cover_every_sample_once_and_report_merges_them(tmp_path):
    net = toy_net()
    x = torch.rand(11, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    y = predict(net, x)
    y[[0, 5]] = (y[[0, 5]] + 1) % 4
    kw = dict(stages=("ibp", "crown"), sound=False)
    single = report([_run(net, x, y, tmp_path / "one", (0, 1), kw)])
    seen = []
    for i in range(3):
        res = certify(net, x, y, EPS, out_dir=tmp_path / "sharded", shard=(i, 3), **kw)
        assert all(k % 3 == i for k in res.records)
        seen += list(res.records)
    assert sorted(seen) == list(range(11))
    merged = report([tmp_path / "sharded"])
    assert merged["done"] == 11 and merged["missing"] == 0 and merged["num_shards"] == 3
    for key in ("counts", "clean_accuracy", "certified_accuracy"):
        assert merged[key] == single[key]
    assert merged["counts"]["misclassified"] == 2
    assert merged["clean_accuracy"] == pytest.approx(9 / 11)
    assert merged["per_stage"]["crown"]["ran"] == merged["per_stage"]["ibp"]["ran"] - \
        merged["per_stage"]["ibp"]["decided"]
    assert merged["autoattack_accuracy"] is None  # no AutoAttack stage ran

    partial = report([tmp_path / "sharded" / journal_name(0, 3)])
    assert partial["done"] == 4 and partial["missing"] == 7
    assert "MISSING" in format_table(partial)


def _run(net, x, y, out, shard, kw):
    certify(net, x, y, EPS, out_dir=out, shard=shard, **kw)
    return out


def test_report_rejects_overlapping_or_mismatched_journals(tmp_path):
    net = toy_net()
    x = torch.rand(4, 2, dtype=torch.float64)
    y = predict(net, x)
    kw = dict(stages=("crown",), sound=False)
    certify(net, x, y, EPS, out_dir=tmp_path / "a", **kw)
    certify(net, x, y, EPS, out_dir=tmp_path / "b", **kw)
    with pytest.raises(JournalError, match="appears in both"):
        report([tmp_path / "a", tmp_path / "b"])
    certify(net, x, y, EPS / 2, out_dir=tmp_path / "c", shard=(1, 2), **kw)
    with pytest.raises(JournalError, match="different runs"):
        report([tmp_path / "a", tmp_path / "c"])


def test_corrupt_journal_lines_are_reported(tmp_path):
    net = toy_net()
    x = torch.rand(4, 2, dtype=torch.float64)
    y = predict(net, x)
    certify(net, x, y, EPS, stages=("crown",), out_dir=tmp_path, sound=False)
    path = tmp_path / journal_name(0, 1)
    good = path.read_bytes()
    lines = good.split(b"\n")
    path.write_bytes(b"\n".join(lines[:3] + [b"\x00garbage{"] + lines[3:]))
    with pytest.raises(JournalError, match=rf"{journal_name(0, 1)}:4: corrupt"):
        read_journal(path)
    with pytest.raises(JournalError, match=":4: corrupt"):
        certify(net, x, y, EPS, stages=("crown",), out_dir=tmp_path, sound=False)
    bad = json.dumps({"type": "sample", "index": 0, "verdict": "robust", "time": 0.0}).encode()
    path.write_bytes(good + bad + b"\n")
    with pytest.raises(JournalError, match="verdict 'robust'"):
        read_journal(path)
    dup = json.loads(lines[2])   # the same sample again, with another verdict: a conflict
    dup["verdict"] = "attacked" if dup["verdict"] != "attacked" else "unknown"
    path.write_bytes(good + json.dumps(dup).encode() + b"\n")
    with pytest.raises(JournalError, match=rf"{journal_name(0, 1)}:7: sample index "
                                           rf"{dup['index']} appears twice with conflicting"):
        read_journal(path)
    path.write_bytes(good + b'{"type": "sam')           # truncated last line
    with pytest.warns(RuntimeWarning, match="ignored"):
        assert report([tmp_path])["done"] == 4
    assert path.read_bytes().endswith(b'"sam')          # the report does not touch the file
    with pytest.raises(JournalError, match="truncated"):
        read_journal(path, truncated="raise")
    with pytest.warns(RuntimeWarning, match="removed"):
        assert len(read_journal(path).samples) == 4
    assert path.read_bytes() == good


def test_journal_appends_whole_lines(tmp_path):
    path = tmp_path / "j.jsonl"
    with Journal(path) as j:
        j.append({"type": "meta", "eps": 0.1})
        j.append({"type": "sample", "index": 3, "verdict": "unknown", "time": 0.5})
    c = read_journal(path)
    assert c.meta["eps"] == 0.1 and c.samples[3]["verdict"] == "unknown"
    assert path.read_bytes().count(b"\n") == 2


# ------------------------------------------------------------------------------ input checks

def test_bad_arguments_name_the_argument(tmp_path):
    net = toy_net()
    x = torch.rand(3, 2, dtype=torch.float64)
    y = predict(net, x)
    with pytest.raises(ValueError, match="stages: unknown"):
        certify(net, x, y, EPS, stages=("ibpp",))
    with pytest.raises(ValueError, match="shard"):
        certify(net, x, y, EPS, stages=("crown",), shard=(3, 3))
    with pytest.raises(ValueError, match="y: expected"):
        certify(net, x, y[:2], EPS, stages=("crown",))
    with pytest.raises(ValueError, match="eps"):
        certify(net, x, y, -1.0, stages=("crown",))
    with pytest.raises(ValueError, match=r"x: expected pixels in \[0, 1\]"):
        certify(net, x + 2, y, EPS, stages=("crown",))
    with pytest.raises(ValueError, match="timeout"):
        InputSplitBaB(timeout=0)


# ---------------------------------------------------------------------------- model loading

def _digits_model():
    from adcert.models import build_model

    torch.manual_seed(0)
    return build_model("cnn3", dataset="digits").eval()


def test_load_model_formats(tmp_path):
    from adcert.train.checkpoint import FORMAT, VERSION, atomic_save

    model = _digits_model()
    x = torch.rand(2, 1, 8, 8)
    ckpt = {"format": FORMAT, "version": VERSION, "kind": "final", "epoch": 1, "config": {},
            "model_spec": {"name": "cnn3", "dataset": "digits"}, "model": model.state_dict()}
    atomic_save(ckpt, tmp_path / "final.pt")
    torch.save({"model_spec": ckpt["model_spec"], "model": model.state_dict()},
               tmp_path / "bare.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated in 2.13
        torch.jit.save(torch.jit.trace(model, x), str(tmp_path / "scripted.pt"))
    torch.save(model, tmp_path / "module.pt")
    ref = model(x)
    for name in ("final.pt", "bare.pt", "scripted.pt"):
        loaded = load_model(tmp_path / name)
        assert not loaded.training
        torch.testing.assert_close(loaded(x), ref)
    with pytest.raises(ModelFileError, match=r"module\.pt.*trust_pickle"):
        load_model(tmp_path / "module.pt")
    torch.testing.assert_close(load_model(tmp_path / "module.pt", trust_pickle=True)(x), ref)

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ModelFileError, match=r"junk\.pt"):
        load_model(tmp_path / "junk.pt")
    with pytest.raises(ModelFileError, match=r"sd\.pt: expected an adcert checkpoint"):
        load_model(tmp_path / "sd.pt")
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "absent.pt")
    raw = (tmp_path / "final.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ModelFileError, match=r"cut\.pt"):
        load_model(tmp_path / "cut.pt")


def test_corrupt_files_are_called_corrupt_and_only_pickled_modules_suggest_trust_pickle(
        tmp_path):
    """A truncated or random-bytes file used to get the advice to pass --trust-pickle (which
    would run code from it); now it is reported as corrupt, naming the file, and trust_pickle
    is suggested only for a valid torch file holding a pickled nn.Module."""
    import argparse
    import random

    model = _digits_model()
    torch.save(model, tmp_path / "module.pt")
    torch.save(model, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.save({"args": argparse.Namespace(lr=0.1)}, tmp_path / "namespace.pt")
    raw = (tmp_path / "module.pt").read_bytes()
    legacy = (tmp_path / "legacy.pt").read_bytes()
    files = {"cut.pt": raw[: len(raw) // 2], "tail.pt": raw[:-40],
             "legacy_cut.pt": legacy[:150], "junk.pt": b"not a checkpoint",
             "random.pt": random.Random(0).randbytes(4096), "empty.pt": b""}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        for trust in (False, True):  # trust_pickle never unpickles a damaged file
            with pytest.raises(ModelFileError) as info:
                load_model(tmp_path / name, trust_pickle=trust)
            msg = str(info.value)
            assert f"{tmp_path / name}: corrupt or not a checkpoint" in msg, msg
            assert "trust_pickle" not in msg and "--trust-pickle" not in msg, msg
    for name in ("module.pt", "legacy.pt"):
        with pytest.raises(ModelFileError, match=rf"{name}: holds a pickled nn.Module "
                                                 rf"\(.*Sequential\).*--trust-pickle"):
            load_model(tmp_path / name)
        x = torch.rand(2, 1, 8, 8)
        torch.testing.assert_close(load_model(tmp_path / name, trust_pickle=True)(x), model(x))
    with pytest.raises(ModelFileError, match=r"namespace\.pt: not a model.*argparse\.Namespace"
                       ) as info:
        load_model(tmp_path / "namespace.pt")
    assert "trust" not in str(info.value)


# ---------------------------------------------------------------------------------- the CLI

def test_cli_certifies_shards_and_reports(tmp_path, capsys):
    from adcert.certify.cli import main
    from adcert.train.checkpoint import FORMAT, VERSION, atomic_save

    model = _digits_model()
    atomic_save({"format": FORMAT, "version": VERSION, "kind": "final", "epoch": 1, "config": {},
                 "model_spec": {"name": "cnn3", "dataset": "digits"},
                 "model": model.state_dict()}, tmp_path / "final.pt")
    args = ["--checkpoint", str(tmp_path / "final.pt"), "--eps", "0.01", "--dataset", "digits",
            "--n", "6", "--stages", "crown", "--out", str(tmp_path / "out")]
    for i in range(2):
        assert main(args + ["--shard", f"{i}/2"]) == 0
    assert main(["report", str(tmp_path / "out"), "--json", str(tmp_path / "r.json")]) == 0
    summary = json.loads((tmp_path / "r.json").read_text())
    assert summary["done"] == 6 and summary["num_shards"] == 2
    assert sum(summary["counts"].values()) == 6
    assert "certified accuracy" in capsys.readouterr().out
    assert main(["--eps", "0.1"]) == 2                  # --checkpoint, --dataset missing
    assert "--checkpoint, --dataset required" in capsys.readouterr().err
    assert main(args[:-6] + ["--stages", "nope", "--out", str(tmp_path / "o2")]) == 2
    assert "stages: unknown" in capsys.readouterr().err


def _digits_checkpoint(path):
    from adcert.train.checkpoint import FORMAT, VERSION, atomic_save

    atomic_save({"format": FORMAT, "version": VERSION, "kind": "final", "epoch": 1, "config": {},
                 "model_spec": {"name": "cnn3", "dataset": "digits"},
                 "model": _digits_model().state_dict()}, path)
    return path


def test_cli_rejects_an_unknown_dataset_in_one_line(tmp_path, capsys):
    from adcert.certify.cli import main

    ckpt = _digits_checkpoint(tmp_path / "final.pt")
    rc = main(["--checkpoint", str(ckpt), "--eps", "0.01", "--dataset", "foo",
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        "adcert certify: --dataset: unknown dataset 'foo'; known: digits, mnist, "
        "fashion-mnist, cifar10, tinyimagenet"]


def test_cli_eps_accepts_the_config_fraction_syntax(tmp_path, capsys):
    """``--eps 1/255`` is parsed like ``train.eps=1/255`` (one shared parser)."""
    from adcert.certify.cli import main
    from adcert.train.config import load_config

    ckpt = _digits_checkpoint(tmp_path / "final.pt")
    out = tmp_path / "out"
    assert main(["--checkpoint", str(ckpt), "--eps", "1/255", "--dataset", "digits", "--n", "2",
                 "--stages", "ibp", "--out", str(out)]) == 0
    meta = read_journal(out / journal_name(0, 1)).meta
    assert meta["eps"] == 1 / 255 == load_config(None, ["train.eps=1/255"]).train.eps
    capsys.readouterr()
    for bad in ("1/0", "one", "1/255/2"):
        with pytest.raises(SystemExit) as info:
            main(["--checkpoint", str(ckpt), "--eps", bad, "--dataset", "digits"])
        assert info.value.code == 2
        assert f"argument --eps: expected a number or a fraction like 2/255, got '{bad}'" in \
            capsys.readouterr().err


def test_cli_missing_scikit_learn_is_one_line(tmp_path, capsys, monkeypatch):
    from adcert.certify.cli import main

    ckpt = _digits_checkpoint(tmp_path / "final.pt")
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes ``import sklearn...`` fail
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    rc = main(["--checkpoint", str(ckpt), "--eps", "0.01", "--dataset", "digits",
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        "adcert certify: dataset 'digits' needs scikit-learn, which is not installed: "
        "pip install scikit-learn"]


# ------------------------------------------------ the papers' pipeline by default (issue 15)

def test_defaults_are_the_papers_pipeline_and_timeouts():
    import inspect as _inspect

    from adcert.certify import DEFAULT_STAGES
    from adcert.certify.cli import add_arguments, resume_command
    import argparse

    assert DEFAULT_STAGES == ("autoattack", "ibp", "crown", "alpha-crown", "bab-relu")
    sig = _inspect.signature(certify).parameters
    assert sig["stages"].default == DEFAULT_STAGES
    assert sig["timeout"].default == 400.0 and sig["sample_timeout"].default == 1000.0
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([])
    assert args.stages == "autoattack,ibp,crown,alpha-crown,bab-relu"
    assert (args.timeout, args.sample_timeout) == (400.0, 1000.0)
    args = p.parse_args(["--sample-timeout", "0", "--timeout", "30"])
    assert (args.timeout, args.sample_timeout) == (30.0, None)     # 0: no limit
    cmd = resume_command(args)
    assert "--sample-timeout 0" in cmd and "--timeout 30.0" in cmd
    with pytest.raises(SystemExit):
        p.parse_args(["--timeout", "-1"])
    with pytest.raises(ValueError, match="sample_timeout"):
        certify(toy_net(), torch.full((1, 2), 0.5, dtype=torch.float64),
                torch.zeros(1, dtype=torch.long), EPS, stages=("ibp",), sample_timeout=0)


class _Sleep:
    """A stage that decides nothing and takes ``seconds[i]`` on the i-th sample it sees in a
    batch, reporting them as its own per-sample times when ``own``."""

    def __init__(self, name, seconds, own=True):
        self.name, self.seconds, self.own, self.limits = name, seconds, own, []

    def unavailable(self, model, x, y, eps):
        return None

    def run(self, model, x, y, eps, time_limits=None):
        import time

        from adcert.certify.stages import Outcome

        self.limits.append(time_limits)
        times = []
        for i in range(x.shape[0]):
            time.sleep(self.seconds[i])
            times.append(self.seconds[i])
        n = x.shape[0]
        return Outcome([None] * n, [None] * n, [None] * n, times if self.own else [])


def test_sample_timeout_ends_a_sample_unknown_and_caps_the_bab_search(tmp_path):
    net = toy_net()
    x, y, _ = planted(net, 3, EPS)                   # non-robust: bab decides them (attacked)
    slow = _Sleep("slow", [0.3])
    res = certify(net, x, y, EPS, stages=[slow, "bab"], out_dir=tmp_path / "a", sound=False,
                  batch_size=1, sample_timeout=0.2)
    for r in res.records.values():                   # out of time after "slow": bab never runs
        assert r["verdict"] == "unknown" and r["timed_out"] is True and r["stage"] is None
        assert set(r["stage_times"]) == {"clean", "slow"} and r["time"] >= 0.2
    summary = report([tmp_path / "a"])
    assert summary["timed_out"] == 3 and summary["sample_timeout"] == 0.2
    assert "3 unknown at the sample timeout of 0.2 s" in format_table(summary)
    # with budget left, bab gets the rest of it as its per-sample limit, and decides
    slow, probe = _Sleep("slow", [0.1] * 3), _Sleep("probe", [0.0] * 3)
    res = certify(net, x, y, EPS, stages=[slow, probe, "bab"], out_dir=tmp_path / "b",
                  sound=False, batch_size=3, sample_timeout=30, timeout=20)
    assert all(r["verdict"] == "attacked" and r["stage"] == "bab" and "timed_out" not in r
               for r in res.records.values())
    (limits,) = probe.limits
    assert len(limits) == 3 and all(30 - 1 < t <= 30 - 0.1 for t in limits)
    # a BaB stage stops at the given limit: nothing decided with (almost) no time left
    out = InputSplitBaB(sound=False, timeout=20).run(net, x, y, EPS, time_limits=[1e-9] * 3)
    assert out.verdicts == [None] * 3 and len(out.times) == 3


def test_stage_times_are_each_samples_own_and_add_up(tmp_path):
    from adcert.certify.pipeline import attribute_times

    assert attribute_times(1.0, [0.1, 0.5], 2) == pytest.approx([0.3, 0.7])  # + equal rest
    assert attribute_times(1.0, None, 4) == [0.25] * 4                        # equal split
    assert attribute_times(1.0, [1.0, 3.0], 2) == pytest.approx([0.25, 0.75])  # scaled down
    assert attribute_times(1.0, [0.1, None], 2) == [0.5, 0.5]
    net = toy_net()
    x = torch.rand(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = predict(net, x)
    own = _Sleep("own", [0.02, 0.25, 0.02, 0.25])
    shared = _Sleep("shared", [0.1, 0.1, 0.1, 0.1], own=False)
    res = certify(net, x, y, EPS, stages=[own, shared], out_dir=tmp_path, sound=False,
                  batch_size=4, sample_timeout=None)
    t = [res.records[i]["stage_times"] for i in range(4)]
    # measured per sample: the slow samples' own time, not the batch average for everyone
    assert t[1]["own"] - t[0]["own"] == pytest.approx(0.23, abs=0.05)
    assert t[3]["own"] - t[2]["own"] == pytest.approx(0.23, abs=0.05)
    assert len({r["shared"] for r in t}) == 1 and t[0]["shared"] >= 0.1   # a batch's share
    assert sum(r["shared"] for r in t) >= 0.4
    summary = report([tmp_path])
    per_stage = sum(st["time_s"] for st in summary["per_stage"].values())
    assert summary["time_s"] == pytest.approx(per_stage)
    assert summary["per_stage"]["own"]["time_s"] == pytest.approx(sum(r["own"] for r in t))
    assert res.records[0]["time"] == pytest.approx(sum(t[0].values()))
    assert "all" in format_table(summary)
