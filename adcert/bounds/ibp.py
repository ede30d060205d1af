"""Interval bound propagation over a :class:`~adcert.bounds.plan.LayerPlan`: the one driver.

Boxes are centre-radius ``(mu, r)`` (DESIGN.md section 3). Each step applies its own rule
(:meth:`~adcert.bounds.layers.base.Node.ibp`): a fused conv/linear + BN + ReLU step is a single
call of a public :mod:`adcert.ops` op (looked up at call time, so whichever backend it exports --
reference or compiled -- is used); Normalize, reshapes, pooling and arithmetic with constants are
exact and cheap in plain torch; a residual join sums its branches' boxes.

No host synchronisation happens here.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from adcert.bounds.layers.base import IbpCtx, Node, Stats, ibp_steps_ctx
from adcert.bounds.layers.dense import AffineStep, conv_padding  # noqa: F401 (re-exported)
from adcert.bounds.layers.relu import shrunk_relu  # noqa: F401 (re-exported)
from adcert.bounds.plan import LayerPlan

Tensor = torch.Tensor
Box = Tuple[Tensor, Tensor]


def ibp_steps(steps: Sequence[Node], mu: Tensor, r: Tensor, stats: Stats,
              relu_bounds: Optional[List[Box]] = None, relu_shrink: float = 1.0) -> Box:
    """Propagate the box ``(mu, r)`` through ``steps``; ``stats`` holds ``(mean, var)`` for every
    batch norm among them (see :func:`adcert.bounds.forward.resolve_bn_stats`).

    ``relu_bounds``: if a list, ``(lb, ub)`` of every activation's input (ReLU, and Sigmoid/Tanh/
    MaxPool where present) is appended to it, in order (differentiable). ``relu_shrink``: every
    ReLU is :func:`shrunk_relu` with this ratio (1: plain IBP). With either, fused steps run their
    ReLU as a separate op, which is slower: use them only when needed (e.g. the warm-up
    regularisers, SABR's shrink)."""
    return ibp_steps_ctx(steps, mu, r, IbpCtx(stats, relu_bounds, relu_shrink))


def ibp_forward(plan: LayerPlan, mu: Tensor, r: Tensor, stats: Stats,
                relu_bounds: Optional[List[Box]] = None, relu_shrink: float = 1.0) -> Box:
    """The output box ``(mu, r)`` of the whole plan for the input box ``(mu, r): [B, *in]``
    (``relu_bounds``, ``relu_shrink``: see :func:`ibp_steps`)."""
    return ibp_steps(plan.steps, mu, r, stats, relu_bounds, relu_shrink)


def effective_linear(step: AffineStep, stats: Stats) -> Tuple[Tensor, Tensor]:
    """A final ``Linear`` (+ batch norm) step as one affine map ``z = W h + b``;
    ``W: [C, K]``, ``b: [C]`` (the batch norm folded in with its resolved statistics)."""
    return step.effective_linear(stats)
