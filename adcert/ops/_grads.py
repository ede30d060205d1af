"""Helpers for the ops' backward functions."""
from __future__ import annotations

import torch


def materialize(grad_mu, grad_r):
    """The ops run with ``ctx.set_materialize_grads(False)`` so that the hidden outputs of the
    fused ops (the pre-activations) never get zero-filled gradients. When only one of the two
    visible outputs was used, the other gradient arrives as None: make it zeros here (the
    callers return early when both are None)."""
    if grad_mu is None:
        grad_mu = torch.zeros_like(grad_r)
    elif grad_r is None:
        grad_r = torch.zeros_like(grad_mu)
    return grad_mu, grad_r
