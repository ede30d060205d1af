"""The alpha,beta-CROWN adapter: VNNLIB specs, the results parser and status map, the stage's
wiring (through a stand-in verifier script that follows abcrown's interface: config, instance CSV,
results pickle, counterexample saver), the missing-verifier errors, and -- when the real abcrown
is installed ($ADCERT_ABCROWN) -- agreement with our own pipeline."""
from __future__ import annotations

import collections
import importlib.util
import io
import json
import pathlib
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
# from $FAKE_PLAN (a JSON list: "safe", "unknown", "crash", or ["unsafe-pgd", "mid"|"adv"|"far"]);
# $FAKE_RUNS, when set, gives each successive run (batch) its own {"plan": [...], "bab": ...}:
# "bab": "tensor" stores branch-and-bound bounds as torch tensors in the results pickle, as the
# real abcrown does; "evil" stores an object whose unpickling would create $FAKE_MARKER.
FAKE = r'''
import functools, importlib.util, json, os, pickle, re, sys
import torch, yaml

class Evil:
    def __reduce__(self):
        return (os.mkdir, (os.environ["FAKE_MARKER"],))

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
counter = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs.txt")
run_no = int(open(counter).read()) if os.path.exists(counter) else 0
open(counter, "w").write(str(run_no + 1))
this = json.loads(os.environ.get("FAKE_RUNS") or "null")
this = this[run_no] if this else {}
plan = this.get("plan") or json.loads(os.environ["FAKE_PLAN"])
bab = this.get("bab")
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
    bab_ret = ([[i, torch.tensor([-0.5, 1.25]), torch.zeros(3, 2, dtype=torch.float64).t()]
                for i in range(len(results))] if bab == "tensor" else
               [Evil()] if bab == "evil" else [])
    with open(g["results_file"], "wb") as f:
        pickle.dump({"summary": {}, "results": results, "bab_ret": bab_ret}, f)
json.dump(log, open(os.path.join(os.path.dirname(g["results_file"]), "fake_log.json"), "w"))
'''


@pytest.fixture
def fake_abcrown(tmp_path, monkeypatch):
    script = tmp_path / "fake" / "abcrown.py"
    script.parent.mkdir()
    script.write_text(FAKE)
    monkeypatch.delenv(ENV_VAR, raising=False)

    def plan(items, adv=None, runs=None):
        monkeypatch.setenv("FAKE_PLAN", json.dumps(items))
        monkeypatch.setenv("FAKE_ADV", json.dumps(adv or []))
        monkeypatch.setenv("FAKE_RUNS", json.dumps(runs) if runs else "")
        monkeypatch.setenv("FAKE_MARKER", str(tmp_path / "EXECUTED"))
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
    # the wall-clock limit leaves room for abcrown's start-up and, per sample, its pre-attack
    assert stage._limit(3) == 120 + 3 * (5 + 30)
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
    # each sample's own time: abcrown's seconds per instance (0.5, 1.5, 2.5), not a batch mean
    t = [recs[i]["stage_times"]["abcrown"] for i in (0, 1, 3)]
    assert t[0] < t[1] < t[2]
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


# ----------------------------------------------------- issue 15: abcrown after our own stages

class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.mkdir, (str(self.marker),))


