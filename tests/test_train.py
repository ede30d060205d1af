"""The trainer: schedules, BN statistics, exact resume, checkpoints, the metrics log, and a short
IBP run on MNIST that must certify far above chance."""
from __future__ import annotations

import json
import os
import pathlib
import re

import pytest
import torch
import torch.nn.functional as F

from adcert.methods import Method, MethodOutput, register
from adcert.train import Trainer, from_dict
from adcert.train import checkpoint as ckpt_mod
from adcert.train.bn import global_batch_stats, population_stats, update_running_stats
from adcert.train.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from adcert.train.schedules import coef_at, eps_at, smooth_ramp
from adcert.train.trainer import RECORD_FIELDS

from conftest import REPO

DATA = pathlib.Path(os.environ.get("ADCERT_DATA", REPO.parent / "shared" / "data"))


@register
class _NoisyCE(Method):
    """Test method: CE on a randomly perturbed input (uses the global RNG, so resume must restore
    it) plus nothing else; reports ``noise`` in its logs."""
    name = "test-noisy-ce"

    def __init__(self, scale: float = 0.05):
        self.scale = scale

    def loss(self, model, x, y, state):
        noise = (torch.rand_like(x) * 2 - 1) * self.scale * state.coef
        logits = model((x + noise).clamp(0, 1))
        return MethodOutput(F.cross_entropy(logits, y), logits.detach(), None,
                            {"noise": noise.abs().mean()})


def _cfg(tmp_path, **over):
    base = {"seed": 1, "output_dir": str(tmp_path), "device": "cpu",
            "data": {"dataset": "digits", "batch_size": 32, "train_subset": 256,
                     "test_subset": 64},
            "model": {"name": "cnn3", "kwargs": {"width": 4, "linear_size": 16}},
            "method": {"name": "test-noisy-ce"},
            "train": {"epochs": 3, "lr": 1e-3, "lr_milestones": [2], "eps": 0.1,
                      "clean_epochs": 1, "ramp_epochs": 1, "l1": 1e-5, "threads": 1},
            "swa": {"enabled": True, "start_epoch": 1},
            "eval": {"subset": 32, "pgd_steps": 2},
            "log": {"progress": False}}
    for key, value in over.items():
        sec, name = key.split("__")
        base[sec] = {**base[sec], name: value}
    return from_dict(base)


# -- schedules ----------------------------------------------------------------------------------
def test_eps_schedule_shape():
    ts = [i / 100 for i in range(101)]
    s = [smooth_ramp(t) for t in ts]
    assert s[0] == 0 and s[-1] == pytest.approx(1.0)
    assert all(b >= a for a, b in zip(s, s[1:]))                 # monotone
    assert smooth_ramp(0.1) == pytest.approx(smooth_ramp(0.2) / 16)   # power 4 before mid
    d = [b - a for a, b in zip(s[30:], s[31:])]
    assert max(d) - min(d) < 1e-9                                  # linear after mid
    assert eps_at(9, clean=10, ramp=20, eps=0.3) == 0.0           # clean steps
    assert eps_at(30, clean=10, ramp=20, eps=0.3) == pytest.approx(0.3)
    assert eps_at(10, clean=10, ramp=0, eps=0.3) == pytest.approx(0.3)
    assert coef_at("eps", 15, 10, 20, 0.03, 0.3) == pytest.approx(0.1)
    assert coef_at("linear", 15, 10, 20, 0.03, 0.3) == pytest.approx(0.25)
    assert coef_at("none", 0, 10, 20, 0.0, 0.3) == 1.0


