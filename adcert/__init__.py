"""adcert: certified training and certification with a compiled interval-bound core.

Public entry points:

* :mod:`adcert.ops` -- differentiable interval ops on centre-radius boxes ``(mu, r)``
  (C++ kernels on CPU, Triton kernels on CUDA, a plain-torch reference in ``adcert.ops.reference``,
  which the ops run when the extension ``adcert._C`` is not built);
* :mod:`adcert.bounds` -- whole-model bounds (``compute_bounds``);
* :mod:`adcert.models` -- the Normalize layer and the standard certified-training architectures;
* :func:`certified_radius` (:mod:`adcert.radius`) -- batched per-sample certified radii (ACERT);
  :mod:`adcert.metrics` -- ACR, ART, certified accuracy over eps.
"""
__version__ = "0.1.0"

from adcert import ops  # noqa: E402,F401  (loads adcert._C if built; else the reference ops)
from adcert.radius import certified_radius  # noqa: E402,F401
