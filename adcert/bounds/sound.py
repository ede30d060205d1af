"""Rounding-sound IBP (``compute_bounds(..., method="ibp", sound=True)``), the certifier's mode.

Goal: the returned bounds contain the EXACT real-arithmetic image of the input box under the
model (with the model's floating-point parameters taken as exact reals), whatever rounding the
floating-point computation made. Correctness over speed: plain torch ops, no fused kernels.

Scheme (u = unit roundoff of the dtype, ``finfo.eps / 2``; ``tiny`` = smallest normal number;
``gamma_k = k u / (1 - k u)``, Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed.,
Lemma 3.1 and eq. (3.5): a k-term dot product computed in any order satisfies
``|fl(w.x) - w.x| <= gamma_k |w|.|x|``; underflow adds at most ``tiny`` per operation, which also
covers flush-to-zero):

* Boxes are carried as END POINTS ``(L, U)``: floats, meaning the real interval ``[L, U]``.
  Rounded end points are pushed outward with ``down(t) = nextafter(t, -inf)`` and
  ``up(t) = nextafter(t, +inf)``: for one correctly rounded operation ``fl(a op b)`` is the float
  nearest to the exact result, so ``down(fl(.)) <= exact <= up(fl(.))``.
* Input: ``(mu, r)`` from :func:`~adcert.bounds.inputs.input_box` carries the roundings of
  ``x -/+ eps`` (eps itself rounded to the dtype) and of the centre/radius split, each at most
  ``u (|mu| + r)``-ish; the box is widened by ``8 u (|mu| + r) + 2 tiny`` before use.
* Conv/linear ``W`` (k terms per output) with bias ``b``, optionally with the batch norm after it
  FOLDED in (``W' = W s``, ``b' = (b - mean) s + beta``, ``s = gamma / sqrt(var + eps)``; the
  certifier runs in eval mode): from ``(L, U)`` a centre ``c = fl((L+U)/2)`` and a radius
  ``rho = max(up(U - c), up(c - L))`` with ``[L, U] subset [c - rho, c + rho]`` exactly. Then
  ``cen = fl(W' c + b')``, ``rad = fl(|W'| rho)``, ``mag = fl(|W'| (|c| + rho))`` (the one extra
  product per layer), and the error bound
  ``e = 2 (gamma_(k+2) + eps_w) mag + 2 gamma_(k+2) |b'| + 2 E_b + (k + 2) tiny``
  where ``eps_w`` bounds the relative error of the computed folded weights against the exact ones
  (``gamma_8`` when a batch norm is folded: ``s`` takes <= 3 roundings, the product one more, with
  slack for a non-correctly-rounded sqrt/division; 0 otherwise) and ``E_b`` bounds the error of
  the computed folded bias (``gamma_10 ((|b| + |mean|) |s| + |beta|)``); both come with the fold,
  :func:`adcert.ops.bn_fold.fold_batch_norm` with ``sound=True``. The factor 2 absorbs the
  rounding of computing ``e`` and ``mag`` themselves (all terms non-negative, each off by at most
  a factor ``(1 - gamma)``). Then ``t = up(rad + e)``, ``L' = down(cen - t)``,
  ``U' = up(cen + t)``.
* A batch norm not after a conv/linear: the same rule with ``k = 1`` and a diagonal weight ``s``.
* Normalize ``(x - m) / sd`` (``sd > 0``, monotone): ``L' = down(down(L - m) / sd)``,
  ``U' = up(up(U - m) / sd)``.
* ReLU: ``max(L, 0), max(U, 0)`` (exact). Flatten/reshape: exact.
* Every other operation's rule (average and max pooling, Sigmoid/Tanh, arithmetic with
  constants, residual add, cat) is documented with the operation, :mod:`adcert.bounds.layers`.
* Margins ``z_y - z_i`` with the specification folded into the last linear layer: the weight
  ``W_y - W_i`` (and bias) is one more rounding, so it enters the affine rule with an absolute
  weight-error tensor ``gamma_2 |W_spec| + eps_w (|W_y| + |W_i|)``; without a final linear,
  ``down(L_y - U_i)``. The ``y`` entry is exactly 0.

For the duration (:func:`strict_float_mode`) every kernel used sums the products of a dot
product in SOME order, with or without fused multiply-adds, which is what ``gamma_k`` covers:
TF32 is off (``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32``),
the fp32 matmul precision is ``"highest"``, cuDNN and NNPACK are disabled (Winograd/FFT
transforms: NNPACK's error reached 42x the bound in a test), and oneDNN runs in IEEE fp32
(``fp32_precision="ieee"``: no implicit bf16/TF32 down-conversion); everything is restored
afterwards. Only fp32 and fp64 are accepted. The result is detached (no gradients): it is a certificate, not a loss.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, List, Optional, Tuple

import torch

from adcert.bounds.layers.base import IbpCtx, sound_steps_ctx
from adcert.bounds.layers.dense import AffineStep
from adcert.bounds.layers.rigorous import affine_box, centre_radius  # noqa: F401 (re-exported)
from adcert.bounds.plan import LayerPlan
from adcert.bounds.spec import fold_margin_spec, zero_label_entry
from adcert.ops._rounding import down, gamma, unit_roundoff, up  # noqa: F401  (re-exported)

Tensor = torch.Tensor
Box = Tuple[Tensor, Tensor]

SOUND_DTYPES = (torch.float32, torch.float64)


@contextlib.contextmanager
def strict_float_mode():
    """Kernels whose every output is a dot product summed in some order, nothing else: TF32
    off, fp32 matmul precision "highest", cuDNN and NNPACK disabled, oneDNN in IEEE fp32; all
    restored afterwards.

    Why each: NNPACK (picked for CPU convolutions of batch >= 16 when oneDNN declines) and cuDNN
    may use Winograd/FFT transforms, whose error is not the dot-product bound
    ``gamma_k |W| |x|`` the rigorous rules charge. oneDNN stays: PyTorch creates its
    convolution and deconvolution primitives with the DIRECT algorithm (ideep's default,
    ``convolution_direct`` / ``deconvolution_direct``; oneDNN's Winograd kernels are only
    selected for the winograd/auto algorithms), which accumulates the products in fp32 (FMA or
    not) -- within the bound -- once ``fp32_precision`` is ``"ieee"`` (no implicit bf16/TF32
    down-conversion). Underflow: flush-to-zero loses less than ``tiny`` per operation, which
    every rule adds; denormal inputs are assumed not flushed (PyTorch's default; the check
    below turns ``torch.set_flush_denormal`` off for the call if it was on)."""
    mk = torch.backends.mkldnn
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision(), mk.conv.fp32_precision,
             mk.matmul.fp32_precision)
    flushing = _denormals_flushed()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            mk.conv.fp32_precision = "ieee"
            mk.matmul.fp32_precision = "ieee"
            if flushing:
                torch.set_flush_denormal(False)
            with torch.backends.cudnn.flags(enabled=False, allow_tf32=False), \
                    mk.flags(enabled=mk.enabled, allow_tf32=False), \
                    torch.backends.nnpack.flags(enabled=False):
                yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])
        mk.conv.fp32_precision, mk.matmul.fp32_precision = saved[3:]
        if flushing:
            torch.set_flush_denormal(True)


def _denormals_flushed() -> bool:
    """Whether this thread flushes denormals (``torch.set_flush_denormal(True)``)."""
    tiny = torch.finfo(torch.float32).tiny
    return bool(torch.tensor(tiny, dtype=torch.float32) / 4 == 0)


def check_sound_dtype(dtype: torch.dtype) -> None:
    if dtype not in SOUND_DTYPES:
        raise TypeError(f"sound: rounding-sound bounds need float32 or float64, got {dtype} "
                        "(convert the model and x with .float() or .double())")


def sound_steps(steps, L: Tensor, U: Tensor, stats,
                relu_bounds: Optional[List[Box]] = None) -> Box:
    """Propagate the real box ``[L, U]`` through ``steps`` soundly (each step's
    :meth:`~adcert.bounds.layers.base.Node.sound_ibp`; see the module docstring)."""
    return sound_steps_ctx(steps, L, U, IbpCtx(stats, relu_bounds))


def sound_input(mu: Tensor, r: Tensor) -> Box:
    """End points containing the exact input box that ``(mu, r)`` was rounded from."""
    u = unit_roundoff(mu.dtype)
    tiny = torch.finfo(mu.dtype).tiny
    slack = up(8 * u * (mu.abs() + r) + 2 * tiny)
    return down(down(mu - r) - slack), up(up(mu + r) + slack)


# ----------------------------------------------------------------------------- margins


def sound_margins_folded(step: AffineStep, L: Tensor, U: Tensor, stats, y: Tensor) -> Tensor:
    """Sound lower bounds ``[B, C]`` of ``z_y - z_i`` with the specification folded into the final
    linear ``step`` (+ batch norm) over the box ``[L, U]: [B, K]``; the ``y`` entry is 0."""
    w, b, rel_w, b_err = step.folded(stats)
    if b is None:
        b = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    if b_err is None:
        b_err = torch.zeros_like(b)
    dtype = L.dtype
    ws, bs = fold_margin_spec(w, b, y)  # [B, C, K], [B, C]
    w_err = gamma(2, dtype) * ws.abs()
    if rel_w:
        w_err = w_err + rel_w * (w[y].abs().unsqueeze(1) + w.abs().unsqueeze(0))
    b_errs = gamma(2, dtype) * bs.abs() + b_err[y].unsqueeze(1) + b_err.unsqueeze(0)
    c, rho = centre_radius(L, U)
    a = c.abs() + rho
    cen = torch.einsum("bck,bk->bc", ws, c) + bs
    rad = torch.einsum("bck,bk->bc", ws.abs(), rho)
    mag = torch.einsum("bck,bk->bc", ws.abs(), a)
    emag = torch.einsum("bck,bk->bc", w_err, a)
    lo, _ = affine_box(cen, rad, mag, bs.abs(), b_errs + emag, int(w.shape[1]), 0.0, dtype)
    return zero_label_entry(lo, y)


# ----------------------------------------------------------------------------- entry point


def sound_ibp_bounds(plan: LayerPlan, mu: Tensor, r: Tensor, stats, y: Optional[Tensor] = None,
                     relu_bounds: Optional[List[Box]] = None,
                     check_y_range: Optional[Callable[[Tensor, int], None]] = None):
    """Rounding-sound IBP over ``plan`` for the input box ``(mu, r): [B, *in]``.

    Returns ``(lb, ub)`` of the outputs, or with ``y: [B]`` the margin lower bounds ``[B, C]``
    (``y`` entry 0). ``relu_bounds``: ReLU-input end points are appended (detached). Raises
    ``TypeError`` for dtypes other than fp32/fp64."""
    check_sound_dtype(mu.dtype)
    with torch.no_grad(), strict_float_mode():
        L, U = sound_input(mu.detach(), r.detach())
        final = plan.final_linear() if y is not None else None
        if final is not None:
            if check_y_range is not None:
                check_y_range(y, final.layer.weight.shape[0])
            L, U = sound_steps(plan.steps[:-1], L, U, stats, relu_bounds)
            if L.dim() != 2:
                raise ValueError(f"x: the last Linear expects a [B, {final.layer.in_features}] "
                                 f"input box, got shape {tuple(L.shape)}")
            return sound_margins_folded(final, L, U, stats, y)
        L, U = sound_steps(plan.steps, L, U, stats, relu_bounds)
        if y is None:
            return L, U
        if L.dim() != 2:
            raise ValueError(f"y: margins need logits of shape [B, C], but the model outputs "
                             f"shape {tuple(L.shape)}")
        if check_y_range is not None:
            check_y_range(y, L.shape[1])
        return zero_label_entry(down(L.gather(1, y[:, None]) - U), y)
