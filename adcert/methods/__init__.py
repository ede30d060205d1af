"""Training objectives, one module each, behind one interface (:mod:`adcert.methods.base`).

    from adcert.methods import get_method, StepState
    method = get_method("mtl-ibp", alpha=0.5, steps=1)
    out = method.loss(model, x, y, StepState(eps=eps_t, eps_target=eps))

Registered: ``ibp``, ``crown-ibp``, ``pgd`` and ``edac`` (teachers), ``mtl-ibp``, ``cc-ibp``,
``exp-ibp``, ``sabr``, ``taps``, ``staps``, ``adcert``, ``rslad-cert``, ``cc-dist`` (these three
need ``teacher=``), ``acert``, ``acert-fast``.
"""
from adcert.methods.base import METHODS, Method, MethodOutput, StepState, get_method, register
from adcert.methods import (  # noqa: F401  (registration)
    acert, adcert, cc_dist, crown_ibp, edac, ibp, mtl_ibp, pgd, sabr, taps,
)
from adcert.methods.regularizers import l1_penalty, warmup_regularizer

__all__ = ["METHODS", "Method", "MethodOutput", "StepState", "get_method", "register",
           "l1_penalty", "warmup_regularizer"]
