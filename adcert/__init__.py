"""adcert: certified training and certification with a compiled interval-bound core.

Public entry points:

* :mod:`adcert.ops` -- differentiable interval ops on centre-radius boxes ``(mu, r)``
  (C++ kernels on CPU, Triton kernels on CUDA, a plain-torch reference in ``adcert.ops.reference``);
* :mod:`adcert.bounds` -- whole-model bounds (``compute_bounds``);
* :mod:`adcert.models` -- the Normalize layer and the standard certified-training architectures;
* :func:`certified_radius` (:mod:`adcert.radius`) -- batched per-sample certified radii (ACERT);
  :mod:`adcert.metrics` -- ACR, ART, certified accuracy over eps.
"""
__version__ = "0.1.0"

from adcert import ops  # noqa: E402,F401  (loads the compiled extension, with a clear error if absent)
from adcert.radius import certified_radius  # noqa: E402,F401