def test_results_with_tensors_are_read_and_anything_else_is_refused(tmp_path):
    """abcrown's branch-and-bound pickles its bounds as torch tensors: plain tensors load (as
    CPU tensors, nothing else runs); every other global is refused, also inside a tensor's
    nested storage record."""
    from adcert.certify.abcrown import load_results

    a = torch.tensor([-0.5, 1.25], requires_grad=True)
    b = torch.arange(6, dtype=torch.float64).reshape(2, 3).t()           # not contiguous
    bab_ret = [[0, a, 3], [1, b, collections.OrderedDict(lb=torch.tensor(2))]]
    with open(tmp_path / "t.pkl", "wb") as f:
        pickle.dump({"summary": collections.defaultdict(list, {"safe": [0]}),
                     "results": [["safe", 1.5], ["unknown", 2]], "bab_ret": bab_ret}, f)
    assert read_results(tmp_path / "t.pkl") == [("safe", 1.5), ("unknown", 2.0)]
    back = load_results(tmp_path / "t.pkl")["bab_ret"]
    assert torch.equal(back[0][1], a.detach()) and not back[0][1].requires_grad
    assert torch.equal(back[1][1], b) and back[1][1].stride() == b.stride()
    assert back[1][2]["lb"].item() == 2
    marker = tmp_path / "EXECUTED"
    with open(tmp_path / "evil.pkl", "wb") as f:                      # a forbidden global
        pickle.dump({"results": [["safe", 1.0]], "bab_ret": [_Evil(marker)]}, f)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load posix\.mkdir"):
        read_results(tmp_path / "evil.pkl")
    # a tensor whose nested storage record names a forbidden global (torch's own
    # _load_from_bytes would run it: it reads that record with weights_only=False)
    buf = io.BytesIO()
    torch.save(_Evil(marker), buf, _use_new_zipfile_serialization=False)  # the legacy record
    nested = buf.getvalue()

    class FakeTensor:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2,
                    (_LoadFromBytes(nested), 0, (1,), (1,), False, collections.OrderedDict()))
    with open(tmp_path / "nested.pkl", "wb") as f:
        pickle.dump({"results": [["safe", 1.0]], "bab_ret": [FakeTensor()]}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing a tensor storage.*mkdir"):
        read_results(tmp_path / "nested.pkl")
    assert not marker.exists()                                        # nothing ran
    with open(tmp_path / "old.pkl", "wb") as f:                       # older abcrown versions
        pickle.dump({"results": ["safe", "unknown"], "time": [1.0, 2.0]}, f)
    assert read_results(tmp_path / "old.pkl") == [("safe", 1.0), ("unknown", 2.0)]


class _LoadFromBytes:
    """Pickles as ``torch.storage._load_from_bytes(data)``, as a tensor's storage does."""

    def __init__(self, data):
        self.data = data

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.data,))


