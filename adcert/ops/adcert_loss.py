"""``adcert_loss``: the AD-CERT training loss (papers/ad-cert.txt eq. 10, DESIGN.md section 6),
fused into one op that also returns its gradients.

Per sample ``i`` (``s`` student logits on ``x_adv``, ``t`` teacher logits on clean ``x``, ``m``
IBP margin lower bounds, all ``[B, C]``)::

    KD(t || x) = tau^2 KL(softmax(t / tau) || softmax(x / tau))
    kd_i       = KD(t_i || s_i)                                        (AD-CERT)
               = (1 - adv_weight) KD(t_i || c_i) + adv_weight KD(t_i || s_i)
                                                  (RSLAD-CERT, when clean_logits c is given)
    ce_i       = logsumexp_j(-m_ij)   (= CE([0, -m_lb], y): m_iy is 0, compute_bounds(..., y=y))
    loss_i     = (1 - alpha) kd_i + alpha ce_i

The op computes the per-sample losses and their gradients w.r.t. ``s``, ``m`` (and ``c``) in
one pass (one row per task); the backward pass only scales the saved gradients by the incoming
per-sample gradient. The teacher takes no gradient.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from adcert.ops._checks import value_checks_enabled
from adcert.ops._grads import eager_autograd_function
from adcert.ops._extension import op, reference_op, register_autograd, register_fake

_op = op("adcert_loss")

REDUCTIONS = ("mean", "sum", "none")


@register_fake("adcert_loss")
def _fake(student, teacher, margin, clean, alpha, tau, adv_weight):
    torch._check(student.dim() == 2, lambda: "student must be [B, C]")
    loss = student.new_empty(student.shape[:1])
    g_c = torch.empty_like(student) if clean is not None else student.new_empty((0,))
    return loss, torch.empty_like(student), torch.empty_like(student), g_c


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    _, g_s, g_m, g_c = output
    ctx.has_clean = inputs[3] is not None
    ctx.save_for_backward(g_s, g_m, g_c)


def _backward(ctx, grad_loss, _g_s, _g_m, _g_c):
    # The gradient outputs are constants of the loss (no second-order terms).
    n = len(ctx.needs_input_grad)
    if grad_loss is None:
        return (None,) * n
    g_s, g_m, g_c = ctx.saved_tensors
    w = grad_loss.unsqueeze(1)
    need = ctx.needs_input_grad
    return (w * g_s if need[0] else None, None, w * g_m if need[2] else None,
            w * g_c if (ctx.has_clean and need[3]) else None, None, None, None)


_Function = eager_autograd_function("AdcertLoss", _op, _setup_context, _backward)
register_autograd("adcert_loss", _backward, _setup_context)


def _check_logits(name: str, t, ref: Optional[torch.Tensor]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name}: expected a float32 or float64 tensor, got dtype {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a [B, C] tensor, got shape {tuple(t.shape)}")
    if ref is not None:
        if t.shape != ref.shape:
            raise ValueError(f"{name}: expected the shape of student_adv_logits "
                             f"{tuple(ref.shape)}, got {tuple(t.shape)}")
        if t.dtype != ref.dtype:
            raise TypeError(f"{name}: expected the dtype of student_adv_logits ({ref.dtype}), "
                            f"got {t.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{name}: expected the device of student_adv_logits ({ref.device}), "
                             f"got {t.device}")
    elif t.shape[1] == 0:
        raise ValueError(f"{name}: expected at least one class, got shape {tuple(t.shape)}")


def _check_values(loss: torch.Tensor, named) -> None:
    """NaN in any input makes its rows' losses NaN: one check of the ``[B]`` losses (instead of a
    pass over every ``[B, C]`` input) and, only when it fires, a search for the culprit. CPU only
    (a check on a GPU would synchronise), and not while compiling or under
    ``value_checks(False)``."""
    if (loss.device.type != "cpu" or loss.numel() == 0 or torch.compiler.is_compiling()
            or not value_checks_enabled() or not bool(torch.isnan(loss).any())):
        return
    for name, t in named:
        if t is not None and bool(torch.isnan(t).any()):
            raise ValueError(f"{name}: contains NaN")
    for name, t in named:
        if t is not None and bool(torch.isinf(t).any()):
            raise ValueError(f"{name}: contains inf, which makes the loss NaN")
    raise ValueError("adcert_loss: the loss is NaN")  # pragma: no cover - not reachable


def _check_float(name: str, v, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(v).__name__}")
    v = float(v)
    ok = (v > lo if lo_open else v >= lo) and v <= hi
    if not ok or math.isnan(v):
        rng = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise ValueError(f"{name}: expected a value in {rng}, got {v!r}")
    return v


def adcert_loss(student_adv_logits: torch.Tensor, teacher_logits: torch.Tensor,
                margin_lb: torch.Tensor, alpha: float, tau: float = 1.0,
                reduction: str = "mean", clean_logits: Optional[torch.Tensor] = None,
                adv_weight: float = 5.0 / 6.0) -> torch.Tensor:
    """AD-CERT loss ``(1 - alpha) KD + alpha CE([0, -margin_lb], y)``.

    Args:
        student_adv_logits: ``[B, C]`` student logits on the adversarial input ``x_adv``.
        teacher_logits: ``[B, C]`` teacher logits on the clean input (takes no gradient).
        margin_lb: ``[B, C]`` lower bounds of ``z_y - z_j`` with ``0`` in the ``y`` entry (as
            returned by ``adcert.bounds.compute_bounds(..., y=y)``); the IBP term is
            ``logsumexp_j(-margin_lb_j)``, which needs no labels.
        alpha: weight of the IBP term, in ``[0, 1]``.
        tau: distillation temperature ``> 0``; the KL term is scaled by ``tau^2``.
        reduction: ``"mean"`` (over the batch), ``"sum"`` or ``"none"`` (``[B]``).
        clean_logits: ``[B, C]`` student logits on the clean input. When given, the KD term is
            RSLAD-CERT's ``(1 - adv_weight) KD(t || clean) + adv_weight KD(t || student_adv)``.
        adv_weight: RSLAD-CERT weight of the adversarial KD term, in ``[0, 1]`` (default 5/6;
            ignored without ``clean_logits``).
    """
    _check_logits("student_adv_logits", student_adv_logits, None)
    _check_logits("teacher_logits", teacher_logits, student_adv_logits)
    _check_logits("margin_lb", margin_lb, student_adv_logits)
    if clean_logits is not None:
        _check_logits("clean_logits", clean_logits, student_adv_logits)
    alpha = _check_float("alpha", alpha, 0.0, 1.0)
    tau = _check_float("tau", tau, 0.0, math.inf, lo_open=True)
    adv_weight = _check_float("adv_weight", adv_weight, 0.0, 1.0)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if _op is None:  # adcert._C not built: the plain-torch reference (adcert.ops._extension)
        loss = reference_op("adcert_loss")(student_adv_logits, teacher_logits, margin_lb, alpha,
                                           tau, "none", clean_logits, adv_weight)
    else:
        loss = _Function.apply(student_adv_logits, teacher_logits.detach(), margin_lb,
                               clean_logits, alpha, tau, adv_weight)[0]
    _check_values(loss, (("student_adv_logits", student_adv_logits),
                         ("teacher_logits", teacher_logits), ("margin_lb", margin_lb),
                         ("clean_logits", clean_logits)))
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
