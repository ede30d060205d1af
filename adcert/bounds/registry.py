"""The registry: which modules, functions and tensor methods the bound engine supports, and the
plan step (:class:`~adcert.bounds.layers.base.Node`) each becomes.

Each operation module of :mod:`adcert.bounds.layers` registers its own entries, so supporting a
new operation means writing one module there (and importing it in ``layers/__init__``):

* :func:`register_module` -- ``nn.Module`` classes; ``build(module)`` returns the step, ``None``
  to drop the module (the identity for bounds), or the module itself for the layers the plan
  fuses (conv/linear + batch norm + ReLU).
* :func:`register_call` -- functions (``F.relu``) and tensor methods (``".relu"``) applied to
  ONE traced tensor (the first argument); ``build(args, kwargs, what)`` gets the remaining
  arguments (constants) and returns the step (or a module to fuse).

The error for an unsupported node lists everything registered (:func:`supported_text`).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple, Type

from torch import nn

ModuleBuilder = Callable[[nn.Module], Any]
CallBuilder = Callable[[tuple, dict, str], Any]

MODULES: Dict[Type[nn.Module], ModuleBuilder] = {}
FUNCTIONS: Dict[Any, CallBuilder] = {}
METHODS: Dict[str, CallBuilder] = {}
_NAMES: List[str] = []  # function / method names, for error messages
# handled by the tracer itself (joins, arithmetic, shape reads); listed for error messages
TRACER_OPERATIONS = ("+, -, *, / and neg with constants or buffers (per element or channel)",
                     "a + b / torch.add / a - b of two traced tensors (residual join)",
                     "torch.cat along a feature dimension", ".contiguous()", "x.size(0)",
                     "x.shape[0]")


def register_module(*types: Type[nn.Module], build: ModuleBuilder = None):
    """Register module classes. ``build(module)`` gives the step (see the module docstring); as
    a decorator, the decorated callable is ``build``."""
    def deco(fn):
        for t in types:
            MODULES[t] = fn
        return fn
    if build is not None:
        return deco(build)
    return deco


def register_call(*targets, names: Tuple[str, ...] = ()):
    """Register functions (callables) and tensor methods (strings starting with ``"."``, e.g.
    ``".relu"``) with one builder (a decorator); ``names`` are shown in error messages (default:
    derived from the targets)."""
    def deco(fn):
        for t in targets:
            if isinstance(t, str):
                METHODS[t.lstrip(".")] = fn
            else:
                FUNCTIONS[t] = fn
        _NAMES.extend(names or [_label(t) for t in targets])
        return fn
    return deco


BATCH = object()  # the traced value of x.size(0) / x.shape[0]


def unsupported_call(what: str, why: str = "") -> NotImplementedError:
    """The error for an unsupported node ``what`` (with a reason), listing what is supported."""
    extra = f" ({why})" if why else ""
    return NotImplementedError(f"model: {what} is not supported by compute_bounds{extra}; "
                               f"{supported_text()}")


def _label(t) -> str:
    if isinstance(t, str):
        return f"{t}()"
    mod = getattr(t, "__module__", "") or ""
    prefix = "F." if "functional" in mod else "torch." if mod.startswith("torch") else ""
    return prefix + getattr(t, "__name__", repr(t))


def module_builder(module: nn.Module) -> Optional[ModuleBuilder]:
    """The builder of ``module``'s registered class, provided it keeps that class's forward (the
    engine never calls the module, so a subclass with its own forward would be silently
    mis-bounded); ``None`` if unsupported."""
    for cls, build in MODULES.items():
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return build
    return None


def supported_modules() -> Tuple[Type[nn.Module], ...]:
    return tuple(MODULES)


def supported_text() -> str:
    """``"supported modules: ...; supported functions: ..."`` for error messages."""
    mods = ", ".join(dict.fromkeys(c.__name__ for c in MODULES))
    calls = ", ".join(dict.fromkeys(_NAMES + list(TRACER_OPERATIONS)))
    return f"supported modules: {mods}; supported functions: {calls}"
