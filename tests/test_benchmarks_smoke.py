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
