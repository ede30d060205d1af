"""Learning-rate schedules and optimisers (adcert.train.schedules): milestones (CTBench App. B.3),
OneCycle (ACERT App. B, Table 4) and the one-cycle triangle of AD-CERT App. D's short-cycle
teachers; their config keys and validation."""
from __future__ import annotations

import pytest
import torch

from adcert.train import ConfigError, from_dict
from adcert.train.config import TrainConfig
from adcert.train.schedules import (TriangularLR, build_lr_scheduler, build_optimizer,
                                    triangle)


def _opt(kind="adam", lr=1e-3, momentum=0.9):
    p = torch.nn.Parameter(torch.zeros(3))
    cfg = TrainConfig(optimizer=kind, lr=lr, momentum=momentum)
    return build_optimizer([p], cfg), p


def _rates(sched, opt, n, key="lr"):
    """The rate (or beta1 / momentum) each of ``n`` optimiser steps runs at."""
    out = []
    for _ in range(n):
        g = opt.param_groups[0]
        out.append(g["betas"][0] if key == "beta1" else g[key])
        opt.step()
        sched.step()
    return out


def test_triangle_shape():
    assert triangle(0.0) == 0 and triangle(0.5) == 1 and triangle(1.0) == 0
    assert triangle(0.25) == pytest.approx(0.5) and triangle(0.75) == pytest.approx(0.5)
    assert triangle(0.2, peak=0.4) == pytest.approx(0.5)
    assert triangle(-1) == 0 and triangle(2) == 0


def test_cyclic_is_one_triangle_over_the_run():
    """AD-CERT App. D: linear from 0 to max_lr over the first half, back to 0 at the end; step s
    runs at the triangle of (s + 1) / S (the short-cycle code's ``epoch + (i + 1) / len``)."""
    opt, _ = _opt("sgd")
    cfg = TrainConfig(optimizer="sgd", lr_schedule="cyclic", max_lr=0.2, epochs=3)
    sched, per_step = build_lr_scheduler(opt, cfg, steps_per_epoch=4)
    assert per_step and isinstance(sched, TriangularLR)
    got = _rates(sched, opt, 12)
    want = [0.2 * triangle((s + 1) / 12) for s in range(12)]
    assert got == pytest.approx(want, abs=1e-12)
    assert got[5] == pytest.approx(0.2) and max(got) == got[5]       # peak at half the run
    assert got[-1] == pytest.approx(0.0) and got[0] == pytest.approx(0.2 / 6)
    d = [b - a for a, b in zip(got, got[1:])]
    assert all(x > 0 for x in d[:5]) and all(x < 0 for x in d[5:])   # linear up, linear down
    assert max(d[:5]) - min(d[:5]) < 1e-12 and max(d[5:]) - min(d[5:]) < 1e-12


def test_cyclic_peak_fraction_and_exact_resume():
    opt, _ = _opt()
    sched = TriangularLR(opt, max_lr=1.0, total_steps=10, pct_start=0.3)
    first = _rates(sched, opt, 4)
    state = sched.state_dict()
    rest = _rates(sched, opt, 6)
    opt2, _ = _opt()
    again = TriangularLR(opt2, max_lr=1.0, total_steps=10, pct_start=0.3)
    again.load_state_dict(state)
    opt2.param_groups[0]["lr"] = again.get_last_lr()[0]
    assert _rates(again, opt2, 6) == rest
    assert first[2] == pytest.approx(1.0)                             # (2 + 1) / 10 = 0.3
    with pytest.raises(ValueError, match="pct_start"):
        TriangularLR(opt, 1.0, 10, pct_start=1.0)


