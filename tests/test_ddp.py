"""Two CPU processes (gloo) train exactly like one process on the same global batch: batch norm
statistics are synchronised (the clean forward's, with gradients, and the frozen ones of the
bound passes) and gradients are mean-all-reduced."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow  # two spawned processes: ~15 s per case


def _cfg(out_dir: str, bn_mode: str):
    from adcert.train import from_dict

    return from_dict({
        "seed": 3, "output_dir": out_dir, "device": "cpu",
        "data": {"dataset": "digits", "batch_size": 32, "train_subset": 128, "test_subset": 32,
                 "augment": False},
        "model": {"name": "cnn3", "kwargs": {"width": 4, "linear_size": 16}},
        # IBP has no randomness, so per-process RNG streams cannot make the runs differ
        "method": {"name": "ibp"},
        "train": {"epochs": 2, "lr": 1e-3, "eps": 0.1, "clean_epochs": 0, "ramp_epochs": 1,
                  "l1": 1e-5, "threads": 1, "bn_mode": bn_mode},
        "eval": {"subset": 16, "pgd_steps": 1},
        "log": {"progress": False}})


def _worker(rank: int, world: int, port: int, out_dir: str, bn_mode: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from adcert.train import Trainer

        trainer = Trainer(_cfg(out_dir, bn_mode))
        trainer.fit()
        if rank == 0:
            torch.save(trainer.model.state_dict(), os.path.join(out_dir, "ddp_weights.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("bn_mode", ["batch", "frozen"])
def test_two_gloo_processes_match_one_process(tmp_path, bn_mode):
    from adcert.train import Trainer

    single = Trainer(_cfg(str(tmp_path / "single"), bn_mode))
    single.fit()
    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(out), bn_mode), nprocs=2, join=True)
    ddp = torch.load(out / "ddp_weights.pt")
    ref = single.model.state_dict()
    assert ddp.keys() == ref.keys()
    # A conv/linear bias right before a batch norm has a gradient that is exactly 0
    # mathematically when the loss sees the batch norm's statistics as functions of the
    # parameters (bn_mode batch: every loss of every step); the computed one is pure rounding
    # noise, which Adam normalises into a step of size ~lr in a noise-dependent direction. The
    # function does not depend on those biases; they (and the running means they shift) may
    # drift apart by up to ~lr per step; every other tensor must agree to rounding.
    steps, lr = 2 * 128 // 32, 1e-3
    pre_bn = {"1.bias", "4.bias", "8.bias", "2.running_mean", "5.running_mean",
              "9.running_mean"} if bn_mode == "batch" else set()
    for k, v in ref.items():
        if not v.is_floating_point():
            assert torch.equal(ddp[k], v), k
        elif k in pre_bn:
            torch.testing.assert_close(ddp[k], v, rtol=0, atol=2 * lr * steps, msg=k)
        else:
            torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=1e-5, msg=k)
    # and training moved the weights (the comparison is not between two initialisations)
    first = next(k for k in ref if k.endswith("weight"))
    init = Trainer(_cfg(str(tmp_path / "init"), bn_mode)).model.state_dict()[first]
    assert not torch.allclose(init, ref[first])
