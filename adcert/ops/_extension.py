"""Loads the compiled extension ``adcert._C`` (which registers the ``torch.ops.adcert.*`` schemas
and their CPU kernels) with an error that says how to fix a missing or mismatched build, and the
Triton CUDA kernels when triton and a GPU are present."""
from __future__ import annotations

import torch

_BUILD_HINT = (
    "Build it against the installed torch ({torch}) from the adcert checkout:\n"
    "    pip install --no-build-isolation -e .\n"
    "(install torch first: pip install torch==2.13.0; see README.md)."
)


def load_extension():
    try:
        from adcert import _C  # noqa: F401
    except ImportError as exc:
        msg = str(exc)
        if "undefined symbol" in msg or "version" in msg.lower():
            why = ("adcert._C was built against a different torch than the one installed "
                   f"({torch.__version__}): {msg}")
        else:
            why = f"the compiled extension adcert._C is missing or failed to load: {msg}"
        raise ImportError(why + "\n" + _BUILD_HINT.format(torch=torch.__version__)) from exc
    return _C


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def register_gpu_kernels() -> bool:
    """Registers the Triton implementations for the CUDA dispatch key; False when unavailable."""
    if not (torch.cuda.is_available() and triton_available()):
        return False
    from adcert.ops import _triton_impl

    _triton_impl.register_cuda_kernels()
    return True
