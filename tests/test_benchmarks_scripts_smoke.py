"""Smoke tests of the stand-alone benchmark scripts in their ``--quick`` modes: each runs end to
end on CPU, exits 0 and writes what it documents. The numbers are not a measurement at these
sizes; what is checked is that the comparison paths agree (the bound benchmark's plain-torch
reference must produce the same bounds as adcert), that the radius benchmark's rows are
counted consistently and that the accuracy record has a row of valid accuracies per method."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO


def _run(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
def test_bench_bounds_quick_reference_agrees(tmp_path):
    out = tmp_path / "bounds.json"
    _run("bench_bounds.py", "--quick", "--device", "cpu", "--variants", "adcert,reference",
         "--out", str(out))
    res = json.loads(out.read_text())
    assert res["errors"] == [] and res["device"]["name"]
    methods = {r["method"] for r in res["results"]}
    assert {"ibp", "crown-ibp", "crown", "alpha-crown"} <= methods
    for row in res["results"]:
        ref = row["variants"].get("reference")
        if row["mode"] == "fwd":
            assert ref is not None, row["method"]
            assert ref["max_rel_diff"] <= 1e-3, (row["method"], ref["max_rel_diff"])
        for v in row["variants"].values():
            assert math.isfinite(v["median_ms"]) and v["median_ms"] > 0


@pytest.mark.slow
def test_bench_radius_quick_prints_every_strategy():
    proc = _run("bench_radius.py", "--quick", "--model", "cnn3")
    for name in ("ibp pass (unit)", "adcert", "naive", "bisection"):
        assert name in proc.stdout, name


@pytest.mark.slow
def test_bench_certify_small_writes_stage_rates(tmp_path):
    out = tmp_path / "certify.json"
    _run("bench_certify.py", "--batch", "2", "--repeats", "1", "--width", "4",
         "--stages", "clean,ibp", "--out", str(out))
    res = json.loads(out.read_text())
    assert [s["stage"] for s in res["stages"]] == ["clean", "ibp"]
    assert res["unavailable"] == {}
    for s in res["stages"]:
        assert s["samples_per_s"] > 0 and len(s["times_s"]) == 1


@pytest.mark.slow
def test_bench_accuracy_quick_writes_a_row_per_method(tmp_path, shared_data):
    if not (shared_data / "mnist").is_dir():
        pytest.skip(f"MNIST not found: {shared_data / 'mnist'} is absent (set ADCERT_DATA)")
    out = tmp_path / "accuracy.json"
    proc = _run("bench_accuracy.py", "--quick", "--methods", "pgd,ibp", "--data-dir",
                str(shared_data), "--work", str(tmp_path / "runs"), "--out", str(out))
    assert out.with_suffix(".png").is_file() or "plot skipped" in proc.stdout
    res = json.loads(out.read_text())
    assert res["errors"] == [] and res["device"]["name"] and res["versions"]["torch"]
    assert [r["method"] for r in res["results"]] == ["pgd", "ibp"]
    for row in res["results"]:
        for key in ("clean_acc", "pgd_acc", "cert_acc"):
            assert 0.0 <= row[key] <= 1.0, (row["method"], key, row[key])
        assert row["cert_acc"] <= row["pgd_acc"] <= row["clean_acc"], row["method"]
        assert row["train_s"] > 0 and row["eval_samples"] == res["config"]["budget"]["test_subset"]


@pytest.mark.slow
def test_bench_crown_scale_quick(tmp_path):
    out = tmp_path / "crown_scale.json"
    _run("bench_crown_scale.py", "--quick", "--no-lirpa", "--dense", "--out", str(out))
    res = json.loads(out.read_text())
    (row,) = res["results"]
    assert {"ibp", "crown", "crown-sound", "alpha-crown", "crown-dense"} <= set(row["seconds"])
    # receptive-field rows and whole-map rows give the same CROWN bounds
    assert row["max_diff"]["crown-dense"] < 1e-4
    assert row["sound_over_plain"] > 0
