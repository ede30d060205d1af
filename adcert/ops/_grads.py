"""Helpers for the ops' backward functions."""
from __future__ import annotations

import functools

import torch


def box_backward(backward):
    """Wraps an op's ``backward(ctx, grad_mu, grad_r, *hidden)``. The ops run with
    ``ctx.set_materialize_grads(False)`` so that the hidden outputs of the fused ops (the
    pre-activations) never get zero-filled gradients. Then: no gradient for either visible
    output -> no gradient for any input; only one of them used -> the other is zeros."""

    @functools.wraps(backward)
    def wrapped(ctx, grad_mu, grad_r, *hidden):
        if grad_mu is None and grad_r is None:
            return (None,) * len(ctx.needs_input_grad)
        if grad_mu is None:
            grad_mu = torch.zeros_like(grad_r)
        elif grad_r is None:
            grad_r = torch.zeros_like(grad_mu)
        return backward(ctx, grad_mu, grad_r, *hidden)

    return wrapped


def eager_autograd_function(name: str, op, setup_context, backward):
    """An ``autograd.Function`` running ``op`` with the same ``setup_context``/``backward`` as
    its ``torch.library.register_autograd`` registration.

    The public wrappers call ops through it: torch.library's autograd path re-reads the op
    schema on every call (``fill_defaults``, ~0.3 ms for the fused ops' 14 arguments), which
    dominated small layers. Inside ``forward`` grad mode is off, so the op's registered autograd
    passes straight through; direct ``torch.ops.adcert.*`` calls keep the registered autograd.
    """

    def forward(ctx, *inputs):
        output = op(*inputs)
        setup_context(ctx, inputs, output)
        return output

    def _backward(ctx, *grads):
        return backward(ctx, *grads)

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(_backward)})
