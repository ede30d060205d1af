"""Lowering a plan for back-substitution: every step's :meth:`~adcert.bounds.layers.base.Node.lower`
appends its primitive pieces (:mod:`adcert.bounds.layers`) to one
:class:`~adcert.bounds.layers.base.Lowered` network, which the one backward walk
(:func:`adcert.bounds.backward.backward_lower`) runs over.

A batch norm after a conv/linear is folded into it (exact in real arithmetic) unless
``fold_bn=False`` (the sound mode keeps it separate, see :mod:`adcert.bounds.crown_sound`).
"""
from __future__ import annotations

from typing import Tuple

from adcert.bounds.backward import backward_lower, concretize_lower  # noqa: F401 (re-exported)
from adcert.bounds.layers.base import Lowered, Lowerer, Node
from adcert.bounds.layers.relu import adaptive_alpha, relu_backward, relu_lines  # noqa: F401
from adcert.bounds.plan import LayerPlan

__all__ = ["lower_plan", "Lowered", "backward_lower", "concretize_lower", "relu_lines",
           "adaptive_alpha", "relu_backward"]


def _unsupported(step, method: str) -> NotImplementedError:
    from adcert.bounds.registry import supported_text
    return NotImplementedError(f"model: the plan step {type(step).__name__} is not supported by "
                               f"method {method!r}; {supported_text()}")


def lower_plan(plan: LayerPlan, stats, in_shape: Tuple[int, ...], dtype, device, method: str,
               fold_bn: bool = True, detach: bool = False) -> Lowered:
    """Lower ``plan`` to pieces for inputs of one-sample shape ``in_shape``.

    ``stats``: resolved batch-norm statistics (as for IBP); ``detach``: cut the parameters out of
    the autograd graph (certification). Raises ``NotImplementedError`` naming an unknown step
    type and ``method``."""
    lw = Lowerer(stats, in_shape, dtype, device, method, fold_bn=fold_bn, detach=detach)
    for step in plan.steps:
        if not isinstance(step, Node):
            raise _unsupported(step, method)
        step.lower(lw)
    return lw.result()
