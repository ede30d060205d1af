"""Argument validation shared by the public ops: every message names the argument and what was
expected, so a wrong call fails loudly instead of returning a silently wrong bound."""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional, Sequence, Tuple, Union

import torch

from adcert.ops import _extension

_STATE = threading.local()


def value_checks_enabled() -> bool:
    return getattr(_STATE, "enabled", True)


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Turns the ops' value checks (NaN, negative radius) on or off in this thread for the
    duration. Shape, dtype and device checks always run. Callers that validated a box once and
    feed it through a chain of ops (``compute_bounds``) switch the per-op pass off: each check
    is a full read of the box, about 10 % of a small layer on a bandwidth-starved CPU."""
    previous = value_checks_enabled()
    _STATE.enabled = bool(enabled)
    try:
        yield
    finally:
        _STATE.enabled = previous

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The dtypes the kernels implement, per device type: the C++ CPU kernels dispatch on float32 and
# float64 only; the Triton CUDA kernels take every float dtype. Other device types (meta) pass.
KERNEL_DTYPES = {"cpu": (torch.float32, torch.float64), "cuda": FLOAT_DTYPES}


def supported_dtypes(device: torch.device) -> Tuple[torch.dtype, ...]:
    """The float dtypes the ops run in on ``device``."""
    return KERNEL_DTYPES.get(device.type, FLOAT_DTYPES)


def _dtype_names(dtypes) -> str:
    names = [str(d).replace("torch.", "") for d in dtypes]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def check_tensor(name: str, t, *, ndim: Optional[Union[int, Sequence[int]]] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    supported = supported_dtypes(t.device)
    if t.dtype not in supported:  # caught here, not as an opaque error inside the kernel
        raise TypeError(f"{name}: expected a {_dtype_names(supported)} tensor (the dtypes "
                        f"of the ops' {t.device.type} kernels), got dtype {t.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name}: expected a {want}-D tensor, got shape {tuple(t.shape)}")


def _box_status(mu: torch.Tensor, r: torch.Tensor) -> int:
    """0 valid, 1 NaN in mu, 2 NaN in r, 3 negative r: ``torch.ops.adcert.box_status`` of
    ``adcert._C``, or the same in plain torch when it is not built."""
    if _extension.compiled():
        return torch.ops.adcert.box_status(mu, r)
    if bool(torch.isnan(mu).any()):
        return 1
    if bool(torch.isnan(r).any()):
        return 2
    return 3 if bool((r < 0).any()) else 0


def check_box(mu, r, *, ndim=None, check_values: bool = True) -> None:
    """``mu`` and ``r`` must be same-shape, same-dtype, same-device float tensors, ``r >= 0``
    and no NaN. The value checks synchronise with the device, so they only run on CPU tensors
    (and when ``check_values``): on GPUs they would stall the hot path (DESIGN.md section 8)."""
    check_tensor("mu", mu, ndim=ndim)
    check_tensor("r", r, ndim=ndim)
    if mu.shape != r.shape:
        raise ValueError(f"r: expected the shape of mu {tuple(mu.shape)}, got {tuple(r.shape)}")
    if mu.dtype != r.dtype:
        raise TypeError(f"r: expected the dtype of mu ({mu.dtype}), got {r.dtype}")
    if mu.device != r.device:
        raise ValueError(f"r: expected the device of mu ({mu.device}), got {r.device}")
    if (check_values and mu.device.type == "cpu" and mu.numel() > 0
            and not torch.compiler.is_compiling() and value_checks_enabled()):
        # One fused C++ pass and one host sync for all value checks (plain torch without _C).
        status = _box_status(mu, r)
        if status == 1:
            raise ValueError("mu: contains NaN")
        if status == 2:
            raise ValueError("r: contains NaN")
        if status == 3:
            raise ValueError(f"r: the radius must be >= 0, got min {float(r.min())}")


def check_param(name: str, t, ref: torch.Tensor, shape: Optional[Tuple[int, ...]] = None,
                optional: bool = False) -> None:
    """A parameter tensor (weight, bias, BN statistic) must match the input's dtype and device."""
    if t is None:
        if optional:
            return
        raise TypeError(f"{name}: expected a torch.Tensor, got None")
    check_tensor(name, t)
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (the dtype of mu), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (the device of mu), got {t.device}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def pair(name: str, v) -> Tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(x, int) for x in v):
        return (int(v[0]), int(v[1]))
    raise TypeError(f"{name}: expected an int or a pair of ints, got {v!r}")


def check_bn(mean, var, weight, bias, eps, channels: int, ref: torch.Tensor) -> None:
    if (mean is None) != (var is None):
        raise ValueError("bn_mean, bn_var: give both batch-norm statistics or neither")
    if mean is None:
        if weight is not None or bias is not None:
            raise ValueError("bn_weight, bn_bias: batch-norm parameters need bn_mean and bn_var")
        return
    for name, t in (("bn_mean", mean), ("bn_var", var)):
        check_param(name, t, ref, (channels,))
    check_param("bn_weight", weight, ref, (channels,), optional=True)
    check_param("bn_bias", bias, ref, (channels,), optional=True)
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"bn_eps: expected a float >= 0, got {eps!r}")
    if (var.device.type == "cpu" and var.numel() > 0 and not torch.compiler.is_compiling()
            and not bool((var + eps > 0).all())):
        raise ValueError("bn_var: bn_var + bn_eps must be > 0 (and not NaN) for every channel")
