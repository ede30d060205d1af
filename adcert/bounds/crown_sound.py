"""``sound=True`` for the CROWN family: back-substitution that is rigorous in floating point.

The bound returned contains the bound of the REAL-arithmetic network (the model's parameters
taken as exact numbers; batch-norm and Normalize coefficients, which the model itself computes
with rounding, are given an interval of relative width ``gamma_c``) over the real input box.

Scheme. ``u`` is the unit roundoff of the dtype, ``gamma_k = k u / (1 - k u)``; every error term
below is computed in floating point, doubled (which covers its own rounding, as long as
``gamma < 1/2``) and increased by ``k * tiny`` (``tiny`` = smallest normal number: underflow);
every update of the running constant is rounded down with ``nextafter(., -inf)``.

* Boxes. A sound IBP pass (lower/upper form) gives a box ``[l_h, u_h]`` at the input of every
  primitive op: ``W+ l + W- u + b`` minus ``gamma_{k+2+c} (|W| m + |b|)``, ``m = max(|l|, |u|)``
  (``c``: roundings in the op's coefficients); ReLU and reshapes are exact. The input box is
  ``(mu, r)`` widened by ``4u (|mu| + r)`` (the rounding of the centre-radius form).
* Affine op ``z = W h + b`` (``k``-term dot products): the computed ``A' = fl(A W)`` differs from
  the exact product by ``|E| <= gamma_{k+c} |A| |W|``, and ``h`` lies in its box, so
  ``A . z >= A' . h + fl(A . b) - gamma_{k+c} (|A||W|) . m_h - gamma_{n+c} |A| . |b|``
  (``n`` = terms in ``A . b``; ``|b|`` is an upper bound of the magnitudes summed into ``b``).
* ReLU: the chord slope and intercept are rounded UP (``(1 + 4u)`` factors: any larger slope
  through ``(l, 0)`` and any larger intercept is still an upper line on ``[l, u]``); lower slopes
  are in ``[0, 1]``, exactly valid. One rounding per entry of ``A'``:
  ``A . relu(z) >= A' . z + fl(c) - gamma_2 |A'| . m_z - gamma_{n+1} |c terms|``.
* Concretisation over the input box: ``fl(A+ . L + A- . U) - gamma_{n+1} |A| . max(|L|, |U|)``.

TF32 (CUDA matmul and cuDNN), reduced-precision fp32 matmul and oneDNN (mkldnn, which may use
Winograd convolutions) are disabled while a sound bound is computed; the remaining kernels sum
products in some order, which ``gamma_k`` covers. Only float32 and float64 are accepted.
alpha-CROWN optimises its slopes without the error terms, then evaluates the best slopes soundly.
The sound result is detached from the parameters for every method (certification only).
"""
from __future__ import annotations

import contextlib
import warnings
from functools import partial
from typing import List, Optional, Tuple

import torch

from adcert.bounds.linear_relax import AffineOp, Lowered, ReluOp, lower_plan, relu_lines

Tensor = torch.Tensor
Box = Tuple[Tensor, Tensor]


