"""A small basic-block ResNet for certified training (not an ``nn.Sequential``).

    Normalize -> conv3x3(w) -> BN -> ReLU
      -> stage 1: blocks[0] x BasicBlock(w,  stride 1)
      -> stage 2: blocks[1] x BasicBlock(2w, stride 2 in its first block)
      -> stage 3: blocks[2] x BasicBlock(4w, stride 2 in its first block)
    -> Flatten -> linear(linear_size) -> BN -> ReLU -> linear(num_classes)

``BasicBlock``: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3x3 convs and a
shortcut that is the identity, or a strided 1x1 conv + BN when the shape changes. No pooling (the
IBP-family ResNets flatten), so the forward is a fixed graph that ``torch.fx`` can trace. Every
conv/linear whose input is the output of a residual add carries ``_adcert_residual_fed = True``,
which :func:`adcert.models.ibp_init` reads to halve its initial std.
Input ``[B, in_channels, input_size, input_size]`` in ``[0, 1]`` -> logits ``[B, num_classes]``.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from adcert.models.cnn import Stat, _check_positive, _conv_out, _normalize


def _bn2d(channels: int, bn: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if bn else nn.Identity()


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN and a residual shortcut. ``[B, c_in, H, W]`` ->
    ``[B, c_out, H', W']`` with ``H' = (H - 1) // stride + 1``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, bn: bool = True,
                 residual_fed: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.bn1 = _bn2d(out_channels, bn)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1)
        self.bn2 = _bn2d(out_channels, bn)
        if stride != 1 or in_channels != out_channels:
            conv = nn.Conv2d(in_channels, out_channels, 1, stride=stride)
            conv._adcert_residual_fed = residual_fed
            self.shortcut = nn.Sequential(conv, _bn2d(out_channels, bn))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()
        self.conv1._adcert_residual_fed = residual_fed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """See the module docstring; ``blocks``: BasicBlocks per stage (1 to 3 stages, channel
    multipliers 1, 2, 4 of ``width``)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, input_size: int = 32,
                 width: int = 16, blocks: Sequence[int] = (1, 1, 1), linear_size: int = 100,
                 bn: bool = True, mean: Stat = None, std: Stat = None):
        super().__init__()
        _check_positive(in_channels=in_channels, num_classes=num_classes, input_size=input_size,
                        width=width, linear_size=linear_size)
        blocks = list(blocks)
        if not 1 <= len(blocks) <= 3 or any(isinstance(b, bool) or not isinstance(b, int)
                                            or b < 1 for b in blocks):
            raise ValueError(f"blocks: expected 1 to 3 positive ints (blocks per stage), "
                             f"got {blocks!r}")
        self.normalize = _normalize(in_channels, mean, std)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), _bn2d(width, bn),
                                  nn.ReLU())
        layers: List[nn.Module] = []
        channels, size = width, input_size
        for stage, count in enumerate(blocks):
            out = width * 2 ** stage
            for j in range(count):
                stride = 2 if stage > 0 and j == 0 else 1
                layers.append(BasicBlock(channels, out, stride, bn, residual_fed=bool(layers)))
                channels, size = out, _conv_out(size, 3, stride, 1)
        self.layers = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels * size * size, linear_size)
        self.fc._adcert_residual_fed = True
        self.fc_bn = nn.BatchNorm1d(linear_size) if bn else nn.Identity()
        self.fc_relu = nn.ReLU()
        self.classifier = nn.Linear(linear_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(self.stem(self.normalize(x)))
        return self.classifier(self.fc_relu(self.fc_bn(self.fc(self.flatten(h)))))


def resnet(in_channels: int = 3, num_classes: int = 10, input_size: int = 32, width: int = 16,
           blocks: Sequence[int] = (1, 1, 1), linear_size: int = 100, bn: bool = True,
           mean: Stat = None, std: Stat = None) -> ResNet:
    """A small :class:`ResNet` (defaults: one BasicBlock per stage, widths 16/32/64)."""
    return ResNet(in_channels, num_classes, input_size, width, blocks, linear_size, bn, mean, std)