# -- batch-norm statistics ----------------------------------------------------------------------
def test_global_stats_match_plain_batch_norm():
    from adcert.models import cnn3

    model = cnn3(1, 10, 8, width=4, linear_size=16)
    ref = cnn3(1, 10, 8, width=4, linear_size=16)
    ref.load_state_dict(model.state_dict())
    x = torch.rand(12, 1, 8, 8)
    model.train(), ref.train()
    stats, counts = global_batch_stats(model, x)
    update_running_stats(stats, counts)
    ref(x)  # plain PyTorch training-mode forward updates the running statistics
    for (name, a), b in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_population_stats_is_the_cumulative_average():
    from adcert.models import cnn3

    model = cnn3(1, 10, 8, width=4, linear_size=16)
    xs = [torch.rand(8, 1, 8, 8) for _ in range(3)]
    population_stats(model, xs)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    # reference: the per-batch means of the first BN input, averaged
    pre = torch.nn.Sequential(*list(model.children())[:2])
    means = torch.stack([pre(x).mean(dim=(0, 2, 3)) for x in xs]).mean(0)
    torch.testing.assert_close(bn.running_mean, means, rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 3


# -- exact resume -------------------------------------------------------------------------------
class _Kill(Exception):
    pass


class _KillAt:
    def __init__(self, step):
        self.step = step

    def on_step(self, trainer, step):
        if step == self.step:
            raise _Kill()


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("accum", [1, 2])
def test_kill_and_resume_is_bit_identical(tmp_path, accum):
    full = Trainer(_cfg(tmp_path / "full", train__grad_accum=accum))
    full.fit()
    steps = full.steps_per_epoch
    # killed in the middle of epoch 2 (after the epoch-1 checkpoint), then resumed
    part = Trainer(_cfg(tmp_path / "part", train__grad_accum=accum), [_KillAt(steps + 3)])
    with pytest.raises(_Kill):
        part.fit()
    assert load_checkpoint(tmp_path / "part" / "last.pt")["epoch"] == 1
    cfg = _cfg(tmp_path / "part", train__grad_accum=accum)
    cfg.resume = True
    resumed = Trainer(cfg)
    assert resumed.epoch == 1 and resumed.step == steps
    resumed.fit()
    a, b = _weights(full.model), _weights(resumed.model)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for k, v in _weights(full.swa).items():
        assert torch.equal(v, _weights(resumed.swa)[k]), k
    assert full.opt.state_dict()["state"][0]["step"] == resumed.opt.state_dict()["state"][0]["step"]
    # the metrics log has one record per epoch and the final one, no duplicates after resume
    recs = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2, 3, 3] and recs[-1]["final"] is True


def test_resume_refuses_a_different_config(tmp_path):
    Trainer(_cfg(tmp_path, train__epochs=1)).fit()
    cfg = _cfg(tmp_path, train__epochs=1, train__lr=2e-3)
    cfg.resume = True
    with pytest.raises(ValueError, match=r"^train\.lr: differs"):
        Trainer(cfg)


# -- log and checkpoints ------------------------------------------------------------------------
def test_metrics_log_fields_and_final_model(tmp_path):
    trainer = Trainer(_cfg(tmp_path, train__epochs=2, train__lr_milestones=[1], swa__start_epoch=0))
    record = trainer.fit()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert len(recs) == 3
    for r in recs[:2]:
        assert set(RECORD_FIELDS) <= set(r), set(RECORD_FIELDS) - set(r)
        assert 0 <= r["clean_acc"] <= 1 and 0 <= r["cert_acc"] <= r["pgd_acc"] <= r["clean_acc"]
        assert 0 <= r["unstable_relu"] <= 1 and r["epoch_time"] > 0
        assert "noise" in r  # the method's own logs, averaged over the epoch
    # eps (of the epoch's last step): 0 in the clean epoch, near the target at the ramp's end
    assert recs[0]["eps"] == 0.0 and 0.05 < recs[1]["eps"] < 0.1
    # milestone 1: the rate is decayed after the first epoch
    assert recs[0]["lr"] == pytest.approx(1e-3) and recs[1]["lr"] == pytest.approx(2e-4)
    assert recs[-1]["final"] and recs[-1]["clean_acc"] == record["clean_acc"]
    model = model_from_checkpoint(tmp_path / "final.pt")
    assert not model.training
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trainer.final(x), rtol=0, atol=0)
    # the final model is the SWA average, not the last weights
    last = load_checkpoint(tmp_path / "last.pt")["model"]
    key = next(k for k in last if k.endswith("weight"))
    assert not torch.equal(last[key], model.state_dict()[key])


