"""The alpha,beta-CROWN adapter: VNNLIB specs, the results parser and status map, the stage's
wiring (through a stand-in verifier script that follows abcrown's interface: config, instance CSV,
results pickle, counterexample saver), the missing-verifier errors, and -- when the real abcrown
is installed ($ADCERT_ABCROWN) -- agreement with our own pipeline."""
from __future__ import annotations

import collections
import importlib.util
import json
import pickle
import re

import numpy as np
import pytest
import torch
import yaml

from adcert.certify import certify, read_journal, report
from adcert.certify.abcrown import (
    ENV_VAR, AbcrownError, AbcrownNotFound, AbcrownStage, abcrown_config, find_abcrown,
    vnnlib_box, load_for_abcrown, map_status, read_results, write_hooks, write_vnnlib,
)
from adcert.certify.journal import journal_name
from test_certify import EPS, grid_counterexample, in_box, planted, predict, toy_net


def parse_vnnlib(path):
    """A small independent reader of the files we write: ``(lower [n], upper [n], pairs)`` with
    ``pairs`` the ``(i, j)`` of every disjunct ``(>= Y_i Y_j)``; checks the declarations."""
    text = re.sub(r";[^\n]*", "", open(path).read())
    xs = sorted(int(k) for k in re.findall(r"\(declare-const X_(\d+) Real\)", text))
    ys = sorted(int(k) for k in re.findall(r"\(declare-const Y_(\d+) Real\)", text))
    assert xs == list(range(len(xs))) and ys == list(range(len(ys)))
    lo, hi = np.full(len(xs), -np.inf), np.full(len(xs), np.inf)
    for op, k, v in re.findall(r"\(assert \((>=|<=) X_(\d+) (\S+)\)\)", text):
        (lo if op == ">=" else hi)[int(k)] = float(v)
    body = re.search(r"\(assert \(or(.*)\)\)\s*$", text, re.S).group(1)
    clauses = re.findall(r"\(and ([^()]*\([^()]*\)[^()]*)\)", body)
    pairs = [tuple(int(a) for a in re.fullmatch(r"\s*\(>= Y_(\d+) Y_(\d+)\)\s*", c).groups())
             for c in clauses]
    return lo, hi, pairs, len(ys)


# ------------------------------------------------------------------------------ VNNLIB specs

def test_vnnlib_holds_the_clipped_box_rounded_outward_and_the_robustness_property(tmp_path):
    x = torch.tensor([[0.0, 0.3], [0.999, 0.5]], dtype=torch.float64)  # one sample, [2, 2]
    eps = 0.1
    lo, hi = vnnlib_box(x, eps)
    exact_lo = np.clip(x.reshape(-1).numpy() - eps, 0, 1)
    exact_hi = np.clip(x.reshape(-1).numpy() + eps, 0, 1)
    assert np.all(lo <= exact_lo) and np.all(hi >= exact_hi)          # contains our box
    assert np.all(lo.astype(np.float32).astype(np.float64) == lo)     # float32 values exactly
    assert np.all(hi.astype(np.float32).astype(np.float64) == hi)
    ulp = np.spacing(np.float32(1.0))
    assert np.all(exact_lo - lo <= ulp) and np.all(hi - exact_hi <= ulp)  # and barely more
    assert lo[0] == 0.0 and hi[2] == 1.0                              # clipped to [0, 1]
    write_vnnlib(tmp_path / "s.vnnlib", lo, hi, label=2, num_classes=4)
    plo, phi, pairs, ny = parse_vnnlib(tmp_path / "s.vnnlib")
    assert np.array_equal(plo, lo) and np.array_equal(phi, hi)        # round-trips exactly
    assert ny == 4 and sorted(pairs) == [(0, 2), (1, 2), (3, 2)]      # OR_{i != y} Y_i >= Y_y


def test_vnnlib_rejects_bad_boxes_and_labels(tmp_path):
    with pytest.raises(ValueError, match="lower <= upper"):
        write_vnnlib(tmp_path / "a", np.ones(3), np.zeros(3), 0, 3)
    with pytest.raises(ValueError, match="label"):
        write_vnnlib(tmp_path / "a", np.zeros(3), np.ones(3), 3, 3)


# ---------------------------------------------------------------------- results and statuses

@pytest.mark.parametrize("status, kind", [
    ("safe", "safe"), ("safe-incomplete", "safe"), ("safe-incomplete-refine", "safe"),
    ("safe (timed out)", "safe"), ("unsat", "safe"),
    ("unsafe-pgd", "unsafe"), ("unsafe-bab", "unsafe"), ("unsafe-mip", "unsafe"), ("sat", "unsafe"),
    ("unsafe-pgd (timed out)", "unsafe"),
    ("unknown", "unknown"), ("timeout", "unknown"), ("timed out", "unknown"),
])
def test_status_map(status, kind):
    assert map_status(status) == kind


