"""Triton kernels (the GPU fast path), installed as ``adcert.kernels``. Pure functions over
pointers: no autograd and no imports from ``adcert`` here."""
