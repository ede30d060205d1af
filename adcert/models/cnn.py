"""The standard certified-training CNNs as flat ``nn.Sequential`` models.

Every model is ``Normalize -> [conv -> (BN) -> ReLU]* -> Flatten -> [linear -> (BN) -> ReLU]* ->
linear``, the layout the bound engine (:mod:`adcert.bounds`) fuses into one step per layer.
Inputs are pixels in ``[0, 1]``: ``x: [B, in_channels, input_size, input_size]``; output logits
``[B, num_classes]``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

from torch import nn

from adcert.models.normalize import Normalize

Stat = Optional[Union[float, Sequence[float]]]

CIFAR10_MEAN: Tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: Tuple[float, float, float] = (0.2023, 0.1994, 0.2010)
MNIST_MEAN: Tuple[float] = (0.1307,)
MNIST_STD: Tuple[float] = (0.3081,)

# (out_channels as a multiple of width, kernel, stride, padding)
ConvSpec = Tuple[int, int, int, int]


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")


def _normalize(in_channels: int, mean: Stat, std: Stat) -> Normalize:
    """``Normalize(mean, std)`` with ``[in_channels]`` buffers; ``None`` means mean 0 / std 1, so
    the layer positions are the same whether or not the caller normalises."""
    layer = Normalize(0.0 if mean is None else mean, 1.0 if std is None else std)
    if layer.num_channels not in (1, in_channels):
        raise ValueError(f"mean, std: expected 1 or in_channels={in_channels} values, "
                         f"got {layer.num_channels}")
    if layer.num_channels != in_channels:
        layer = Normalize(layer.mean.expand(in_channels), layer.std.expand(in_channels))
    return layer


def _build(in_channels: int, num_classes: int, input_size: int, convs: Sequence[ConvSpec],
           width: int, linears: Sequence[int], bn: bool, mean: Stat, std: Stat) -> nn.Sequential:
    layers: List[nn.Module] = [_normalize(in_channels, mean, std)]
    channels, size = in_channels, input_size
    for mult, kernel, stride, padding in convs:
        out = mult * width
        layers.append(nn.Conv2d(channels, out, kernel, stride=stride, padding=padding))
        if bn:
            layers.append(nn.BatchNorm2d(out))
        layers.append(nn.ReLU())
        channels, size = out, _conv_out(size, kernel, stride, padding)
        if size < 1:
            raise ValueError(f"input_size: {input_size} is too small for this architecture")
    layers.append(nn.Flatten())
    features = channels * size * size
    for out in linears:
        layers.append(nn.Linear(features, out))
        if bn:
            layers.append(nn.BatchNorm1d(out))
        layers.append(nn.ReLU())
        features = out
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


def cnn7(in_channels: int = 3, num_classes: int = 10, input_size: int = 32, width: int = 64,
         linear_size: int = 512, bn: bool = True, mean: Stat = None, std: Stat = None
         ) -> nn.Sequential:
    """CTBench's CNN7: ``Normalize -> conv(w) conv(w) conv(2w, stride 2) conv(2w) conv(2w) ->
    Flatten -> linear(linear_size) -> linear(num_classes)``, all convs 3x3 with padding 1 and
    BatchNorm (if ``bn``) + ReLU after every layer but the last.

    ``mean``/``std``: per-channel input statistics (e.g. :data:`CIFAR10_MEAN`); ``None`` gives an
    identity ``Normalize``.
    Input ``[B, in_channels, input_size, input_size]`` -> ``[B, num_classes]``.
    """
    _check_positive(in_channels=in_channels, num_classes=num_classes, input_size=input_size,
                    width=width, linear_size=linear_size)
    convs = [(1, 3, 1, 1), (1, 3, 1, 1), (2, 3, 2, 1), (2, 3, 1, 1), (2, 3, 1, 1)]
    return _build(in_channels, num_classes, input_size, convs, width, [linear_size], bn, mean, std)


def cnn3(in_channels: int = 3, num_classes: int = 10, input_size: int = 32, width: int = 16,
         linear_size: int = 100, bn: bool = True, mean: Stat = None, std: Stat = None
         ) -> nn.Sequential:
    """A tiny CNN for tests and demos: ``Normalize -> conv(w, 4x4, stride 2, pad 1) ->
    conv(2w, 4x4, stride 2, pad 1) -> Flatten -> linear(linear_size) -> linear(num_classes)``,
    BatchNorm (if ``bn``) + ReLU after every layer but the last.

    Input ``[B, in_channels, input_size, input_size]`` -> ``[B, num_classes]``.
    """
    _check_positive(in_channels=in_channels, num_classes=num_classes, input_size=input_size,
                    width=width, linear_size=linear_size)
    convs = [(1, 4, 2, 1), (2, 4, 2, 1)]
    return _build(in_channels, num_classes, input_size, convs, width, [linear_size], bn, mean, std)


def cnn5(in_channels: int = 3, num_classes: int = 10, input_size: int = 32, width: int = 16,
         linear_size: int = 512, bn: bool = True, mean: Stat = None, std: Stat = None
         ) -> nn.Sequential:
    """CNN5 (the IBP-family papers' small net): ``Normalize -> conv(w, 3x3, pad 1) ->
    conv(2w, 4x4, stride 2, pad 1) -> conv(2w, 4x4, stride 2, pad 1) -> Flatten ->
    linear(linear_size) -> linear(num_classes)``, BatchNorm (if ``bn``) + ReLU after every layer
    but the last. Input ``[B, in_channels, input_size, input_size]`` -> ``[B, num_classes]``."""
    _check_positive(in_channels=in_channels, num_classes=num_classes, input_size=input_size,
                    width=width, linear_size=linear_size)
    convs = [(1, 3, 1, 1), (2, 4, 2, 1), (2, 4, 2, 1)]
    return _build(in_channels, num_classes, input_size, convs, width, [linear_size], bn, mean, std)


def cnn7_tinyimagenet(in_channels: int = 3, num_classes: int = 200, input_size: int = 64,
                      width: int = 64, linear_size: int = 512, bn: bool = True,
                      mean: Stat = None, std: Stat = None) -> nn.Sequential:
    """CNN7 for TinyImageNet (CTBench): as :func:`cnn7` with the last conv's stride doubled
    (stride 2), so the 64x64 input reaches the linear layers at 16x16."""
    _check_positive(in_channels=in_channels, num_classes=num_classes, input_size=input_size,
                    width=width, linear_size=linear_size)
    convs = [(1, 3, 1, 1), (1, 3, 1, 1), (2, 3, 2, 1), (2, 3, 1, 1), (2, 3, 2, 1)]
    return _build(in_channels, num_classes, input_size, convs, width, [linear_size], bn, mean, std)
