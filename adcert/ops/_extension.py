"""The compiled extension ``adcert._C`` (it defines the ``torch.ops.adcert.*`` schemas and their
C++ CPU kernels), loaded lazily, and the Triton CUDA kernels when triton and a GPU are present.

Which path the public ops take (:func:`status`, shown by ``adcert info``):

* ``"compiled"``: ``adcert._C`` loads. The ops are ``torch.library`` custom ops with fake kernels
  and registered autograd; CPU tensors run the C++ kernels, CUDA tensors the Triton kernels.
* ``"reference"``: ``adcert._C`` was never built (an install without a compiler). ``import adcert``
  works, and each public op in :mod:`adcert.ops` runs its plain-torch reference
  (:mod:`adcert.ops.reference`: same signatures and argument checks, ordinary autograd, slower),
  with ONE :class:`ExtensionMissingWarning` per process that says how to build it. The
  ``torch.ops.adcert.*`` custom ops do not exist then.
* ``"broken"``: an ``adcert._C`` file exists but does not load -- typically built against another
  torch. ``import adcert`` still works (models, data), but every op raises the ImportError that
  says how to rebuild: a stale build is an install error, not a reason to run 10x slower with
  other rounding than the runs (and checkpoints) made with the compiled kernels.
"""
from __future__ import annotations

import importlib.util
import warnings
from typing import Any, Callable, Optional

import torch

_BUILD_HINT = (
    "Build it against the installed torch ({torch}) from the adcert checkout:\n"
    "    pip install --no-build-isolation -e .\n"
    "(install torch first: pip install torch==2.13.0; see README.md)."
)


class ExtensionMissingWarning(RuntimeWarning):
    """``adcert._C`` is not built: the ops run their plain-torch reference."""


def _load_error(exc: ImportError) -> ImportError:
    msg = str(exc)
    if "undefined symbol" in msg or "version" in msg.lower():
        why = ("adcert._C was built against a different torch than the one installed "
               f"({torch.__version__}): {msg}")
    else:
        why = f"the compiled extension adcert._C is missing or failed to load: {msg}"
    return ImportError(why + "\n" + _BUILD_HINT.format(torch=torch.__version__))


def load_extension():
    """``adcert._C``; an ImportError that says how to build it when it is missing or does not
    load (the ops do not need it: see the module docstring)."""
    try:
        from adcert import _C  # noqa: F401
    except ImportError as exc:
        raise _load_error(exc) from exc
    return _C


def _never_built() -> bool:
    """No ``adcert._C`` module to load at all (as opposed to one that fails to load)."""
    try:
        return importlib.util.find_spec("adcert._C") is None
    except (ImportError, ValueError):
        return True


_state: Optional[tuple] = None  # (status, adcert._C or the load error), set on first use
_warned = False


def status() -> str:
    """``"compiled"``, ``"reference"`` or ``"broken"`` (see the module docstring); the extension
    is imported on the first call."""
    global _state
    if _state is None:
        try:
            _state = ("compiled", load_extension())
        except ImportError as err:
            _state = ("reference" if _never_built() else "broken", err)
    return _state[0]


def compiled() -> bool:
    """Whether ``adcert._C`` is loaded (the ops are the compiled custom ops)."""
    return status() == "compiled"


def describe() -> str:
    """One line for ``adcert info``: the active path and why."""
    kind = status()
    if kind == "compiled":
        return f"compiled (adcert._C: {_state[1].__file__})"
    if kind == "reference":
        return ("reference (plain torch, slower: adcert._C is not built; build it with "
                "pip install --no-build-isolation -e .)")
    return "unavailable (" + " ".join(str(_state[1]).split()) + ")"


def reference_op(name: str) -> Callable[..., Any]:
    """The plain-torch ``adcert.ops.reference.<name>`` that a public op runs when ``adcert._C``
    is not loaded: warns once per process when it was never built; raises the load error (how to
    rebuild) when it is broken."""
    global _warned
    if status() == "broken":
        raise ImportError(str(_state[1]))
    if not _warned:
        _warned = True
        warnings.warn(
            "adcert._C (the compiled kernels) is not built: the adcert ops run their plain-torch "
            "reference (adcert.ops.reference), which is correct but slower. To build it, run "
            "`pip install --no-build-isolation -e .` in the adcert checkout (needs a C++ "
            "compiler); `adcert info` shows the active path.",
            ExtensionMissingWarning, stacklevel=3)
    from adcert.ops import reference

    return getattr(reference, name)


def op(name: str):
    """``torch.ops.adcert.<name>`` when ``adcert._C`` is loaded (it defines the schema), else
    None."""
    return getattr(torch.ops.adcert, name) if compiled() else None


def register_fake(name: str):
    """``@torch.library.register_fake("adcert::<name>")`` when ``adcert._C`` is loaded; without
    it there is no op to register for, and the function is returned as is."""
    if compiled():
        return torch.library.register_fake(f"adcert::{name}")
    return lambda fn: fn


def register_autograd(name: str, backward, setup_context) -> None:
    """``torch.library.register_autograd`` for ``adcert::<name>`` when ``adcert._C`` is
    loaded."""
    if compiled():
        torch.library.register_autograd(f"adcert::{name}", backward,
                                        setup_context=setup_context)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def register_gpu_kernels() -> bool:
    """Registers the Triton implementations for the CUDA dispatch key; False when unavailable
    (no GPU, no triton, or no ``adcert._C`` to define the ops)."""
    if not (torch.cuda.is_available() and triton_available() and compiled()):
        return False
    from adcert.ops import _triton_impl

    _triton_impl.register_cuda_kernels()
    return True
