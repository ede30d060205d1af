"""Certification runs that cannot be corrupted or mixed up (issue 13): one locked writer per
journal, fingerprinted journals refused on mismatch, duplicate-but-identical records readable,
a progress bar, and Ctrl-C that keeps the journal and says how to resume."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from adcert.certify import (
    CertifyInterrupted, JournalError, JournalLock, JournalLocked, JournalMismatch, certify,
    read_journal, report,
)
from adcert.certify import pipeline as pipeline_mod
from adcert.certify.cli import main
from adcert.certify.journal import journal_name, lock_path
from test_certify import EPS, predict, toy_net

pytestmark = pytest.mark.filterwarnings("ignore:certify. sound=False:RuntimeWarning")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KW = dict(stages=("crown",), sound=False)


def _toy_data(n=6, seed=3):
    net = toy_net()
    x = torch.rand(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return net, x, predict(net, x)


def _checkpoint(path, seed=0):
    """A tiny digits cnn3 checkpoint (weights from ``seed``), as in test_certify."""
    from adcert.models import build_model
    from adcert.train.checkpoint import FORMAT, VERSION, atomic_save

    torch.manual_seed(seed)
    model = build_model("cnn3", dataset="digits").eval()
    atomic_save({"format": FORMAT, "version": VERSION, "kind": "final", "epoch": 1, "config": {},
                 "model_spec": {"name": "cnn3", "dataset": "digits"},
                 "model": model.state_dict()}, path)
    return path


def _sample_lines(path):
    return [json.loads(l) for l in path.read_bytes().split(b"\n")[:-1]
            if json.loads(l)["type"] == "sample"]


# ------------------------------------------------------------------------------------ the lock

def test_a_held_lock_refuses_a_second_writer_naming_the_pid_and_any_exit_releases_it(
        tmp_path, monkeypatch):
    net, x, y = _toy_data()
    path = tmp_path / journal_name(0, 1)
    with JournalLock(path):
        assert json.loads(lock_path(path).read_text())["pid"] == os.getpid()
        with pytest.raises(JournalLocked, match=rf"{journal_name(0, 1)} is being written by "
                                                rf"another certify process \(PID {os.getpid()}\)"):
            certify(net, x, y, EPS, out_dir=tmp_path, **KW)
    assert not path.exists() or not read_journal(path).samples   # nothing written
    assert lock_path(path).read_text() == ""                     # released and emptied

    real_finish = pipeline_mod._finish

    def crash_after_two(journal, index, *a):
        real_finish(journal, index, *a)
        if len(read_journal(path).samples) == 2:
            raise RuntimeError("simulated crash")
    monkeypatch.setattr(pipeline_mod, "_finish", crash_after_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        certify(net, x, y, EPS, out_dir=tmp_path, batch_size=1, **KW)
    monkeypatch.setattr(pipeline_mod, "_finish", real_finish)
    with JournalLock(path):    # the crash released the lock
        pass
    res = certify(net, x, y, EPS, out_dir=tmp_path, **KW)
    assert len(res.computed) == 4 and len(res.records) == 6


def test_the_lock_of_a_killed_process_is_not_stale(tmp_path):
    """A SIGKILLed holder leaves its PID in the lock file, but the kernel dropped its flock:
    the next run goes ahead."""
    net, x, y = _toy_data()
    lock = lock_path(tmp_path / journal_name(0, 1))
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, json, os, sys, time\n"
         f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.write(fd, json.dumps({'pid': os.getpid()}).encode())\n"
         "print('locked', flush=True)\n"
         "time.sleep(120)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(JournalLocked, match=rf"PID {holder.pid}\)"):
            certify(net, x, y, EPS, out_dir=tmp_path, **KW)
    finally:
        holder.kill()
        holder.wait()
    assert json.loads(lock.read_text())["pid"] == holder.pid   # a dead process's PID
    res = certify(net, x, y, EPS, out_dir=tmp_path, **KW)
    assert len(res.computed) == 6


def _env():
    """This checkout first on the path; one thread each (the test and the processes share the
    cores)."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [REPO] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))


