"""Training objectives, one module each, behind one interface (:mod:`adcert.methods.base`).

    from adcert.methods import get_method, StepState
    method = get_method("mtl-ibp", alpha=0.5, steps=1)
    out = method.loss(model, x, y, StepState(eps=eps_t, eps_target=eps))

Registered: ``ibp``, ``pgd`` (teachers), ``mtl-ibp``, ``cc-ibp``, ``exp-ibp``, ``sabr``,
``adcert``, ``rslad-cert`` (these two need ``teacher=``), ``acert``, ``acert-fast``.
"""
from adcert.methods.base import METHODS, Method, MethodOutput, StepState, get_method, register
from adcert.methods import acert, adcert, ibp, mtl_ibp, pgd, sabr  # noqa: F401  (registration)
from adcert.methods.regularizers import l1_penalty, warmup_regularizer

__all__ = ["METHODS", "Method", "MethodOutput", "StepState", "get_method", "register",
           "l1_penalty", "warmup_regularizer"]
