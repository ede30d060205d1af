"""Output geometry of a 2-D convolution and validation of conv arguments."""
from __future__ import annotations

from typing import Tuple

import torch

from adcert.ops._checks import check_param, pair


def conv_output_shape(mu_shape, weight_shape, stride, padding, dilation) -> Tuple[int, ...]:
    """``[B, C_out, H', W']`` for input ``[B, C_in, H, W]`` and weight ``[C_out, _, kH, kW]``."""
    out = [mu_shape[0], weight_shape[0]]
    for d in range(2):
        span = dilation[d] * (weight_shape[2 + d] - 1) + 1
        out.append((mu_shape[2 + d] + 2 * padding[d] - span) // stride[d] + 1)
    return tuple(out)


def check_conv_args(mu: torch.Tensor, weight, bias, stride, padding, dilation, groups):
    """Validates and normalises conv arguments; returns ``(stride, padding, dilation, groups)``
    as int pairs and an int."""
    check_param("weight", weight, mu)
    if weight.dim() != 4:
        raise ValueError(f"weight: expected [C_out, C_in / groups, kH, kW], got shape "
                         f"{tuple(weight.shape)}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups: expected an int >= 1, got {groups!r}")
    if mu.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"weight: expected {mu.shape[1] // groups if groups else '?'} input "
                         f"channels per group (mu has {mu.shape[1]} channels, groups={groups}), "
                         f"got weight of shape {tuple(weight.shape)}")
    if weight.shape[0] % groups:
        raise ValueError(f"weight: C_out={weight.shape[0]} is not divisible by groups={groups}")
    check_param("bias", bias, mu, (weight.shape[0],), optional=True)
    stride, padding, dilation = pair("stride", stride), pair("padding", padding), \
        pair("dilation", dilation)
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"stride/dilation must be >= 1 and padding >= 0, got stride={stride}, "
                         f"padding={padding}, dilation={dilation}")
    out = conv_output_shape(mu.shape, weight.shape, stride, padding, dilation)
    if out[2] < 1 or out[3] < 1:
        raise ValueError(f"mu: spatial size {tuple(mu.shape[2:])} is too small for kernel "
                         f"{tuple(weight.shape[2:])} with padding {padding}, dilation {dilation}")
    return stride, padding, dilation, groups
