"""Differentiable interval ops on centre-radius boxes ``(mu, r)`` (TEMPORARY: reference-backed
until the compiled ops land)."""
from adcert.ops.reference import (  # noqa: F401
    interval_linear, interval_conv2d, interval_batch_norm, interval_relu,
    interval_linear_bn_relu, interval_conv2d_bn_relu,
)
from adcert.ops import reference  # noqa: F401
