"""Weight initialisations: IBP initialisation for certified training, Kaiming uniform for
adversarial teachers."""
from __future__ import annotations

import math

import torch
from torch import nn

_LAYERS = (nn.Conv2d, nn.Linear)


def ibp_init(model: nn.Module) -> nn.Module:
    """IBP initialisation (Shi et al. 2021, DESIGN.md section 6): every conv/linear weight except
    the last layer's is redrawn from ``N(0, 2 pi / fan_in^2)`` (std ``sqrt(2 pi) / fan_in``), which
    keeps interval widths stable with depth. Biases and batch norms are untouched. Layers marked
    ``_adcert_residual_fed = True`` (fed by a residual add) get half that std. Returns ``model``."""
    layers = [m for m in model.modules() if isinstance(m, _LAYERS)]
    with torch.no_grad():
        for m in layers[:-1]:
            fan_in = m.weight[0].numel()
            std = math.sqrt(2 * math.pi) / fan_in
            if getattr(m, "_adcert_residual_fed", False):
                std /= 2
            m.weight.normal_(0.0, std)
    return model


def kaiming_init(model: nn.Module) -> nn.Module:
    """Kaiming-uniform initialisation for adversarially trained teachers (CTBench App. B.3 and
    AD-CERT App. F.3: "initialized by Kaiming uniform"), as CTBench's code does it
    (``networks.get_network(init="default")`` -> ``torch.nn.init.kaiming_uniform_(weight)`` on
    every layer with a weight except batch norms, github.com/eth-sri/CTBench): every conv/linear
    weight, the last layer's included, redrawn from ``U(-b, b)`` with ``b = sqrt(6 / fan_in)``
    (``kaiming_uniform_``'s defaults: fan-in, gain ``sqrt(2)``); biases and batch norms keep
    their PyTorch defaults. Returns ``model``."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _LAYERS):
                nn.init.kaiming_uniform_(m.weight)
    return model