def _wait_for(proc, predicate, what, timeout=180.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the certify process exited ({proc.returncode}) before {what}:\n{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.002)


def _holds_lock(lock, pid):
    def check():
        try:
            return json.loads(lock.read_text()).get("pid") == pid
        except (OSError, ValueError):
            return False
    return check


def test_two_certify_processes_on_one_shard_the_second_is_refused_naming_the_pid(tmp_path):
    ckpt = _checkpoint(tmp_path / "final.pt")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "adcert.cli", "certify", "--checkpoint", str(ckpt), "--eps",
           "0.01", "--dataset", "digits", "--n", "40", "--stages", "crown", "--batch-size", "4",
           "--out", str(out), "--quiet"]
    first = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(first, _holds_lock(lock_path(out / journal_name(0, 1)), first.pid),
                  "it took the journal's lock")
        first.send_signal(signal.SIGSTOP)   # it holds the lock, stopped: it cannot finish first
        second = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                                timeout=300)
        first.send_signal(signal.SIGCONT)
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip().splitlines() == [
            f"adcert certify: {out / journal_name(0, 1)} is being written by another certify "
            f"process (PID {first.pid}): one writer per journal; wait for it to finish (or stop "
            f"it), or use another --out or --shard"]
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
            first.wait()
    assert first.returncode == 0, err
    path = out / journal_name(0, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no duplicate, no truncated line
        assert sorted(read_journal(path, truncated="raise").samples) == list(range(40))
    assert len(_sample_lines(path)) == 40      # every sample written once
    assert report([out])["done"] == 40


# ----------------------------------------------------------------------------- duplicates

def test_duplicate_identical_records_are_read_once_with_a_warning(tmp_path):
    net, x, y = _toy_data()
    certify(net, x, y, EPS, out_dir=tmp_path, **KW)
    path = tmp_path / journal_name(0, 1)
    good = path.read_bytes()
    lines = good.split(b"\n")[:-1]
    samples = [l for l in lines if json.loads(l)["type"] == "sample"]
    path.write_bytes(good + b"\n".join(samples) + b"\n")   # a second writer did them all again
    with pytest.warns(RuntimeWarning, match=rf"{journal_name(0, 1)}: 6 duplicate sample "
                                            r"record\(s\) with the same verdict.*kept once"):
        summary = report([tmp_path])
    assert summary["done"] == 6 and sum(summary["counts"].values()) == 6
    with pytest.warns(RuntimeWarning, match="duplicate"):
        res = certify(net, x, y, EPS, out_dir=tmp_path, **KW)   # resuming works too
    assert res.computed == [] and len(res.records) == 6

    conflict = json.loads(samples[0])
    conflict["verdict"] = "attacked" if conflict["verdict"] != "attacked" else "unknown"
    path.write_bytes(good + json.dumps(conflict).encode() + b"\n")
    bad_line = len(lines) + 1
    with pytest.raises(JournalError, match=rf"{journal_name(0, 1)}:{bad_line}: sample index "
                                           rf"{conflict['index']} appears twice with "
                                           rf"conflicting verdicts"):
        report([tmp_path])


def test_cli_report_of_a_journal_with_identical_duplicates(tmp_path, capsys):
    net, x, y = _toy_data()
    certify(net, x, y, EPS, out_dir=tmp_path, **KW)
    path = tmp_path / journal_name(0, 1)
    path.write_bytes(path.read_bytes() + path.read_bytes().split(b"\n", 2)[2])
    with pytest.warns(RuntimeWarning, match="6 duplicate"):
        assert main(["report", str(tmp_path)]) == 0
    assert "samples 6/6" in capsys.readouterr().out


# ---------------------------------------------------------------------------- fingerprints

def test_resume_with_other_settings_is_refused_naming_what_differs(tmp_path):
    net, x, y = _toy_data()
    out = tmp_path / "cert"
    certify(net, x, y, EPS, out_dir=out, stages=("crown", "bab"), sound=False, timeout=20,
            stage_options={"bab": {"method": "ibp"}})
    kw = dict(stages=("crown", "bab"), sound=False, timeout=20,
              stage_options={"bab": {"method": "ibp"}})
    other = toy_net(seed=5)
    changes = {
        "eps 0.06; this run has eps 0.03": dict(eps=EPS / 2),
        r"model weights sha256 \w{12}; this run has model weights sha256 \w{12}":
            dict(model=other),
        r"dtype float64; this run has dtype float32": dict(model=toy_net().float()),
        r"input data sha256 \w{12}; this run has input data sha256": dict(x=x.flip(0)),
        r'stage options {"bab": {"method": "ibp"}}; this run has stage options '
        r'{"bab": {"method": "crown"}}': dict(stage_options={"bab": {"method": "crown"}}),
        r"timeout 20; this run has timeout 5": dict(timeout=5),
        r"stages clean,crown,bab; this run has stages clean,bab": dict(stages=("bab",)),
    }
    for message, change in changes.items():
        args = dict(model=net, x=x, y=y, eps=EPS, **kw)
        args.update(change)
        with pytest.raises(JournalMismatch) as info:
            certify(args.pop("model"), args.pop("x"), args.pop("y"), args.pop("eps"),
                    out_dir=out, **args)
        assert info.match(rf"^--out {out} holds a run with {message}.*: use another --out$")
    res = certify(net, x, y, EPS, out_dir=out, batch_size=2, **kw)  # batch size may change
    assert res.computed == [] and len(res.records) == 6


def test_sample_timeout_and_autoattack_settings_are_in_the_fingerprint(tmp_path):
    """Issue 15: the whole-sample time limit and AutoAttack's settings decide verdicts, so a
    resume with others is refused; per-sample stage times and the limit are journaled."""
    net, x, y = _toy_data()
    out = tmp_path / "cert"
    kw = dict(stages=("crown",), sound=False)
    certify(net, x, y, EPS, out_dir=out, sample_timeout=50, **kw)
    with pytest.raises(JournalMismatch, match=r"sample_timeout 50; this run has sample_timeout "
                                              r"60"):
        certify(net, x, y, EPS, out_dir=out, sample_timeout=60, **kw)
    contents = read_journal(out / journal_name(0, 1))
    assert contents.meta["sample_timeout"] == 50
    assert all(set(r["stage_times"]) == {"clean", "crown"} for r in contents.samples.values())
    assert certify(net, x, y, EPS, out_dir=out, sample_timeout=50, **kw).computed == []
    aa = dict(stages=("autoattack",), stage_options={"autoattack": {"steps": 2,
                                                                   "components": ["apgd-ce"]}})
    certify(net, x, y, EPS, out_dir=tmp_path / "aa", **aa)
    fp = read_journal(tmp_path / "aa" / journal_name(0, 1)).meta["fingerprint"]
    assert fp["stage_options"]["autoattack"]["steps"] == 2
    assert fp["stage_options"]["autoattack"]["target_classes"] == 3   # min(9, C - 1), C = 4
    with pytest.raises(JournalMismatch, match="stage options"):
        certify(net, x, y, EPS, out_dir=tmp_path / "aa", stages=("autoattack",),
                stage_options={"autoattack": {"steps": 3, "components": ["apgd-ce"]}})


def test_cli_resume_with_another_checkpoint_or_eps_is_refused(tmp_path, capsys):
    a = _checkpoint(tmp_path / "a.pt", seed=0)
    b = _checkpoint(tmp_path / "b.pt", seed=1)
    out = tmp_path / "cert"

    def args(ckpt, *more):
        return ["--checkpoint", str(ckpt), "--eps", "0.01", "--dataset", "digits", "--n", "4",
                "--stages", "ibp", "--out", str(out), *more]
    assert main(args(a)) == 0
    capsys.readouterr()
    assert main(args(b)) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"adcert certify: --out {out} holds a run with checkpoint {a} (sha256 "
        f"{_sha(a)[:12]}); this run has checkpoint {b} (sha256 {_sha(b)[:12]}): "
        f"use another --out"], err
    for more, what in ((["--eps", "0.02"], "eps 0.01; this run has eps 0.02"),
                       (["--n", "5"], "4 samples; this run has 5 samples"),
                       (["--dtype", "float64"], "dtype float32; this run has dtype float64")):
        assert main(args(a)[:-2] + ["--out", str(out)] + more) == 2
        assert f"holds a run with {what}: use another --out" in capsys.readouterr().err
    moved = tmp_path / "moved.pt"
    shutil.copy(a, moved)                   # the same checkpoint elsewhere: resumes
    assert main(args(moved)) == 0
    assert "0 samples processed now, 4 in the journal" in capsys.readouterr().out