def test_corrupt_checkpoint_names_the_file(tmp_path):
    Trainer(_cfg(tmp_path, train__epochs=1)).fit()
    path = tmp_path / "last.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)
    cfg = _cfg(tmp_path, train__epochs=1)
    cfg.resume = True
    with pytest.raises(CheckpointError, match="corrupt"):
        Trainer(cfg)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)
    torch.save({"some": "dict"}, path)
    with pytest.raises(CheckpointError, match="not an adcert checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="file not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    ckpt_mod.atomic_save({"format": ckpt_mod.FORMAT, "v": 1}, path)
    before = path.read_bytes()

    def dying_save(obj, f):
        f.write(b"partial garbage")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ckpt_mod, "_save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt_mod.atomic_save({"format": ckpt_mod.FORMAT, "v": 2}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]  # no temp file left


# -- the run directory: one run per directory, clean metrics logs ------------------------------
def _epochs(path):
    recs = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    return [r["epoch"] for r in recs], recs


def _resume_cfg(path, **over):
    cfg = _cfg(path, **over)
    cfg.resume = True
    return cfg


def test_kill_during_the_first_checkpoint_write_then_resume_logs_each_epoch_once(tmp_path,
                                                                              monkeypatch):
    """SIGKILL while epoch 1's last.pt is written: the epoch's record is in the log, there is no
    checkpoint, the temporary file stays behind. The resume starts over with a clean log (it
    used to give epochs [1, 1, 2, 3, 3]) and removes the orphan."""
    from adcert.train import trainer as trainer_mod

    def killed_save(obj, path):  # atomic_save up to the kill: the temporary file, no rename
        path = pathlib.Path(path)
        fd, _ = ckpt_mod.tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                          dir=path.parent)
        os.write(fd, b"partial checkpoint")
        os.close(fd)
        raise _Kill()

    monkeypatch.setattr(trainer_mod, "atomic_save", killed_save)
    with pytest.raises(_Kill):
        Trainer(_cfg(tmp_path)).fit()
    monkeypatch.undo()
    assert not (tmp_path / "last.pt").exists() and _epochs(tmp_path)[0] == [1]
    assert len(list(tmp_path.glob(".last.pt.*.tmp"))) == 1
    resumed = Trainer(_resume_cfg(tmp_path))
    assert resumed.epoch == 0
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "metrics.jsonl").exists()
    resumed.fit()
    epochs, recs = _epochs(tmp_path)
    assert epochs == [1, 2, 3, 3] and recs[-1]["final"] is True
    # the same run uninterrupted logs the same epochs
    Trainer(_cfg(tmp_path / "full")).fit()
    assert _epochs(tmp_path / "full")[0] == epochs


def test_fresh_start_in_a_used_directory_is_refused_and_overwrite_replaces_it(tmp_path):
    from adcert.train import ConfigError
    from adcert.train.config import validate

    Trainer(_cfg(tmp_path, train__epochs=1)).fit()
    log = (tmp_path / "metrics.jsonl").read_bytes()
    last = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(ConfigError, match=r"^output_dir: .* already holds a run \(metrics\.jsonl, "
                                          r"last\.pt, final\.pt\); continue it with --resume.*"
                                          r"--overwrite"):
        Trainer(_cfg(tmp_path, train__epochs=1))
    assert (tmp_path / "metrics.jsonl").read_bytes() == log                # nothing touched
    assert (tmp_path / "last.pt").read_bytes() == last
    (tmp_path / "last.pt").unlink()                                        # the log alone is a run
    (tmp_path / "final.pt").unlink()
    with pytest.raises(ConfigError, match=r"already holds a run \(metrics\.jsonl\)"):
        Trainer(_cfg(tmp_path, train__epochs=2))
    (tmp_path / "notes.txt").write_text("not the run's")
    cfg = _cfg(tmp_path, train__epochs=2)
    cfg.overwrite = True
    trainer = Trainer(cfg)
    assert not (tmp_path / "metrics.jsonl").exists()
    trainer.fit()
    assert _epochs(tmp_path)[0] == [1, 2, 2]
    assert (tmp_path / "notes.txt").read_text() == "not the run's"
    cfg.resume = True                                                      # both: refused
    with pytest.raises(ConfigError, match=r"^overwrite: expected false with resume: true"):
        validate(cfg)