def test_a_batch_with_unreadable_results_is_recorded_per_sample_and_the_run_goes_on(
        tmp_path, fake_abcrown):
    script, plan = fake_abcrown
    net = toy_net()
    x = torch.rand(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y = predict(net, x)
    # batch 1: abcrown's BaB bounds as tensors (readable); batch 2: a forbidden object in the
    # results file; batch 3: abcrown crashes (after a batch has run: recorded, not raised)
    plan([], runs=[{"plan": ["safe"], "bab": "tensor"}, {"plan": ["safe"], "bab": "evil"},
                   {"plan": ["crash"]}])
    stage = AbcrownStage(script, timeout=5, workdir=tmp_path / "work")
    with pytest.warns(RuntimeWarning, match="batch of 1 samples failed"):
        res = certify(net, x, y, EPS, stages=[stage], out_dir=tmp_path / "out", batch_size=1)
    recs = res.records
    assert [recs[i]["verdict"] for i in range(3)] == ["certified", "unknown", "unknown"]
    assert recs[0]["extra"] == {"abcrown": {"status": "safe", "seconds": 0.5}}
    err = recs[1]["extra"]["abcrown"]
    assert err["status"] is None and "refusing to load posix.mkdir" in err["error"]
    assert "exited with status 1" in recs[2]["extra"]["abcrown"]["error"]
    assert not (tmp_path / "EXECUTED").exists()
    assert len(read_journal(tmp_path / "out" / journal_name(0, 1)).samples) == 3


def test_abcrown_is_a_stage_after_ours_deciding_only_what_they_left(tmp_path, fake_abcrown,
                                                                     monkeypatch):
    script, plan = fake_abcrown
    net = toy_net()
    xp, yp, _ = planted(net, 2, EPS)                         # never certified by IBP
    xr = torch.rand(30, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x, y = torch.cat([xp, xr]), torch.cat([yp, predict(net, xr)])
    eps = EPS / 4
    plan(["unknown"] * len(y))
    monkeypatch.setenv(ENV_VAR, str(script))                  # found by name
    res = certify(net, x, y, eps, stages=("ibp", "abcrown"), out_dir=tmp_path / "out",
                  stage_options={"abcrown": {"workdir": str(tmp_path / "work")}})
    recs = res.records
    by_ibp = [i for i, r in recs.items() if r["stage"] == "ibp"]
    left = [i for i, r in recs.items() if r["stage"] != "clean" and r["stage"] != "ibp"]
    assert by_ibp and left and {0, 1} <= set(left)
    assert all("abcrown" not in recs[i]["stage_times"] for i in by_ibp)
    assert all(recs[i]["extra"]["abcrown"]["status"] == "unknown" for i in left)
    seen = json.loads(next((tmp_path / "work").iterdir()).joinpath("fake_log.json").read_text())
    assert len(seen) == len(left)                            # abcrown saw only those
    for rec, i in zip(seen, sorted(left)):
        assert torch.allclose(torch.tensor(rec["mid"], dtype=torch.float64), x[i], atol=1e-6)
    meta = read_journal(tmp_path / "out" / journal_name(0, 1)).meta
    assert meta["stages"] == ["clean", "ibp", "abcrown"]
    assert meta["fingerprint"]["stage_options"]["abcrown"]["timeout"] == 400.0
    monkeypatch.delenv(ENV_VAR)
    with pytest.raises(AbcrownNotFound):                      # before any file is written
        certify(net, x, y, eps, stages=("ibp", "abcrown"), out_dir=tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_cli_appends_abcrown_to_our_stages_and_verifier_abcrown_is_an_alias(
        tmp_path, fake_abcrown, capsys):
    from adcert.certify.cli import main
    from test_certify import _digits_checkpoint

    script, plan = fake_abcrown
    plan(["safe"] * 8)
    ckpt = _digits_checkpoint(tmp_path / "final.pt")
    base = ["--checkpoint", str(ckpt), "--eps", "0.01", "--dataset", "digits", "--n", "6",
            "--abcrown", str(script), "--sample-timeout", "0"]
    assert main(base + ["--stages", "ibp,abcrown", "--out", str(tmp_path / "a")]) == 0
    j = read_journal(tmp_path / "a" / journal_name(0, 1))
    assert j.meta["stages"] == ["clean", "ibp", "abcrown"]
    assert j.meta["abcrown"] == str(script.resolve())
    assert all(r["stage"] in ("clean", "ibp", "abcrown") for r in j.samples.values())
    assert all(r["verdict"] == "certified" for r in j.samples.values()
               if r["stage"] == "abcrown")
    assert main(base + ["--verifier", "abcrown", "--out", str(tmp_path / "b")]) == 0
    assert read_journal(tmp_path / "b" / journal_name(0, 1)).meta["stages"] == ["clean",
                                                                                "abcrown"]
    assert "abcrown" in capsys.readouterr().out


def test_launcher_stubs_the_imports_abcrown_needs_only_for_unused_features(tmp_path):
    """abcrown imports onnx2pytorch (and the ONNX tool chain) and gurobipy at start-up; the
    launcher puts stubs in place of the missing ones, so its start-up gets past them, and any
    call into one names the module to install."""
    import importlib.util
    import subprocess
    import sys

    missing = [m for m in ("onnx2pytorch", "onnx", "onnxruntime", "skl2onnx", "gurobipy")
               if importlib.util.find_spec(m) is None]
    if "gurobipy" not in missing or "onnx2pytorch" not in missing:
        pytest.skip("gurobipy / onnx2pytorch are installed here: nothing to stub")
    script = tmp_path / "abcrown.py"
    script.write_text(
        "import gurobipy as grb\n"
        "import onnx2pytorch\n"
        "from skl2onnx.helpers.onnx_helper import select_model_inputs_outputs\n"
        "STATUS = {grb.GRB.OPTIMAL: 'optimal'}\n"                    # module-level use
        "class Net(onnx2pytorch.ConvertModel): pass\n"
        "try:\n"
        "    grb.Model()\n"
        "except RuntimeError as err:\n"
        "    print('CALLED:', err)\n")
    out = subprocess.run([sys.executable, "-m", "adcert.certify.abcrown", str(script)],
                         capture_output=True, text=True, timeout=120,
                         cwd=str(pathlib.Path(__file__).resolve().parents[1]))
    assert out.returncode == 0, out.stderr
    assert "CALLED: gurobipy.Model was called, but gurobipy is not installed" in out.stdout
