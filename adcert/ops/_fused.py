"""Pieces shared by the affine-layer ops (``interval_{linear,conv2d}`` and their fused blocks
``interval_{linear,conv2d}_bn_relu``)."""
from __future__ import annotations

import torch


def fake_layer_backward(mu, r, weight, output_mask):
    """Fake (meta) result of ``interval_{linear,conv2d}_backward``: gradients of ``mu, r,
    weight`` and the bias ``[out]``; None where masked out."""
    g_in, g_w, g_b = output_mask
    return (torch.empty_like(mu) if g_in else None, torch.empty_like(r) if g_in else None,
            torch.empty_like(weight) if g_w else None,
            weight.new_empty(weight.shape[0]) if g_b else None)


def fake_block_backward(mu, r, weight, params, output_mask):
    """Fake (meta) result of a fused block's backward: gradients of ``mu, r, weight`` and of
    ``params = (bias, bn_mean, bn_var, bn_weight, bn_bias)``; None where masked out or absent."""
    g_in, g_w, g_p = output_mask
    grads = [None if (t is None or not g_p) else torch.empty_like(t) for t in params]
    return (torch.empty_like(mu) if g_in else None, torch.empty_like(r) if g_in else None,
            torch.empty_like(weight) if g_w else None, *grads)


def block_output_mask(needs_input_grad):
    """``[input grads, weight grad, parameter grads]`` from ``ctx.needs_input_grad`` of a fused
    op whose inputs start ``mu, r, weight, bias, bn_mean, bn_var, bn_weight, bn_bias``."""
    need = needs_input_grad
    return [need[0] or need[1], need[2], any(need[3:8])]