def test_train_cli_refuses_a_used_directory_and_overwrites_on_request(tmp_path, capsys):
    import yaml

    from adcert.cli import main

    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_cfg(out, train__epochs=1, eval__final_subset=16,
                                          swa__enabled=False).to_dict()))
    assert main(["train", "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"adcert train: output_dir: {out} already holds a run" in err and "--overwrite" in err
    assert main(["train", "--config", str(config), "--overwrite"]) == 0
    assert _epochs(out)[0] == [1, 1]
    with pytest.raises(SystemExit):  # argparse: not allowed with each other
        main(["train", "--config", str(config), "--overwrite", "--resume"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_truncated_last_metrics_line_is_dropped_with_a_warning(tmp_path):
    part = Trainer(_cfg(tmp_path), [_KillAt(8 + 3)])                    # in epoch 2
    assert part.steps_per_epoch == 8
    with pytest.raises(_Kill):
        part.fit()
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:  # killed while writing epoch 2's record
        f.write('{"epoch": 2, "step": 16, "eps": 0.0')
    with pytest.warns(RuntimeWarning, match=re.escape(f"metrics log {path}:2: truncated last "
                                                      f"line removed")):
        resumed = Trainer(_resume_cfg(tmp_path))
    assert _epochs(tmp_path)[0] == [1]
    resumed.fit()
    assert _epochs(tmp_path)[0] == [1, 2, 3, 3]


def test_corrupt_metrics_line_before_the_last_is_an_error(tmp_path):
    from adcert.cli import main
    from adcert.train import MetricsLogError, read_metrics

    Trainer(_cfg(tmp_path, train__epochs=1)).fit()
    path = tmp_path / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("".join(x + "\n" for x in [lines[0][:20]] + lines[1:]))
    with pytest.raises(MetricsLogError, match=re.escape(f"metrics log {path}:1: corrupt line")):
        Trainer(_resume_cfg(tmp_path, train__epochs=1))
    path.write_text("".join(x + "\n" for x in [lines[0], "[1, 2]"]))
    with pytest.raises(MetricsLogError, match=re.escape(f"{path}:2: not a metrics record")):
        read_metrics(path)
    assert path.read_text().count("\n") == 2                               # left as it was


def test_orphaned_temporary_checkpoints_are_removed_at_start(tmp_path):
    orphans = [tmp_path / ".last.pt.k3j_x9.tmp", tmp_path / ".final.pt.a81bq2.tmp",
               tmp_path / ".metrics.jsonl.tmp"]
    for p in orphans:
        p.write_bytes(b"a killed write")
    other = tmp_path / ".other.pt.abc.tmp"
    other.write_bytes(b"not ours")
    Trainer(_cfg(tmp_path, train__epochs=1))                             # orphans alone: no run
    assert not any(p.exists() for p in orphans) and other.exists()


def test_a_copied_run_directory_resumes(tmp_path):
    import shutil

    part = Trainer(_cfg(tmp_path / "a"), [_KillAt(8 + 3)])
    with pytest.raises(_Kill):
        part.fit()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    resumed = Trainer(_resume_cfg(tmp_path / "b"))                     # output_dir differs
    assert resumed.epoch == 1
    resumed.fit()
    assert _epochs(tmp_path / "b")[0] == [1, 2, 3, 3]
    assert _epochs(tmp_path / "a")[0] == [1]                            # the original untouched
    with pytest.raises(ValueError, match=r"^train\.lr: differs"):        # the rest still counts
        Trainer(_resume_cfg(tmp_path / "a", train__lr=2e-3))


# -- a real run ---------------------------------------------------------------------------------
@pytest.mark.skipif(not (DATA / "mnist").is_dir(),
                    reason=f"MNIST not found under {DATA} (set ADCERT_DATA)")
def test_short_ibp_run_on_mnist_certifies(tmp_path):
    # CTBench trains MNIST 0.1 at a larger eps than it tests (Table 3: 0.2); 0.15 here
    cfg = from_dict({
        "seed": 0, "output_dir": str(tmp_path), "device": "cpu",
        "data": {"dataset": "mnist", "data_dir": str(DATA), "batch_size": 50,
                 "train_subset": 2000, "test_subset": 200},
        "model": {"name": "cnn3", "kwargs": {"width": 8, "linear_size": 64}},
        "method": {"name": "ibp"},
        "train": {"epochs": 10, "lr": 5e-3, "eps": 0.15, "clean_epochs": 1, "ramp_epochs": 6,
                  "threads": 1},
        "eval": {"eps": 0.1, "subset": 100, "pgd_steps": 5, "every": 10},
        "log": {"progress": False}})
    record = Trainer(cfg).fit()
    assert record["eval_samples"] == 200
    assert record["cert_acc"] > 0.4, record      # chance is 0.1 (about 0.53 on CPU, seed 0)
    assert record["clean_acc"] >= record["pgd_acc"] >= record["cert_acc"]


# -- per-sample method state: dataset indices and ACERT's warm-start cache ----------------------
@register
class _IndexRecorder(Method):
    """Test method: plain CE that records the ``state.index`` of every call."""
    name = "test-index-recorder"
    seen = []

    def loss(self, model, x, y, state):
        _IndexRecorder.seen.append((state.epoch, state.index, y))
        logits = model(x)
        return MethodOutput(F.cross_entropy(logits, y), logits.detach(), None, {})


def test_trainer_passes_dataset_indices_per_micro_batch(tmp_path):
    _IndexRecorder.seen = []
    trainer = Trainer(_cfg(tmp_path, method__name="test-index-recorder", train__epochs=1,
                           train__grad_accum=2, swa__enabled=False))
    trainer.fit()
    assert len(_IndexRecorder.seen) == 2 * trainer.steps_per_epoch
    idx = torch.cat([i for _, i, _ in _IndexRecorder.seen])
    assert idx.dtype == torch.int64 and len(idx) == len(idx.unique()) == 256
    assert torch.equal(idx, trainer.batches.indices(0))          # the epoch's permutation
    ys = torch.cat([y for _, _, y in _IndexRecorder.seen])
    assert torch.equal(ys, trainer.y_train[idx])                  # index i is sample i


def _acert_cfg(path, **over):
    over.setdefault("method__hparams", {"warm_start": True})
    return _cfg(path, method__name="acert", train__clean_epochs=0, train__ramp_epochs=1,
                swa__enabled=False, **over)


def test_acert_kill_and_resume_restores_the_radius_cache(tmp_path):
    full = Trainer(_acert_cfg(tmp_path / "full"))
    full.fit()
    steps = full.steps_per_epoch
    part = Trainer(_acert_cfg(tmp_path / "part"), [_KillAt(steps + 3)])
    with pytest.raises(_Kill):
        part.fit()
    saved = load_checkpoint(tmp_path / "part" / "last.pt")["method"][0]["radius_cache"]["frac"]
    # epoch 1's radii: every sample but the first batch's (its step runs at eps_t = 0)
    assert saved is not None and int((~torch.isnan(saved)).sum()) == 256 - 32
    cfg = _acert_cfg(tmp_path / "part")
    cfg.resume = True
    resumed = Trainer(cfg)
    torch.testing.assert_close(resumed.method.cache.frac, saved, rtol=0, atol=0, equal_nan=True)
    resumed.fit()
    a, b = _weights(full.model), _weights(resumed.model)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    torch.testing.assert_close(full.method.cache.frac, resumed.method.cache.frac, rtol=0, atol=0,
                               equal_nan=True)


def test_acert_second_epoch_searches_start_warm(tmp_path):
    """After training every sample has a cached radius, and a search of the next epoch's first
    batch started from the cache costs fewer Brent iterations than a cold one, same radii."""
    from adcert.methods.base import StepState

    hp = {"maxiter": 30, "xtol": 1e-5, "certified_only": True, "reg_lambda": 0.0,
          "warm_start": True}
    trainer = Trainer(_acert_cfg(tmp_path, train__epochs=3, method__hparams=hp,
                                 train__lr=5e-3, train__eps=0.03))
    trainer.fit()
    method, model = trainer.method, trainer.model
    frac = method.cache.frac
    assert int((~torch.isnan(frac)).sum()) == 256 and bool(((frac >= 0) & (frac <= 1)).all())
    xb, yb, ib = next(iter(trainer.batches.epoch(3, with_index=True)))
    model.eval()
    state = StepState(eps=0.03, eps_target=0.03)
    with torch.no_grad():
        logits = model(xb)
        cold_r, cold_it = method.radii(model, xb, yb, logits, state)
        warm_r, warm_it = method.radii(model, xb, yb, logits, state, ib)
    inner = (cold_r > 0) & (cold_r < 0.03)
    assert int(inner.sum()) >= 8, "the test needs samples with an interior radius"
    assert float((warm_r - cold_r).abs().max()) <= 2e-5
    assert float(warm_it[inner].double().mean()) < float(cold_it[inner].double().mean())


# -- SWA that never averaged, per-step learning-rate schedules ----------------------------------
def test_swa_without_an_average_finishes_with_the_trained_model(tmp_path):
    """A run shorter than ``swa.start_epoch`` takes no average: ``final.pt`` is the trained
    model (population BN statistics), not the SWA copy of the initial weights."""
    trainer = Trainer(_cfg(tmp_path, train__epochs=2, swa__start_epoch=5))
    initial = _weights(trainer.model)
    record = trainer.fit()
    assert int(trainer.swa.n_averaged) == 0 and not trainer.swa_used
    assert record["swa_averaged"] == 0
    final = model_from_checkpoint(tmp_path / "final.pt").state_dict()
    trained = _weights(trainer.model)
    weights = [k for k in trained if k.endswith("weight")]
    assert weights and all(torch.equal(final[k], trained[k]) for k in weights)
    assert not all(torch.equal(final[k], initial[k]) for k in weights)
    # with an average taken (start_epoch within the run) the final model is the average
    avg = Trainer(_cfg(tmp_path / "avg", train__epochs=2, swa__start_epoch=1))
    avg.fit()
    assert int(avg.swa.n_averaged) == 1 and avg.swa_used
    final = model_from_checkpoint(tmp_path / "avg" / "final.pt").state_dict()
    swa = avg.swa.module.state_dict()
    assert all(torch.equal(final[k], swa[k]) for k in weights)


_SCHEDULES = {
    "onecycle": {"lr_schedule": "onecycle", "max_lr": 2e-3, "lr_milestones": []},
    "cyclic": {"lr_schedule": "cyclic", "max_lr": 0.05, "lr_milestones": [],
               "optimizer": "sgd"},
}


def _sched_cfg(path, kind, **over):
    cfg = _cfg(path, **over)
    for k, v in _SCHEDULES[kind].items():
        setattr(cfg.train, k, v)
    return cfg


@pytest.mark.parametrize("kind", sorted(_SCHEDULES))
def test_per_step_schedule_kill_and_resume_is_bit_identical(tmp_path, kind):
    full = Trainer(_sched_cfg(tmp_path / "full", kind))
    assert full.sched_per_step
    full.fit()
    steps = full.steps_per_epoch
    assert full.sched.last_epoch == 3 * steps                 # stepped once per optimiser step
    part = Trainer(_sched_cfg(tmp_path / "part", kind), [_KillAt(steps + 3)])
    with pytest.raises(_Kill):
        part.fit()
    cfg = _sched_cfg(tmp_path / "part", kind)
    cfg.resume = True
    resumed = Trainer(cfg)
    assert resumed.sched.last_epoch == steps
    resumed.fit()
    a, b = _weights(full.model), _weights(resumed.model)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert full.sched.state_dict() == resumed.sched.state_dict()
    assert full.opt.state_dict()["param_groups"] == resumed.opt.state_dict()["param_groups"]
    recs = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in recs[:3]]                         # the rate at each epoch's start
    if kind == "cyclic":   # up over the first half, then down
        assert lrs[0] < lrs[1] and lrs[2] < lrs[1]
    else:                  # starts at max_lr / 25
        assert lrs[0] == pytest.approx(2e-3 / 25) and lrs[1] > lrs[0]


def test_edac_steps_the_trainers_optimiser_and_resumes_exactly(tmp_path):
    """EDAC's look-ahead is a step of the training optimiser (CTBench): two Adam steps per
    training step; resume stays bit-exact; gradient accumulation is refused."""
    over = dict(method__name="edac", method__hparams={"steps": 2, "restarts": 1},
                train__epochs=2, swa__enabled=False)
    full = Trainer(_cfg(tmp_path / "full", **over))
    assert full.method.optimizer is full.opt
    full.fit()
    steps = full.steps_per_epoch
    assert int(full.opt.state_dict()["state"][0]["step"]) == 2 * 2 * steps
    part = Trainer(_cfg(tmp_path / "part", **over), [_KillAt(steps + 2)])
    with pytest.raises(_Kill):
        part.fit()
    cfg = _cfg(tmp_path / "part", **over)
    cfg.resume = True
    resumed = Trainer(cfg)
    resumed.fit()
    a, b = _weights(full.model), _weights(resumed.model)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(ValueError, match=r"^train\.grad_accum:"):
        Trainer(_cfg(tmp_path / "accum", train__grad_accum=2, **over))
    # the functional look-ahead needs no optimiser and allows accumulation
    func = dict(over, method__hparams={"steps": 2, "restarts": 1, "lookahead": "functional"})
    Trainer(_cfg(tmp_path / "func", train__grad_accum=2, **func))


def test_resume_accepts_a_checkpoint_that_predates_new_config_keys(tmp_path):
    """A checkpoint written before a config key existed (here the schedule keys) resumes when
    the key is at its default, and is refused when it is not."""
    Trainer(_cfg(tmp_path, train__epochs=1)).fit()
    path = tmp_path / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    for key in ("optimizer", "lr_schedule", "max_lr", "lr_pct_start"):
        del ckpt["config"]["train"][key]
    torch.save(ckpt, path)
    cfg = _cfg(tmp_path, train__epochs=1)
    cfg.resume = True
    assert Trainer(cfg).epoch == 1
    cfg = _cfg(tmp_path, train__epochs=1, train__optimizer="sgd")
    cfg.resume = True
    with pytest.raises(ValueError, match=r"^train\.optimizer: differs"):
        Trainer(cfg)
