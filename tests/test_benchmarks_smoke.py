"""Smoke test of the benchmark runner: ``benchmarks/run.py --quick`` runs end to end on CPU and
writes a JSON file with the documented keys and positive times (the numbers themselves are not
checked: at batch 2 and 3 repeats they are not a measurement)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO

RUNNER = REPO / "benchmarks" / "run.py"
STATS = ("median_ms", "p20_ms", "p80_ms")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_run_quick_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    proc = subprocess.run([sys.executable, str(RUNNER), "--quick", "--device", "cpu",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"run.py failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "speedup" in proc.stdout and "ratio to clean" in proc.stdout  # the printed table
    res = json.loads(out.read_text())

    for key in ("schema_version", "timestamp_utc", "device", "versions", "precision",
                "ops_backend", "config", "memory_method", "cases", "model", "errors"):
        assert key in res, key
    assert res["errors"] == []
    assert res["device"]["type"] == "cpu" and res["device"]["name"]
    assert res["device"]["torch_num_threads"] >= 1
    for key in ("python", "torch", "triton"):
        assert key in res["versions"]
    assert res["config"]["quick"] is True and res["config"]["batch"] >= 1

    names = {(c["name"], c["mode"]) for c in res["cases"]}
    assert len(names) == len(res["cases"]) >= 16  # 8 layer cases x (fwd, fwdbwd)
    for c in res["cases"]:
        assert set(c["variants"]) == {"adcert", "reference"}, c["name"]
        for v in c["variants"].values():
            for k in STATS:
                assert _positive(v[k]), (c["name"], c["mode"], k, v[k])
            assert v["p20_ms"] <= v["median_ms"] <= v["p80_ms"]
            assert isinstance(v["peak_mem_bytes"], int) and v["peak_mem_bytes"] >= 0
        assert _positive(c["speedup"])

    m = res["model"]
    assert {"clean", "ibp_adcert", "ibp_reference"} <= set(m["variants"])
    for v in m["variants"].values():
        for k in STATS:
            assert _positive(v[k]), k
        assert isinstance(v["peak_mem_bytes"], int) and v["peak_mem_bytes"] > 0
    for name in m["variants"]:
        if name != "clean":
            assert _positive(m["ratio"][name]) and _positive(m["ratio_paired"][name])
    assert m["floor"] == 2.0 and m["target"] == 2.2


@pytest.mark.slow
def test_bench_loss_fusion_quick_writes_json(tmp_path):
    """``benchmarks/bench_loss_fusion.py --quick``: fused vs unfused CROWN-IBP loss, both modes,
    positive times and memory, the side-by-side ratio, and the two loss values recorded."""
    out = tmp_path / "loss_fusion.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_loss_fusion.py"),
                           "--quick", "--device", "cpu", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    res = json.loads(out.read_text())
    for key in ("timestamp_utc", "device", "versions", "config", "memory_method", "results",
                "errors"):
        assert key in res, key
    assert res["errors"] == [] and res["config"]["quick"] is True
    assert {(r["mode"], r["batch"]) for r in res["results"]} == {("fwd", 2), ("fwdbwd", 2)}
    for r in res["results"]:
        assert set(r["variants"]) == {"unfused", "fused"}
        for v in r["variants"].values():
            for k in STATS:
                assert _positive(v[k]), (r["mode"], k, v[k])
            assert v["p20_ms"] <= v["median_ms"] <= v["p80_ms"]
            assert isinstance(v["peak_mem_bytes"], int) and v["peak_mem_bytes"] >= 0
            assert math.isfinite(v["loss"]) and v["loss"] > 0
        assert _positive(r["ratio"])


@pytest.mark.slow
def test_bench_bab_quick_writes_json(tmp_path):
    """``benchmarks/bench_bab.py --quick``: every variant runs on every selected instance, the
    counts add up, and no instance is certified by one variant and attacked by the other."""
    out = tmp_path / "bab.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_bab.py"), "--quick",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, \
        f"bench_bab.py failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    res = json.loads(out.read_text())
    n = res["config"]["instances"]
    assert n >= 1 and res["config"]["quick"] is True and res["conflicts"] == []
    assert set(res["variants"]) == {"clamp-only", "beta", "beta+warm", "beta+warm+refine",
                                    "beta+warm+recompute"}
    for v in res["variants"].values():
        assert len(v["per_instance"]) == n
        assert v["solved"] == v["certified"] + v["attacked"] and v["solved"] + v["unknown"] == n
        assert all(r["domains"] >= 1 and r["seconds"] >= 0 for r in v["per_instance"])


@pytest.mark.slow
def test_bench_bab_cnn7_quick_writes_json(tmp_path, shared_data):
    """``benchmarks/bench_bab_cnn7.py --quick``: trains a tiny CNN7 on MNIST, runs both box
    variants on what alpha-CROWN leaves open, and the verdicts never contradict."""
    out = tmp_path / "bab_cnn7.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_bab_cnn7.py"),
                           "--quick", "--data-dir", str(shared_data), "--work",
                           str(tmp_path / "work"), "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, \
        f"bench_bab_cnn7.py failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    res = json.loads(out.read_text())
    n = len(res["bab_samples"])
    assert sum(res["before_bab"].values()) == res["args"]["samples"]
    assert set(res["variants"]) == {"reuse", "refine"}
    for v in res["variants"].values():
        assert v["certified"] + v["attacked"] + v["unknown"] == n


@pytest.mark.slow
def test_bench_vs_abcrown_quick(tmp_path, shared_data):
    """``benchmarks/bench_vs_abcrown.py --quick`` with a real alpha,beta-CROWN
    (``$ADCERT_ABCROWN``; skipped without it): both verifiers decide the same samples' fates
    without contradiction and the JSON records both runs."""
    abcrown = os.environ.get("ADCERT_ABCROWN")
    if not abcrown or not os.path.isfile(abcrown):
        pytest.skip("ADCERT_ABCROWN does not point at alpha,beta-CROWN's abcrown.py")
    out = tmp_path / "vs.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_vs_abcrown.py"),
                           "--quick", "--abcrown", abcrown, "--data-dir", str(shared_data),
                           "--work", str(tmp_path / "work"), "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, \
        f"bench_vs_abcrown.py failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    res = json.loads(out.read_text())
    assert res["contradictions"] == [] and set(res["runs"]) == {"adcert", "abcrown"}
    for run in res["runs"].values():
        assert len(run["verdicts"]) == res["args"]["samples"]