def test_unrecognised_status_is_unknown_with_a_warning():
    with pytest.warns(RuntimeWarning, match="unrecognised status"):
        assert map_status("verified?") == "unknown"


def test_results_file_in_abcrown_format_is_read_in_instance_order(tmp_path):
    summary = collections.defaultdict(list, {"safe-incomplete": [0, 2], "unsafe-pgd": [1],
                                             "unknown": [3]})
    results = [["safe-incomplete", 1.5], ["unsafe-pgd", 0.25], ["safe-incomplete", 2],
               ["unknown", 30.0]]
    with open(tmp_path / "out.pkl", "wb") as f:
        pickle.dump({"summary": summary, "results": results, "bab_ret": []}, f)
    got = read_results(tmp_path / "out.pkl")
    assert got == [("safe-incomplete", 1.5), ("unsafe-pgd", 0.25), ("safe-incomplete", 2.0),
                   ("unknown", 30.0)]
    with open(tmp_path / "bad.pkl", "wb") as f:
        pickle.dump({"results": [["safe", 1.0]], "x": np.zeros(2)}, f)
    with pytest.raises(pickle.UnpicklingError, match="numpy"):
        read_results(tmp_path / "bad.pkl")                            # only plain containers
    with open(tmp_path / "odd.pkl", "wb") as f:
        pickle.dump({"results": [["safe"]]}, f)
    with pytest.raises(ValueError, match=r"results\[0\]"):
        read_results(tmp_path / "odd.pkl")


def test_config_points_abcrown_at_our_loader_specs_and_results(tmp_path):
    cfg = abcrown_config(tmp_path, tmp_path / "m.pt", tmp_path / "i.csv", (1, 8, 8), 12.5,
                         overrides={"solver": {"batch_size": 7}, "bab": {"branching": {"x": 1}}})
    assert cfg["general"]["device"] == "cpu" and cfg["general"]["csv_name"] == str(tmp_path /
                                                                                    "i.csv")
    assert cfg["model"]["input_shape"] == [-1, 1, 8, 8] and cfg["bab"]["timeout"] == 12.5
    assert "load_for_abcrown" in cfg["model"]["name"] and str(tmp_path / "m.pt") in \
        cfg["model"]["name"]
    assert cfg["solver"] == {"batch_size": 7} and cfg["bab"]["branching"] == {"x": 1}
    assert yaml.safe_load(yaml.safe_dump(cfg)) == cfg
    # abcrown eval()s the loader strings: paths with quotes survive
    odd = tmp_path / "it's \"odd\""
    cfg = abcrown_config(odd, odd / "m.pt", odd / "i.csv", (2,), 1.0)
    args = {"Customized": lambda *a, **k: (a, k)}
    (file, fn), kw = eval(cfg["model"]["name"], args)
    assert fn == "load_for_abcrown" and kw == {"path": str(odd / "m.pt"), "dtype": "float32"}
    assert file == str(odd / "adcert_abcrown_hooks.py")
    odd.mkdir()
    spec = importlib.util.spec_from_file_location("hooks", write_hooks(odd))
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)                                    # as abcrown loads it
    assert hooks.load_for_abcrown is load_for_abcrown
    (file, fn), kw = eval(cfg["attack"]["adv_saver"], args)
    assert fn == "save_counterexample" and kw["out"].startswith(str(odd))


# ------------------------------------------------------------------------ a missing verifier

def test_missing_abcrown_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(AbcrownNotFound, match=f"--abcrown PATH or the environment variable "
                                              f"{ENV_VAR}"):
        find_abcrown()
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(AbcrownNotFound, match=r"\$ADCERT_ABCROWN = .*nowhere"):
        AbcrownStage()
    with pytest.raises(AbcrownNotFound, match="--abcrown = "):
        find_abcrown(tmp_path)                                        # a folder without it
    (tmp_path / "abcrown.py").write_text("")
    assert find_abcrown(tmp_path) == (tmp_path / "abcrown.py").resolve()


