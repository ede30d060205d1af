"""A model written the way users write it -- its own normalisation module (arithmetic with
buffers), functional ReLUs, max pooling, ``torch.flatten`` -- trains with ``ibp`` through the
trainer and certifies with ``crown`` through the certifier (issue 14's "done when")."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adcert.attacks import pgd_attack
from adcert.bounds import compute_bounds
from adcert.certify import certify
from adcert.data import load_dataset
from adcert.models.registry import MODELS
from adcert.train import Trainer, from_dict


class UserNormalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class UserCNN(nn.Module):
    def __init__(self, in_channels=1, num_classes=10, input_size=8, width=8, mean=(0.5,),
                 std=(0.5,)):
        super().__init__()
        self.norm = UserNormalize(list(mean), list(std))
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * (input_size // 2) ** 2, num_classes)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(self.norm(x))))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


def user_cnn(in_channels=1, num_classes=10, input_size=8, width=8, mean=(0.5,), std=(0.5,)):
    return UserCNN(in_channels, num_classes, input_size, width, mean, std)


def test_user_cnn_trains_with_ibp_and_certifies_with_crown(tmp_path, monkeypatch):
    monkeypatch.setitem(MODELS, "user-cnn", user_cnn)
    eps = 0.05
    cfg = from_dict({
        "seed": 0, "output_dir": str(tmp_path / "run"), "device": "cpu",
        "data": {"dataset": "digits", "batch_size": 64, "train_subset": 1024,
                 "test_subset": 128},
        "model": {"name": "user-cnn", "kwargs": {"width": 8}},
        "method": {"name": "ibp"},
        "train": {"epochs": 6, "lr": 5e-3, "lr_milestones": [5], "eps": eps,
                  "clean_epochs": 1, "ramp_epochs": 2, "threads": 1},
        "swa": {"enabled": False},
        "eval": {"subset": 128, "pgd_steps": 5},
        "log": {"progress": False}})
    trainer = Trainer(cfg)
    final = trainer.fit()
    # IBP training made the user's model certifiable by IBP itself
    assert final["clean_acc"] > 0.5 and final["cert_acc"] > 0.2, final

    model = trainer.final_model().eval()
    x, y = load_dataset("digits", split="test")
    x, y = x[:48], y[:48]
    res = certify(model, x, y, eps, stages=("ibp", "crown"))
    records = [res.records[i] for i in range(len(y))]
    by = {s: sum(r["verdict"] == "certified" and r["stage"] == s for r in records)
          for s in ("ibp", "crown")}
    assert by["ibp"] > 0 and by["crown"] > 0, by  # CROWN certifies what IBP could not
    # certified samples are not broken by an attack
    certified = torch.tensor([r["verdict"] == "certified" for r in records])
    xs, ys = x[certified].float(), y[certified]
    adv = pgd_attack(model, xs, ys, eps, steps=20, restarts=2)
    assert bool((model(adv).argmax(1) == ys).all())
    # and their sound CROWN margins (intersected with IBP's) are all positive
    m = compute_bounds(model, xs, eps, method="crown", y=ys, sound=True)
    assert bool((m.masked_fill(F.one_hot(ys, m.shape[1]).bool(), 1.0) > 0).all())
