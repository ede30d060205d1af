"""Arithmetic with constants: ``x + c``, ``x - c``, ``c - x``, ``x * c``, ``x / c``, ``-x`` where
``c`` is a number, a buffer or parameter of the model, or anything computed from those alone
(``self.mean.view(1, 3, 1, 1)``), broadcast per element or per channel over one sample. A user's
normalisation module ``(x - self.mean) / self.std`` is traced into two of these steps.

The constant is read from the model at every pass (a learnable scale trains). It must broadcast
over ONE sample: shape ``[*s]`` or ``[1, *s]`` with ``s`` broadcastable to the sample's shape
without enlarging it.

* IBP (centre-radius, exact): ``(mu + c, r)``, ``(mu - c, r)``, ``(c - mu, r)``, ``(-mu, r)``,
  ``(mu c, r |c|)``, ``(mu / c, r / |c|)``.
* Sound IBP (end points; each operation is one correctly rounded op per entry, pushed outward):
  ``down(L + c), up(U + c)``; for ``* c`` and ``/ c`` the min/max of the two end points' images.
* Lowered to an :class:`~adcert.bounds.layers.affine_piece.ElementwisePiece`
  ``z = h * w + b``: ``x / c`` has ``w = fl(1 / c)``, one rounding charged in sound mode.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from adcert.bounds.layers.affine_piece import ElementwisePiece
from adcert.bounds.layers.base import Box, ForwardCtx, IbpCtx, Lowerer, Node, Tensor
from adcert.bounds.registry import BATCH, unsupported_call
from adcert.ops._rounding import down, up


class Const:
    """A constant operand, evaluated at every pass: ``fn()`` gives a tensor or a number;
    ``text`` describes it in errors."""

    def __init__(self, fn: Callable[[], object], text: str):
        self.fn, self.text = fn, text

    def __call__(self):
        return self.fn()

    def __repr__(self) -> str:
        return f"Const({self.text})"


ARITH_FUNCTIONS = {
    operator.add: "add", operator.iadd: "add", torch.add: "add",
    operator.sub: "sub", operator.isub: "sub", torch.sub: "sub", torch.subtract: "sub",
    operator.mul: "mul", operator.imul: "mul", torch.mul: "mul", torch.multiply: "mul",
    operator.truediv: "div", operator.itruediv: "div", torch.div: "div",
    torch.true_divide: "div", operator.neg: "neg", torch.neg: "neg", torch.negative: "neg",
}
ARITH_METHODS = {"add": "add", "sub": "sub", "mul": "mul", "div": "div", "true_divide": "div",
                 "neg": "neg"}


@dataclass(frozen=True, eq=False)
class ArithStep(Node):
    """``op`` (``add``, ``sub``, ``rsub`` = ``c - x``, ``mul``, ``div``, ``neg``) with the
    constant ``const`` (``None`` for ``neg``)."""
    op: str
    const: Optional[Const] = None

    @staticmethod
    def from_call(op: str, args, kwargs, thread, value, what: str) -> "ArithStep":
        """The step of a traced call ``op(*args)`` in which ``thread`` (an fx node) is the traced
        tensor; ``value(arg)`` resolves the other operand."""
        if kwargs:
            raise unsupported_call(what, f"keyword arguments {sorted(kwargs)}")
        if op == "neg":
            return ArithStep("neg")
        if len(args) != 2:
            raise unsupported_call(what, "expected two operands")
        swapped = args[1] is thread
        other = value(args[0] if swapped else args[1])
        if other is BATCH or not (isinstance(other, Const) or
                                  (isinstance(other, (int, float)) and
                                   not isinstance(other, bool))):
            raise unsupported_call(what, f"the other operand {other!r} is not a constant")
        if not isinstance(other, Const):
            number = float(other)
            other = Const(lambda: number, repr(number))
        if swapped and op == "div":
            raise unsupported_call(what, "dividing a constant by the traced tensor is not linear")
        if swapped and op == "sub":
            op = "rsub"
        return ArithStep(op, other)

    def first_module(self):
        return None

    # -- the constant ----------------------------------------------------------------------
    def value(self, ref: Tensor) -> Tensor:
        """The constant as a tensor of ``ref``'s dtype/device, shaped for ONE sample
        (``[*s]``, a leading batch dimension of size 1 dropped); raises if it would broadcast
        over the batch or enlarge the sample."""
        c = self.const()
        c = torch.as_tensor(c, dtype=ref.dtype, device=ref.device)
        if c.dim() >= ref.dim():
            if c.dim() > ref.dim() or c.shape[0] != 1:
                raise ValueError(f"model: the constant {self.const.text} of shape "
                                 f"{tuple(c.shape)} does not broadcast over one sample of the "
                                 f"[B, *] = {tuple(ref.shape)} tensor it is combined with")
            c = c[0]
        sample = tuple(ref.shape[1:])
        try:
            ok = tuple(torch.broadcast_shapes(sample, tuple(c.shape))) == sample
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"model: the constant {self.const.text} of shape {tuple(c.shape)} "
                             f"does not broadcast over one sample of shape {sample}")
        return c

    # -- rules -----------------------------------------------------------------------------
    def forward(self, h: Tensor, ctx: ForwardCtx) -> Tensor:
        if self.op == "neg":
            return -h
        c = self.value(h)
        return {"add": operator.add, "sub": operator.sub, "mul": operator.mul,
                "div": operator.truediv}.get(self.op, lambda a, b: b - a)(h, c)

    def ibp(self, mu: Tensor, r: Tensor, ctx: IbpCtx) -> Box:
        op = self.op
        if op == "neg":
            return -mu, r
        c = self.value(mu)
        if op == "add":
            return mu + c, r
        if op == "sub":
            return mu - c, r
        if op == "rsub":
            return c - mu, r
        if op == "mul":
            return mu * c, r * c.abs()
        return mu / c, r / c.abs()

    def sound_ibp(self, L: Tensor, U: Tensor, ctx: IbpCtx) -> Box:
        op = self.op
        if op == "neg":
            return -U, -L
        c = self.value(L)
        if op == "add":
            return down(L + c), up(U + c)
        if op == "sub":
            return down(L - c), up(U - c)
        if op == "rsub":
            return down(c - U), up(c - L)
        if op == "div":
            if bool((c == 0).any()):
                raise ValueError(f"model: sound bounds of a division by {self.const.text}, "
                                 "which has zero entries")
            a, b = L / c, U / c
        else:
            a, b = L * c, U * c
        return down(torch.minimum(a, b)), up(torch.maximum(a, b))

    def lower(self, lw: Lowerer) -> None:
        op = self.op
        ref = lw.probe
        minus_one = torch.tensor(-1.0, dtype=lw.dtype, device=lw.device)
        if op == "neg":
            lw.add(ElementwisePiece(minus_one, None))
            return
        c = lw.detach(self.value(ref))
        piece = {"add": lambda: ElementwisePiece(None, c),
                 "sub": lambda: ElementwisePiece(None, -c),
                 "rsub": lambda: ElementwisePiece(minus_one, c),
                 "mul": lambda: ElementwisePiece(c, None),
                 "div": lambda: ElementwisePiece(1.0 / c, None, coef_rel_err=1)}[op]()
        lw.add(piece)
