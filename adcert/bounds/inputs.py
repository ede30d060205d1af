"""Argument checks and the input box of :func:`adcert.bounds.compute_bounds`.

Every error names the argument. Checks that read tensor VALUES (NaN, ``eps >= 0``, label range,
``x_L <= x_U``) synchronise with the device, so -- like the ops' checks -- they run only for CPU
tensors; on accelerators they would stall the hot path (DESIGN.md section 8).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import torch
from torch import nn

from adcert.bounds.plan import LayerPlan, iter_steps

Tensor = torch.Tensor
Eps = Union[float, int, Tensor]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _on_cpu(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.numel() > 0


def check_x(x, name: str = "x") -> None:
    """``x`` must be a floating-point tensor ``[B, *in]`` (at least 2-D) without NaN."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name}: expected a batched tensor [B, ...] (at least 2-D), "
                         f"got shape {tuple(x.shape)}")
    if _on_cpu(x) and bool(torch.isnan(x).any()):
        raise ValueError(f"{name}: contains NaN")


def check_x_for_plan(plan: LayerPlan, x: Tensor) -> None:
    """``x`` must fit the model's first layer (rank, channels/features, dtype, device)."""
    _check_model_dtype(plan, x)
    first = plan.first_layer()
    if isinstance(first, nn.Conv2d):
        want_dims, want_c, what = (4,), first.in_channels, "4-D input [B, C, H, W]"
    elif isinstance(first, nn.Linear):
        want_dims, want_c, what = (2,), first.in_features, "2-D input [B, features]"
    elif isinstance(first, nn.BatchNorm2d):
        want_dims, want_c, what = (4,), first.num_features, "4-D input [B, C, H, W]"
    elif isinstance(first, nn.BatchNorm1d):
        want_dims, want_c, what = (2, 3), first.num_features, "input [B, C] or [B, C, L]"
    else:  # Flatten or no such layer: any rank
        return
    if x.dim() not in want_dims:
        raise ValueError(f"x: the model's first layer {type(first).__name__} expects an "
                         f"{what}, got shape {tuple(x.shape)}")
    dim = -1 if isinstance(first, nn.Linear) else 1
    if x.shape[dim] != want_c:
        raise ValueError(f"x: the model's first layer {type(first).__name__} expects "
                         f"{want_c} {'features' if dim == -1 else 'channels'}, "
                         f"got shape {tuple(x.shape)}")


def _runs_on_shape(model: nn.Module, state, shape, dtype) -> bool:
    """Does ``model``'s forward accept an input of ``shape``? Run on the meta device (shapes
    only, nothing computed, the model's own tensors untouched)."""
    try:
        with torch.no_grad():
            torch.func.functional_call(model, state, (torch.empty(shape, dtype=dtype,
                                                                  device="meta"),))
    except Exception:
        return False
    return True


def input_shape_error(model: nn.Module, x: Tensor, max_size: int = 512) -> Optional[str]:
    """Why ``x`` does not fit ``model``, or ``None`` when its shape is not the problem.

    Called after a bound pass failed (an internal layer's shape error): the model's forward is
    run on the meta device with ``x``'s per-sample shape; if that fails too, the message names
    ``x`` and, for image inputs ``[B, C, H, W]``, the square sizes the model accepts (searched
    up to ``max(64, 2 * max(H, W))``, at most ``max_size``)."""
    try:
        state = {name: t.to("meta") for name, t in
                 list(model.named_parameters()) + list(model.named_buffers())}
        per_sample = tuple(x.shape[1:])
        if _runs_on_shape(model, state, (2,) + per_sample, x.dtype):
            return None
        got = f"x: got shape {tuple(x.shape)}, which does not fit the model"
        if x.dim() != 4:
            return got
        channels, top = x.shape[1], min(max_size, max(64, 2 * max(x.shape[2:])))
        fit = []
        for size in range(1, top + 1):
            if _runs_on_shape(model, state, (2, channels, size, size), x.dtype):
                fit.append(size)
            elif fit:  # the sizes that fit form one run (layer sizes grow with the input)
                break
        if not fit:
            return got
        # strided layers floor, so neighbouring sizes fit too; name the one with the largest
        # power-of-two factor (the data's size for every model here: 8, 28, 32, 64)
        best = max(fit, key=lambda n: ((n & -n), n))
        if len(fit) == 1:
            return f"{got}: it expects inputs of shape [B, {channels}, {best}, {best}]"
        return (f"{got}: it expects inputs of shape [B, {channels}, {best}, {best}] (square "
                f"sizes from {fit[0]} to {fit[-1]} fit)")
    except Exception:  # the diagnosis must never hide the original error
        return None


def _check_model_dtype(plan: LayerPlan, x: Tensor) -> None:
    """``x`` must have the dtype and device of the model's first conv/linear/batch-norm weight."""
    for step in iter_steps(plan.steps):
        module = getattr(step, "layer", None)
        if module is None:
            module = getattr(step, "bn", None)
        if module is None:
            continue
        ref = next((t for t in list(module.parameters()) + list(module.buffers())
                    if t.is_floating_point()), None)
        if ref is None:
            continue
        if ref.dtype != x.dtype:
            raise TypeError(f"x: expected dtype {ref.dtype} (the model's dtype), got {x.dtype}")
        if ref.device != x.device:
            raise ValueError(f"x: expected device {ref.device} (the model's device), "
                             f"got {x.device}")
        return