def test_onecycle_is_torchs_with_acerts_settings():
    """ACERT App. B: OneCycleLR, linear annealing, max_lr 2e-3 (torch's other defaults: start
    at max_lr / 25, peak after 30 % of the steps, end at start / 1e4; Adam's beta1 cycled
    0.95 -> 0.85 -> 0.95)."""
    opt, _ = _opt()
    cfg = TrainConfig(lr_schedule="onecycle", max_lr=2e-3, epochs=5)
    sched, per_step = build_lr_scheduler(opt, cfg, steps_per_epoch=4)
    assert per_step and isinstance(sched, torch.optim.lr_scheduler.OneCycleLR)
    lrs = _rates(sched, opt, 20)
    opt, _ = _opt()
    sched, _ = build_lr_scheduler(opt, cfg, steps_per_epoch=4)
    betas = _rates(sched, opt, 20, key="beta1")
    peak = lrs.index(max(lrs))
    assert lrs[0] == pytest.approx(2e-3 / 25) and max(lrs) == pytest.approx(2e-3)
    assert peak == round(0.3 * 20) - 1                              # torch: end of phase 1
    assert lrs[-1] == pytest.approx(2e-3 / 25 / 1e4)
    up = [b - a for a, b in zip(lrs[:peak], lrs[1:peak + 1])]
    down = [b - a for a, b in zip(lrs[peak:], lrs[peak + 1:])]
    assert max(up) - min(up) < 1e-12 and max(down) - min(down) < 1e-12   # linear annealing
    assert betas[0] == pytest.approx(0.95) and betas[peak] == pytest.approx(0.85)
    assert betas[-1] == pytest.approx(0.95)
    # cosine annealing and no momentum cycling on request
    opt, _ = _opt()
    cfg = TrainConfig(lr_schedule="onecycle", max_lr=2e-3, epochs=5, lr_anneal="cos",
                      lr_cycle_momentum=False, lr_pct_start=0.5)
    sched, _ = build_lr_scheduler(opt, cfg, steps_per_epoch=4)
    lrs = _rates(sched, opt, 20)
    assert lrs.index(max(lrs)) == 9 and opt.param_groups[0]["betas"][0] == 0.9
    up = [b - a for a, b in zip(lrs[:9], lrs[1:10])]
    assert max(up) - min(up) > 1e-6                                  # not linear


def test_milestones_step_per_epoch():
    opt, _ = _opt(lr=1e-3)
    cfg = TrainConfig(lr=1e-3, lr_milestones=[1, 3], lr_decay=0.2, epochs=4)
    sched, per_step = build_lr_scheduler(opt, cfg, steps_per_epoch=100)
    assert not per_step
    assert _rates(sched, opt, 4) == pytest.approx([1e-3, 2e-4, 2e-4, 4e-5])


def test_optimizers():
    opt, _ = _opt("sgd", lr=0.1, momentum=0.9)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9
    opt, _ = _opt("adam", lr=0.1)
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize("train, key", [
    ({"lr_schedule": "step"}, "train.lr_schedule"),
    ({"optimizer": "rmsprop"}, "train.optimizer"),
    ({"lr_schedule": "onecycle"}, "train.max_lr"),                    # max_lr required
    ({"lr_schedule": "cyclic", "max_lr": 0}, "train.max_lr"),
    ({"lr_schedule": "cyclic", "max_lr": 0.2, "lr_milestones": [3]}, "train.lr_milestones"),
    ({"lr_schedule": "onecycle", "max_lr": 1e-3, "lr_pct_start": 1.0}, "train.lr_pct_start"),
    ({"max_lr": 1e-3}, "train.max_lr"),                               # milestones has no peak
    ({"lr_pct_start": 0.3}, "train.lr_pct_start"),
    ({"lr_schedule": "onecycle", "max_lr": 1e-3, "lr_anneal": "exp"}, "train.lr_anneal"),
    ({"lr_div_factor": 0.5}, "train.lr_div_factor"),
    ({"momentum": 1.0}, "train.momentum"),
])
def test_schedule_config_errors_name_the_key(train, key):
    with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.") + ":"):
        from_dict({"train": train})


def test_schedule_config_keys():
    cfg = from_dict({"train": {"optimizer": "sgd", "momentum": 0.9, "lr_schedule": "cyclic",
                               "max_lr": 0.2}})
    assert (cfg.train.optimizer, cfg.train.lr_schedule, cfg.train.max_lr) == ("sgd", "cyclic",
                                                                              0.2)
    cfg = from_dict({"train": {"lr_schedule": "onecycle", "max_lr": "2/1000"}})
    assert cfg.train.max_lr == pytest.approx(2e-3) and cfg.train.lr_anneal == "linear"
    assert from_dict({}).train.lr_schedule == "milestones"