def _sha(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_journal_without_fingerprint_is_resumed_with_a_warning(tmp_path):
    """A journal written before fingerprints: its header's eps, stages, ... are still checked;
    if they agree it is resumed, with a warning that the model could not be checked."""
    net, x, y = _toy_data()
    certify(net, x, y, EPS, out_dir=tmp_path, batch_size=1, **KW)
    path = tmp_path / journal_name(0, 1)
    lines = path.read_bytes().split(b"\n")
    meta = json.loads(lines[0])
    del meta["fingerprint"]
    meta.update(version=1, checkpoint="old/final.pt")
    keep = [l for l in lines[1:-1] if json.loads(l).get("index") not in (4, 5)]
    path.write_bytes(b"\n".join([json.dumps(meta).encode()] + keep) + b"\n")
    with pytest.raises(JournalMismatch, match=rf"^--out {tmp_path} holds a run with eps 0.06; "
                                              r"this run has eps 0.03: use another --out$"):
        certify(net, x, y, EPS / 2, out_dir=tmp_path, **KW)
    with pytest.warns(RuntimeWarning, match=r"older adcert, without a fingerprint.*not the "
                                            r"model \(it names checkpoint old/final.pt\)"):
        res = certify(net, x, y, EPS, out_dir=tmp_path, **KW)
    assert sorted(res.computed) == [4, 5] and len(res.records) == 6


def test_report_refuses_shards_of_different_models(tmp_path):
    net, x, y = _toy_data()
    certify(net, x, y, EPS, out_dir=tmp_path, shard=(0, 2), **KW)
    certify(toy_net(seed=5), x, y, EPS, out_dir=tmp_path, shard=(1, 2), **KW)
    with pytest.raises(JournalError, match="journals of different runs .*differ in model"):
        report([tmp_path])


# ------------------------------------------------------------------------------- progress

def test_cli_progress_bar_on_a_terminal_one_line_per_batch_otherwise_nothing_when_quiet(
        tmp_path, capsys, monkeypatch):
    ckpt = _checkpoint(tmp_path / "final.pt")

    def run(out, *more):
        assert main(["--checkpoint", str(ckpt), "--eps", "0.01", "--dataset", "digits", "--n",
                     "6", "--stages", "ibp", "--batch-size", "4", "--out", str(tmp_path / out),
                     *more]) == 0
        return capsys.readouterr().err

    lines = run("a").strip().splitlines()      # capsys: stderr is not a terminal
    assert lines == ["certify shard 0/1: 4/6 samples", "certify shard 0/1: 6/6 samples"]
    assert run("b", "--quiet") == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    err = run("c")
    assert "certify shard" not in err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    counts = read_journal(tmp_path / "c" / journal_name(0, 1)).samples.values()
    n = {v: sum(r["verdict"] == v for r in counts) for v in ("certified", "misclassified")}
    assert last.startswith("certify 0/1: 100%") and "6/6" in last, err
    assert f"certified={n['certified']}" in last and \
        f"misclassified={n['misclassified']}" in last, last
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert run("d", "--quiet") == ""


def test_progress_bar_counts_resumed_samples(tmp_path):
    import io

    net, x, y = _toy_data()
    certify(net, x, y, EPS, out_dir=tmp_path, **KW, progress=io.StringIO())
    buf = io.StringIO()
    certify(net, x, y, EPS, out_dir=tmp_path, **KW, progress=buf)
    assert "6/6" in buf.getvalue().replace("\r", "\n").strip().splitlines()[-1]


# ----------------------------------------------------------------------------- interrupts

def test_keyboard_interrupt_keeps_the_journal_and_says_how_to_resume(tmp_path, capsys,
                                                                     monkeypatch):
    from adcert.certify.stages import CleanStage

    ckpt = _checkpoint(tmp_path / "final.pt")
    out = tmp_path / "cert"
    args = ["--checkpoint", str(ckpt), "--eps", "1/255", "--dataset", "digits", "--n", "12",
            "--stages", "ibp", "--batch-size", "4", "--out", str(out)]
    real, calls = CleanStage.run, []

    def interrupted_in_the_third_batch(self, *a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *a)
    monkeypatch.setattr(CleanStage, "run", interrupted_in_the_third_batch)
    assert main(args) == 130
    err = capsys.readouterr().err
    path = out / journal_name(0, 1)
    done = read_journal(path, truncated="raise").samples
    assert sorted(done) == list(range(8))     # two whole batches; the third one dropped
    assert "Traceback" not in err
    assert f"interrupted; the journal {path} holds {len(done)} of the 12 samples" in err
    command = err.strip().splitlines()[-1].strip()
    assert err.strip().splitlines()[-2].endswith("To resume, run the same command again:")
    words = shlex.split(command)
    assert words[:2] == ["adcert", "certify"]
    assert JournalLock(path).acquire().release() is None     # released
    monkeypatch.setattr(CleanStage, "run", real)
    assert main(words[2:]) == 0                                # the printed command resumes
    assert f"{12 - len(done)} samples processed now, 12 in the journal" in \
        capsys.readouterr().out

    net, x, y = _toy_data()                                    # the API: CertifyInterrupted
    monkeypatch.setattr(CleanStage, "run", interrupted_in_the_third_batch)
    calls.clear()
    with pytest.raises(CertifyInterrupted) as info:
        certify(net, x, y, EPS, out_dir=tmp_path / "api", batch_size=2, **KW)
    assert isinstance(info.value, KeyboardInterrupt)
    assert (info.value.done, info.value.total, info.value.computed) == (4, 6, 4)
    assert len(read_journal(tmp_path / "api" / journal_name(0, 1)).samples) == 4


def test_sigint_to_a_running_certify_process(tmp_path):
    """SIGINT (Ctrl-C) to ``python -m adcert.cli certify``: exit 130, no traceback, the
    journal intact with the samples done so far, the printed command completes the rest."""
    ckpt = _checkpoint(tmp_path / "final.pt")
    out = tmp_path / "out"
    n = 100
    cmd = ["--checkpoint", str(ckpt), "--eps", "0.01", "--dataset", "digits", "--n", str(n),
           "--stages", "crown", "--batch-size", "1", "--out", str(out)]
    path = out / journal_name(0, 1)
    proc = subprocess.Popen([sys.executable, "-m", "adcert.cli", "certify"] + cmd,
                            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        # the run record is written after the start-up checks, right before the first batch
        _wait_for(proc, lambda: path.exists() and b'"type": "run"' in path.read_bytes(),
                  "it wrote its run record")
        # then step it in short slices until it has journaled a sample: it cannot finish first
        proc.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 180
        while not (path.exists() and _sample_lines(path)) and time.monotonic() < deadline:
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.003)
            proc.send_signal(signal.SIGSTOP)
        before = path.read_bytes()
        assert _sample_lines(path), "no sample journaled in time"
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        done = read_journal(path, truncated="raise").samples   # intact: whole lines only
    assert 1 <= len(done) < n
    assert path.read_bytes().startswith(before)
    tail = err.strip().splitlines()
    assert f"interrupted; the journal {path} holds {len(done)} of the {n} samples" in err
    assert tail[-2].endswith("To resume, run the same command again:")
    words = shlex.split(tail[-1])
    assert words[:2] == ["adcert", "certify"]
    again = subprocess.run([sys.executable, "-m", "adcert.cli", "certify"] + words[2:],
                           cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"{n - len(done)} samples processed now, {n} in the journal" in again.stdout
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sorted(read_journal(path, truncated="raise").samples) == list(range(n))