def test_cli_without_abcrown_exits_2_naming_the_option_and_variable(tmp_path, monkeypatch,
                                                                     capsys):
    from adcert.certify.cli import main

    monkeypatch.delenv(ENV_VAR, raising=False)
    code = main(["--checkpoint", str(tmp_path / "none.pt"), "--eps", "0.1", "--dataset",
                 "digits", "--verifier", "abcrown", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--abcrown" in err and ENV_VAR in err
    assert not (tmp_path / "o").exists()                              # nothing done


# --------------------------------------------------------- the stage, with a stand-in script

# Follows abcrown's interface: ``--config CFG`` (YAML), a one-column instance CSV, the model from
# the config's ``Customized(file, fn, **kw)`` loader, counterexamples through ``attack.adv_saver``
# and per-instance results pickled to ``general.results_file``. What it claims per instance comes
# from $FAKE_PLAN (a JSON list: "safe", "unknown", "crash", or ["unsafe-pgd", "mid"|"adv"|"far"]).
FAKE = r'''
import functools, importlib.util, json, os, pickle, re, sys
import torch, yaml

def Customized(def_file, name, *args, **kwargs):
    spec = importlib.util.spec_from_file_location("customized", def_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return functools.partial(getattr(mod, name), *args, **kwargs)

cfg = yaml.safe_load(open(sys.argv[sys.argv.index("--config") + 1]))
g = cfg["general"]
model = eval(cfg["model"]["name"])()
saver = eval(cfg["attack"]["adv_saver"])
specs = [l.strip() for l in open(g["csv_name"]) if l.strip()]
plan = json.loads(os.environ["FAKE_PLAN"])
log, results = [], []
for k, path in enumerate(specs):
    text = open(path).read()
    lo = {int(i): float(v) for i, v in re.findall(r"\(>= X_(\d+) ([^\s)]+)\)", text)}
    hi = {int(i): float(v) for i, v in re.findall(r"\(<= X_(\d+) ([^\s)]+)\)", text)}
    lo = torch.tensor([lo[i] for i in sorted(lo)], dtype=torch.float64)
    hi = torch.tensor([hi[i] for i in sorted(hi)], dtype=torch.float64)
    shape = cfg["model"]["input_shape"][1:]
    mid = ((lo + hi) / 2).reshape([1] + shape)
    log.append({"mid": mid.reshape(-1).tolist(),
                "out": model(mid.to(next(model.parameters()).dtype)).reshape(-1).tolist()})
    what = plan[k]
    if what == "crash":
        sys.exit(1)
    if what == "hang":
        import time
        time.sleep(600)
    if isinstance(what, list):
        pt = {"mid": mid, "far": mid + 1.0,
              "adv": torch.tensor(json.loads(os.environ["FAKE_ADV"])[k]).reshape(mid.shape)}
        saver(pt[what[1]], model(pt[what[1]].to(mid.dtype)), g.get("results_file") + ".cex")
        what = what[0]
    results.append([what, 0.5 + k])
    with open(g["results_file"], "wb") as f:
        pickle.dump({"summary": {}, "results": results, "bab_ret": []}, f)
json.dump(log, open(os.path.join(os.path.dirname(g["results_file"]), "fake_log.json"), "w"))
'''


@pytest.fixture
def fake_abcrown(tmp_path, monkeypatch):
    script = tmp_path / "fake" / "abcrown.py"
    script.parent.mkdir()
    script.write_text(FAKE)
    monkeypatch.delenv(ENV_VAR, raising=False)

    def plan(items, adv=None):
        monkeypatch.setenv("FAKE_PLAN", json.dumps(items))
        monkeypatch.setenv("FAKE_ADV", json.dumps(adv or []))
    return script, plan


def test_stage_maps_statuses_and_keeps_only_verified_counterexamples(tmp_path, fake_abcrown):
    script, plan = fake_abcrown
    net = toy_net()
    x, y, adv = planted(net, 3, EPS)
    far = torch.rand(50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    far = far[((far[:, None] - x[None]).abs().amax(-1) > 3 * EPS).all(1)][:1]  # disjoint box
    x, y, adv = torch.cat([x, far]), torch.cat([y, predict(net, far)]), torch.cat([adv, far])
    plan(["safe-incomplete", ["unsafe-pgd", "adv"], ["unsafe-pgd", "mid"],
          ["unsafe-bab", "far"]], adv=adv.tolist())
    stage = AbcrownStage(script, timeout=5, workdir=tmp_path / "work")
    out = stage.run(net, x, y, EPS)
    # sample 0 "safe" -> certified; 1: a real counterexample -> attacked; 2: the box centre
    # (correctly classified) and 3: a point outside every box are rejected -> undecided
    assert out.verdicts == ["certified", "attacked", None, None]
    assert stage.last_statuses == ["safe-incomplete", "unsafe-pgd", "unsafe-pgd", "unsafe-bab"]
    assert out.extra == [{"status": s, "seconds": 0.5 + k}
                         for k, s in enumerate(stage.last_statuses)]
    assert out.adv[0] is None and out.adv[2] is None and out.adv[3] is None
    assert in_box(out.adv[1], x[1], EPS) and predict(net, out.adv[1][None])[0] != y[1]
    # the verifier saw our model (float64 here) and each sample's box centre
    run_dir = next((tmp_path / "work").iterdir())
    log = json.loads((run_dir / "fake_log.json").read_text())
    for j, rec in enumerate(log):
        mid = torch.tensor(rec["mid"], dtype=torch.float64)
        assert torch.allclose(mid, x[j], atol=1e-6)
        assert torch.allclose(torch.tensor(rec["out"], dtype=torch.float64), net(mid[None])[0],
                              atol=1e-9)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["general"]["double_fp"]


def test_a_verified_counterexample_overrides_a_safe_claim(tmp_path, fake_abcrown):
    script, plan = fake_abcrown
    net = toy_net()
    x, y, adv = planted(net, 1, EPS)
    plan([["safe", "adv"]], adv=adv.tolist())        # a (buggy) "safe" with a real counterexample
    with pytest.warns(RuntimeWarning, match="verified counterexample"):
        out = AbcrownStage(script, timeout=5).run(net, x, y, EPS)
    assert out.verdicts == ["attacked"] and predict(net, out.adv[0][None])[0] != y[0]


def test_stage_crash_is_an_error_and_running_out_of_time_is_unknown(tmp_path, fake_abcrown,
                                                                    monkeypatch):
    script, plan = fake_abcrown
    net = toy_net()
    x = torch.rand(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y = predict(net, x)
    stage = AbcrownStage(script, timeout=5)                           # temporary work folder
    plan(["safe", "crash", "safe"])      # a crash decides nothing: the batch stays undone
    with pytest.raises(AbcrownError, match="exited with status 1"):
        stage.run(net, x, y, EPS)
    plan(["hang", "safe", "safe"])       # killed at the wall-clock limit: undecided = unknown
    monkeypatch.setattr(stage, "_limit", lambda n: 4.0)
    out = stage.run(net, x, y, EPS)
    assert out.verdicts == [None] * 3 and out.extra == [{"status": None}] * 3


def test_pipeline_with_the_stage_journals_abcrown_verdicts_and_resumes(tmp_path, fake_abcrown):
    script, plan = fake_abcrown
    net = toy_net()
    xp, yp, adv = planted(net, 2, EPS)
    far = torch.rand(50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    far = far[((far[:, None] - xp[None]).abs().amax(-1) > 3 * EPS).all(1)][:1]  # disjoint box
    x = torch.cat([xp, xp[:1], far])
    y = torch.cat([yp, (yp[:1] + 1) % 4, predict(net, far)])          # sample 2 misclassified
    # the clean check runs first: only samples 0, 1 and 3 reach the verifier
    plan(["safe", ["unsafe-pgd", "adv"], "unknown"], adv=adv.tolist())
    stage = AbcrownStage(script, timeout=5, workdir=tmp_path / "work")
    res = certify(net, x, y, EPS, stages=[stage], out_dir=tmp_path / "out")
    recs = res.records
    assert [recs[i]["verdict"] for i in range(4)] == ["certified", "attacked", "misclassified",
                                                      "unknown"]
    assert [recs[i]["stage"] for i in range(4)] == ["abcrown", "abcrown", "clean", None]
    assert [recs[i].get("extra") for i in range(4)] == [
        {"abcrown": {"status": "safe", "seconds": 0.5}},
        {"abcrown": {"status": "unsafe-pgd", "seconds": 1.5}}, None,
        {"abcrown": {"status": "unknown", "seconds": 2.5}}]
    a = torch.load(tmp_path / "out" / recs[1]["adv"])
    assert in_box(a, x[1], EPS) and predict(net, a[None])[0] != y[1]
    assert all(recs[i]["stage_times"]["abcrown"] > 0 for i in (0, 1, 3))
    meta = read_journal(tmp_path / "out" / journal_name(0, 1)).meta
    assert meta["stages"] == ["clean", "abcrown"]
    summary = report([tmp_path / "out"])
    assert summary["per_stage"]["abcrown"]["decided"] == 2
    plan(["crash"] * 3)                                               # resume: nothing to do
    again = certify(net, x, y, EPS, stages=[stage], out_dir=tmp_path / "out")
    assert again.computed == [] and len(again.records) == 4


# -------------------------------------------------------------------- the real alpha,beta-CROWN

def _real_abcrown():
    try:
        return find_abcrown()
    except AbcrownNotFound as err:
        pytest.skip(f"alpha,beta-CROWN is not installed: {err}")


@pytest.mark.slow
def test_real_abcrown_agrees_with_our_pipeline(tmp_path):
    script = _real_abcrown()
    net = toy_net()
    xp, yp, _ = planted(net, 3, EPS)
    xr = torch.rand(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    x, y = torch.cat([xp, xr]), torch.cat([yp, predict(net, xr)])
    ours = certify(net, x, y, EPS, stages=("crown", "bab"), out_dir=tmp_path / "ours",
                   timeout=20, batch_size=16).records
    stage = AbcrownStage(script, timeout=20, workdir=tmp_path / "work")
    theirs = certify(net, x, y, EPS, stages=[stage], out_dir=tmp_path / "ab",
                     batch_size=16).records
    cex = grid_counterexample(net, x, y, EPS)
    decided = 0
    for i in range(len(y)):
        a, b = ours[i]["verdict"], theirs[i]["verdict"]
        assert {a, b} != {"certified", "attacked"}, (i, ours[i], theirs[i])
        if b == "certified":
            assert not cex[i], f"abcrown certified sample {i}, which the grid attacks"
        if b == "attacked":
            adv = torch.load(tmp_path / "ab" / theirs[i]["adv"])
            assert in_box(adv, x[i], EPS) and predict(net, adv[None])[0] != y[i]
        decided += b in ("certified", "attacked")
    assert decided == len(y)                                          # complete on a 2-D toy
    assert all(map_status(r["extra"]["abcrown"]["status"]) != "unknown" and
               r["extra"]["abcrown"]["seconds"] >= 0 for r in theirs.values()
               if r["verdict"] != "misclassified")
    assert {r["verdict"] for r in theirs.values()} >= {"certified", "attacked"}


@pytest.mark.slow
def test_real_abcrown_from_the_cli(tmp_path, capsys):
    _real_abcrown()
    from adcert.certify.cli import main
    from adcert.models import build_model
    from adcert.train.checkpoint import FORMAT, VERSION, atomic_save

    from adcert.data import load_dataset

    model = build_model("cnn3", dataset="digits")
    xt, yt = load_dataset("digits", "test")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):      # fit the first test digits, so the clean check passes some of them
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt[:32].float()), yt[:32]).backward()
        opt.step()
    model.eval()
    atomic_save({"format": FORMAT, "version": VERSION, "kind": "final", "epoch": 1, "config": {},
                 "model_spec": {"name": "cnn3", "dataset": "digits"},
                 "model": model.state_dict()}, tmp_path / "final.pt")
    out = tmp_path / "out"
    (tmp_path / "ab.yaml").write_text("attack:\n  pgd_order: after\n")  # attack only if needed
    code = main(["--checkpoint", str(tmp_path / "final.pt"), "--eps", "0.001", "--dataset",
                 "digits", "--n", "3", "--verifier", "abcrown", "--timeout", "20",
                 "--abcrown-config", str(tmp_path / "ab.yaml"), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    recs = read_journal(out / journal_name(0, 1)).samples
    assert len(recs) == 3
    assert all(r["stage"] in ("clean", "abcrown") for r in recs.values())
    assert read_journal(out / journal_name(0, 1)).meta["abcrown"].endswith("abcrown.py")
    assert any(r["stage"] == "abcrown" and r["verdict"] in ("certified", "attacked")
               for r in recs.values())
    assert "abcrown" in capsys.readouterr().out                       # the report's stage table


def test_pipeline_rejects_malformed_stage_objects():
    net = toy_net()
    x = torch.full((1, 2), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="stages: expected stage names or stage objects"):
        certify(net, x, predict(net, x), EPS, stages=[object()])

    class Clean:
        name = "clean"
        unavailable = run = None
    with pytest.raises(ValueError, match="stages: unknown stage"):
        certify(net, x, predict(net, x), EPS, stages=[Clean()])


def test_cli_rejects_a_bad_abcrown_config(tmp_path, fake_abcrown, capsys):
    from adcert.certify.cli import main

    script, _ = fake_abcrown
    (tmp_path / "ab.yaml").write_text("- just\n- a list\n")
    code = main(["--checkpoint", str(tmp_path / "none.pt"), "--eps", "0.1", "--dataset",
                 "digits", "--verifier", "abcrown", "--abcrown", str(script),
                 "--abcrown-config", str(tmp_path / "ab.yaml"), "--out", str(tmp_path / "o")])
    assert code == 2 and "--abcrown-config" in capsys.readouterr().err
