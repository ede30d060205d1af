"""``adcert quickstart`` (the README's main job) end to end at a tiny size."""
import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_quickstart_trains_teacher_then_student(tmp_path):
    out = tmp_path / "qs"
    cmd = [sys.executable, "-m", "adcert.cli", "quickstart", "--out", str(out),
           "--set", "train.epochs=2", "--set", "train.ramp_epochs=1",
           "--set", "train.lr_milestones=[]", "--set", "eval.subset=40",
           "--set", "eval.final_subset=40", "--set", "eval.pgd_steps=2"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    # the student used the teacher just trained, and both printed the three accuracies
    assert (out / "teacher" / "final.pt").is_file() and (out / "adcert" / "final.pt").is_file()
    assert res.stdout.count("test IBP-certified acc.") == 2
    records = [json.loads(line) for line in (out / "adcert" / "metrics.jsonl").read_text()
               .splitlines()]
    assert [r["epoch"] for r in records][-1] == 2


def test_quickstart_rejects_bad_override(tmp_path):
    from adcert import quickstart

    assert quickstart.main(["--out", str(tmp_path), "--set", "train.bogus=1"]) == 2
