"""The input normalisation layer, ``(x - mean) / std`` per channel.

Every adcert model starts with it, so perturbation radii are always given in pixel space
(``[0, 1]``) and never divided by a dataset std by hand (DESIGN.md section 3). The bound engine
treats it as an exact affine map: centre ``(mu - mean) / std``, radius ``r / std``.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

Tensor = torch.Tensor
Stat = Union[float, Sequence[float], Tensor]


def _as_vector(name: str, value: Stat) -> Tensor:
    """``value`` as a 1-D float32 tensor ``[C]`` (a scalar becomes ``[1]``)."""
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected a float, a sequence of floats or a tensor, got bool")
    try:
        t = torch.as_tensor(value, dtype=torch.float32).detach().clone()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name}: expected a float, a sequence of floats or a tensor, "
                        f"got {type(value).__name__}") from exc
    if t.dim() > 1:
        raise ValueError(f"{name}: expected a scalar or a 1-D per-channel vector, "
                         f"got shape {tuple(t.shape)}")
    t = t.reshape(-1)
    if t.numel() == 0:
        raise ValueError(f"{name}: expected at least one value, got an empty sequence")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: every value must be finite, got {t.tolist()}")
    return t


class Normalize(nn.Module):
    """``(x - mean) / std`` with per-channel ``mean, std: [C]`` (or one value for all channels).

    Input ``x: [B, C, H, W]`` or ``[B, C]`` (any ``[B, C, *]``); output has the same shape.
    ``mean`` and ``std`` are buffers (they move with ``.to()`` and are saved in the state dict,
    but are not trained). ``std`` must be > 0 everywhere.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Stat, std: Stat) -> None:
        super().__init__()
        mean_t, std_t = _as_vector("mean", mean), _as_vector("std", std)
        if mean_t.numel() != std_t.numel() and 1 not in (mean_t.numel(), std_t.numel()):
            raise ValueError(f"std: expected {mean_t.numel()} values (one per channel of mean), "
                             f"got {std_t.numel()}")
        if not bool((std_t > 0).all()):
            raise ValueError(f"std: every value must be > 0, got {std_t.tolist()}")
        channels = max(mean_t.numel(), std_t.numel())
        self.register_buffer("mean", mean_t.expand(channels).clone())
        self.register_buffer("std", std_t.expand(channels).clone())

    @property
    def num_channels(self) -> int:
        return self.mean.numel()

    def channel_view(self, t: Tensor, ref: Tensor) -> Tensor:
        """A per-channel buffer ``[C]`` reshaped to broadcast against ``ref: [B, C, *]``,
        in ``ref``'s dtype and device."""
        if ref.dim() < 2:
            raise ValueError(f"x: Normalize expects a [B, C, *] input, "
                             f"got shape {tuple(ref.shape)}")
        channels = self.num_channels
        if channels != 1 and ref.shape[1] != channels:
            raise ValueError(f"x: Normalize has {channels} channels but the input has "
                             f"{ref.shape[1]} (shape {tuple(ref.shape)})")
        return t.to(dtype=ref.dtype, device=ref.device).reshape((1, -1) + (1,) * (ref.dim() - 2))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.channel_view(self.mean, x)) / self.channel_view(self.std, x)

    def extra_repr(self) -> str:
        fmt = lambda t: "[" + ", ".join(f"{v:.6g}" for v in t.tolist()) + "]"  # noqa: E731
        return f"mean={fmt(self.mean)}, std={fmt(self.std)}"