@contextlib.contextmanager
def exact_float_mode():
    """Disable TF32, reduced-precision fp32 matmul and oneDNN for the duration; restore after."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        with warnings.catch_warnings():  # torch warns about oneDNN TF32 on Intel GPUs
            warnings.simplefilter("ignore", UserWarning)
            ctx = torch.backends.mkldnn.flags(enabled=False)
            ctx.__enter__()
        try:
            yield
        finally:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                ctx.__exit__(None, None, None)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def unit_roundoff(dtype) -> float:
    return torch.finfo(dtype).eps / 2


def gamma(k: int, dtype) -> float:
    """``gamma_k = k u / (1 - k u)`` (raises if ``k u >= 1/2``, where the doubling argument
    fails)."""
    ku = k * unit_roundoff(dtype)
    if ku >= 0.5:
        raise ValueError(f"sound: dot products of length {k} are too long for {dtype} "
                         "(k * u >= 1/2)")
    return ku / (1 - ku)


def down(t: Tensor) -> Tensor:
    """The next float below ``t`` (a lower bound of the exact result of one rounded op)."""
    return torch.nextafter(t, torch.full_like(t, -float("inf")))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _bias_map(op: AffineOp, t: Tensor, ndim: int) -> Tensor:
    """A per-output bias vector reshaped to broadcast over ``[N, *out_shape]``."""
    if op.kind == "linear":
        return t
    return t.reshape((1, -1) + (1,) * (ndim - 2))


def _bias_mag(op: AffineOp) -> Optional[Tensor]:
    if op.bias is None:
        return None
    return op.bias_mag if op.bias_mag is not None else op.bias.abs()


def sound_ibp(low: Lowered, L: Tensor, U: Tensor) -> List[Box]:
    """Rigorous boxes ``[(l, u)]`` at the input of every op of ``low`` and, last, its output."""
    boxes = [(L, U)]
    tiny = torch.finfo(L.dtype).tiny
    for op in low.ops:
        if isinstance(op, ReluOp):
            L, U = L.clamp(min=0), U.clamp(min=0)
        elif op.kind == "reshape":
            L, U = op.forward(L), op.forward(U)
        else:
            w = op.weight
            wp, wn = w.clamp(min=0), w.clamp(max=0)
            lo = op.forward(L, wp, bias=False) + op.forward(U, wn, bias=False)
            hi = op.forward(U, wp, bias=False) + op.forward(L, wn, bias=False)
            m = torch.maximum(L.abs(), U.abs())
            k = op.dot_length + 2 + op.coef_rel_err
            size = op.forward(m, w.abs(), bias=False)
            if op.bias is not None:
                b = _bias_map(op, op.bias, lo.dim())
                lo, hi = lo + b, hi + b
                size = size + _bias_map(op, _bias_mag(op), lo.dim())
            err = 2 * gamma(k, L.dtype) * size + k * tiny
            L = down(down(lo) - err)
            U = -down(down(-hi) - err)
        boxes.append((L, U))
    return boxes


def _abs_sum(t: Tensor) -> Tensor:
    return t.flatten(2).sum(-1)


def sound_concretize(A: Tensor, L: Tensor, U: Tensor) -> Tensor:
    """A rigorous lower bound ``[B, S]`` of ``A . x`` over ``L <= x <= U``."""
    Af = A.flatten(2)
    val = (torch.einsum("bsk,bk->bs", Af.clamp(min=0), L.flatten(1))
           + torch.einsum("bsk,bk->bs", Af.clamp(max=0), U.flatten(1)))
    m = torch.maximum(L.abs(), U.abs()).flatten(1)
    n = Af.shape[-1]
    err = 2 * gamma(2 * n + 1, A.dtype) * torch.einsum("bsk,bk->bs", Af.abs(), m)
    return down(down(val) - (err + n * torch.finfo(A.dtype).tiny))


def sound_backward(low: Lowered, end: int, A: Tensor, mu, r, relu_box: List[Box],
                   alphas=None, *, in_boxes: List[Box]) -> Tensor:
    """The rigorous twin of :func:`adcert.bounds.linear_relax.backward_lower` (same arguments;
    ``in_boxes`` from :func:`sound_ibp`; the input box is ``in_boxes[0]``, ``mu, r`` unused)."""
    dtype = A.dtype
    tiny = torch.finfo(dtype).tiny
    u_r = unit_roundoff(dtype)
    const = A.new_zeros(A.shape[:2])
    for i in range(end - 1, -1, -1):
        op = low.ops[i]
        lo_h, up_h = in_boxes[i]
        if isinstance(op, ReluOp):
            lo, up = relu_box[op.index]
            m_h = torch.maximum(lo.abs(), up.abs()).unsqueeze(1)
            active, unstable, slope, icpt = relu_lines(lo, up)
            slope = torch.where(unstable, slope * (1 + 4 * u_r), slope)
            icpt = torch.where(unstable, (-lo * slope) * (1 + 4 * u_r), icpt)
            alpha = None if alphas is None else alphas.get(op.index)
            if alpha is None:
                alpha = (up >= -lo).to(dtype).unsqueeze(1)
            lo_slope = torch.where(unstable.unsqueeze(1), alpha.clamp(0, 1),
                                   active.unsqueeze(1).to(dtype))
            neg = A.clamp(max=0)
            A_new = A.clamp(min=0) * lo_slope + neg * slope.unsqueeze(1)
            terms = neg * icpt.unsqueeze(1)
            n = _numel(op.shape)
            c = _abs_sum(terms)
            err = 2 * (gamma(2, dtype) * _abs_sum(A_new.abs() * m_h)
                       + gamma(n + 1, dtype) * _abs_sum(terms.abs())) + 2 * n * tiny
        elif op.kind == "reshape":
            A_new, c, err = op.backward(A), None, None
        else:
            A_new = op.backward(A)
            m_h = torch.maximum(lo_h.abs(), up_h.abs()).unsqueeze(1)
            absA = A.abs()
            k = op.dot_length + op.coef_rel_err + 1
            err = 2 * gamma(k, dtype) * _abs_sum(op.backward(absA, op.weight.abs()) * m_h)
            c = op.bias_term(A)
            n_in = _numel(op.in_shape)
            if c is not None:
                n = _numel(op.out_shape) + op.coef_rel_err + 1
                err = err + 2 * gamma(n, dtype) * op.bias_term(absA, magnitude=True)
            err = err + 2 * (n_in + _numel(op.out_shape)) * tiny
        if c is not None:
            const = down(const + c)
        if err is not None:
            const = down(const - err)
        A = A_new
    L, U = in_boxes[0]
    return down(sound_concretize(A, L, U) + const)


def _widened_input(mu: Tensor, r: Tensor) -> Box:
    u_r = unit_roundoff(mu.dtype)
    slack = 4 * u_r * (mu.abs() + r) + torch.finfo(mu.dtype).tiny
    L = down(down(mu - r) - slack)
    U = -down(down(-(mu + r)) - slack)
    return L, U


def _check_sound_steps(plan, method: str) -> None:
    """Refuse the traced-graph steps the rigorous back-substitution does not cover yet."""
    from adcert.bounds.plan import AvgPoolStep, ResidualStep, iter_steps
    for step in iter_steps(plan.steps):
        if isinstance(step, (ResidualStep, AvgPoolStep)):
            raise NotImplementedError(
                f"sound: the plan step {type(step).__name__} is not supported by method "
                f"{method!r} with sound=True yet (use sound=False)")


def run_sound(plan, mu: Tensor, r: Tensor, stats, request, method: str, opts: dict):
    """``compute_bounds(..., method, sound=True)`` for the CROWN family (see the module doc)."""
    from adcert.bounds import crown as cr
    if mu.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"sound: needs float32 or float64 inputs and model, got {mu.dtype}")
    _check_sound_steps(plan, method)
    with exact_float_mode(), torch.no_grad():
        mu, r = mu.detach(), r.detach()
        low = lower_plan(plan, stats, tuple(mu.shape[1:]), mu.dtype, mu.device, method,
                         fold_bn=False, detach=True)
        spec, kind = cr.build_spec(request, low.out_shape, mu)
        spec = spec.detach()
        splits = cr.check_splits(opts.get("splits"), low, mu.shape[0])
        L, U = _widened_input(mu, r)
        in_boxes = sound_ibp(low, L, U)
        ibp_relu = [in_boxes[at] for at in low.relu_at]
        backward = partial(sound_backward, in_boxes=in_boxes)
        if method == "crown-ibp":
            boxes = [cr.apply_split(b, None if splits is None else splits.get(k))
                     for k, b in enumerate(ibp_relu)]
        else:
            boxes = cr.crown_intermediate(low, mu, r, ibp_relu, splits,
                                          opts["max_spec_elements"], backward)
        end = len(low.ops)
        alphas = None
        if method == "alpha-crown":
            from adcert.bounds.alpha_crown import optimize_alpha
            _, alphas = optimize_alpha(low, end, spec, mu, r, boxes, opts)
        lb = backward(low, end, spec, mu, r, boxes, alphas)
        if method != "crown-ibp":
            lb = torch.maximum(lb, sound_concretize(spec, *in_boxes[-1]))
    if request.relu_bounds is not None:
        request.relu_bounds.extend(boxes)
    return cr.format_result(lb, kind, request, low.out_shape)