def check_eps(eps, x: Tensor) -> Union[float, Tensor]:
    """``eps``: a float >= 0, or a tensor ``[]`` / ``[B]`` of values >= 0. Returns a float or a
    tensor shaped ``[B, 1, ...]`` to broadcast against ``x``."""
    if isinstance(eps, torch.Tensor):
        if not eps.is_floating_point():
            raise TypeError(f"eps: expected a floating-point tensor, got dtype {eps.dtype}")
        batch = x.shape[0]
        if eps.dim() == 0:
            eps = eps.expand(batch)
        if tuple(eps.shape) != (batch,):
            raise ValueError(f"eps: expected a float or a per-sample tensor of shape "
                             f"[B]=({batch},), got shape {tuple(eps.shape)}")
        if eps.device != x.device:
            raise ValueError(f"eps: expected device {x.device} (the device of x), got {eps.device}")
        if _on_cpu(eps):
            if bool(torch.isnan(eps).any()):
                raise ValueError("eps: contains NaN")
            if bool((eps < 0).any()):
                raise ValueError(f"eps: every value must be >= 0, got min {float(eps.min())}")
        return eps.to(x.dtype).reshape((batch,) + (1,) * (x.dim() - 1))
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps: expected a float >= 0 or a tensor [B], got {type(eps).__name__}")
    if not eps >= 0:  # also rejects NaN
        raise ValueError(f"eps: expected a value >= 0, got {eps!r}")
    return float(eps)


def check_box(x: Tensor, x_L, x_U) -> None:
    """``x_L, x_U``: tensors of ``x``'s shape, dtype and device with ``x_L <= x_U``."""
    if (x_L is None) != (x_U is None):
        raise ValueError("x_L, x_U: give both bounds of the input box or neither")
    for name, t in (("x_L", x_L), ("x_U", x_U)):
        check_x(t, name)
        if t.shape != x.shape:
            raise ValueError(f"{name}: expected the shape of x {tuple(x.shape)}, "
                             f"got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected the dtype of x ({x.dtype}), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected the device of x ({x.device}), got {t.device}")
    if _on_cpu(x_L) and bool((x_L > x_U).any()):
        raise ValueError("x_L, x_U: expected x_L <= x_U everywhere")


def check_data_range(data_range) -> Tuple[float, float]:
    """``data_range``: a pair ``(lo, hi)`` of finite numbers with ``lo < hi``."""
    ok = (isinstance(data_range, (tuple, list)) and len(data_range) == 2
          and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in data_range))
    if ok:
        lo, hi = float(data_range[0]), float(data_range[1])
        if math.isfinite(lo) and math.isfinite(hi) and lo < hi:
            return lo, hi
    raise ValueError(f"data_range: expected a pair (lo, hi) of finite numbers with lo < hi, "
                     f"got {data_range!r}")


def check_x_in_range(x: Tensor, lo: float, hi: float) -> None:
    """``x`` must lie in ``[lo, hi]``: the eps-box is clamped to that range, so the box around
    an ``x`` outside it would not contain ``x`` (a different point would be certified). Reads
    the values: CPU only, like the other value checks."""
    if not _on_cpu(x):
        return
    low, high = (float(v) for v in torch.aminmax(x.detach()))
    if low < lo or high > hi:
        raise ValueError(
            f"x: expected pixels in [{lo:g}, {hi:g}], got values in [{low:.4g}, {high:.4g}]; "
            f"the eps-box is clamped to [{lo:g}, {hi:g}] and would not contain x. Pass inputs "
            f"in pixel space with the normalisation inside the model (adcert.models.Normalize), "
            f"or give data_range=(lo, hi) for another input domain")


def input_box(x: Tensor, eps: Optional[Eps] = None, x_L: Optional[Tensor] = None,
              x_U: Optional[Tensor] = None, data_range: Tuple[float, float] = (0.0, 1.0)
              ) -> Tuple[Tensor, Tensor]:
    """The input box in centre-radius form ``(mu, r)``, both shaped like ``x: [B, *in]``.

    With ``eps``: ``[clamp(x - eps, lo, hi), clamp(x + eps, lo, hi)]`` for ``data_range = (lo,
    hi)``, by default ``[0, 1]`` (pixel space, DESIGN.md section 3), ``eps`` a float or a
    per-sample tensor ``[B]``; ``x`` must lie in that range (``ValueError`` naming ``x``, checked
    on CPU). With ``x_L, x_U``: that box, unclipped and not checked against ``x`` (the caller's
    box: SABR's small box, for one, is centred on another point). Exactly one of the two must be
    given.
    """
    check_x(x)
    lo, hi = check_data_range(data_range)
    if eps is not None and (x_L is not None or x_U is not None):
        raise ValueError("eps: give either eps or the box (x_L, x_U), not both")
    if eps is None:
        if x_L is None and x_U is None:
            raise ValueError("eps: give eps (a float or a tensor [B]) or the box (x_L, x_U)")
        check_box(x, x_L, x_U)
        lower, upper = x_L, x_U
    else:
        e = check_eps(eps, x)
        check_x_in_range(x, lo, hi)
        lower, upper = torch.clamp(x - e, lo, hi), torch.clamp(x + e, lo, hi)
    return (upper + lower) / 2, (upper - lower) / 2


def check_y(y, x: Tensor) -> Tensor:
    """``y``: integer labels ``[B]`` on ``x``'s device; returned as int64."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y: expected a torch.Tensor of int64 labels, got {type(y).__name__}")
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise TypeError(f"y: expected an integer (int64) tensor of labels, got dtype {y.dtype}")
    if tuple(y.shape) != (x.shape[0],):
        raise ValueError(f"y: expected shape [B]=({x.shape[0]},), got {tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"y: expected the device of x ({x.device}), got {y.device}")
    return y.long()


def check_y_range(y: Tensor, num_classes: int) -> None:
    if _on_cpu(y) and bool(((y < 0) | (y >= num_classes)).any()):
        raise ValueError(f"y: labels must be in [0, {num_classes}), got min {int(y.min())} "
                         f"max {int(y.max())}")
